"""Interoperability with the mail software a provider and a site already run.

Every test drives real programs on loopback and asserts byte-exact delivery:

  1. Postfix as the provider's MX relays the hosted domains to odmrd over
     LMTP (TCP, and odmrd's unix socket); mail is injected with swaks.
  2. Postfix hands the hosted domains to `odmrctl enqueue` through a pipe(8)
     transport running as an unprivileged user (odmrd runs as that user too).
  3. fetchmail as the site's ODMR client, in clear text and over TLS (see
     the note on fetchmail and STARTTLS below), delivering to a sink.
  4. odmr-fetch delivering into the site's Postfix (Maildir), in clear text
     and with verified STARTTLS between odmr-fetch and odmrd.

A missing peer program (postfix, swaks, fetchmail, openssl) is a failure,
never a skip.  Every Postfix instance is stopped (and its processes killed)
in a finally block; every wait is bounded.
"""

import email
import email.policy
import os
import pwd
import select
import shutil
import socket
import ssl
import sys
import threading
import time

from harness import (check, fail, need, received_header, strip_received,
                     wait_for)
from sink import Sink

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from postfix_instance import PostfixInstance, PostfixError  # noqa: E402

SENDER = "sender@remote.test"
ALICE_PW = "secret"            # harness Env.setup_accounts()
EX_NOUSER = 67


# --------------------------------------------------------------------------
# test messages

LONG_LINE = ("long line " + "0123456789" * 88).encode()     # 890 octets


def original(marker, to="u1@example.org"):
    """A message (CRLF) with what breaks careless relays: leading dots (one,
    two, a lone dot), a 'From ' line, trailing white space, a tab, 8-bit
    UTF-8, an empty line inside the body, a long (but < 998) line and no
    Received: header of its own.  Fully qualified addresses and a Date and
    Message-ID, so that Postfix has nothing to add or rewrite."""
    return (b"Message-ID: <" + marker.encode() + b"@remote.test>\r\n"
            b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            b"From: Sender <" + SENDER.encode() + b">\r\n"
            b"To: " + to.encode() + b"\r\n"
            b"Subject: interop " + marker.encode() + b"\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"
            b"\r\n"
            b".leading dot\r\n"
            b"..two leading dots\r\n"
            b".\r\n"
            b"From the start of a line\r\n"
            b"trailing spaces   \r\n"
            b"\ttab-indented\r\n"
            + "8bit: caf\u00e9 \u00fc \u20ac\r\n".encode("utf-8") +
            b"\r\n" + LONG_LINE + b"\r\n"
            b"MARKER " + marker.encode() + b"\r\n"
            b"last line\r\n")


def bulk(marker, size=2 * 1024 * 1024, to="big@example.org"):
    """A large message (about `size` octets) whose lines have every length
    from 0 to 996, with a leading dot, two dots or a lone dot every few
    lines, so that dot-stuffing and line ends fall on every possible
    position of the peers' buffers."""
    head = (b"Message-ID: <" + marker.encode() + b"@remote.test>\r\n"
            b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            b"From: Sender <" + SENDER.encode() + b">\r\n"
            b"To: " + to.encode() + b"\r\n"
            b"Subject: interop " + marker.encode() + b"\r\n\r\n")
    pattern = b"abcdefghijklmnopqrstuvwxyz0123456789-_=+ " * 25
    parts, total, i = [head], len(head), 0
    while total < size:
        n = (i * 7919) % 997
        if i % 13 == 0:
            line = b"."
        elif i % 11 == 0:
            line = (b".." + pattern)[:max(n, 2)]
        elif i % 5 == 0:
            line = (b"." + pattern)[:max(n, 1)]
        else:
            line = pattern[i % 41:i % 41 + n]
        parts.append(line + b"\r\n")
        total += len(line) + 2
        i += 1
    parts.append(b"MARKER " + marker.encode() + b"\r\n")
    return b"".join(parts)


def marker_of(data):
    i = data.find(b"\r\nMARKER ")
    if i < 0:
        return None
    return data[i + 9:data.index(b"\r\n", i + 9)].decode()


def lf(data):
    return data.replace(b"\r\n", b"\n")


def diff_hint(sent, got):
    """Where two byte strings first differ, for failure messages."""
    n = 0
    while n < min(len(sent), len(got)) and sent[n] == got[n]:
        n += 1
    return ("first difference at octet %d (sent %d, got %d octets):\n"
            "  sent ...%r\n  got  ...%r" % (n, len(sent), len(got),
                                            sent[max(0, n - 40):n + 60],
                                            got[max(0, n - 40):n + 60]))


def check_exact(sent, got, what):
    if sent != got:
        fail("%s is not byte-exact; %s" % (what, diff_hint(sent, got)))


def header_fields(data, eol):
    """Splits the header section of data into [(name lower-case, raw field
    with continuation lines and line ends)] and returns (fields, offset of
    the first octet after the last field taken)."""
    fields, pos = [], 0
    while pos < len(data):
        if data[pos:pos + len(eol)] == eol:          # end of header
            break
        end = data.find(eol, pos)
        if end < 0:
            break
        nxt = end + len(eol)
        while data[nxt:nxt + 1] in (b" ", b"\t"):
            end = data.find(eol, nxt)
            if end < 0:
                fail("unterminated folded header field")
            nxt = end + len(eol)
        field = data[pos:nxt]
        colon = field.find(b":")
        if colon <= 0:
            break
        fields.append((field[:colon].strip().lower().decode("ascii", "replace"),
                       field))
        pos = nxt
    return fields


