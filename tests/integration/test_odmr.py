"""The ODMR service (SPEC 3.5, RFC 2645) of the real odmrd, port 366 role.

Before the role reversal: AUTH (RFC 4954: CRAM-MD5, SCRAM-SHA-256 with a
client written here, PLAIN only over TLS), ATRN replies (RFC 2645 section
7), 502 for everything else.  After `250 OK now reversing the connection`
the test itself is the customer's SMTP server (class Customer), scripted
per test: 2xx/4xx/5xx per recipient, dropped connections, a session
process killed with SIGKILL, PIPELINING offered or not, SIZE limits, mail
arriving during the session.  Returned mail goes to a recording sink
(sink.py) configured as bounce_relay.  fetchmail is used as an independent
ODMR client.

Python 3 standard library only.
"""

import base64
import email
import email.policy
import hashlib
import hmac
import os
import re
import signal
import socket
import time

from harness import (SMTP, TestFailure, check, check_reply,
                     descendants, dot_stuff, fail, need, strip_received,
                     to_crlf, wait_for)
from sink import Sink

ALICE_PW = "alice-pw"
BOB_PW = "bob-pw"
SENDER = "sender@remote.test"

REFUSED = "450 4.7.1 ATRN request refused"
BUSY = "451 4.4.0 Unable to process ATRN request now"
REVERSING = "OK now reversing the connection"

# What a full-featured customer MTA announces after the reversal.
FULL_EXT = ("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN",
            "ENHANCEDSTATUSCODES")


# --------------------------------------------------------------------------
# setup

def setup(env, start=True, relay=None, debug=False, **conf):
    """alice (ALICE_PW): example.org, example.net; bob (BOB_PW):
    example.com.  relay: a Sink used as bounce_relay."""
    if relay is not None:
        conf["bounce_relay"] = relay.address
    if conf:
        env.write_conf(**conf)
    env.add_user("alice", ALICE_PW)
    env.add_domain("example.org", "alice")
    env.add_domain("example.net", "alice")
    env.add_user("bob", BOB_PW)
    env.add_domain("example.com", "bob")
    if start:
        env.start(extra_args=("-d",) if debug else ())


def message(tag, extra=b""):
    """A small RFC 5322 message (CRLF lines) with a unique marker."""
    if isinstance(tag, str):
        tag = tag.encode()
    return (b"From: Sender <" + SENDER.encode() + b">\r\n"
            b"To: someone@example.org\r\n"
            b"Subject: odmr test " + tag + b"\r\n"
            b"Message-ID: <" + tag + b"@remote.test>\r\n"
            b"\r\n"
            b"Body of " + tag + b".\r\n" + extra +
            b"end of " + tag + b"\r\n")


def enqueue(env, rcpts, body, sender=SENDER):
    """odmrctl enqueue; returns {domain: queue id} of the new message."""
    before = set(env.queued())
    r = env.odmrctl("enqueue", "-f", sender, "--", *rcpts, input=body)
    check(r.returncode == 0, "odmrctl enqueue exited %d: %s"
          % (r.returncode, r.stderr.strip()))
    new = set(env.queued()) - before
    check(new, "odmrctl enqueue: nothing new in the queue")
    out = {}
    for d, qid in new:
        out[d] = qid
    return out


def smtp_in(env, rcpts, body, sender=SENDER, mail_params="",
            rcpt_params=None):
    """One transaction on odmrd's inbound SMTP listener; returns the queue
    id.  body: CRLF bytes, dot-stuffed here."""
    rcpt_params = rcpt_params or {}
    with env.smtp() as s:
        check_reply(s.greeting, 220, what="inbound greeting")
        check_reply(s.cmd("EHLO src.test"), 250, what="inbound EHLO")
        check_reply(s.cmd("MAIL FROM:<%s>%s" % (sender, mail_params)), 250,
                    "2.1.0", "inbound MAIL")
        for r in rcpts:
            check_reply(s.cmd("RCPT TO:<%s>%s" % (r, rcpt_params.get(r, ""))),
                        250, "2.1.5", "inbound RCPT %s" % r)
        reply = check_reply(s.data(body), 250, "2.0.0", "inbound data")
        s.quit()
    m = re.search(r"queued as ([0-9A-Fa-f]+)", reply[1])
    check(m, "no queue id in %r" % (reply,))
    return m.group(1)


def files_of(env, domain, qid):
    """(bytes of the envelope in force, bytes of the data)."""
    return env.envelope_text(domain, qid), env.message(domain, qid)


def e_files(env):
    """Every committed message's file under the spool's queue (its .e or
    .q; relative paths)."""
    out = []
    top = env.queue_dir()
    for root, _, files in os.walk(top):
        for f in files:
            if f.endswith((".e", ".q")):
                out.append(os.path.relpath(os.path.join(root, f), top))
    return sorted(out)


def log_since(env, mark):
    return env.log()[mark:]


def log_line_with(env, mark, *parts):
    """The first log line after mark that contains every one of parts;
    fails when there is none."""
    for l in log_since(env, mark).splitlines():
        if all(p in l for p in parts):
            return l
    fail("no odmrd log line with all of %r; log:\n%s" % (parts,
                                                       env.log_tail(15)))


def domain_files(env, domain):
    """Files left in q/<domain>/ besides the lock files (.lock, and .linger
    that every ATRN takes too: server/linger.h)."""
    d = env.queue_dir(domain)
    if not os.path.isdir(d):
        return []
    return sorted(f for f in os.listdir(d) if f not in (".lock", ".linger"))


# --------------------------------------------------------------------------
# SASL clients

def b64(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text.strip(), validate=True)


def cram_md5(s, user, password):
    """AUTH CRAM-MD5; returns the final reply."""
    r = s.cmd("AUTH CRAM-MD5")
    check_reply(r, 334, what="AUTH CRAM-MD5")
    chal = unb64(r[1])
    check(chal.startswith(b"<") and chal.endswith(b">"),
          "CRAM-MD5 challenge is not <...>: %r" % chal)
    digest = hmac.new(password.encode(), chal, hashlib.md5).hexdigest()
    return s.cmd(b64("%s %s" % (user, digest)))


def scram(s, user, password, mech="SCRAM-SHA-256"):
    """RFC 5802 / 7677 client.  Returns the final reply; fails the test when
    the server's signature does not verify."""
    hname = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}[mech]
    hf = getattr(hashlib, hname)
    cnonce = b64(os.urandom(18))
    gs2 = "n,,"
    first_bare = "n=%s,r=%s" % (user.replace("=", "=3D").replace(",", "=2C"),
                                cnonce)
    r = s.cmd("AUTH %s %s" % (mech, b64(gs2 + first_bare)))
    check_reply(r, 334, what="AUTH %s (server-first)" % mech)
    server_first = unb64(r[1]).decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    check(attrs.get("r", "").startswith(cnonce) and len(attrs["r"]) > len(cnonce),
          "server nonce %r does not extend ours %r" % (attrs.get("r"), cnonce))
    salt = base64.b64decode(attrs["s"])
    iters = int(attrs["i"])
    check(iters >= 4096, "SCRAM iteration count %d < 4096" % iters)
    salted = hashlib.pbkdf2_hmac(hname, password.encode(), salt, iters)
    client_key = hmac.new(salted, b"Client Key", hf).digest()
    stored_key = hf(client_key).digest()
    final_wo_proof = "c=%s,r=%s" % (b64(gs2), attrs["r"])
    auth_message = ",".join((first_bare, server_first, final_wo_proof)).encode()
    client_sig = hmac.new(stored_key, auth_message, hf).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, client_sig))
    server_key = hmac.new(salted, b"Server Key", hf).digest()
    server_sig = hmac.new(server_key, auth_message, hf).digest()
    r = s.cmd(b64("%s,p=%s" % (final_wo_proof, b64(proof))))
    expected_final = "v=" + b64(server_sig)
    if r[0] == 334:
        # server-final as a challenge (no SASL_SUCCESS_DATA): verify it,
        # then the empty response
        final = unb64(r[1]).decode()
        check(final == expected_final,
              "SCRAM server signature does not verify: %r" % final)
        return s.cmd("")
    if r[0] == 235:
        # success data in the 235 (RFC 4954 allows it)
        check(expected_final in [w for t in r[1].split()
                                 for w in [_try_b64(t)]],
              "SCRAM: 235 without a verifiable server signature: %r" % (r,))
    return r


def _try_b64(text):
    try:
        return unb64(text).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def plain(s, user, password):
    return s.cmd("AUTH PLAIN " + b64("\0%s\0%s" % (user, password)))


# --------------------------------------------------------------------------
# ODMR client side (before the reversal)

def odmr(env, **kw):
    """Connected to the ODMR listener, greeting checked."""
    s = SMTP(port=env.odmr_port, **kw)
    check_reply(s.greeting, 220, what="ODMR greeting")
    check(s.greeting[1].startswith("mx.test ") and "ODMR" in s.greeting[1],
          "ODMR greeting: %r" % (s.greeting,))
    return s


def ehlo(s, name="customer.test"):
    code, kw = s.ehlo(name)
    check(code == 250, "EHLO: %r %r" % (code, s.last_lines))
    return kw


def login(env, user="alice", password=ALICE_PW, **kw):
    """ODMR session, EHLO, AUTH CRAM-MD5 done."""
    s = odmr(env, **kw)
    ehlo(s)
    check_reply(cram_md5(s, user, password), 235, "2.7.0", "AUTH CRAM-MD5")
    return s


def atrn(s, arg=None):
    return s.cmd("ATRN" if arg is None else "ATRN " + arg)


def check_exact(reply, expected, what):
    got = "%d %s" % reply
    if got != expected:
        fail("%s: expected %r, got %r" % (what, expected, got))


def reverse(env, domains=None, user="alice", password=ALICE_PW, **cust):
    """login + ATRN (250 expected); returns a Customer on the connection."""
    s = login(env, user, password)
    r = atrn(s, domains)
    check_reply(r, 250, what="ATRN %s" % domains)
    check(r[1] == REVERSING, "250 text %r" % r[1])
    return Customer(s, **cust)


# --------------------------------------------------------------------------
# the customer side after the reversal

class Tx:
    """One MAIL transaction the customer saw."""

    def __init__(self, mail_line):
        self.mail_line = mail_line           # str, as received
        m = re.match(r"(?i)MAIL FROM:<([^>]*)>(.*)$", mail_line)
        self.sender = m.group(1) if m else None
        self.mail_params = m.group(2).split() if m else []
        self.rcpt_lines = []
        self.rcpts = []                      # accepted
        self.rejected = []                   # (addr, reply)
        self.raw = b""                       # data as on the wire
        self.data = None                     # dot-stuffing undone
        self.data_reply = None

    def params(self):
        out = {}
        for p in self.mail_params:
            k, _, v = p.partition("=")
            out[k.upper()] = v
        return out

    def __repr__(self):
        return "<Tx %r rcpts=%r %s bytes>" % (
            self.mail_line, self.rcpts,
            len(self.data) if self.data is not None else "no")