def strip_prepended(data, names, eol):
    """Removes the leading header fields of data as long as they are, in
    order, the fields named in `names` (a list of lower-case names; each
    must be present).  Returns (the removed fields {name: [field...]},
    the rest)."""
    fields = header_fields(data, eol)
    if len(fields) < len(names):
        fail("message has %d header fields, expected at least the %d "
             "prepended ones %r: %r" % (len(fields), len(names), names,
                                       data[:400]))
    got = {}
    pos = 0
    for want, (name, raw) in zip(names, fields):
        if name != want:
            fail("prepended header fields are %r, expected %r; message "
                 "starts %r" % ([n for n, _ in fields[:len(names)]], names,
                                data[:600]))
        got.setdefault(name, []).append(raw)
        pos += len(raw)
    return got, data[pos:]


def value(field):
    """The unfolded value of a raw header field."""
    v = field.split(b":", 1)[1]
    return b" ".join(v.split()).decode("utf-8", "replace")


# --------------------------------------------------------------------------
# peers

def swaks_send(env, port, rcpts, data, sender=SENDER, helo="remote.test",
               name="msg"):
    """Injects one message with swaks (which dot-stuffs and ends the data
    itself).  Returns swaks' stdout."""
    swaks = need("swaks")
    check(b"%" not in data, "swaks would expand %TOKENS% in the data")
    check(data.endswith(b"\r\n"), "message data must end with CRLF")
    path = env.path("swaks-%s.eml" % name)
    with open(path, "wb") as f:
        # swaks ends the data with CRLF "." CRLF itself: a file that ends
        # with a line end would get an empty line appended
        f.write(data[:-2])
    r = env.run([swaks, "--server", "127.0.0.1:%d" % port,
                 "--from", sender, "--to", ",".join(rcpts),
                 "--helo", helo, "--data", "@" + path, "--timeout", "30",
                 "--silent", "2"], timeout=60)
    if r.returncode != 0:
        fail("swaks to 127.0.0.1:%d exited %d:\n%s%s" % (
            port, r.returncode, r.stdout[-1500:], r.stderr[-1500:]))
    return r.stdout


def postfix(env, **kw):
    """A PostfixInstance; a missing or broken Postfix fails the test."""
    need("postfix")
    try:
        return PostfixInstance(**kw)
    except PostfixError as e:
        fail("cannot set up a Postfix instance: %s" % e)


def start_postfix(pf):
    try:
        pf.start()
    except PostfixError as e:
        fail("Postfix instance did not start: %s" % e)


def postfix_drained(pf, what, timeout=30):
    if not pf.wait_empty(timeout):
        fail("Postfix queue not empty after %ss (%s): %r\n--- postfix log ---\n%s"
             % (timeout, what, pf.queue_counts(), pf.log_tail(30)))


def inline_map(pairs):
    """Postfix inline: table from (key, value) pairs."""
    return "inline:{ %s }" % ", ".join("%s=%s" % kv for kv in pairs)


def wait_queued(env, domain, n, timeout=30, pf=None):
    """Waits until odmrd's queue for domain holds n committed messages."""
    end = time.time() + timeout
    while True:
        ids = env.queued_ids(domain)
        if len(ids) == n:
            return ids
        if time.time() > end:
            fail("%s: %d message(s) queued after %ss, expected %d\n"
                 "--- odmrd log ---\n%s%s" % (
                     domain, len(ids), timeout, n, env.log_tail(20),
                     ("\n--- postfix log ---\n" + pf.log_tail(30)) if pf else ""))
        time.sleep(0.1)


def dsn_fields(tx):
    """Per-recipient fields of a delivery status notification."""
    msg = email.message_from_bytes(tx.data, policy=email.policy.compat32)
    check(msg.get_content_type() == "multipart/report",
          "not a DSN: %r" % tx.data[:400])
    out = []
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload()[1:]:
                out.append({k: " ".join(v.split()) for k, v in block.items()})
    return out


def check_bounced_by_postfix(sink, pf, rcpt, status_prefix="5."):
    """Postfix returned `rcpt` to SENDER: its DSN reached the sink."""
    txs = sink.wait(1, timeout=30, what="Postfix's bounce for %s" % rcpt)
    check(len(txs) == 1, "sink got %d messages, expected one bounce: %r"
          % (len(txs), txs))
    tx = txs[0]
    check(tx.mail_from == "", "bounce MAIL FROM <%s>, not <>" % tx.mail_from)
    check(tx.rcpts == [SENDER], "bounce went to %r" % tx.rcpts)
    fields = dsn_fields(tx)
    finals = [f.get("Final-Recipient", "") for f in fields]
    check(finals == ["rfc822; " + rcpt], "bounce reports %r, expected only %s"
          % (finals, rcpt))
    f = fields[0]
    check(f.get("Action") == "failed", "bounce Action %r" % f.get("Action"))
    check(f.get("Status", "").startswith(status_prefix),
          "bounce Status %r, expected %s..." % (f.get("Status"), status_prefix))
    return f


def spool_rcpts(env, domain, qid):
    return sorted(r["addr"] for r in env.envelope(domain, qid)["rcpts"])


def check_spool_copy(env, domain, qid, sent, rcpts, received, pf):
    """The queued copy: envelope sender/recipients, the `received` number of
    Received: fields on top (first odmrd's or odmrctl's, then Postfix's),
    and below them exactly what was sent."""
    e = env.envelope(domain, qid)
    check(e["sender"] == SENDER, "%s/%s sender <%s>" % (domain, qid, e["sender"]))
    got_rcpts = sorted(r["addr"] for r in e["rcpts"])
    check(got_rcpts == sorted(rcpts), "%s/%s recipients %r, expected %r"
          % (domain, qid, got_rcpts, sorted(rcpts)))
    data = env.message(domain, qid)
    check(len(data) == e["size"], "%s/%s: Z %d, .m %d octets"
          % (domain, qid, e["size"], len(data)))
    fields = header_fields(data, b"\r\n")[:received]
    names = [n for n, _ in fields]
    check(names == ["received"] * received,
          "%s/%s starts with %r, expected %d Received: fields: %r"
          % (domain, qid, names, received, data[:500]))
    postfix_rcvd = value(fields[-1][1])
    check("(Postfix)" in postfix_rcvd and pf.myhostname in postfix_rcvd,
          "the innermost Received: is not Postfix's: %r" % postfix_rcvd)
    check_exact(sent, strip_received(data, received),
                "%s/%s (below the %d Received: fields)" % (domain, qid, received))
    return data


def make_traversable(env, *dirs):
    """Gives others search permission (o+x) on env.dir and the given
    directories below it (the test's directories are 0700; Postfix daemons
    and pipe(8) users must reach sockets, binaries and files below them).
    The directories above env.dir must already allow it."""
    for d in (env.dir,) + dirs:
        st = os.stat(d)
        os.chmod(d, (st.st_mode & 0o7777) | 0o011)
    up = os.path.dirname(env.dir)
    while up != "/":
        check(os.stat(up).st_mode & 0o001, "%s is not searchable by other "
              "users: Postfix and pipe(8) users cannot reach %s" % (up, env.dir))
        up = os.path.dirname(up)


# ==========================================================================
# 1. Postfix MX -> odmrd over LMTP

def test_postfix_lmtp_tcp_to_odmrd(env):
    """Postfix relays example.org / example.net to odmrd's LMTP listener
    through transport_maps; one transaction with three hosted recipients in
    two domains and one for a domain odmrd does not host (routed there by
    mistake): odmrd refuses that one at RCPT (550 5.7.1), Postfix bounces
    it, the rest lands byte-exact in odmrd's per-domain queues."""
    need("swaks")
    env.setup_accounts()
    env.start()
    with Sink() as sink:          # the sender's domain: Postfix's bounces
        lmtp = "lmtp:inet:[127.0.0.1]:%d" % env.lmtp_port
        pf = postfix(env, mode="defer", name="provider-mx", main_extra={
            "relay_domains": "example.org example.net nothosted.test",
            "transport_maps": inline_map([
                ("example.org", lmtp), ("example.net", lmtp),
                ("nothosted.test", lmtp),
                ("remote.test", "relay:[127.0.0.1]:%d" % sink.port)]),
            "lmtp_connect_timeout": "5s",
        })
        try:
            start_postfix(pf)
            sent = original("lmtp-tcp", to="u1@example.org, u2@example.org")
            rcpts = ["u1@example.org", "u2@example.org", "u3@example.net",
                     "x@nothosted.test"]
            swaks_send(env, pf.port, rcpts, sent, name="lmtp-tcp")
            org = wait_queued(env, "example.org", 1, pf=pf)
            net = wait_queued(env, "example.net", 1, pf=pf)
            # odmrd's 550 5.7.1 at RCPT becomes Postfix's bounce
            check_bounced_by_postfix(sink, pf, "x@nothosted.test", "5.7.1")
            postfix_drained(pf, "after LMTP delivery and the bounce")
            log = pf.log()
            check("status=bounced" in log and "x@nothosted.test" in log
                  and "5.7.1" in log,
                  "Postfix log lacks the 5.7.1 refusal of x@nothosted.test:\n%s"
                  % pf.log_tail(20))
            # 3 to odmrd, 1 bounce; Postfix writes its log asynchronously,
            # so the bounce's line may follow the sink's receipt a little
            deadline = time.time() + 10
            while pf.log().count("status=sent") < 4 and time.time() < deadline:
                time.sleep(0.1)
            log = pf.log()
            check(log.count("status=sent") == 4,
                  "Postfix log: %d status=sent lines:\n%s"
                  % (log.count("status=sent"), pf.log_tail(20)))
        finally:
            pf.cleanup()
    for dom, ids, want in (("example.org", org, ["u1@example.org",
                                                 "u2@example.org"]),
                           ("example.net", net, ["u3@example.net"])):
        data = check_spool_copy(env, dom, ids[0], sent, want, 2, pf)
        top = received_header(data)
        check("by mx.test (odmrd) with LMTP" in top,
              "odmrd's Received: %r" % top)
        e = env.envelope(dom, ids[0])
        check(e.get("helo") == pf.myhostname,
              "envelope HELO %r, expected Postfix's %r" % (e.get("helo"),
                                                           pf.myhostname))
    check(env.spool_problems() == [], "spool: %r" % env.spool_problems())
    check(env.queued("nothosted.test") == [], "queued for nothosted.test")