class Customer:
    """The customer's SMTP server, played by the test on the reversed
    connection.

    rcpt_reply(addr) -> reply line (default 250); data_reply(tx) -> reply
    line, or None to drop the connection instead of answering; drop_in_data
    = N: close the connection after N data lines.  strict: check that
    odmrd pipelines (MAIL..DATA before any reply) exactly when PIPELINING
    was offered."""

    def __init__(self, s, extensions=FULL_EXT, greeting="220 customer.test ESMTP",
                 ehlo_reply=None, rcpt_reply=None, data_reply=None,
                 drop_in_data=None, strict=False, timeout=20):
        self.s = s
        self.extensions = list(extensions)
        self.greeting = greeting
        self.ehlo_reply = ehlo_reply
        self.rcpt_reply = rcpt_reply or (lambda a: "250 2.1.5 Ok")
        self.data_reply = data_reply or (lambda tx: "250 2.0.0 Ok delivered")
        self.drop_in_data = drop_in_data
        self.strict = strict
        self.timeout = timeout
        self.transactions = []
        self.commands = []
        self.helo = None
        self.quit = False
        self.closed = False
        self.pending = []
        self.s.sock.settimeout(timeout)

    # ---- raw I/O on the harness SMTP object's socket and buffer
    def _fill(self, timeout):
        self.s.sock.settimeout(timeout)
        try:
            chunk = self.s.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return None
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        finally:
            self.s.sock.settimeout(self.timeout)
        if not chunk:
            self.closed = True
            return b""
        self.s.buf += chunk
        return chunk

    def rawline(self, timeout=None):
        """One line with its line end; None at EOF; fails on timeout."""
        timeout = self.timeout if timeout is None else timeout
        end = time.time() + timeout
        while b"\n" not in self.s.buf:
            left = end - time.time()
            got = self._fill(max(left, 0.01)) if left > 0 else None
            if got is None:
                fail("customer: timed out after %ss waiting for odmrd "
                     "(commands so far %r, partial %r)"
                     % (timeout, self.commands[-10:], self.s.buf[:200]))
            if got == b"":
                return None
        line, self.s.buf = self.s.buf.split(b"\n", 1)
        return line + b"\n"

    def try_line(self, timeout):
        """A line if one arrives within timeout, else None (no failure)."""
        end = time.time() + timeout
        while b"\n" not in self.s.buf:
            left = end - time.time()
            if left <= 0:
                return None
            got = self._fill(left)
            if got is None:
                return None
            if got == b"":
                return None
        line, self.s.buf = self.s.buf.split(b"\n", 1)
        return line + b"\n"

    def quiet(self, what, wait=0.3):
        """Checks odmrd sends nothing more until we reply (no pipelining)."""
        if self.s.buf:
            fail("customer: odmrd sent %r before the reply to %s although "
                 "PIPELINING was not offered" % (self.s.buf[:100], what))
        got = self._fill(wait)
        if got:
            fail("customer: odmrd sent %r before the reply to %s although "
                 "PIPELINING was not offered" % (got[:100], what))

    def out(self, line):
        self.s.sock.sendall(line.encode("utf-8") + b"\r\n")

    def command(self):
        if self.pending:
            return self.pending.pop(0)
        raw = self.rawline()
        if raw is None:
            return None
        check(raw.endswith(b"\r\n"), "command line without CRLF: %r" % raw)
        line = raw[:-2].decode("utf-8", "replace")
        self.commands.append(line)
        return line

    def drop(self):
        try:
            self.s.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.s.close()
        self.closed = True

    # ---- the protocol
    def start(self):
        """Greets and answers the EHLO (or HELO)."""
        self.out(self.greeting)
        if not self.greeting.startswith("220"):
            return
        line = self.command()
        check(line is not None, "odmrd closed the connection after our 220")
        verb = line.split(" ", 1)[0].upper()
        check(verb == "EHLO", "odmrd's first command is %r, not EHLO" % line)
        check(line.split(" ", 1)[1:] == ["mx.test"],
              "odmrd's EHLO %r does not name its hostname" % line)
        if self.ehlo_reply:
            self.out(self.ehlo_reply)
            line = self.command()
            check(line is not None and line.upper() == "HELO MX.TEST",
                  "after %r to EHLO odmrd sent %r, not HELO"
                  % (self.ehlo_reply, line))
            self.helo = line
            self.out("250 customer.test")
            return
        self.helo = line
        lines = ["customer.test"] + self.extensions
        for i, l in enumerate(lines):
            self.out("250%s%s" % (" " if i == len(lines) - 1 else "-", l))

    def run(self):
        """Greeting, EHLO, then serves until QUIT or the connection ends."""
        self.start()
        return self.serve()

    def serve(self):
        tx = None
        pipelining = "PIPELINING" in [e.split()[0].upper()
                                      for e in self.extensions] \
            and not self.ehlo_reply
        while True:
            line = self.command()
            if line is None:
                return self
            verb = line.split(" ", 1)[0].upper()
            if verb == "MAIL":
                if self.strict and pipelining and not self.pending:
                    group = []
                    while not group or group[-1].upper() != "DATA":
                        raw = self.try_line(5)
                        if raw is None:
                            fail("customer: PIPELINING was offered but odmrd "
                                 "waited for the reply to %r (got %r)"
                                 % (line, group))
                        group.append(raw[:-2].decode("utf-8", "replace"))
                        self.commands.append(group[-1])
                    self.pending = group
                elif self.strict and not pipelining:
                    self.quiet(line)
                tx = Tx(line)
                self.out("250 2.1.0 Ok")
            elif verb == "RCPT":
                check(tx is not None, "RCPT without MAIL: %r" % line)
                tx.rcpt_lines.append(line)
                m = re.match(r"(?i)RCPT TO:<([^>]*)>", line)
                check(m, "bad RCPT %r" % line)
                if self.strict and not pipelining:
                    self.quiet(line)
                reply = self.rcpt_reply(m.group(1))
                if reply.startswith("2"):
                    tx.rcpts.append(m.group(1))
                else:
                    tx.rejected.append((m.group(1), reply))
                self.out(reply)
            elif verb == "DATA":
                check(tx is not None, "DATA without MAIL")
                if not tx.rcpts:
                    self.out("554 5.5.1 No valid recipients")
                    continue
                self.out("354 go ahead")
                if not self.read_data(tx):
                    return self
                self.transactions.append(tx)
                reply = self.data_reply(tx)
                tx.data_reply = reply
                if reply is None:
                    self.drop()
                    return self
                self.out(reply)
                tx = None
            elif verb == "RSET":
                tx = None
                self.out("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.out("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.quit = True
                self.out("221 2.0.0 Bye")
                self.s.close()
                return self
            else:
                self.out("502 5.5.1 Unexpected %s" % verb)

    def read_data(self, tx):
        raw, n = [], 0
        while True:
            line = self.rawline()
            if line is None:
                fail("customer: connection closed in the middle of DATA")
            if line == b".\r\n":
                break
            raw.append(line)
            n += 1
            if self.drop_in_data is not None and n >= self.drop_in_data:
                tx.raw = b"".join(raw)
                self.drop()
                return False
        tx.raw = b"".join(raw)
        tx.data = b"".join(l[1:] if l.startswith(b".") else l for l in raw)
        return True


def wait_session_end(env, mark, what="the ODMR session to end"):
    """Waits for odmrd's per-session summary line logged after `mark`
    (an offset into the log); returns it."""
    def summary():
        for l in log_since(env, mark).splitlines():
            if "account=alice, messages=" in l or "account=bob, messages=" in l:
                return l
        return None
    return wait_for(summary, timeout=10, what=what)


def wait_disconnect(env, mark):
    """Waits until odmrd logged the end of a session that began after mark."""
    return wait_for(lambda: ("disconnect from" in log_since(env, mark)),
                    timeout=10, what="odmrd to log the disconnect")


# --------------------------------------------------------------------------
# DSN checks

def check_dsn(tx, to, failed, status_prefix="5."):
    """tx (a sink Transaction) is a DSN with null sender to `to` that
    reports exactly the recipients `failed` with Status starting with
    status_prefix.  Returns the per-recipient field dicts."""
    check(tx.mail_from == "", "DSN MAIL FROM is <%s>, not <>" % tx.mail_from)
    check(tx.rcpts == [to], "DSN sent to %r, expected [%r]" % (tx.rcpts, to))
    msg = email.message_from_bytes(tx.data, policy=email.policy.compat32)
    check(msg.get_content_type() == "multipart/report",
          "DSN Content-Type %r" % msg.get("Content-Type"))
    check(msg.get_param("report-type") == "delivery-status",
          "DSN report-type %r" % msg.get_param("report-type"))
    check("MAILER-DAEMON@mx.test" in (msg.get("From") or ""),
          "DSN From: %r" % msg.get("From"))
    parts = msg.get_payload()
    check(isinstance(parts, list) and len(parts) >= 2, "DSN parts: %r" % parts)
    status = parts[1]
    check(status.get_content_type() == "message/delivery-status",
          "second part is %r" % status.get_content_type())
    blocks = status.get_payload()
    per_rcpt = [dict(b.items()) for b in blocks[1:]]
    finals = sorted(f.get("Final-Recipient", "") for f in per_rcpt)
    check(finals == sorted("rfc822; " + a for a in failed),
          "DSN Final-Recipient fields %r, expected %r" % (finals, failed))
    for f in per_rcpt:
        check(f.get("Action") == "failed", "DSN Action %r" % f.get("Action"))
        check(f.get("Status", "").startswith(status_prefix),
              "DSN Status %r, expected %s..." % (f.get("Status"), status_prefix))
    return per_rcpt


# ==========================================================================
# 1. fetchmail as an independent ODMR client

def test_fetchmail_odmr_client(env):
    fetchmail = need("fetchmail")
    setup(env)
    bodies = {
        "a@example.org": to_crlf("From: <%s>\nTo: <a@example.org>\n"
                                 "Subject: first\n\nline one\n.leading dot\n"
                                 "..two dots\n.\nlast line\n" % SENDER),
        "b@example.net": to_crlf("From: <%s>\nTo: <b@example.net>\n"
                                 "Subject: second\n\n" % SENDER) +
        b"x" * 1500 + b"\r\n" + "8bit caf\u00e9\r\n".encode("utf-8"),
    }
    sent = {}     # message marker (Subject) -> (rcpts, body)
    smtp_in(env, ["a@example.org", "c@example.org"], bodies["a@example.org"])
    sent["first"] = (["a@example.org", "c@example.org"], bodies["a@example.org"])
    smtp_in(env, ["b@example.net"], bodies["b@example.net"],
            mail_params=" BODY=8BITMIME")
    sent["second"] = (["b@example.net"], bodies["b@example.net"])
    # and one for bob, which must stay
    smtp_in(env, ["z@example.com"], to_crlf("Subject: bob's\n\nhi\n"))
    check(len(env.queued()) == 3, "queue: %r" % env.queued())
    with Sink() as sink:
        rc = env.path("fetchmailrc")
        with open(rc, "w") as f:
            f.write('poll 127.0.0.1 protocol odmr service %d auth cram-md5\n'
                    '  user "alice" password "%s"\n'
                    '  fetchdomains example.org,example.net\n'
                    '  smtphost 127.0.0.1/%d\n'
                    '  sslproto ""\n' % (env.odmr_port, ALICE_PW, sink.port))
        os.chmod(rc, 0o600)
        fenv = dict(os.environ, HOME=env.dir, FETCHMAILHOME=env.dir,
                    LC_ALL="C")
        r = env.run([fetchmail, "-f", rc, "--nosyslog", "-v", "-N",
                     "--pidfile", env.path("fetchmail.pid"),
                     "-i", env.path("fetchids")], timeout=60, env=fenv)
        env.info("fetchmail exit %d" % r.returncode)
        txs = sink.wait(2, timeout=15, what="mail relayed by fetchmail")
        sink.wait_idle()
        time.sleep(0.3)
        check(len(sink.transactions) == 2,
              "sink got %d transactions" % len(sink.transactions))
        for tx in sink.transactions:
            m = re.search(rb"(?m)^Subject: (\w+)", tx.data)
            check(m, "relayed message without Subject: %r" % tx.data[:300])
            rcpts, body = sent[m.group(1).decode()]
            check(tx.mail_from == SENDER, "MAIL FROM <%s>" % tx.mail_from)
            check(sorted(tx.rcpts) == sorted(rcpts),
                  "recipients %r, expected %r" % (tx.rcpts, rcpts))
            got = strip_received(tx.data)
            if got != body:
                fail("message %s not byte-exact:\nsent %r\ngot  %r"
                     % (m.group(1), body, got))
        if r.returncode not in (0, 1):
            fail("fetchmail exited %d: %s %s" % (r.returncode, r.stdout[-800:],
                                                r.stderr[-800:]))
    left = e_files(env)
    check([f[:-2] for f in left] == ["example.com/" + env.queued_ids("example.com")[0]],
          "spool after fetchmail: %r (only bob's message should be left)"
          % left)
    for d in ("example.org", "example.net"):
        check(domain_files(env, d) == [], "files left in q/%s: %r"
              % (d, domain_files(env, d)))
    log_line_with(env, 0, "authenticated as alice", "CRAM-MD5")


# ==========================================================================
# 2. the provider side before the reversal

def test_ehlo_capabilities(env):
    setup(env)
    with odmr(env) as s:
        kw = ehlo(s)
        check("ATRN" in kw, "EHLO lacks ATRN: %r" % s.last_lines)
        check("ENHANCEDSTATUSCODES" in kw, "EHLO lacks ENHANCEDSTATUSCODES")
        check("STARTTLS" not in kw, "STARTTLS offered without a certificate")
        mechs = kw.get("AUTH", "").split()
        for m in ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5"):
            check(m in mechs, "AUTH lacks %s: %r" % (m, mechs))
        for m in ("PLAIN", "LOGIN", "ANONYMOUS"):
            check(m not in mechs, "AUTH offers %s without TLS: %r" % (m, mechs))
        s.quit()


def test_auth_before_ehlo(env):
    setup(env)
    with odmr(env) as s:
        check_reply(s.cmd("AUTH CRAM-MD5"), 503, "5.5.1", "AUTH before EHLO")
        # HELO is not enough: AUTH is an ESMTP extension
        check_reply(s.cmd("HELO customer.test"), 250, what="HELO")
        check_reply(s.cmd("AUTH CRAM-MD5"), 503, "5.5.1", "AUTH after HELO")
        ehlo(s)
        check_reply(cram_md5(s, "alice", ALICE_PW), 235, "2.7.0", "AUTH")
        s.quit()


def test_auth_unknown_mechanism_cancel_bad_base64(env):
    setup(env)
    with odmr(env) as s:
        ehlo(s)
        check_reply(s.cmd("AUTH X-NO-SUCH-MECH"), 504, "5.5.4", "unknown mech")
        check_reply(s.cmd("AUTH ANONYMOUS"), 504, "5.5.4", "ANONYMOUS")
        check_reply(s.cmd("AUTH CRAM-MD5"), 334, what="AUTH CRAM-MD5")
        check_reply(s.cmd("*"), 501, what="'*' cancels")
        check_reply(s.cmd("AUTH CRAM-MD5"), 334, what="AUTH CRAM-MD5")
        check_reply(s.cmd("!!not base64!!"), 501, "5.5.2", "bad base64 response")
        check_reply(s.cmd("AUTH SCRAM-SHA-256 %%%"), 501, "5.5.2",
                    "bad base64 initial response")
        # none of that counts as authenticated, and the session goes on
        check_exact(atrn(s, "example.org"),
                    "530 5.7.0 Authentication required", "ATRN after cancel")
        check_reply(cram_md5(s, "alice", ALICE_PW), 235, "2.7.0",
                    "AUTH after cancel")
        check_reply(s.cmd("AUTH CRAM-MD5"), 503, what="AUTH when authenticated")
        s.quit()


def test_auth_three_failures(env):
    setup(env)
    mark = len(env.log())
    with odmr(env) as s:
        ehlo(s)
        check_reply(cram_md5(s, "alice", "wrong1"), 535, "5.7.8", "1st failure")
        check_reply(cram_md5(s, "alice", "wrong2"), 535, "5.7.8", "2nd failure")
        check_reply(cram_md5(s, "nosuchuser", "x"), 421, "4.7.0",
                    "3rd failure")
        check(s.expect_closed(5), "connection still open after the 421")
    # SCRAM with a wrong password fails the same way
    with odmr(env) as s:
        ehlo(s)
        check_reply(scram(s, "alice", "wrong"), 535, "5.7.8",
                    "SCRAM-SHA-256 with a wrong password")
        s.quit()
    log = log_since(env, mark)
    for pw in ("wrong1", "wrong2"):
        check(pw not in log, "password %r in the log" % pw)


def test_plain_not_offered_without_tls(env):
    setup(env)
    with odmr(env) as s:
        kw = ehlo(s)
        check("PLAIN" not in kw.get("AUTH", "").split(), "PLAIN offered")
        check_reply(plain(s, "alice", ALICE_PW), 538, "5.7.11",
                    "AUTH PLAIN without TLS")
        check_reply(s.cmd("AUTH LOGIN"), 538, "5.7.11", "AUTH LOGIN without TLS")
        check_exact(atrn(s), "530 5.7.0 Authentication required",
                    "ATRN after refused PLAIN")
        s.quit()


def test_starttls_then_plain(env):
    env.make_cert()
    setup(env, debug=True)
    qid = enqueue(env, ["t@example.org"], message("overtls"))["example.org"]
    stored = env.message("example.org", qid)
    with odmr(env) as s:
        kw = ehlo(s)
        check("STARTTLS" in kw, "STARTTLS not offered: %r" % s.last_lines)
        check_reply(s.starttls(), 220, what="STARTTLS")
        kw = ehlo(s)
        check("STARTTLS" not in kw, "STARTTLS offered again inside TLS")
        mechs = kw.get("AUTH", "").split()
        check("PLAIN" in mechs and "LOGIN" in mechs,
              "PLAIN/LOGIN not offered over TLS: %r" % mechs)
        check_reply(plain(s, "alice", ALICE_PW), 235, "2.7.0",
                    "AUTH PLAIN over TLS")
        # the reversed session runs over TLS as well
        r = atrn(s, "example.org")
        check_reply(r, 250, what="ATRN over TLS")
        c = Customer(s).run()
        check(c.quit, "no QUIT from odmrd over TLS")
        check(len(c.transactions) == 1 and c.transactions[0].data == stored,
              "message over TLS: %r" % c.transactions)
    log = env.log()
    check(ALICE_PW not in log and b64("\0alice\0" + ALICE_PW) not in log,
          "the password (or the PLAIN response) is in the debug log")
    check(env.queued() == [], "queue not empty: %r" % env.queued())


def test_tls_quit_ends_with_close_notify(env):
    """The 221 to QUIT and TLS's close_notify both reach the customer (they
    leave in one packet): a client that treats a bare TCP close as an
    error (suppress_ragged_eofs=False) sees a clean end."""
    import ssl
    env.make_cert()
    setup(env)
    with odmr(env) as s:
        ehlo(s)
        check_reply(s.cmd("STARTTLS"), 220, what="STARTTLS")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s.sock = ctx.wrap_socket(s.sock, server_hostname="mx.test",
                                 suppress_ragged_eofs=False)
        ehlo(s)
        check_reply(s.cmd("QUIT"), 221, what="QUIT over TLS")
        check(s.buf == b"", "data after the 221: %r" % s.buf)
        s.sock.settimeout(5)
        try:
            rest = s.sock.recv(100)
        except ssl.SSLEOFError as e:
            fail("the connection ended without close_notify: %s" % e)
        check(rest == b"", "data after the 221: %r" % rest)


def test_scram_sha256(env):
    setup(env)
    with odmr(env) as s:
        ehlo(s)
        check_reply(scram(s, "alice", ALICE_PW), 235, "2.7.0",
                    "AUTH SCRAM-SHA-256")
        check_exact(atrn(s, "example.org"), "453 You have no mail",
                    "ATRN after SCRAM")
        s.quit()
    with odmr(env) as s:
        ehlo(s)
        check_reply(scram(s, "bob", BOB_PW, "SCRAM-SHA-1"), 235, "2.7.0",
                    "AUTH SCRAM-SHA-1")
        s.quit()


def test_cram_md5(env):
    setup(env)
    with odmr(env) as s:
        ehlo(s)
        check_reply(cram_md5(s, "bob", BOB_PW), 235, "2.7.0", "CRAM-MD5 bob")
        # bob is bob: alice's domain is not his
        check_exact(atrn(s, "example.org"), REFUSED, "bob asks for example.org")
        check_exact(atrn(s, "example.com"), "453 You have no mail",
                    "bob asks for example.com")
        s.quit()


def test_atrn_before_auth(env):
    setup(env)
    enqueue(env, ["u@example.org"], message("m1"))
    with odmr(env) as s:
        check_exact(atrn(s, "example.org"), "530 5.7.0 Authentication required",
                    "ATRN before EHLO")
        ehlo(s)
        check_exact(atrn(s, "example.org"), "530 5.7.0 Authentication required",
                    "ATRN before AUTH")
        check_exact(atrn(s), "530 5.7.0 Authentication required",
                    "ATRN (no argument) before AUTH")
        check_reply(s.cmd("NOOP"), 250, what="NOOP")
        s.quit()
    check(len(env.queued()) == 1, "queue changed")


def test_atrn_malformed(env):
    setup(env)
    enqueue(env, ["u@example.org"], message("m1"))
    with login(env) as s:
        for arg in (",,", "bad..domain", "example.org,", ",example.org",
                    "example.org,,example.net", "example.org example.net",
                    "exa_mple.org", "[127.0.0.1]", "example.org;x",
                    "-bad.example", "a" * 64 + ".example.org"):
            r = atrn(s, arg)
            check_reply(r, 501, "5.5.4", "ATRN %r" % arg)
        check_reply(s.cmd("NOOP"), 250, what="NOOP after 501s")
        s.quit()
    check(len(env.queued()) == 1, "queue changed")


def test_atrn_foreign_and_unknown_domain(env):
    setup(env)
    enqueue(env, ["u@example.org"], message("m1"))
    enqueue(env, ["u@example.com"], message("m2"))
    with login(env) as s:
        r1 = atrn(s, "example.com")          # bob's
        check_exact(r1, REFUSED, "another account's domain")
        r2 = atrn(s, "nonexistent.test")     # nobody's
        check_exact(r2, REFUSED, "a domain that does not exist")
        check(r1 == r2, "replies differ: %r vs %r" % (r1, r2))
        # the whole request is refused, mail for the own domain included
        check_exact(atrn(s, "example.org,example.com"), REFUSED,
                    "own + foreign domain")
        check_exact(atrn(s, "nonexistent.test,example.org"), REFUSED,
                    "unknown + own domain")
        check_reply(s.cmd("NOOP"), 250, what="NOOP after 450")
        s.quit()
    check(len(env.queued()) == 2, "queue changed: %r" % env.queued())


def test_atrn_domain_busy(env):
    setup(env)
    enqueue(env, ["u@example.org"], message("m1"))
    first = reverse(env, "example.org")
    first.out("220 customer.test ESMTP")
    line = first.command()
    check(line and line.upper().startswith("EHLO"),
          "first session: expected EHLO, got %r" % line)
    # the first session is now waiting for our EHLO reply, holding the lock
    second = login(env)
    check_exact(atrn(second, "example.org"), BUSY, "second ATRN, same domain")
    check_exact(atrn(second, "example.net,example.org"), BUSY,
                "second ATRN, one of two domains busy")
    check_exact(atrn(second), BUSY, "second ATRN without argument")
    check_reply(second.cmd("NOOP"), 250, what="NOOP after 451")
    # the first session ends: the domain is free again
    mark = len(env.log())
    first.drop()
    wait_disconnect(env, mark)
    deadline = time.time() + 5
    while True:
        r = atrn(second, "example.org")
        if r[0] != 451 or time.time() > deadline:
            break
        time.sleep(0.1)
    check_reply(r, 250, what="ATRN after the first session ended")
    c = Customer(second).run()
    check(len(c.transactions) == 1, "delivered %r" % c.transactions)
    check(env.queued() == [], "queue: %r" % env.queued())


def test_atrn_no_mail(env):
    setup(env)
    enqueue(env, ["u@example.com"], message("bobs"))
    with login(env) as s:
        check_exact(atrn(s, "example.org"), "453 You have no mail",
                    "ATRN, nothing queued")
        check_reply(s.cmd("NOOP"), 250, "2.0.0", "NOOP after 453")
        check_exact(atrn(s), "453 You have no mail", "ATRN (all), nothing queued")
        check_reply(s.cmd("NOOP"), 250, "2.0.0", "NOOP after second 453")
        # mail arrives: the same session can now dequeue it
        enqueue(env, ["u@example.net"], message("late"))
        check_reply(atrn(s, "example.net"), 250, what="ATRN after mail arrived")
        c = Customer(s).run()
        check([t.rcpts for t in c.transactions] == [["u@example.net"]],
              "delivered %r" % c.transactions)
    check(env.queued() == [("example.com", env.queued_ids("example.com")[0])],
          "bob's mail must stay: %r" % env.queued())


def test_commands_before_reversal(env):
    setup(env)
    enqueue(env, ["u@example.org"], message("m1"))
    with odmr(env) as s:
        ehlo(s)
        for line in ("MAIL FROM:<a@remote.test>", "RCPT TO:<u@example.org>",
                     "DATA", "VRFY alice", "EXPN list", "ETRN example.org",
                     "BDAT 10 LAST", "TURN"):
            check_reply(s.cmd(line), 502, "5.5.1", line + " before AUTH")
        check_reply(cram_md5(s, "alice", ALICE_PW), 235, "2.7.0", "AUTH")
        for line in ("MAIL FROM:<a@remote.test>", "RCPT TO:<u@example.org>",
                     "DATA"):
            check_reply(s.cmd(line), 502, "5.5.1", line + " after AUTH")
        for line in ("NOOP", "RSET"):
            check_reply(s.cmd(line), 250, what=line)
        check_reply(s.cmd("HELP"), 214, what="HELP")
        # still usable
        check_reply(atrn(s, "example.org"), 250, what="ATRN after 502s")
        c = Customer(s).run()
        check(len(c.transactions) == 1, "delivered %r" % c.transactions)


def test_require_tls(env):
    env.make_cert()
    setup(env, require_tls="yes")
    with odmr(env) as s:
        kw = ehlo(s)
        check("AUTH" not in kw, "AUTH offered before STARTTLS with "
              "require_tls: %r" % s.last_lines)
        check("STARTTLS" in kw, "STARTTLS not offered")
        check_reply(s.cmd("AUTH CRAM-MD5"), 530, "5.7.0", "AUTH before STARTTLS")
        check_reply(plain(s, "alice", ALICE_PW), 530, "5.7.0",
                    "AUTH PLAIN before STARTTLS")
        check_exact(atrn(s, "example.org"), "530 5.7.0 Authentication required",
                    "ATRN before STARTTLS")
        check_reply(s.starttls(), 220, what="STARTTLS")
        kw = ehlo(s)
        check("CRAM-MD5" in kw.get("AUTH", "").split(),
              "AUTH after STARTTLS: %r" % s.last_lines)
        check_reply(cram_md5(s, "alice", ALICE_PW), 235, "2.7.0",
                    "AUTH after STARTTLS")
        s.quit()


# ==========================================================================
# 3. delivery outcomes (the test is the customer)

def test_atrn_all_domains_and_case(env):
    setup(env)
    a = enqueue(env, ["u1@example.org"], message("org"))["example.org"]
    b = enqueue(env, ["u2@example.net"], message("net"))["example.net"]
    enqueue(env, ["u3@example.com"], message("com"))
    stored = {"u1@example.org": env.message("example.org", a),
              "u2@example.net": env.message("example.net", b)}
    c = reverse(env, None).run()
    got = {tuple(t.rcpts): t.data for t in c.transactions}
    check(sorted(got) == [("u1@example.org",), ("u2@example.net",)],
          "ATRN without argument delivered %r" % c.transactions)
    for (r,), data in got.items():
        check(data == stored[r], "message for %s differs from the queue" % r)
    check(c.quit, "no QUIT")
    check([d for d, _ in env.queued()] == ["example.com"],
          "queue: %r" % env.queued())
    # domain names are case-insensitive
    enqueue(env, ["u1@example.org"], message("org2"))
    c = reverse(env, "EXAMPLE.Org").run()
    check(len(c.transactions) == 1, "ATRN EXAMPLE.Org: %r" % c.transactions)


def test_rcpt_4xx_keeps_message(env):
    setup(env)
    qid = smtp_in(env, ["ok@example.org", "later@example.org"],
                  message("defer"))
    m_before = env.message("example.org", qid)
    mark = len(env.log())
    c = reverse(env, "example.org", rcpt_reply=lambda a: (
        "451 4.2.0 mailbox busy, try later" if a == "later@example.org"
        else "250 2.1.5 Ok")).run()
    check(c.quit, "odmrd did not QUIT")
    check(len(c.transactions) == 1 and c.transactions[0].rcpts == ["ok@example.org"],
          "first session: %r" % c.transactions)
    check(c.transactions[0].data == m_before, "data differs from the queue")
    wait_session_end(env, mark)
    check(env.queued_ids("example.org") == [qid],
          "message not kept after 4xx: %r" % env.queued())
    e = env.envelope("example.org", qid)
    check([r["addr"] for r in e["rcpts"]] == ["later@example.org"],
          "envelope recipients after the session: %r" % e["rcpts"])
    check(e["rcpts"][0]["last_reply"] == "451 4.2.0 mailbox busy, try later",
          "last reply recorded: %r" % e["rcpts"][0]["last_reply"])
    check(e.get("attempts") == 1, "attempts: %r" % e.get("attempts"))
    # the queue file stays as it was; the progress is its newer envelope
    check(env.message_files("example.org", qid) == [qid + ".n", qid + ".q"],
          "files: %r" % env.message_files("example.org", qid))
    check(env.message("example.org", qid) == m_before, "the data changed")
    check(env.spool_problems() == [], "spool: %r" % env.spool_problems())
    # SPEC 3.5: queue id, domain, recipient, account, status and reply
    l = log_line_with(env, mark, qid, "later@example.org", "alice",
                      "deferred", "451 4.2.0 mailbox busy, try later")
    check(l.replace("later@example.org", "").count("example.org") >= 1,
          "the delivery log line does not name the domain: %r" % l)
    log_line_with(env, mark, qid, "ok@example.org", "alice", "sent",
                  "250 2.0.0 Ok delivered")
    # the next ATRN delivers it
    c = reverse(env, "example.org").run()
    check(len(c.transactions) == 1 and
          c.transactions[0].rcpts == ["later@example.org"],
          "second session: %r" % c.transactions)
    check(c.transactions[0].data == m_before, "data differs on the retry")
    check(env.queued() == [], "queue after retry: %r" % env.queued())
    check(domain_files(env, "example.org") == [], "files left: %r"
          % domain_files(env, "example.org"))


def test_rcpt_5xx_returns_dsn(env):
    with Sink() as relay:
        setup(env, relay=relay)
        qid = smtp_in(env, ["good@example.org", "bad@example.org"],
                      message("bounce-one"))
        stored = env.message("example.org", qid)
        mark = len(env.log())
        c = reverse(env, "example.org", rcpt_reply=lambda a: (
            "550 5.1.1 <bad@example.org>: no such user"
            if a == "bad@example.org" else "250 2.1.5 Ok")).run()
        check(c.quit, "odmrd did not QUIT")
        check(len(c.transactions) == 1 and
              c.transactions[0].rcpts == ["good@example.org"],
              "customer got %r" % c.transactions)
        check(c.transactions[0].data == stored, "delivered data differs")
        dsn = relay.wait(1, what="DSN for bad@example.org")
        per = check_dsn(dsn[0], SENDER, ["bad@example.org"], "5.1.1")
        check("no such user" in per[0].get("Diagnostic-Code", ""),
              "Diagnostic-Code lacks the customer's reply: %r" % per[0])
        wait_session_end(env, mark)
        time.sleep(0.3)
        check(len(relay.transactions) == 1,
              "relay got %d messages" % len(relay.transactions))
        check(env.queued() == [], "message still queued: %r" % env.queued())
        log_line_with(env, mark, qid, "bad@example.org", "alice", "bounced",
                      "550 5.1.1")
        check(domain_files(env, "example.org") == [],
              "files left: %r" % domain_files(env, "example.org"))


def test_dsn_status_only_from_a_status_code(env):
    """The report's Status is the enhanced code that starts the
    customer's reply text, or 5.0.0: "5.7.1:" gives 5.7.1, "5.1.10x" and
    "5.x" give 5.0.0 - never text that is not a code."""
    replies = {"a@example.org": "550 5.7.1: blocked by policy",
               "b@example.org": "550 5.1.10x odd",
               "c@example.org": "550 5.x not a code"}
    with Sink() as relay:
        setup(env, relay=relay)
        smtp_in(env, sorted(replies), message("status"))
        c = reverse(env, "example.org", rcpt_reply=lambda a: replies[a]).run()
        check(c.quit, "odmrd did not QUIT")
        dsn = relay.wait(1, what="the DSN")
        per = check_dsn(dsn[0], SENDER, sorted(replies), "5.")
        got = {f["Final-Recipient"].split(";")[1].strip(): f["Status"]
               for f in per}
        check(got == {"a@example.org": "5.7.1", "b@example.org": "5.0.0",
                      "c@example.org": "5.0.0"}, "statuses %r" % got)


def test_data_reply_outcomes(env):
    """The reply after the final dot decides for every recipient the
    customer accepted: 4xx keeps them, 5xx returns them (one DSN for the
    message), a multi-line 250 delivers."""
    with Sink() as relay:
        setup(env, relay=relay)
        q_temp = smtp_in(env, ["t1@example.org", "t2@example.org"],
                         message("temp"))
        q_perm = smtp_in(env, ["p1@example.org", "p2@example.org"],
                         message("perm"))
        q_ok = smtp_in(env, ["m@example.org"], message("multi"))
        replies = {("t1@example.org", "t2@example.org"):
                   "452 4.3.1 Insufficient system storage",
                   ("p1@example.org", "p2@example.org"):
                   "554 5.6.0 Message content rejected",
                   ("m@example.org",):
                   "250-2.0.0 Ok\r\n250-more text\r\n250 2.0.0 queued"}
        mark = len(env.log())
        c = reverse(env, "example.org",
                    rcpt_reply=lambda a: ("550 5.1.1 unknown" if a ==
                                          "p2@example.org" else "250 2.1.5 Ok"),
                    data_reply=lambda tx: replies[tuple(sorted(
                        tx.rcpts + [a for a, _ in tx.rejected]))]).run()
        check(c.quit, "no QUIT")
        check(len(c.transactions) == 3, "transactions %r" % c.transactions)
        wait_session_end(env, mark)
        check(env.queued_ids("example.org") == [q_temp],
              "after the session: %r" % env.queued())
        e = env.envelope("example.org", q_temp)
        check(sorted(r["addr"] for r in e["rcpts"]) ==
              ["t1@example.org", "t2@example.org"], "kept %r" % e["rcpts"])
        check(all(r["last_reply"] == "452 4.3.1 Insufficient system storage"
                  for r in e["rcpts"]), "last replies %r" % e["rcpts"])
        dsn = relay.wait(1, what="DSN for the rejected data")
        time.sleep(0.3)
        check(len(relay.transactions) == 1,
              "one DSN expected for %s, relay got %r" % (q_perm,
                                                         relay.transactions))
        per = check_dsn(dsn[0], SENDER, ["p1@example.org", "p2@example.org"])
        status = sorted(f["Status"] for f in per)
        check(status == ["5.1.1", "5.6.0"], "DSN statuses %r" % status)
        log_line_with(env, mark, q_ok, "m@example.org", "sent")


def test_null_sender_never_bounced(env):
    with Sink() as relay:
        setup(env, relay=relay)
        qid = smtp_in(env, ["n@example.org"], message("null"), sender="")
        mark = len(env.log())
        c = reverse(env, "example.org",
                    rcpt_reply=lambda a: "550 5.1.1 no such user").run()
        check(c.quit and c.transactions == [], "customer: %r" % c.transactions)
        check(c.commands[-2:] == ["RSET", "QUIT"] or
              c.commands[-1] == "QUIT", "commands %r" % c.commands)
        wait_session_end(env, mark)
        check(env.queued() == [], "null-sender message still queued")
        log_line_with(env, mark, qid, "n@example.org", "bounced")
        time.sleep(0.5)
        check(relay.connections == 0 and relay.transactions == [],
              "a bounce was sent for a null-sender message: %r"
              % relay.transactions)


def test_connection_dropped_during_data(env):
    setup(env)
    body = message("dropped", b"".join(b"line %d of the body\r\n" % i
                                       for i in range(200)))
    qid = enqueue(env, ["u1@example.org", "u2@example.org"], body)["example.org"]
    e_before, m_before = files_of(env, "example.org", qid)
    mark = len(env.log())
    c = reverse(env, "example.org", drop_in_data=20).run()
    check(len(c.transactions) == 0 and c.closed, "customer: %r" % c.transactions)
    summary = wait_session_end(env, mark)
    check("connection lost" in summary, "summary: %r" % summary)
    check(env.queued_ids("example.org") == [qid], "queue: %r" % env.queued())
    e_after, m_after = files_of(env, "example.org", qid)
    check(e_after == e_before, ".e changed after a dropped connection:\n%r\n%r"
          % (e_before, e_after))
    check(m_after == m_before, ".m changed after a dropped connection")
    # dropped after the complete data, before the reply: same
    mark = len(env.log())
    c = reverse(env, "example.org", data_reply=lambda tx: None).run()
    check(len(c.transactions) == 1, "customer: %r" % c.transactions)
    wait_session_end(env, mark)
    check(files_of(env, "example.org", qid) == (e_before, m_before),
          "queue files changed after a drop before the reply to the data")
    # and it is delivered afterwards
    c = reverse(env, "example.org").run()
    check(len(c.transactions) == 1 and c.transactions[0].data == m_before,
          "retry: %r" % c.transactions)
    check(env.queued() == [], "queue: %r" % env.queued())


def session_pid(env, mark):
    """pid of the session process that logged the ATRN after mark."""
    def find():
        m = re.search(r"odmrd\[(\d+)\]: .*ATRN by alice", log_since(env, mark))
        return int(m.group(1)) if m else None
    return wait_for(find, timeout=5, what="the 'ATRN by alice' log line")


def dead(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_kill9_session_during_delivery(env):
    setup(env, debug=True)
    ids = {}
    for i in range(3):
        ids.update({i: enqueue(env, ["k%d@example.org" % i],
                               message("kill%d" % i))["example.org"]})
    before = {i: files_of(env, "example.org", q) for i, q in ids.items()}
    mark = len(env.log())
    killed = []

    def kill_on_second(tx):
        if len(c.transactions) < 2:
            return "250 2.0.0 Ok"
        pid = session_pid(env, mark)
        check(pid != env.daemon.pid and pid in descendants(env.daemon.pid),
              "pid %d from the log is not a session process of odmrd %d"
              % (pid, env.daemon.pid))
        # delivery.c settles the first message behind the second's data,
        # without waiting for this reply: wait until it has, so the kill
        # lands after it.  (A kill before it leaves the first message
        # queued, a duplicate by design: docs/architecture.md.)
        first = c.transactions[0].rcpts[0]
        done = [q for i, q in ids.items() if first == "k%d@example.org" % i]
        wait_for(lambda: done and done[0] not in env.queued_ids("example.org"),
                 timeout=5, what="the first message's removal")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_for(lambda: dead(pid), timeout=5, what="the session to die")
        return "250 2.0.0 Ok"   # too late: nobody reads it

    c = reverse(env, "example.org", data_reply=kill_on_second)
    try:
        c.run()
    except (TestFailure, OSError):
        pass
    check(killed, "the session was not killed (transactions %r)"
          % c.transactions)
    check(not c.quit, "QUIT from a killed session")
    check(env.running(), "odmrd master died with its session process")
    first = c.transactions[0]
    delivered_first = [i for i, q in ids.items()
                       if first.rcpts == ["k%d@example.org" % i]]
    check(delivered_first, "first transaction %r" % first)
    # nothing lost: the two not acknowledged are intact
    for i, q in ids.items():
        if i in delivered_first:
            continue
        check(q in env.queued_ids("example.org"),
              "message %d (%s) lost after kill -9" % (i, q))
        check(files_of(env, "example.org", q) == before[i],
              "message %d (%s) changed after kill -9" % (i, q))
    check(env.spool_problems() == [], "spool: %r" % env.spool_problems())
    # the domain is not locked: a new ATRN gets 250 at once
    s = login(env)
    check_reply(atrn(s, "example.org"), 250, what="ATRN right after kill -9")
    c2 = Customer(s).run()
    got = sorted(t.rcpts[0] for t in c2.transactions)
    want = sorted("k%d@example.org" % i for i in ids if i not in delivered_first)
    check(got == want, "after the kill delivered %r, expected %r" % (got, want))
    for t in c2.transactions:
        i = int(t.rcpts[0][1])
        check(t.data == before[i][1], "message %d differs" % i)
    check(env.queued() == [], "queue: %r" % env.queued())


def test_pipelining_offered_or_not(env):
    setup(env)
    for ext in (FULL_EXT, ("8BITMIME", "ENHANCEDSTATUSCODES")):
        ids = [enqueue(env, ["p1@example.org", "p2@example.org"],
                       message("pipe-a"))["example.org"],
               enqueue(env, ["p3@example.org"], message("pipe-b"))["example.org"]]
        stored = {q: env.message("example.org", q) for q in ids}
        c = reverse(env, "example.org", extensions=ext, strict=True).run()
        what = "PIPELINING %s" % ("offered" if "PIPELINING" in ext else
                                  "not offered")
        check(c.quit, "%s: no QUIT" % what)
        check(sorted(tuple(t.rcpts) for t in c.transactions) ==
              [("p1@example.org", "p2@example.org"), ("p3@example.org",)],
              "%s: %r" % (what, c.transactions))
        check(sorted(t.data for t in c.transactions) ==
              sorted(stored.values()), "%s: data differs" % what)
        check(env.queued() == [], "%s: queue %r" % (what, env.queued()))


def test_next_envelope_follows_the_dot(env):
    """With PIPELINING the next message's MAIL, RCPT and DATA come in the
    same write as the previous final dot, before its reply (RFC 2920 3.1);
    an outcome is still taken only from the reply to each dot: a 4xx
    keeps that message, a connection dropped after a 250 keeps every
    message but the acknowledged one."""
    setup(env)

    def fill(tag):
        return [enqueue(env, ["%s%d@example.org" % (tag, i)],
                        message("%s-%d" % (tag, i)))["example.org"]
                for i in range(3)]

    def customer(replies):
        ahead = []
        holder = {}

        def data_reply(tx):
            c = holder["c"]
            n = len(c.transactions)
            line = c.try_line(5) if n < 3 else None
            ahead.append(line)
            if line:   # served as usual, after our reply
                c.pending.append(line[:-2].decode())
            reply = replies(n)
            if reply.startswith("drop after "):
                c.out(reply[len("drop after "):])
                return None
            return reply
        c = reverse(env, "example.org", data_reply=data_reply)
        holder["c"] = c
        return c, ahead

    ids = fill("ahead")
    rcpts = {q: rcpts_of_id(env, q) for q in ids}
    mark = len(env.log())
    c, ahead = customer(lambda n: "451 4.3.0 try later" if n == 1
                        else "250 2.0.0 Ok")
    c.run()
    check(c.quit and len(c.transactions) == 3, "customer: %r" % c.transactions)
    check([bool(a) and a.startswith(b"MAIL FROM:") for a in ahead] ==
          [True, True, False], "the next MAIL did not follow the dot: %r"
          % ahead)
    wait_session_end(env, mark)
    kept = [q for q in ids if rcpts[q] == c.transactions[0].rcpts]
    check(env.queued_ids("example.org") == kept and len(kept) == 1,
          "after a 451 to the first dot: %r" % env.queued())
    c = reverse(env, "example.org").run()   # empties the queue
    check(env.queued() == [], "queue: %r" % env.queued())
    # the connection drops after the 250 to the first dot, with the
    # second message's envelope sent and unanswered
    ids = fill("drop")
    rcpts = {q: rcpts_of_id(env, q) for q in ids}
    mark = len(env.log())
    c, ahead = customer(lambda n: "drop after 250 2.0.0 Ok")
    c.run()
    check(len(c.transactions) == 1 and ahead[0], "customer: %r %r"
          % (c.transactions, ahead))
    wait_session_end(env, mark)
    left = sorted(q for q in ids if rcpts[q] != c.transactions[0].rcpts)
    check(sorted(env.queued_ids("example.org")) == left and len(left) == 2,
          "after a drop behind the first 250: %r" % env.queued())


def rcpts_of_id(env, qid):
    try:
        return sorted(r["addr"] for r in env.envelope("example.org",
                                                       qid)["rcpts"])
    except (OSError, KeyError):
        return None


def test_mail_arriving_during_session(env):
    setup(env)
    enqueue(env, ["first@example.org"], message("first"))
    late = {}

    def hold(tx):
        if tx.rcpts == ["first@example.org"]:
            late["id"] = smtp_in(env, ["late@example.org"], message("late"))
            late["data"] = env.message("example.org", late["id"])
        return "250 2.0.0 Ok"

    c = reverse(env, "example.org", data_reply=hold).run()
    check(c.quit, "no QUIT")
    check([t.rcpts for t in c.transactions] ==
          [["first@example.org"], ["late@example.org"]],
          "mail queued during the session not delivered in it: %r"
          % c.transactions)
    check(c.transactions[1].data == late["data"], "late message differs")
    check(env.queued() == [], "queue: %r" % env.queued())
    # a bare ATRN covers the account's domains without mail too: mail that
    # arrives for one of them during the session is delivered in it
    enqueue(env, ["first@example.org"], message("first2"))
    late.clear()

    def hold_other(tx):
        if tx.rcpts == ["first@example.org"]:
            late["id"] = smtp_in(env, ["late@example.net"], message("late2"))
        return "250 2.0.0 Ok"

    c = reverse(env, data_reply=hold_other).run()
    check([t.rcpts for t in c.transactions] ==
          [["first@example.org"], ["late@example.net"]],
          "bare ATRN: mail for an empty domain queued during the session: %r"
          % c.transactions)
    check(env.queued() == [], "queue: %r" % env.queued())


def test_dot_stuffing_on_the_wire(env):
    setup(env)
    body = to_crlf("Subject: dots\n\n.\n..\n.a\n..b\nx.\n . \n...\n.\r\n")
    qid = smtp_in(env, ["d@example.org"], body)
    stored = env.message("example.org", qid)
    check(strip_received(stored) == body, "stored message differs from sent")
    c = reverse(env, "example.org").run()
    check(len(c.transactions) == 1, "delivered %r" % c.transactions)
    t = c.transactions[0]
    check(t.raw == dot_stuff(stored),
          "data on the wire is not dot-stuffed right:\n%r\nexpected\n%r"
          % (t.raw, dot_stuff(stored)))
    check(b"\r\n..\r\n...\r\n..a\r\n...b\r\n" in t.raw,
          "dot lines on the wire: %r" % t.raw)
    check(t.data == stored, "unstuffed data differs from the stored message")
    check(env.queued() == [], "queue: %r" % env.queued())


def test_dot_stuffing_across_read_chunks(env):
    """Dot lines where odmrd's 64 KB reads of the data file split them:
    lines ".x." repeated, in five messages shifted by one byte each, so
    that the byte at offset 65536 is a leading '.', the 'x', a '.' inside
    the line, the CR and the LF of a line end."""
    setup(env)
    stored, at_boundary = {}, set()
    for shift in range(5):
        body = (b"Subject: chunk %d\r\n\r\n" % shift + b"q" * (100 + shift) +
                b"\r\n" + b"y" * 64600 + b"\r\n" + b".x.\r\n" * 400 +
                b"end\r\n")
        q = smtp_in(env, ["c%d@example.org" % shift], body)
        m = env.message("example.org", q)
        stored["c%d@example.org" % shift] = m
        at_boundary.add(m[65536:65537])
    check(at_boundary == {b".", b"x", b"\r", b"\n"},
          "test set-up: bytes at offset 65536 are %r" % at_boundary)
    c = reverse(env, "example.org").run()
    check(len(c.transactions) == 5, "delivered %r" % c.transactions)
    for t in c.transactions:
        want = stored[t.rcpts[0]]
        check(t.raw == dot_stuff(want), "%s: wire data differs from the "
              "dot-stuffed stored message" % t.rcpts[0])
        check(t.data == want, "%s: data differs" % t.rcpts[0])
    check(env.queued() == [], "queue: %r" % env.queued())


def test_customer_size_limit(env):
    with Sink() as relay:
        setup(env, relay=relay)
        small = smtp_in(env, ["s@example.org"], message("small"))
        big = smtp_in(env, ["b1@example.org", "b2@example.org"],
                      message("big", b"z" * 5000 + b"\r\n"))
        small_size = len(env.message("example.org", small))
        check(small_size < 2000 and len(env.message("example.org", big)) > 5000,
              "test messages have unexpected sizes")
        mark = len(env.log())
        c = reverse(env, "example.org",
                    extensions=FULL_EXT + ("SIZE 2000",)).run()
        check(c.quit, "no QUIT")
        check([t.rcpts for t in c.transactions] == [["s@example.org"]],
              "customer got %r (the big message must not be sent)"
              % c.transactions)
        mails = [l for l in c.commands if l.upper().startswith("MAIL")]
        check(len(mails) == 1, "MAIL commands: %r" % mails)
        check(c.transactions[0].params().get("SIZE") == str(small_size),
              "MAIL for the small one lacks SIZE=%d: %r"
              % (small_size, c.transactions[0].mail_line))
        dsn = relay.wait(1, what="DSN for the too-big message")
        check_dsn(dsn[0], SENDER, ["b1@example.org", "b2@example.org"], "5.3.4")
        wait_session_end(env, mark)
        check(env.queued() == [], "queue: %r" % env.queued())


def test_esmtp_parameters_passed(env):
    setup(env)
    qid = smtp_in(env, ["p@example.org"], message("params", "caf\u00e9\r\n".encode()),
                  mail_params=" BODY=8BITMIME RET=HDRS ENVID=env+2Did42",
                  rcpt_params={"p@example.org":
                               " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;p@example.org"})
    size = len(env.message("example.org", qid))
    # a plain customer: no parameters, and its 4xx keeps the mail
    mark = len(env.log())
    c = reverse(env, "example.org", extensions=("ENHANCEDSTATUSCODES",),
                rcpt_reply=lambda a: "452 4.2.2 over quota").run()
    # its session holds the domain's lock until odmrd has finished it (slow
    # under the sanitizers): the next ATRN would get 451
    wait_for(lambda: "disconnect from 127.0.0.1 account=alice"
             in log_since(env, mark), timeout=10, what="the first session's end")
    mails = [l for l in c.commands if l.upper().startswith("MAIL")]
    rcpts = [l for l in c.commands if l.upper().startswith("RCPT")]
    check(mails == ["MAIL FROM:<%s>" % SENDER],
          "MAIL to a customer without extensions: %r" % mails)
    check(rcpts == ["RCPT TO:<p@example.org>"],
          "RCPT to a customer without DSN: %r" % rcpts)
    check(env.queued_ids("example.org") == [qid], "not kept after 452")
    # a full customer gets them all
    c = reverse(env, "example.org",
                extensions=FULL_EXT + ("SIZE 10000000",)).run()
    check(len(c.transactions) == 1, "delivered %r" % c.transactions)
    t = c.transactions[0]
    p = t.params()
    check(p.get("SIZE") == str(size), "SIZE: %r" % t.mail_line)
    check(p.get("BODY") == "8BITMIME", "BODY: %r" % t.mail_line)
    check(p.get("RET") == "HDRS", "RET: %r" % t.mail_line)
    check(p.get("ENVID") == "env+2Did42", "ENVID: %r" % t.mail_line)
    check("SMTPUTF8" not in p, "SMTPUTF8 for an ASCII message: %r" % t.mail_line)
    r = t.rcpt_lines[0]
    check(re.search(r"(?i)NOTIFY=(SUCCESS,FAILURE|FAILURE,SUCCESS)\b", r),
          "NOTIFY not passed: %r" % r)
    check("ORCPT=rfc822;p@example.org" in r, "ORCPT not passed: %r" % r)
    check(env.queued() == [], "queue: %r" % env.queued())


def test_smtputf8_message(env):
    with Sink() as relay:
        setup(env, relay=relay)
        qid = smtp_in(env, ["j\u00fcrgen@example.org"],
                      message("utf8", "Gr\u00fc\u00dfe\r\n".encode()),
                      mail_params=" SMTPUTF8 BODY=8BITMIME")
        stored = env.message("example.org", qid)
        c = reverse(env, "example.org").run()
        check(len(c.transactions) == 1, "delivered %r" % c.transactions)
        t = c.transactions[0]
        check("SMTPUTF8" in t.params(), "SMTPUTF8 not passed: %r" % t.mail_line)
        check(t.rcpts == ["j\u00fcrgen@example.org"], "rcpt %r" % t.rcpts)
        check(t.data == stored, "data differs")
        # a customer without SMTPUTF8 cannot take it: returned
        smtp_in(env, ["j\u00fcrgen@example.org"], message("utf8b"),
                mail_params=" SMTPUTF8")
        c = reverse(env, "example.org", extensions=("8BITMIME",)).run()
        check(c.transactions == [], "sent to a customer without SMTPUTF8")
        dsn = relay.wait(1, what="DSN for the SMTPUTF8 message")
        check(dsn[0].mail_from == "" and dsn[0].rcpts == [SENDER],
              "DSN envelope %r" % dsn[0])
        check(env.queued() == [], "queue: %r" % env.queued())


def test_overlong_customer_reply(env):
    """A reply line longer than RFC 5321's 512 octets still counts by its
    code: the message the customer accepted is not delivered again."""
    setup(env)
    qid = enqueue(env, ["long@example.org"], message("long-reply"))["example.org"]
    mark = len(env.log())
    c = reverse(env, "example.org",
                data_reply=lambda tx: "250 2.0.0 Ok " + "x" * 3000).run()
    check(len(c.transactions) == 1 and c.quit, "session %r" % c.transactions)
    check(env.queued() == [], "queue after an over-long 250: %r" % env.queued())
    log_line_with(env, mark, qid, "over-long reply line")
    log_line_with(env, mark, qid, "status=sent")


def test_bare_atrn_account_with_many_domains(env):
    """A bare ATRN serves the account's domains that have mail first, at
    most 100 per session; the rest wait (logged) and the next ATRN takes
    them, as the drained ones drop out.  (Taking the first 100 owned
    domains instead would serve the same, now empty, 100 every time.)"""
    setup(env)
    names = ["d%03d.example" % i for i in range(105)]
    for d in names:
        env.add_domain(d, "alice")
        enqueue(env, ["u@" + d], message("many-" + d))
    mark = len(env.log())
    c = reverse(env).run()
    first = sorted(t.rcpts[0] for t in c.transactions)
    check(len(first) == 100, "first ATRN delivered %d" % len(first))
    log_line_with(env, mark, "5 more domain(s) with mail")
    c = reverse(env).run()
    second = sorted(t.rcpts[0] for t in c.transactions)
    check(sorted(first + second) == ["u@" + d for d in names],
          "second ATRN delivered %r" % second)
    check(env.queued() == [], "queue: %r" % env.queued())


def test_two_file_spool_of_earlier_versions_is_delivered(env):
    """A message as spools held it before queue files (server/qfile.h): a
    data file .m and an envelope .e.  odmrd reads both layouts, so it is
    delivered as it is, byte-exact, and then removed whole."""
    setup(env)
    body = message("two-file layout")
    qid = smtp_in(env, ["a@example.org"], body)
    data, text = env.queue_file("example.org", qid)
    d = env.queue_dir("example.org")
    with open(os.path.join(d, qid + ".m"), "wb") as f:
        f.write(data)
    with open(os.path.join(d, qid + ".e"), "wb") as f:
        f.write(text)
    os.unlink(os.path.join(d, qid + ".q"))
    check(env.queued_ids("example.org") == [qid], "queue %r" % env.queued())
    c = reverse(env, "example.org").run()
    check([t.data for t in c.transactions] == [data],
          "delivered %r, queued %r" % ([t.data for t in c.transactions], data))
    check(env.queued() == [], "queue: %r" % env.queued())
    check(domain_files(env, "example.org") == [], "files left in q/example.org:"
          " %r" % domain_files(env, "example.org"))


def test_two_file_message_cut_short_is_left_alone(env):
    """A data file .m shorter than the size its envelope gives (a damaged
    spool) is never sent: it would go out cut short, be answered 250 and
    be removed.  It stays queued with a log line; the next message goes."""
    setup(env)
    qid = smtp_in(env, ["a@example.org"], message("cut short"))
    other = smtp_in(env, ["b@example.org"], message("whole"))
    data, text = env.queue_file("example.org", qid)
    d = env.queue_dir("example.org")
    with open(os.path.join(d, qid + ".m"), "wb") as f:
        f.write(data[:len(data) // 2])
    with open(os.path.join(d, qid + ".e"), "wb") as f:
        f.write(text)
    os.unlink(os.path.join(d, qid + ".q"))
    mark = len(env.log())
    c = reverse(env, "example.org").run()
    check([t.rcpts for t in c.transactions] == [["b@example.org"]],
          "delivered %r" % c.transactions)
    check(env.queued_ids("example.org") == [qid], "queue %r" % env.queued())
    log_line_with(env, mark, qid, "shorter than its envelope says")
    check(other not in env.queued_ids("example.org"), "the whole one stayed")


def test_fifo_in_the_queue_does_not_hang_delivery(env):
    """A FIFO named like a queue file would block open() for ever, with
    the domain's lock held.  Spool files are opened without blocking and
    must be regular files: the FIFO is left alone with a log line and the
    real message is delivered."""
    setup(env)
    qid = smtp_in(env, ["a@example.org"], message("next to a fifo"))
    fifo = os.path.join(env.queue_dir("example.org"), "0000000000000001.q")
    os.mkfifo(fifo, 0o600)
    mark = len(env.log())
    c = reverse(env, "example.org", timeout=10).run()
    check([t.rcpts for t in c.transactions] == [["a@example.org"]],
          "delivered %r" % c.transactions)
    check(c.quit, "no QUIT: odmrd hung on the FIFO")
    check(qid not in env.queued_ids("example.org"), "message still queued")
    log_line_with(env, mark, "0000000000000001", "not a regular file")
    os.unlink(fifo)


def test_damaged_envelope_left_alone(env):
    """An envelope whose id or recipients do not fit its file name is
    unreadable: left in the queue with a log line, and never taken for
    another message (which would remove that one undelivered)."""
    setup(env)
    a = smtp_in(env, ["a@example.org"], message("env-a"))
    b = smtp_in(env, ["b@example.org"], message("env-b"))
    text = env.envelope_text("example.org", a).decode()
    check(("I %s\n" % a) in text, "no I record in %r" % text)
    env.rewrite_envelope("example.org", a, lambda t: t.replace(
        ("I %s\n" % a).encode(), ("I %s\n" % b).encode()))
    mark = len(env.log())
    c = reverse(env, "example.org").run()
    check([t.rcpts for t in c.transactions] == [["b@example.org"]],
          "delivered %r" % c.transactions)
    check(env.queued_ids("example.org") == [a], "queue %r" % env.queued())
    log_line_with(env, mark, a, "unreadable envelope", "names %s" % b)
    # no recipients at all: the same
    env.rewrite_envelope("example.org", a, lambda t: "".join(
        l for l in text.splitlines(True) if not l.startswith("R ")).encode())
    mark = len(env.log())
    c = reverse(env, "example.org")
    c.start()
    c.drop()
    r = env.odmrctl("queue", "bounce", a)
    check(r.returncode != 0 and "no recipients" in r.stderr,
          "odmrctl queue bounce of an envelope without recipients: exit %d, "
          "%r" % (r.returncode, r.stderr))
    check(env.queued_ids("example.org") == [a], "queue %r" % env.queued())


EIGHT_BIT_MIME = (
    b"From: Sender <" + SENDER.encode() + b">\r\n"
    b"To: d@example.org\r\n"
    b"Subject: 8-bit parts\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"=b1\"\r\n\r\n"
    b"--=b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln, 5 \xe2\x82\xac = teuer \r\n"
    b".a line with a leading dot and " + b"\xc3\xa9" * 60 + b"\r\n"
    b"--=b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"AAECAwQF\r\n"
    b"--=b1\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"From: x@y.test\r\nSubject: inner\r\n\r\n"
    b"inner \xc3\xb8\r\n"
    b"--=b1--\r\n")


def leaf_parts(data):
    """(content type, decoded payload) of every leaf part, in order."""
    msg = email.message_from_bytes(data)
    return [(p.get_content_type(), p.get_payload(decode=True))
            for p in msg.walk() if not p.is_multipart()
            and p.get_content_type() != "message/rfc822"]


def test_8bit_downgrade_for_customer_without_8bitmime(env):
    """RFC 6152 section 3: 8-bit parts are re-encoded quoted-printable for
    a customer that does not offer 8BITMIME; a customer that does gets
    the message byte for byte."""
    setup(env)
    qid = smtp_in(env, ["d@example.org"], EIGHT_BIT_MIME,
                  mail_params=" BODY=8BITMIME")
    stored = env.message("example.org", qid)
    ascii_qid = smtp_in(env, ["d@example.org"], message("ascii"),
                        mail_params=" BODY=8BITMIME")
    ascii_stored = env.message("example.org", ascii_qid)
    mark = len(env.log())
    c = reverse(env, "example.org",
                extensions=("PIPELINING", "ENHANCEDSTATUSCODES")).run()
    check(len(c.transactions) == 2, "delivered %r" % c.transactions)
    by_subject = {b"8-bit" in t.data: t for t in c.transactions}
    t = by_subject[True]
    check("BODY" not in t.params(), "BODY= sent: %r" % t.mail_line)
    check(all(b < 128 for b in t.data), "8-bit octets reached the customer")
    check(max(len(l) for l in t.data.split(b"\r\n")) <= 998, "line too long")
    check(b"Content-Transfer-Encoding: quoted-printable\r\n" in t.data,
          "no quoted-printable part:\n%s" % t.data.decode(errors="replace"))
    check(b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n" in t.data,
          "the base64 part changed")
    check(leaf_parts(t.data) == leaf_parts(stored),
          "decoded parts differ:\n%r\n%r" % (leaf_parts(t.data),
                                              leaf_parts(stored)))
    check(by_subject[False].data == ascii_stored,
          "a 7-bit message declared 8BITMIME was changed")
    log_line_with(env, mark, qid, "converted to quoted-printable")
    check(env.queued() == [], "queue: %r" % env.queued())
    # with 8BITMIME offered: as stored, BODY passed on
    qid = smtp_in(env, ["d@example.org"], EIGHT_BIT_MIME,
                  mail_params=" BODY=8BITMIME")
    stored = env.message("example.org", qid)
    c = reverse(env, "example.org").run()
    t = c.transactions[0]
    check(t.params().get("BODY") == "8BITMIME", "BODY: %r" % t.mail_line)
    check(t.data == stored, "changed for an 8BITMIME customer")


def test_helo_fallback_and_bad_greeting(env):
    setup(env)
    qid = enqueue(env, ["h@example.org"], message("helo"))["example.org"]
    stored = env.message("example.org", qid)
    # a customer that says 554 instead of 220: nothing is delivered
    mark = len(env.log())
    c = reverse(env, "example.org", greeting="554 customer.test no service")
    c.start()
    line = c.try_line(3)
    check(line is None, "odmrd sent %r after a 554 greeting" % line)
    c.drop()
    wait_disconnect(env, mark)
    check(env.queued_ids("example.org") == [qid], "queue after 554 greeting")
    # a customer that refuses EHLO: HELO, no ESMTP parameters
    c = reverse(env, "example.org",
                ehlo_reply="500 5.5.1 EHLO not understood").run()
    check(c.helo == "HELO mx.test", "no HELO fallback: %r" % c.commands)
    check(len(c.transactions) == 1 and c.transactions[0].mail_line ==
          "MAIL FROM:<%s>" % SENDER, "after HELO: %r" % c.transactions)
    check(c.transactions[0].data == stored, "data differs")
    check(env.queued() == [], "queue: %r" % env.queued())


def raw_line(s, timeout=10):
    """One line from odmrd on the reversed connection (bytes, CRLF cut),
    None when it closed it."""
    s.sock.settimeout(timeout)
    while b"\n" not in s.buf:
        try:
            chunk = s.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            return None
        s.buf += chunk
    line, s.buf = s.buf.split(b"\n", 1)
    return line.rstrip(b"\r")


def closed_within(s, seconds):
    """True when odmrd closes the connection within seconds (what it sends
    meanwhile is read and dropped)."""
    end = time.time() + seconds
    s.sock.settimeout(0.2)
    while time.time() < end:
        try:
            chunk = s.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not chunk:
            return True
    return False


def reversed_to_ehlo(env, tag, body=None):
    """One message (body, or a small one) queued for example.org, the
    reversal done by hand up to odmrd's EHLO; returns (session, queue id,
    its files, log mark)."""
    qid = enqueue(env, ["u1@example.org"],
                  body or message(tag))["example.org"]
    before = files_of(env, "example.org", qid)
    mark = len(env.log())
    s = login(env)
    check_reply(atrn(s, "example.org"), 250, what="ATRN")
    s.sock.sendall(b"220 customer.test ESMTP\r\n")
    check((raw_line(s) or b"").upper().startswith(b"EHLO"), "no EHLO")
    return s, qid, before, mark


def test_customer_trickling_a_reply_is_cut_off(env):
    """Each line of the customer's reply keeps to the timeout, and the
    rest of a multi-line reply must follow its first line within the
    timeout: one line per 1.2 s with timeout 2s is cut off after about
    2 s, and the message stays queued unchanged."""
    setup(env, timeout="2s")
    s, qid, before, mark = reversed_to_ehlo(env, "trickle")
    t0 = time.time()
    s.sock.sendall(b"250-customer.test\r\n")
    for i in range(12):
        time.sleep(1.2)
        try:
            s.sock.sendall(b"250-X-SLOW-%d\r\n" % i)
        except OSError:
            break
        if closed_within(s, 0.05):
            break
    dt = time.time() - t0
    check(dt < 5, "odmrd still read a trickled EHLO reply after %.1fs "
          "(timeout 2s)" % dt)
    wait_session_end(env, mark)
    check("too slow during EHLO (deadline exceeded)" in log_since(env, mark),
          "no deadline log line:\n%s" % env.log_tail())
    check(files_of(env, "example.org", qid) == before,
          "the queued message changed")


def stepwise_to_354(s, answer_to_data):
    """Answers odmrd's EHLO without PIPELINING, then its MAIL and RCPT
    with 250, and its DATA with answer_to_data (bytes)."""
    s.sock.sendall(b"250 customer.test\r\n")
    check((raw_line(s) or b"").upper().startswith(b"MAIL"), "no MAIL")
    s.sock.sendall(b"250 2.1.0 Ok\r\n")
    check((raw_line(s) or b"").upper().startswith(b"RCPT"), "no RCPT")
    s.sock.sendall(b"250 2.1.5 Ok\r\n")
    check((raw_line(s) or b"").upper() == b"DATA", "no DATA")
    s.sock.sendall(answer_to_data)


def read_slowly(s, per_tick, tick, give_up, ended):
    """Reads the reversed connection, at most per_tick bytes per tick
    seconds, until ended() (checked every tick), the final dot arrives or
    give_up seconds pass; returns (seconds, bytes read, dot seen)."""
    t0 = time.time()
    got = len(s.buf)
    tail = s.buf[-5:]
    s.sock.settimeout(tick)
    while time.time() - t0 < give_up and not ended():
        try:
            chunk = s.sock.recv(per_tick)
        except (socket.timeout, TimeoutError):
            continue
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        got += len(chunk)
        tail = (tail + chunk)[-5:]
        if tail == b"\r\n.\r\n":
            return time.time() - t0, got, True
        time.sleep(tick)
    return time.time() - t0, got, False


def test_customer_reading_slowly_is_cut_off(env):
    """After the reversal the customer must take a message at
    data_min_rate once timeout has passed, as an inbound client must send
    one.  odmrd's send buffer is held at 16 KB (tests/shim/accept_shim.c), so every
    write waits for the customer as on a slow link.  The customer frees
    that buffer well within each 3 s timeout but takes 64 KB/s: 3 MB
    would hold the domain's lock for most of a minute; at data_min_rate
    1000000 the cut comes after 3 + 3 s.  The message stays
    queued, and a customer that reads at speed gets it next time."""
    setup(env, start=False, timeout="3s", data_min_rate="1000000")
    env.start(sndbuf=16384)
    line = b"x" * 998 + b"\r\n"
    big = message("slow-reader", extra=line * 3000)
    s, qid, before, mark = reversed_to_ehlo(env, "slow-reader", body=big)
    stepwise_to_354(s, b"354 go ahead\r\n")
    # 64 KB a second, in whole reads: loopback frees a receive buffer
    # only skb by skb, and smaller reads stall the window for longer
    # than the timeout.
    cut = "too slow during DATA (deadline exceeded)"
    dt, got, dot = read_slowly(s, 65536, 1.0, give_up=25,
                               ended=lambda: cut in log_since(env, mark))
    env.info("odmrd gave up after %.1f s; the customer had read %d bytes"
             % (dt, got))
    check(not dot, "odmrd sent the whole message (%d bytes) to a customer "
          "reading 64 KB/s in %.1fs" % (got, dt))
    check(cut in log_since(env, mark) and dt < 11,
          "odmrd still writing to a customer reading 64 KB/s after %.1fs "
          "(%d bytes; deadline 3 + 3 s):\n%s" % (dt, got, env.log_tail()))
    s.sock.close()
    wait_session_end(env, mark)
    check(files_of(env, "example.org", qid) == before,
          "the queued message changed")
    c = reverse(env, "example.org").run()
    check(len(c.transactions) == 1 and c.transactions[0].data == before[1],
          "a customer reading at speed: %r" % c.transactions)
    check(env.queued() == [], "queue after the delivery: %r" % env.queued())


def test_reply_out_of_turn_after_354(env):
    """A customer that answers DATA with 354 and, in the same packet, a
    250 that would be taken for the final dot's: a protocol error, the
    message stays queued."""
    setup(env)
    s, qid, before, mark = reversed_to_ehlo(env, "early")
    stepwise_to_354(s, b"354 go ahead\r\n250 2.0.0 early\r\n")
    data_lines = 0
    while True:
        line = raw_line(s)
        if line is None or line == b".":
            break
        data_lines += 1
    if line == b".":
        try:
            s.sock.sendall(b"451 4.3.0 not taken\r\n")
        except OSError:
            pass
    closed_within(s, 5)
    wait_session_end(env, mark)
    check("sent more after its 354" in log_since(env, mark),
          "no protocol error logged:\n%s" % env.log_tail())
    check(env.queued_ids("example.org") == [qid], "queue: %r" % env.queued())
    check(files_of(env, "example.org", qid) == before,
          "the queued message changed")


def test_drop_at_the_dot_settles_nothing_else(env):
    """Three messages, PIPELINING: the customer drops the connection
    instead of answering the first message's final dot.  The messages
    loaded ahead were never offered: none of them is marked deferred."""
    setup(env)
    ids = [enqueue(env, ["u1@example.org"], message("m%d" % i))["example.org"]
           for i in range(3)]
    before = {q: files_of(env, "example.org", q) for q in ids}
    mark = len(env.log())
    c = reverse(env, "example.org", data_reply=lambda tx: None).run()
    check(c.closed, "customer: %r" % c.transactions)
    wait_session_end(env, mark)
    log = log_since(env, mark)
    check("status=deferred" not in log, "a message was settled as deferred "
          "after the connection was lost:\n%s" % log)
    for q in ids:
        check(files_of(env, "example.org", q) == before[q],
              "queued message %s changed" % q)



def test_truncated_accounts_db_is_a_temporary_failure(env):
    """An accounts file of 0 bytes that nothing is writing (a full disk, a
    slip of the shell) must not read as "no accounts": every AUTH would get
    535 and count towards the failure limits.  It is a temporary failure,
    with a line that says what is wrong."""
    env.setup_accounts()
    open(env.db, "w").close()
    past = time.time() - 60
    os.utime(env.db, (past, past))
    env.start()
    with SMTP(env.odmr_port) as s:
        check_reply(s.cmd("EHLO site.test"), 250, what="EHLO")
        r = cram_md5(s, "alice", "secret")
        check(r[0] == 454, "AUTH with an empty accounts file: %r" % (r,))
    # inbound mail for a hosted domain waits too (not 550 relay denied)
    with SMTP(env.smtp_port) as s:
        check_reply(s.cmd("EHLO client.test"), 250, what="EHLO")
        check_reply(s.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        r = s.cmd("RCPT TO:<u1@example.org>")
        check(r[0] == 451, "RCPT with an empty accounts file: %r" % (r,))
    check("is empty (0 bytes) and nothing is writing it" in env.log(),
          env.log_tail())
    # odmrctl reads it as a database without entries: user add starts anew
    env.odmrctl_ok("user", "add", "carol", input="pw\n")
    check(os.path.getsize(env.db) > 0, "user add on the empty file")