def test_postfix_lmtp_unix_to_odmrd(env):
    """The same over odmrd's unix-domain LMTP socket (lmtp_listen =
    unix:/path, relay_to lmtp:unix:/path), which Postfix's lmtp(8) reaches
    as user postfix."""
    need("swaks")
    rundir = env.path("run")
    os.mkdir(rundir, 0o755)
    make_traversable(env, rundir)
    sock = os.path.join(rundir, "lmtp.sock")
    env.write_conf(lmtp_listen="unix:" + sock)
    env.setup_accounts()
    env.start()
    pf = postfix(env, mode="relay", relay_to="lmtp:unix:" + sock,
                 name="provider-mx-unix")
    try:
        start_postfix(pf)
        check(pf.postconf("-h", "default_transport").strip()
              == "lmtp:unix:" + sock, "postfix default_transport %r"
              % pf.postconf("-h", "default_transport"))
        sent = {"lmtp-unix": (original("lmtp-unix"), "u1@example.org"),
                "lmtp-big": (bulk("lmtp-big"), "big@example.org")}
        for m, (data, rcpt) in sorted(sent.items()):
            swaks_send(env, pf.port, [rcpt], data, name=m)
        ids = wait_queued(env, "example.org", 2, pf=pf)
        postfix_drained(pf, "after delivery over the unix socket")
        check(pf.log().count("status=sent") == 2,
              "Postfix log:\n%s" % pf.log_tail(20))
        for qid in ids:
            m = marker_of(env.message("example.org", qid))
            check(m in sent, "unknown message %s in the queue" % qid)
            data, rcpt = sent.pop(m)
            stored = check_spool_copy(env, "example.org", qid, data, [rcpt],
                                      2, pf)
            check("with LMTP" in received_header(stored),
                  "odmrd's Received: %r" % received_header(stored))
    finally:
        pf.cleanup()
    check(env.spool_problems() == [], "spool: %r" % env.spool_problems())


# ==========================================================================
# 2. Postfix -> pipe(8) -> odmrctl enqueue

def test_postfix_pipe_odmrctl_enqueue(env):
    """master.cf `odmr unix - n n - - pipe flags=q user=nobody argv=odmrctl
    -c CONF enqueue -f ${sender} -- ${recipient}`, transport_maps
    `example.org odmr:`, odmr_destination_recipient_limit = 1.  odmrd runs
    as nobody as well (user = nobody), so the spool and the database belong
    to the user the pipe runs odmrctl as.  Hosted recipients are queued
    byte-exact (one copy per recipient); a recipient in a domain odmrd does
    not host makes odmrctl exit 67, which Postfix turns into a bounce; the
    queued mail is then dequeued by odmrd (as nobody) to an ODMR client."""
    need("swaks")
    nobody = pwd.getpwnam("nobody")
    # nobody must reach the binary, the configuration, the spool and the db
    bindir = env.path("bin")
    os.mkdir(bindir, 0o755)
    make_traversable(env, bindir)
    odmrctl = os.path.join(bindir, "odmrctl")
    shutil.copy2(env.odmrctl_bin, odmrctl)
    os.chmod(odmrctl, 0o755)
    var = env.path("var")
    os.mkdir(var, 0o700)
    os.chown(var, nobody.pw_uid, nobody.pw_gid)
    env.spool = os.path.join(var, "spool")
    env.db = os.path.join(var, "accounts.db")
    env.write_conf(user="nobody", spool_dir=env.spool, accounts_db=env.db)
    os.chmod(env.conf_path, 0o644)
    env.setup_accounts()           # odmrctl as root becomes nobody here
    env.start()
    st = os.stat(env.spool)
    check(st.st_uid == nobody.pw_uid, "spool owned by uid %d, not nobody"
          % st.st_uid)
    with Sink() as sink:
        pf = postfix(env, mode="defer", name="provider-pipe", main_extra={
            "relay_domains": "example.org example.net nothosted.test",
            "transport_maps": inline_map([
                ("example.org", "odmr:"), ("example.net", "odmr:"),
                ("nothosted.test", "odmr:"),
                ("remote.test", "relay:[127.0.0.1]:%d" % sink.port)]),
            "odmr_destination_recipient_limit": "1",
        }, master_extra=[
            "odmr unix - n n - - pipe",
            "  flags=q user=nobody argv=%s -c %s enqueue -f ${sender} -- "
            "${recipient}" % (odmrctl, env.conf_path)])
        try:
            start_postfix(pf)
            sent = original("pipe", to="u1@example.org, u2@example.org")
            swaks_send(env, pf.port, ["u1@example.org", "u2@example.org",
                                      "u3@example.net", "x@nothosted.test"],
                       sent, name="pipe")
            org = wait_queued(env, "example.org", 2, pf=pf)
            net = wait_queued(env, "example.net", 1, pf=pf)
            # odmrctl exits 67 (EX_NOUSER): pipe(8) bounces with 5.1.1
            check_bounced_by_postfix(sink, pf, "x@nothosted.test", "5.1.1")
            postfix_drained(pf, "after the pipe deliveries and the bounce")
            lines = [l for l in pf.log().splitlines() if "status=" in l]
            sent_lines = [l for l in lines if "relay=odmr," in l
                          and "status=sent" in l]
            check(len(sent_lines) == 3, "Postfix delivered %d recipient(s) "
                  "through the pipe, expected 3:\n%s" % (len(sent_lines),
                                                        "\n".join(lines)))
            bounced = [l for l in lines if "to=<x@nothosted.test>" in l]
            check(len(bounced) == 1 and "status=bounced" in bounced[0] and
                  "dsn=5.1.1" in bounced[0] and "odmrctl:" in bounced[0]
                  and "not hosted" in bounced[0],
                  "exit %d of odmrctl not reported as a 5.1.1 bounce with "
                  "its error line:\n%s" % (EX_NOUSER, "\n".join(lines)))
        finally:
            pf.cleanup()
    got = {}
    for dom, ids in (("example.org", org), ("example.net", net)):
        for qid in ids:
            rc = spool_rcpts(env, dom, qid)
            check(len(rc) == 1, "%s/%s has recipients %r; the recipient "
                  "limit is 1" % (dom, qid, rc))
            got[rc[0]] = (dom, qid)
            data = check_spool_copy(env, dom, qid, sent, rc, 2, pf)
            top = received_header(data)
            check("(odmrctl, from uid %d)" % nobody.pw_uid in top,
                  "odmrctl's Received: %r" % top)
            path = os.path.join(env.queue_dir(dom),
                                env.message_files(dom, qid)[-1])   # .m or .q
            st = os.stat(path)
            check(st.st_uid == nobody.pw_uid and st.st_mode & 0o077 == 0,
                  "%s: uid %d mode %o" % (path, st.st_uid, st.st_mode & 0o777))
    check(sorted(got) == ["u1@example.org", "u2@example.org",
                          "u3@example.net"], "queued recipients %r" % got)
    check(env.queued("nothosted.test") == [], "queued for nothosted.test")
    check(env.spool_problems() == [], "spool: %r" % env.spool_problems())
    # what odmrctl (as nobody) wrote, odmrd (as nobody) delivers
    with Sink() as site:
        r = env.run([env.fetch_bin, "-s", "127.0.0.1:%d" % env.odmr_port,
                     "-u", "alice", "--tls", "off", "--timeout", "20",
                     "--lock", env.path("fetch.lock"),
                     "--deliver", "smtp:" + site.address],
                    env=dict(os.environ, ODMR_PASSWORD=ALICE_PW), timeout=60)
        check(r.returncode == 0, "odmr-fetch exited %d: %s"
              % (r.returncode, r.stderr[-1500:]))
        txs = site.wait(3, timeout=15, what="dequeued pipe mail")
        for tx in txs:
            check(tx.mail_from == SENDER, "MAIL FROM <%s>" % tx.mail_from)
            check_exact(sent, strip_received(tx.data, 2),
                        "dequeued copy for %r" % tx.rcpts)
    check(env.queued() == [], "left queued: %r" % env.queued())


# ==========================================================================
# 3. fetchmail (ODMR) as the site's client
#
# fetchmail 6.4's ODMR driver (odmr.c) never sends STARTTLS: with
# `sslproto tls1.2+` (and sslcertck) it still authenticates in clear text
# when the server offers STARTTLS.  Its only TLS is implicit TLS (`ssl`, the
# "odmrs" port), which odmrd does not listen for itself; providers put a
# TLS terminator (stunnel) in front of port 366 for it.  The tests cover:
# clear text (byte-exact); implicit TLS through such a terminator with
# certificate and host name verification (and a refusal with the wrong
# trust anchor); and odmrd's require_tls = yes refusing fetchmail's
# clear-text AUTH.

class TLSFront:
    """An stunnel-like TLS terminator: accepts TLS on 127.0.0.1:port and
    forwards the clear text to 127.0.0.1:backend.  One thread per
    connection, select() with a bounded idle time."""

    IDLE = 30

    def __init__(self, cert, key, backend):
        self.backend = backend
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.handshakes = 0
        self.errors = []
        self.stopping = False
        self.threads = []
        self.socks = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, raw):
        raw.settimeout(self.IDLE)
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with self.lock:
                self.errors.append(str(e))
            raw.close()
            return
        with self.lock:
            self.handshakes += 1
        try:
            back = socket.create_connection(("127.0.0.1", self.backend), 10)
        except OSError as e:
            self.errors.append(str(e))
            tls.close()
            return
        with self.lock:
            self.socks += [tls, back]
        try:
            while not self.stopping:
                if tls.pending():
                    ready = [tls]
                else:
                    ready, _, _ = select.select([tls, back], [], [], self.IDLE)
                if not ready:
                    break
                for s in ready:
                    other = back if s is tls else tls
                    try:
                        data = s.recv(65536)
                    except ssl.SSLWantReadError:
                        continue
                    if not data:
                        return
                    other.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (tls, back):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.stopping = True
        try:
            self.lsock.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(5)
        for t in self.threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
FETCHMAILRC_EXAMPLE = os.path.join(TOP, "contrib", "fetchmail",
                                   "fetchmailrc.example")
ADMIN_GUIDE = os.path.join(TOP, "docs", "admin-guide.md")


def fetchmailrc_from_example(host, port, user, password, domains, smtphost,
                             tls):
    """The fetchmailrc of the documentation (contrib/fetchmail/
    fetchmailrc.example) with its example values replaced by the test's.
    Every example value must occur exactly once, so that the test keeps
    running what the file says."""
    with open(FETCHMAILRC_EXAMPLE) as f:
        text = f.read()
    for old, new in (("poll mx.provider.example ", "poll %s " % host),
                     ("service 366\n", "service %d\n" % port),
                     ('user "example-org"', 'user "%s"' % user),
                     ('password "the-account-password"',
                      'password "%s"' % password),
                     ("fetchdomains example.org,example.net\n",
                      "fetchdomains %s\n" % domains),
                     ("smtphost 127.0.0.1/25\n", "smtphost %s\n" % smtphost),
                     ('sslproto ""\n', tls + "\n")):
        check(text.count(old) == 1, "%s: %r occurs %d times, expected once"
              % (FETCHMAILRC_EXAMPLE, old, text.count(old)))
        text = text.replace(old, new)
    return text


def fetchmail_run(env, name, port, sink, extra, host="127.0.0.1",
                  domains="example.org,example.net"):
    """fetchmail -f RC with the documented example fetchmailrc; `extra`
    replaces its `sslproto ""` line."""
    fetchmail = need("fetchmail")
    rc = env.path("fetchmailrc-" + name)
    with open(rc, "w") as f:
        f.write(fetchmailrc_from_example(
            host, port, "alice", ALICE_PW, domains,
            "127.0.0.1/%d" % sink.port, extra))
    os.chmod(rc, 0o600)
    fenv = dict(os.environ, HOME=env.dir, FETCHMAILHOME=env.dir, LC_ALL="C")
    r = env.run([fetchmail, "-f", rc, "--nosyslog", "-v", "-N",
                 "--pidfile", env.path("fetchmail-%s.pid" % name),
                 "-i", env.path("fetchids-" + name)], timeout=90, env=fenv)
    env.info("fetchmail %s exit %d" % (name, r.returncode))
    return r


def test_fetchmail_example_is_in_the_admin_guide(env):
    """The admin guide shows contrib/fetchmail/fetchmailrc.example verbatim
    (the file the fetchmail tests run), so the documented text is the
    tested one."""
    with open(FETCHMAILRC_EXAMPLE) as f:
        example = f.read()
    with open(ADMIN_GUIDE) as f:
        guide = f.read()
    check("contrib/fetchmail/fetchmailrc.example" in guide,
          "docs/admin-guide.md does not name the example file")
    check("```\n" + example + "```\n" in guide,
          "docs/admin-guide.md does not show %s verbatim in a code block"
          % FETCHMAILRC_EXAMPLE)


def inject_two(env):
    """Two messages into odmrd over SMTP (swaks): one for two example.org
    recipients, one for example.net.  Returns {marker: (rcpts, data)}."""
    sent = {}
    for marker, rcpts in (("fm-org", ["a@example.org", "b@example.org"]),
                          ("fm-net", ["c@example.net"])):
        data = original(marker, to=", ".join(rcpts))
        swaks_send(env, env.smtp_port, rcpts, data, name=marker)
        sent[marker] = (rcpts, data)
    check(len(env.queued()) == 2, "queue after injection: %r" % env.queued())
    return sent


def check_sink_exact(sink, sent, received=1):
    txs = sink.wait(len(sent), timeout=20, what="mail relayed by fetchmail")
    sink.wait_idle()
    check(len(sink.transactions) == len(sent),
          "sink got %d transactions, expected %d" % (len(sink.transactions),
                                                     len(sent)))
    seen = set()
    for tx in txs:
        marker = None
        for m in sent:
            if b"MARKER " + m.encode() + b"\r\n" in tx.data:
                marker = m
        check(marker is not None, "unknown message: %r" % tx.data[:300])
        seen.add(marker)
        rcpts, data = sent[marker]
        check(tx.mail_from == SENDER, "MAIL FROM <%s>" % tx.mail_from)
        check(sorted(tx.rcpts) == sorted(rcpts), "%s: recipients %r, "
              "expected %r" % (marker, tx.rcpts, rcpts))
        top = received_header(tx.data)
        check("by mx.test (odmrd)" in top, "odmrd's Received: %r" % top)
        check_exact(data, strip_received(tx.data, received),
                    "message %s at the site" % marker)
    check(seen == set(sent), "delivered %r of %r" % (seen, set(sent)))


def test_fetchmail_odmr_cleartext(env):
    env.setup_accounts()
    env.start()
    sent = inject_two(env)
    with Sink() as sink:
        r = fetchmail_run(env, "plain", env.odmr_port, sink, 'sslproto ""')
        check_sink_exact(sink, sent)
        if r.returncode != 0:
            fail("fetchmail exited %d:\n%s\n%s" % (r.returncode,
                 r.stdout[-1500:], r.stderr[-1500:]))
    check(env.queued() == [], "left queued: %r" % env.queued())
    check("authenticated as alice with CRAM-MD5" in env.log(),
          "odmrd log:\n%s" % env.log_tail(15))


def test_fetchmail_odmr_implicit_tls(env):
    """fetchmail `ssl` (implicit TLS, the only TLS its ODMR driver has)
    through an stunnel-like terminator in front of odmrd, `sslcertck` with
    the provider's certificate as `sslcertfile` for the polled name.

    With the wrong trust anchor fetchmail must refuse: no AUTH reaches
    odmrd, nothing is dequeued.  With the right one it authenticates and
    turns the connection around over TLS.  fetchmail 6.4 then relays the
    message data with select() on the raw socket while reading TLS one line
    at a time, so lines already decrypted into OpenSSL's buffer wait until
    more arrives: the transfer stalls until odmrd's `timeout` ends the
    session (5s here).  Either outcome is checked: everything relayed and
    removed, or the stall -- then whatever reached the site is byte-exact,
    odmrd removed only what the site acknowledged to it, and nothing is
    lost (every message is at the site or still queued)."""
    openssl = need("openssl")
    cert = env.make_cert("localhost")
    key = env.conf["tls_key_file"]
    other = env.path("other-ca.pem")
    r = env.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                 "-keyout", env.path("other-key.pem"), "-out", other,
                 "-days", "2", "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost"], timeout=60)
    check(r.returncode == 0, "openssl: %s" % r.stderr)
    env.write_conf(timeout="5s")
    env.setup_accounts()
    env.start()
    sent = inject_two(env)
    tls = "ssl sslproto tls1.2+ sslcertck sslcertfile %s"
    # a site MTA without PIPELINING: one command per TLS record
    with TLSFront(cert, key, env.odmr_port) as front, \
            Sink(extensions=("8BITMIME", "ENHANCEDSTATUSCODES")) as sink:
        r = fetchmail_run(env, "wrong-ca", front.port, sink, tls % other,
                          host="localhost")
        check(r.returncode != 0, "fetchmail accepted a certificate its "
              "trust anchor did not sign:\n%s" % r.stdout[-1500:])
        check("verif" in (r.stdout + r.stderr).lower(),
              "no certificate verification error from fetchmail:\n%s"
              % (r.stdout + r.stderr)[-1500:])
        check(sink.connections == 0, "fetchmail reached the site's MTA "
              "after a failed certificate check")
        check(len(env.queued()) == 2, "mail dequeued despite the "
              "certificate failure: %r" % env.queued())
        check("authenticated" not in env.log(), "fetchmail authenticated "
              "after a failed certificate check")
        t0 = time.time()
        r = fetchmail_run(env, "tls", front.port, sink, tls % cert,
                          host="localhost")
        took = time.time() - t0
        out = r.stdout + r.stderr
        check("TLS" in out and "localhost" in out,
              "fetchmail -v shows no TLS session:\n%s" % out[-1500:])
        check(front.handshakes >= 1, "no TLS handshake at the terminator")
        wait_for(lambda: "disconnect from 127.0.0.1 account=alice"
                 in env.log(), 20, what="the end of odmrd's ODMR session")
        sink.wait_idle()
        log = env.log()
        check("authenticated as alice with CRAM-MD5" in log and
              "ATRN by alice for 2 domain(s)" in log,
              "odmrd did not authenticate/turn around fetchmail over the "
              "TLS terminator:\n%s" % env.log_tail(15))
        at_site = {}
        for tx in sink.transactions:
            m = marker_of(tx.data)
            check(m in sent, "unknown message at the site: %r" % tx.data[:300])
            rcpts, data = sent[m]
            check(tx.mail_from == SENDER, "MAIL FROM <%s>" % tx.mail_from)
            check(sorted(tx.rcpts) == sorted(rcpts), "%s: recipients %r"
                  % (m, tx.rcpts))
            check_exact(data, strip_received(tx.data, 1),
                        "message %s relayed by fetchmail over TLS" % m)
            at_site[m] = tx
    queued = {}
    for d, q in env.queued():
        queued[marker_of(env.message(d, q))] = (d, q)
    for m in sent:
        check(m in at_site or m in queued, "message %s was lost: neither at "
              "the site nor queued" % m)
    for line in log.splitlines():
        if "status=sent" in line:
            rcpt = line.split("to=<", 1)[1].split(">", 1)[0]
            check(any(rcpt in tx.rcpts for tx in at_site.values()),
                  "odmrd logged %s as sent but the site never accepted it: %s"
                  % (rcpt, line))
    if not queued and r.returncode == 0 and len(at_site) == len(sent):
        env.info("fetchmail relayed everything over TLS (%.1fs)" % took)
    else:
        check(at_site, "nothing reached the site over TLS (fetchmail exit "
              "%d):\n%s" % (r.returncode, out[-1500:]))
        check(queued, "fetchmail stalled but odmrd removed every message")
        env.info("fetchmail's ODMR over TLS stalled (its select()/SSL "
                 "buffering); %d of %d message(s) reached the site, %d still "
                 "queued after odmrd's timeout (%.1fs)"
                 % (len(at_site), len(sent), len(queued), took))


def test_fetchmail_refused_by_require_tls(env):
    """odmrd with require_tls = yes offers STARTTLS; fetchmail (no STARTTLS
    for ODMR, even with `sslproto tls1.2+` and sslcertck) must be refused
    at AUTH with 530 5.7.0, nothing may be dequeued, and odmrd's log must
    say why in one line (the administrator's only clue)."""
    cert = env.make_cert("localhost")
    env.write_conf(require_tls="yes")
    env.setup_accounts()
    env.start()
    inject_two(env)
    why = ("127.0.0.1: AUTH refused: require_tls = yes and the session is "
           "not encrypted (fetchmail never uses STARTTLS for ODMR)")
    with Sink() as sink:
        for n, tls in enumerate(('sslproto ""', "sslproto tls1.2+",
                                 "sslproto tls1.2+ sslcertck sslcertfile %s"
                                 % cert)):
            r = fetchmail_run(env, "require-tls-%d" % n, env.odmr_port, sink,
                              tls, host="localhost")
            out = r.stdout + r.stderr
            check(r.returncode != 0, "fetchmail (%s) exited 0 against "
                  "require_tls" % tls)
            # fetchmail -v shows what it sends as "SMTP> ..." / "ODMR> ..."
            check("> STARTTLS" not in out,
                  "fetchmail (%s) tried STARTTLS after all; the "
                  "documentation says it never does:\n%s" % (tls, out[-1500:]))
            check("530 5.7.0" in out, "fetchmail (%s) did not see 530:\n%s"
                  % (tls, out[-1500:]))
            wait_for(lambda: env.log().count(why) == n + 1, 10,
                     what="odmrd's log line for refused AUTH number %d:\n%s"
                     % (n + 1, env.log_tail(15)))
        check(sink.connections == 0, "fetchmail reached the site's MTA")
    check(len(env.queued()) == 2, "mail dequeued: %r" % env.queued())
    log = env.log()
    check("authenticated as" not in log, "odmrd log:\n%s" % env.log_tail(15))
    lines = [l for l in log.splitlines() if "AUTH refused" in l]
    check(len(lines) == 3 and all(l.endswith(why) for l in lines),
          "odmrd's AUTH refused lines: %r" % lines)


# ==========================================================================
# 4. odmr-fetch -> the site's Postfix (Maildir)

def fetch_into(env, pf, tls, extra=(), server=None):
    argv = [env.fetch_bin, "-s", server or "127.0.0.1:%d" % env.odmr_port,
            "-u", "alice", "--tls", tls, "--timeout", "20", "-v",
            "--lock", env.path("fetch.lock"),
            "--deliver", "smtp:127.0.0.1:%d" % pf.port] + list(extra)
    r = env.run(argv, env=dict(os.environ, ODMR_PASSWORD=ALICE_PW), timeout=90)
    if r.returncode != 0:
        fail("odmr-fetch exited %d:\n%s\n--- postfix log ---\n%s" % (
            r.returncode, r.stderr[-2000:], pf.log_tail(20)))
    return r


def check_maildir(pf, address, sent, sender=SENDER):
    """The one message in address's Maildir: Postfix virtual(8) put
    Return-Path, X-Original-To and Delivered-To on top, Postfix's smtpd a
    Received:, odmrd's Received: is next; below them the message as sent
    (Maildir files have LF line ends)."""
    files = pf.maildir_messages(address)
    check(len(files) == 1, "%s: %d Maildir files: %r\n%s" % (
        address, len(files), files, pf.log_tail(20)))
    with open(files[0], "rb") as f:
        data = f.read()
    got, rest = strip_prepended(
        data, ["return-path", "x-original-to", "delivered-to", "received",
               "received"], b"\n")
    check(value(got["return-path"][0]) == "<%s>" % sender,
          "%s: %r" % (address, got["return-path"][0]))
    check(value(got["delivered-to"][0]) == address,
          "%s: %r" % (address, got["delivered-to"][0]))
    check(value(got["x-original-to"][0]) == address,
          "%s: %r" % (address, got["x-original-to"][0]))
    site, odmrd = (value(x) for x in got["received"])
    check("(Postfix)" in site and pf.myhostname in site,
          "site Received: %r" % site)
    check("by mx.test (odmrd)" in odmrd, "odmrd Received: %r" % odmrd)
    check_exact(lf(sent), rest, "%s's Maildir file below the prepended "
                "fields" % address)
    return data


def site_postfix(env):
    pf = postfix(env, mode="maildir", name="site",
                 domains=["example.org", "example.net"])
    for a in ("u1@example.org", "u2@example.org", "u3@example.net",
              "nul@example.org", "big@example.org"):
        pf.add_mailbox(a)
    return pf


def odmr_to_postfix(env, tls):
    pf = site_postfix(env)
    try:
        start_postfix(pf)
        sent = original("site-" + tls, to="u1@example.org, u2@example.org")
        swaks_send(env, env.smtp_port, ["u1@example.org", "u2@example.org",
                                        "u3@example.net"], sent, name="site")
        bounce = original("site-null", to="nul@example.org")
        swaks_send(env, env.smtp_port, ["nul@example.org"], bounce,
                   sender="<>", name="null")
        big = bulk("site-big") if tls == "off" else None
        if big:
            swaks_send(env, env.smtp_port, ["big@example.org"], big,
                       name="big")
        check(len(env.queued()) == (4 if big else 3), "odmrd queue %r"
              % env.queued())
        if tls == "off":
            r = fetch_into(env, pf, "off")
        else:
            r = fetch_into(env, pf, "require",
                           ["--ca-file", env.conf["tls_cert_file"]],
                           server="localhost:%d" % env.odmr_port)
        postfix_drained(pf, "after the site's deliveries")
        files = 5 if big else 4
        wait_for(lambda: len(pf.maildir_messages()) >= files, 20,
                 what="%d Maildir files" % files)
        for a in ("u1@example.org", "u2@example.org", "u3@example.net"):
            check_maildir(pf, a, sent)
        check_maildir(pf, "nul@example.org", bounce, sender="")
        if big:
            check_maildir(pf, "big@example.org", big)
        check(len(pf.maildir_messages()) == files, "Maildir files: %r"
              % pf.maildir_messages())
        check(env.queued() == [], "left at the provider: %r" % env.queued())
        return r
    finally:
        pf.cleanup()


def test_odmr_fetch_into_postfix_maildir(env):
    env.setup_accounts()
    env.start()
    odmr_to_postfix(env, "off")


def test_odmr_fetch_tls_into_postfix_maildir(env):
    env.make_cert("localhost")
    env.write_conf(require_tls="yes")
    env.setup_accounts()
    env.start()
    odmr_to_postfix(env, "require")
    check("authenticated as alice" in env.log() and "over TLS" in env.log(),
          "odmrd did not see AUTH over TLS:\n%s" % env.log_tail(15))
