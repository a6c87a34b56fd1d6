"""odmr-fetch (SPEC 4): end to end against a real odmrd on loopback, with
every delivery target, TLS, the exit codes, the lock, the configuration
file, and the reversed SMTP server's protocol details (against a scripted
provider, so that odmrd's well-behaved client is not the only one).

Accounts: alice (password "secret") owns example.org and example.net, bob
owns example.com."""

import base64
import email
import email.policy
import fcntl
import hashlib
import hmac
import os
import sys
import re
import select
import socket
import socketserver
import stat
import subprocess
import threading
import time

from harness import (SMTP, SMTPClosed, check, check_reply, dot_stuff, fail,
                     free_port, need, queue_id_of, to_crlf, wait_for)
from sink import Sink

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL = 0, 64, 69, 75
EX_PROTOCOL, EX_NOPERM, EX_CONFIG = 76, 77, 78

BODY = (b"From: Sender <s@remote.test>\r\n"
        b"To: u1@example.org\r\n"
        b"Subject: fetch test\r\n"
        b"\r\n"
        b".a line that starts with a dot\r\n"
        b"..and one with two\r\n"
        b".\r\n"
        b"BODY-MARKER\r\n")


# --------------------------------------------------------------------------
# helpers

def fetch(env, *args, user="alice", password="secret", deliver=None,
          tls="off", server=None, timeout=90, lock=True, env_extra=None):
    """Runs odmr-fetch; returns CompletedProcess (text)."""
    argv = [env.fetch_bin, "-s", server or "127.0.0.1:%d" % env.odmr_port,
            "-u", user, "--timeout", "20"]
    if tls is not None:
        argv += ["--tls", tls]
    if lock:
        argv += ["--lock", env.path("fetch.lock")]
    if deliver:
        argv += ["--deliver", deliver]
    argv += [str(a) for a in args]
    e = dict(os.environ)
    e.pop("ODMR_PASSWORD", None)
    if password is not None:
        e["ODMR_PASSWORD"] = password
    e.update(env_extra or {})
    r = env.run(argv, env=e, timeout=timeout)
    no_sanitizer_report(r.stderr)
    return r


def no_sanitizer_report(stderr):
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
        check(marker not in stderr, "sanitizer report from odmr-fetch:\n%s"
              % stderr[-3000:])


def expect(r, code, what):
    if r.returncode != code:
        fail("%s: odmr-fetch exited %d, expected %d; stderr:\n%s" % (
            what, r.returncode, code, r.stderr[-2000:]))
    return r


def send(env, sender, rcpts, body=BODY, mail_params=""):
    """One SMTP transaction into odmrd; rcpts are addresses or (address,
    params).  Returns the queue id."""
    with env.smtp() as s:
        check_reply(s.cmd("EHLO client.test"), 250, what="EHLO")
        check_reply(s.cmd("MAIL FROM:<%s>%s" % (sender, mail_params)), 250,
                    what="MAIL")
        for r in rcpts:
            addr, params = (r, "") if isinstance(r, str) else r
            check_reply(s.cmd("RCPT TO:<%s>%s" % (addr, params)), 250,
                        what="RCPT")
        reply = check_reply(s.data(to_crlf(body)), 250, what="end of data")
        s.quit()
    return queue_id_of(reply[1])


def started(env, **conf):
    if conf:
        env.write_conf(**conf)
    env.setup_accounts()
    env.start()


def rcpts_of(env, qid, domain="example.org"):
    return sorted(r["addr"] for r in env.envelope(domain, qid)["rcpts"])


def dsn_of(tx):
    """(message, per-recipient status field dicts) of a DSN."""
    msg = email.message_from_bytes(tx.data, policy=email.policy.compat32)
    check(msg.get_content_type() == "multipart/report",
          "not a DSN: %r" % tx.data[:300])
    fields = []
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload()[1:]:
                fields.append({k: " ".join(v.split()) for k, v in block.items()})
    return msg, fields


def peak_rss_kb(p, program):
    """Waits for p; returns the peak resident set (VmHWM, kB) of the
    program it runs.  Sampled from /proc while it runs: ru_maxrss from
    wait4() would include the test process itself, whose memory a
    vfork()ed child shares until exec."""
    real = os.path.realpath(program)
    hwm = 0
    while p.poll() is None:
        try:
            if os.readlink("/proc/%d/exe" % p.pid) == real:
                with open("/proc/%d/status" % p.pid) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            hwm = max(hwm, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return hwm


def is_sanitized(path):
    with open(path, "rb") as f:
        return b"__asan_init" in f.read()


# --------------------------------------------------------------------------
# a scripted LMTP server (TCP or unix socket)

class LMTPServer:
    """Records deliveries: (sender, recipient, data) for every recipient
    that got 2xx after the data.  rcpt_replies / data_replies map an
    address to the reply to give at RCPT / after the data."""

    def __init__(self, unix=None, rcpt_replies=None, data_replies=None,
                 drop_after_replies=None):
        self.drop_after_replies = drop_after_replies
        self.rcpt_replies = rcpt_replies or {}
        self.data_replies = data_replies or {}
        self.delivered = []
        self.lines = []
        self.lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def handle(self):
                try:
                    outer._session(self.rfile, self.wfile)
                except (OSError, socket.timeout):
                    pass

        if unix:
            class Server(socketserver.ThreadingUnixStreamServer):
                daemon_threads = True
            self.server = Server(unix, Handler)
            self.address = unix
        else:
            class Server(socketserver.ThreadingTCPServer):
                daemon_threads = True
                allow_reuse_address = True
            self.server = Server(("127.0.0.1", 0), Handler)
            self.address = "127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def _session(self, rfile, wfile):
        def out(line):
            wfile.write(line.encode() + b"\r\n")
            wfile.flush()
        out("220 lmtp.test LMTP ready")
        sender, accepted = None, []
        while True:
            raw = rfile.readline(65536)
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            with self.lock:
                self.lines.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "LHLO":
                out("250-lmtp.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                    "250 ENHANCEDSTATUSCODES")
            elif verb == "MAIL":
                sender, accepted = line[10:].strip("<> "), []
                out("250 2.1.0 Ok")
            elif verb == "RCPT":
                addr = line[8:].split(">")[0].strip("< ")
                reply = self.rcpt_replies.get(addr, "250 2.1.5 Ok")
                if reply.startswith("2"):
                    accepted.append(addr)
                out(reply)
            elif verb == "DATA":
                out("354 go ahead")
                data = []
                while True:
                    l = rfile.readline()
                    if not l:
                        return
                    if l == b".\r\n":
                        break
                    data.append(l[1:] if l.startswith(b".") else l)
                data = b"".join(data)
                if self.drop_after_replies is not None:
                    accepted = accepted[:self.drop_after_replies]
                    dropping = True
                else:
                    dropping = False
                for a in accepted:
                    reply = self.data_replies.get(a, "250 2.0.0 <%s> Saved" % a)
                    if reply.startswith("2"):
                        with self.lock:
                            self.delivered.append((sender, a, data))
                    out(reply)
                if dropping:
                    return          # the connection breaks mid-replies
                accepted = []
            elif verb == "RSET":
                accepted = []
                out("250 2.0.0 Ok")
            elif verb == "QUIT":
                out("221 2.0.0 Bye")
                return
            else:
                out("502 5.5.1 What?")

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


# --------------------------------------------------------------------------
# a scripted ODMR provider (the reversed session is the test's script)

def wrap(sock):
    """A harness.SMTP object over an accepted socket."""
    s = SMTP.__new__(SMTP)
    s.sock, s.buf, s.last_lines, s.transcript, s.greeting = \
        sock, b"", [], [], None
    return s


class FakeProvider:
    """Listens on loopback for one odmr-fetch connection: greeting, EHLO
    (extensions as given), AUTH CRAM-MD5 checked against user/password,
    ATRN answered with atrn_reply; after a 250 the script(conn) runs as
    odmrd would, conn being a harness.SMTP object."""

    def __init__(self, script=None, greeting="220 fake.test ESMTP ODMR",
                 extensions=("AUTH CRAM-MD5", "ENHANCEDSTATUSCODES", "ATRN"),
                 atrn_reply="250 OK now reversing the connection",
                 user="alice", password="secret", extra_334=False):
        self.extra_334 = extra_334   # another 334 after CRAM-MD5's one round
        self.script, self.greeting, self.extensions = script, greeting, extensions
        self.atrn_reply, self.user, self.password = atrn_reply, user, password
        self.commands = []          # what odmr-fetch sent before ATRN
        self.error = None
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def server(self):
        return "127.0.0.1:%d" % self.port

    def _run(self):
        try:
            self.lsock.settimeout(30)
            sock, _ = self.lsock.accept()
            sock.settimeout(30)
            c = wrap(sock)
            try:
                self._session(c)
            finally:
                c.close()
        except Exception as e:   # reported by join()
            self.error = e

    def _auth(self, c, line):
        check(line.upper().startswith("AUTH CRAM-MD5"), "AUTH line %r" % line)
        chal = b"<1896.697170952@fake.test>"
        c.send("334 " + base64.b64encode(chal).decode())
        resp = base64.b64decode(c.readline()).decode()
        user, digest = resp.rsplit(" ", 1)
        good = hmac.new(self.password.encode(), chal, "md5").hexdigest()
        if self.extra_334:
            c.send("334 " + base64.b64encode(b"more?").decode())
            self.cancel = c.readline()
            c.send("501 5.7.0 Authentication cancelled")
        elif user == self.user and digest == good:
            c.send("235 2.7.0 Authentication successful")
        else:
            c.send("535 5.7.8 Authentication credentials invalid")

    def _session(self, c):
        c.send(self.greeting)
        if not self.greeting.startswith("220"):
            return
        while True:
            line = c.readline().decode()
            self.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                lines = ["fake.test"] + list(self.extensions)
                c.send("\r\n".join("250%s%s" % (" " if i == len(lines) - 1
                                                else "-", l)
                                   for i, l in enumerate(lines)))
            elif verb == "AUTH":
                self._auth(c, line)
            elif verb == "ATRN":
                c.send(self.atrn_reply)
                if self.atrn_reply.startswith("250"):
                    greeting = c.reply()
                    check(greeting[0] == 220, "customer greeting %r" % (greeting,))
                    self.customer_greeting = greeting
                    if self.script:
                        self.script(c)
                    return
            elif verb == "QUIT":
                c.send("221 2.0.0 Bye")
                return
            elif verb == "XLINGER" and any(e.startswith("XLINGER")
                                           for e in self.extensions):
                c.send("250 2.0.0 Lingering")
            else:
                c.send("502 5.5.1 no")

    def join(self, timeout=30):
        self.thread.join(timeout)
        self.lsock.close()
        if self.thread.is_alive():
            fail("fake provider still running")
        if self.error:
            raise self.error


def run_fake(env, script, deliver, tls="off", **kw):
    """Runs odmr-fetch against a FakeProvider; returns (result, provider)."""
    p = FakeProvider(script=script, **kw)
    r = fetch(env, deliver=deliver, server=p.server, tls=tls)
    p.join()
    return r, p


def make_maildir(root, *parts):
    d = os.path.join(root, *parts)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    return d


def maildir_files(d):
    new = os.path.join(d, "new")
    if not os.path.isdir(new):
        return []
    return [os.path.join(new, f) for f in sorted(os.listdir(new))]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def lf(data):
    return data.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------
# end to end with odmrd

def test_fetch_smtp_end_to_end(env):
    started(env)
    q1 = send(env, "s@remote.test", ["u1@example.org", "u2@example.org"])
    q2 = send(env, "other@remote.test",
              [("u3@example.net", " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;"
                                  "orig+2Bu3@example.net")],
              body=b"Subject: two\r\n\r\nsecond\r\n",
              mail_params=" RET=HDRS ENVID=env+2B1")
    q3 = send(env, "", ["u4@example.org"], body=b"Subject: null\r\n\r\nx\r\n")
    stored = {q: env.message(d, q) for d, q in env.queued()}
    with Sink() as sink:
        r = expect(fetch(env, "-v", deliver="smtp:" + sink.address), EX_OK,
                   "smtp delivery")
        txs = sink.wait(3)
    check(env.queued() == [], "still queued: %r" % env.queued())
    by_from = {t.mail_from: t for t in txs}
    t1 = by_from["s@remote.test"]
    check(sorted(t1.rcpts) == ["u1@example.org", "u2@example.org"],
          "recipients %r" % t1.rcpts)
    check(t1.data == stored[q1], "message 1 not byte-exact:\n%r\n%r" % (
        t1.data[-200:], stored[q1][-200:]))
    check(b"\r\n..a line that starts" in t1.raw and b"\r\n..\r\n" in t1.raw,
          "not dot-stuffed towards the target: %r" % t1.raw[-200:])
    t2 = by_from["other@remote.test"]
    check(t2.data == stored[q2], "message 2 not byte-exact")
    check("RET=HDRS" in t2.mail_params and "ENVID=env+2B1" in t2.mail_params,
          "DSN MAIL parameters not relayed: %r" % t2.mail_params)
    p = t2.rcpt_params["u3@example.net"]
    check("NOTIFY=SUCCESS,FAILURE" in p and "ORCPT=rfc822;orig+2Bu3@example.net"
          in p, "DSN RCPT parameters not relayed: %r" % p)
    check(by_from[""].data == stored[q3], "null-sender message")
    lines = [l for l in r.stderr.splitlines() if "messages=" in l]
    check(len(lines) == 1, "-v: expected one summary line, got %r" % r.stderr)
    for item in ("messages=3", "bytes=%d" % sum(map(len, stored.values())),
                 "domains=", "seconds="):
        check(item in lines[0], "summary %r lacks %s" % (lines[0], item))


def test_fetch_site_replying_out_of_turn_after_354(env):
    """A site that answers DATA with 354 and at once a 250: nothing is due
    from it before the final dot, so that 250 must not be taken for the
    dot's reply.  odmr-fetch answers 451, the message stays queued."""
    started(env)
    qid = send(env, "s@remote.test", ["u1@example.org"])
    with Sink(after_354="250 2.0.0 early") as sink:
        r = fetch(env, deliver="smtp:" + sink.address)
    check(r.returncode == EX_TEMPFAIL, "exit %d: %s" % (r.returncode,
                                                         r.stderr))
    check(env.queued_ids("example.org") == [qid],
          "queue after a reply out of turn: %r" % env.queued())
    check("out of turn" in env.log(), "odmrd did not hear why:\n%s"
          % env.log_tail())


def test_fetch_site_replying_out_of_turn_with_pipelining(env):
    """The same with two messages, so that the first one's final dot goes
    out pipelined with the next MAIL: the early line must not be taken for
    the dot's reply there either."""
    started(env)
    q1 = send(env, "s@remote.test", ["u1@example.org"])
    q2 = send(env, "t@remote.test", ["u2@example.org"])
    with Sink(after_354="250 2.0.0 early") as sink:
        r = fetch(env, deliver="smtp:" + sink.address)
    check(r.returncode == EX_TEMPFAIL, "exit %d: %s" % (r.returncode,
                                                         r.stderr))
    check(sorted(env.queued_ids("example.org")) == sorted([q1, q2]),
          "queue after replies out of turn: %r" % env.queued())


def test_fetch_smtp_per_recipient(env):
    with Sink() as bounces:
        started(env, bounce_relay=bounces.address)
        q = send(env, "s@remote.test", ["ok@example.org", "gone@example.org",
                                        "later@example.org"])
        with Sink(rcpt_replies={"gone@example.org": "550 5.1.1 no such user",
                                "later@example.org": "452 4.2.2 over quota"}
                  ) as sink:
            r = expect(fetch(env, deliver="smtp:" + sink.address),
                       EX_TEMPFAIL, "a recipient deferred")
            tx = sink.wait(1)[0]
        check(tx.rcpts == ["ok@example.org"], "delivered to %r" % tx.rcpts)
        check(rcpts_of(env, q) == ["later@example.org"],
              "queued recipients %r" % rcpts_of(env, q))
        dsn = bounces.wait(1, what="the DSN for gone@")[0]
        msg, fields = dsn_of(dsn)
        check(dsn.rcpts == ["s@remote.test"], "DSN to %r" % dsn.rcpts)
        check(any("gone@example.org" in f.get("Final-Recipient", "") and
                  "no such user" in f.get("Diagnostic-Code", "")
                  for f in fields), "DSN fields %r" % fields)


def test_fetch_lmtp_mixed_results(env):
    with Sink() as bounces, LMTPServer(
            rcpt_replies={"b1@example.org": "550 5.1.1 <b1@example.org> unknown"},
            data_replies={"c2@example.org": "452 4.2.2 <c2@example.org> quota",
                          "d2@example.org": "552 5.2.2 <d2@example.org> full"}
    ) as lmtp:
        started(env, bounce_relay=bounces.address)
        qa = send(env, "a@remote.test", ["a1@example.org", "a2@example.org"])
        qb = send(env, "b@remote.test", ["b1@example.org", "b2@example.org"])
        qc = send(env, "c@remote.test", ["c1@example.org", "c2@example.org"])
        qd = send(env, "d@remote.test", ["d1@example.org", "d2@example.org"])
        stored_c = env.message("example.org", qc)
        r = expect(fetch(env, deliver="lmtp:" + lmtp.address), EX_TEMPFAIL,
                   "LMTP with a deferred message")
        got = sorted(a for _, a, _ in lmtp.delivered)
        check(got == ["a1@example.org", "a2@example.org", "b2@example.org",
                      "c1@example.org", "d1@example.org"],
              "LMTP deliveries %r" % got)
        # c: 2xx + 4xx after the data -> 451, odmrd keeps all of it
        check(env.queued_ids() == [qc], "queued %r (expected only %s)"
              % (env.queued(), qc))
        check(rcpts_of(env, qc) == ["c1@example.org", "c2@example.org"],
              "message c keeps both recipients")
        # b: refused at RCPT -> only b1 returned; d: 2xx + 5xx -> returned,
        # and the notice says who did get it
        dsns = bounces.wait(2, what="DSNs for b and d")
        by_to = {}
        for t in dsns:
            msg, fields = dsn_of(t)
            by_to[t.rcpts[0]] = fields
        check(sorted(f["Final-Recipient"] for f in by_to["b@remote.test"])
              == ["rfc822; b1@example.org"], "DSN b %r" % by_to["b@remote.test"])
        d_fields = by_to["d@remote.test"]
        check(any("not delivered to <d2@example.org>" in f.get("Diagnostic-Code", "")
                  and "did receive it" in f.get("Diagnostic-Code", "")
                  for f in d_fields), "DSN d %r" % d_fields)
        # the next run delivers c (c1 gets it a second time: documented)
        lmtp.data_replies = {}
        expect(fetch(env, deliver="lmtp:" + lmtp.address), EX_OK, "retry")
        check(env.queued() == [], "still queued %r" % env.queued())
        c2 = [d for _, a, d in lmtp.delivered if a == "c2@example.org"]
        check(c2 == [stored_c], "c2's copy is not byte-exact")


def test_fetch_lmtp_lost_after_data(env):
    """The LMTP server answers for one recipient and drops the connection:
    the unknown outcome is temporary, odmrd keeps the message."""
    with LMTPServer(drop_after_replies=1) as lmtp:
        started(env)
        q = send(env, "s@remote.test", ["u1@example.org", "u2@example.org",
                                        "u3@example.org"])
        expect(fetch(env, deliver="lmtp:" + lmtp.address), EX_TEMPFAIL,
               "connection lost after the first LMTP reply")
        check(env.queued_ids() == [q], "queued %r" % env.queued())
        check(rcpts_of(env, q) == ["u1@example.org", "u2@example.org",
                                   "u3@example.org"], "all kept")


def test_fetch_lmtp_unix_socket(env):
    sock = env.path("lmtp.sock")
    with LMTPServer(unix=sock) as lmtp:
        started(env)
        q = send(env, "s@remote.test", ["u1@example.org"])
        stored = env.message("example.org", q)
        expect(fetch(env, deliver="lmtp:" + sock), EX_OK, "lmtp over unix")
        check(lmtp.delivered == [("s@remote.test", "u1@example.org", stored)],
              "delivered %r" % [(s, a, len(d)) for s, a, d in lmtp.delivered])
        check(any(l.startswith("LHLO ") for l in lmtp.lines), "no LHLO")


MDA_SCRIPT = """#!/bin/sh
# test delivery command: $1 sender, then recipients
n=$(date +%%s%%N)-$$
printf '%%s\\n' "$@" > "%(dir)s/$n.args"
cat > "%(dir)s/$n.msg"
case "$2" in
  *x75@*) exit 75 ;;
  *x1@*) exit 1 ;;
  *sig@*) kill -9 $$ ;;
esac
exit 0
"""


def test_fetch_mda_exit_codes(env):
    out = env.path("mda-out")
    os.mkdir(out)
    script = env.path("mda.sh")
    with open(script, "w") as f:
        f.write(MDA_SCRIPT % {"dir": out})
    os.chmod(script, 0o755)
    with Sink() as bounces:
        started(env, bounce_relay=bounces.address)
        q0 = send(env, "s@remote.test", ["x0@example.org", "it's@example.org"])
        q75 = send(env, "s@remote.test", ["x75@example.org"])
        q1 = send(env, "s@remote.test", ["x1@example.org"])
        qs = send(env, "s@remote.test", ["sig@example.org"])
        stored0 = env.message("example.org", q0)
        r = expect(fetch(env, deliver="mda:%s %%f %%r" % script),
                   EX_TEMPFAIL, "mda with exit 75 and a signal")
        check(sorted(env.queued_ids()) == sorted([q75, qs]),
              "exit 75 and a killed command keep the mail queued: %r"
              % env.queued())
        dsn = bounces.wait(1, what="the DSN for the exit 1 message")[0]
        msg, fields = dsn_of(dsn)
        check(any("x1@example.org" in f.get("Final-Recipient", "") and
                  "exit status 1" in f.get("Diagnostic-Code", "")
                  for f in fields), "DSN %r" % fields)
        check(q1 not in env.queued_ids(), "exit 1 message still queued")
    args = {}
    for name in os.listdir(out):
        if name.endswith(".args"):
            lines = read(os.path.join(out, name)).decode().splitlines()
            args[lines[1]] = (lines, read(os.path.join(out, name[:-5] + ".msg")))
    lines, msg = args["x0@example.org"]
    check(lines == ["s@remote.test", "x0@example.org", "it's@example.org"],
          "%%f %%r (shell-quoted) gave %r" % lines)
    check(msg == lf(stored0), "message on stdin differs:\n%r\n%r" % (
        msg[:300], lf(stored0)[:300]))


def test_fetch_maildir(env):
    root = env.path("mail")
    u1 = make_maildir(root, "example.org", "u1")
    net_u1 = os.path.join(root, "example.net", "u1")
    os.makedirs(net_u1)
    with Sink() as bounces:
        started(env, bounce_relay=bounces.address)
        q = send(env, "s@remote.test", ["U1@Example.ORG", "nobody@example.org"],
                 body=BODY)
        stored = env.message("example.org", q)
        qn = send(env, "s@remote.test", ["u1@example.net"],
                  body=b"Subject: n\r\n\r\nnet\r\n")
        stored_n = env.message("example.net", qn)
        expect(fetch(env, deliver="maildir:%s/%%d/%%u" % root), EX_OK,
               "maildir delivery")
        dsn = bounces.wait(1, what="DSN for the missing mailbox")[0]
        msg, fields = dsn_of(dsn)
        check(any("nobody@example.org" in f.get("Final-Recipient", "") and
                  "5.1.1" in f.get("Status", "") for f in fields),
              "DSN %r" % fields)
    files = maildir_files(u1)
    check(len(files) == 1, "maildir %s has %r" % (u1, files))
    want = (b"Return-Path: <s@remote.test>\nDelivered-To: U1@Example.ORG\n"
            + lf(stored))
    got = read(files[0])
    check(got == want, "maildir file not byte-exact:\n%r\n%r" % (got[:300],
                                                                want[:300]))
    check(stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600, "file mode")
    check(os.listdir(os.path.join(u1, "tmp")) == [], "tmp/ not empty")
    nfiles = maildir_files(net_u1)
    check(len(nfiles) == 1 and read(nfiles[0]).endswith(lf(stored_n)),
          "existing directory made a maildir and delivered into: %r" % nfiles)
    check(env.queued() == [], "still queued %r" % env.queued())


def test_fetch_maildir_single(env):
    """A maildir without %u is created on first use."""
    started(env)
    send(env, "", ["a@example.org", "b@example.org"])
    box = env.path("Maildir")
    expect(fetch(env, deliver="maildir:" + box), EX_OK, "single maildir")
    files = maildir_files(box)
    check(len(files) == 2, "expected a copy per recipient, got %r" % files)
    heads = sorted(read(f).split(b"\n")[1] for f in files)
    check(heads == [b"Delivered-To: a@example.org", b"Delivered-To: b@example.org"],
          "Delivered-To headers %r" % heads)
    check(read(files[0]).startswith(b"Return-Path: <>\n"), "null Return-Path")


def test_fetch_target_down(env):
    started(env)
    q = send(env, "s@remote.test", ["u1@example.org"])
    with Sink() as sink:
        port = sink.port
    # the sink is closed now: nothing listens on port
    r = expect(fetch(env, deliver="smtp:127.0.0.1:%d" % port), EX_TEMPFAIL,
               "target down")
    check("127.0.0.1" in r.stderr and "keeps the mail" in r.stderr,
          "no clear message: %r" % r.stderr)
    check(env.queued_ids() == [q], "mail must stay queued: %r" % env.queued())
    with Sink() as sink:
        expect(fetch(env, deliver="smtp:" + sink.address), EX_OK, "retry")
        sink.wait(1)
    check(env.queued() == [], "still queued after the retry")


def test_fetch_no_mail(env):
    started(env)
    r = expect(fetch(env, "-v", deliver="smtp:127.0.0.1:1"), EX_OK, "no mail")
    check("messages=0" in r.stderr, "summary %r" % r.stderr)


def test_fetch_auth_and_atrn_refused(env):
    started(env)
    send(env, "s@remote.test", ["u1@example.org"])
    r = expect(fetch(env, password="wrong"), EX_NOPERM, "wrong password")
    check("535" in r.stderr, "stderr %r" % r.stderr)
    r = expect(fetch(env, "example.com"), EX_NOPERM, "bob's domain")
    check("450" in r.stderr, "stderr %r" % r.stderr)
    # the domain list: only example.net has nothing -> 453 -> 0
    expect(fetch(env, "--domains", "example.net", deliver="smtp:127.0.0.1:1"),
           EX_OK, "nothing for example.net")
    check(len(env.queued_ids()) == 1, "mail of example.org touched")


def test_fetch_lock_contention(env):
    lock = env.path("fetch.lock")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        r = expect(fetch(env, server="127.0.0.1:%d" % port), EX_TEMPFAIL,
                   "lock held")
    check("another odmr-fetch" in r.stderr, "stderr %r" % r.stderr)
    listener.settimeout(0.2)
    try:
        listener.accept()
        fail("odmr-fetch connected although the lock was held")
    except socket.timeout:
        pass
    finally:
        listener.close()


def test_fetch_config_file(env):
    started(env)
    conf = env.path("fetch.conf")
    with Sink() as sink:
        with open(conf, "w") as f:
            f.write("# odmr-fetch test\nserver = 127.0.0.1:%d\nuser = alice\n"
                    "password = secret\ntls = off\ndeliver = smtp:%s\n"
                    "domains = example.org\ntimeout = 20\nlock_file = %s\n"
                    % (env.odmr_port, sink.address, env.path("lock2")))
        os.chmod(conf, 0o644)
        r = env.run([env.fetch_bin, "-c", conf])
        expect(r, EX_CONFIG, "readable config with a password")
        check("readable" in r.stderr, "stderr %r" % r.stderr)
        os.chmod(conf, 0o600)
        send(env, "s@remote.test", ["u1@example.org"])
        expect(env.run([env.fetch_bin, "-c", conf]), EX_OK, "config 0600")
        sink.wait(1)
    # a password file must be private too
    pw = env.path("pw")
    with open(pw, "w") as f:
        f.write("secret\nignored\n")
    os.chmod(pw, 0o640)
    r = fetch(env, "--password-file", pw, password=None)
    expect(r, EX_CONFIG, "group-readable password file")
    os.chmod(pw, 0o600)
    expect(fetch(env, "--password-file", pw, password="wrong",
                 deliver="smtp:127.0.0.1:1"), EX_OK,
           "--password-file wins over ODMR_PASSWORD")
    # errors name file and line
    with open(conf, "w") as f:
        f.write("server = x\nbogus = 1\ntls = maybe\n")
    r = expect(env.run([env.fetch_bin, "-c", conf]), EX_CONFIG, "bad keys")
    check("%s:2:" % conf in r.stderr and "%s:3:" % conf in r.stderr,
          "errors without file:line: %r" % r.stderr)
    # a comment after a value is part of it (and said so); a key twice
    with open(conf, "w") as f:
        f.write("server = x\nuser = a\nca_file = %s   # private CA\n"
                "user = b\n" % env.path("no-such-ca.pem"))
    r = expect(env.run([env.fetch_bin, "-c", conf]), EX_CONFIG, "ca_file")
    check("%s:3: ca_file:" % conf in r.stderr and
          "a '#' starts a comment only at the beginning of a line" in r.stderr,
          "missing ca_file with a trailing comment: %r" % r.stderr)
    check("%s:4: user: set again (first on line 2)" % conf in r.stderr,
          "user given twice: %r" % r.stderr)
    # usage
    expect(env.run([env.fetch_bin, "--bogus"]), EX_USAGE, "unknown option")
    expect(env.run([env.fetch_bin, "-u", "alice"]), EX_USAGE, "no server")
    expect(env.run([env.fetch_bin, "-s", "x", "-u", "a", "--deliver", "pop:x"]),
           EX_USAGE, "bad target")
    # an empty domain list would widen the request to every domain, and a
    # typo beside a valid mechanism would be dropped without a word
    r = expect(env.run([env.fetch_bin, "-s", "x", "-u", "a", "--domains",
                        ""]), EX_USAGE, "an empty --domains")
    check("empty domain list" in r.stderr, "stderr: %r" % r.stderr)
    expect(env.run([env.fetch_bin, "-s", "x", "-u", "a", "--domains",
                    " , "]), EX_USAGE, "--domains of only separators")
    r = expect(env.run([env.fetch_bin, "-s", "x", "-u", "a", "--mech",
                        "SCRAM-SHA256 CRAM-MD5"]), EX_USAGE, "a mistyped "
               "mechanism")
    check('unknown SASL mechanism "SCRAM-SHA256"' in r.stderr,
          "stderr: %r" % r.stderr)
    conf = env.path("fetch-empty-domains.conf")
    with open(conf, "w") as f:
        f.write("server = x\nuser = a\ndomains = ,\n")
    expect(env.run([env.fetch_bin, "-c", conf]), EX_CONFIG,
           "an empty domains key")
    r = expect(env.run([env.fetch_bin, "--version"]), EX_OK, "--version")
    check(r.stdout.strip() == "odmr-fetch 0.1.0", "--version %r" % r.stdout)
    r = expect(env.run([env.fetch_bin, "--help"]), EX_OK, "--help")
    check("--deliver" in r.stdout, "--help %r" % r.stdout)


def test_fetch_tls_verified(env):
    cert = env.make_cert(cn="localhost")
    started(env, require_tls="yes")
    q = send(env, "s@remote.test", ["u1@example.org"])
    with Sink() as sink:
        r = expect(fetch(env, "-vv", "--ca-file", cert, tls="require",
                         server="localhost:%d" % env.odmr_port,
                         deliver="smtp:" + sink.address), EX_OK, "TLS")
        sink.wait(1)
    check("over TLS" in env.log(), "odmrd did not see AUTH over TLS")
    check("TLS established" in r.stderr, "-vv trace: %r" % r.stderr[:500])
    check(q not in env.queued_ids(), "not delivered")


def test_fetch_tls_wrong_name(env):
    cert = env.make_cert(cn="localhost")
    env.setup_accounts()
    env.start(extra_args=("-d",))
    send(env, "s@remote.test", ["u1@example.org"])
    r = fetch(env, "--ca-file", cert, tls="require",
              server="127.0.0.1:%d" % env.odmr_port)
    expect(r, EX_PROTOCOL, "certificate for another name")
    check("does not match host 127.0.0.1" in r.stderr,
          "unclear message: %r" % r.stderr)
    # without the CA the chain does not verify
    r = fetch(env, tls="auto", server="localhost:%d" % env.odmr_port)
    expect(r, EX_PROTOCOL, "untrusted certificate")
    check("certificate verify failed" in r.stderr, "unclear: %r" % r.stderr)
    log = env.log()
    check("< AUTH" not in log and "authenticat" not in log,
          "odmrd saw authentication after a failed certificate check:\n%s"
          % log[-1500:])
    check(len(env.queued_ids()) == 1, "mail was dequeued")


def test_fetch_tls_required_not_offered(env):
    started(env)    # no certificate: no STARTTLS
    r = expect(fetch(env, tls="require"), EX_PROTOCOL, "no STARTTLS")
    check("does not offer STARTTLS" in r.stderr, "stderr %r" % r.stderr)
    check("authenticated" not in env.log() and "authentication" not in env.log(),
          "AUTH was sent without TLS")
    expect(fetch(env, tls="auto", deliver="smtp:127.0.0.1:1"), EX_OK,
           "--tls auto without STARTTLS")


def test_fetch_trace_redacts_secrets(env):
    cert = env.make_cert(cn="localhost")
    started(env)
    pw = "Very$ecret-Pass"
    env.odmrctl_ok("user", "passwd", "alice", input=pw + "\n")
    plain = base64.b64encode(b"\0alice\0" + pw.encode()).decode()
    r = expect(fetch(env, "-vv", "--mech", "PLAIN", "--ca-file", cert,
                     tls="require", password=pw,
                     server="localhost:%d" % env.odmr_port,
                     deliver="smtp:127.0.0.1:1"), EX_OK, "PLAIN over TLS")
    check("AUTH PLAIN" in r.stderr and "redacted" in r.stderr,
          "trace: %r" % r.stderr)
    for secret in (pw, plain, plain[:20]):
        check(secret not in r.stderr, "secret in the -vv trace")
        check(secret not in env.log(), "secret in the odmrd log")


def test_fetch_big_message_memory(env):
    """100 MB end to end; odmr-fetch's peak RSS stays small."""
    started(env, max_message_size="200M")
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (100 * 1024 * 1024 // len(line))
    send(env, "s@remote.test", ["u1@example.org"], body=body)
    digest = hashlib.sha256(lf(body)).hexdigest()
    del body
    box = env.path("Maildir")
    err = open(env.path("big.err"), "wb")
    e = dict(os.environ, ODMR_PASSWORD="secret")
    p = env.spawn([env.fetch_bin, "-s", "127.0.0.1:%d" % env.odmr_port,
                   "-u", "alice", "--tls", "off", "--lock", env.path("l"),
                   "--deliver", "maildir:" + box], env=e,
                  stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    hwm_kb = peak_rss_kb(p, env.fetch_bin)
    err.close()
    check(p.returncode == 0, "exit %d: %s" % (p.returncode,
                                               read(env.path("big.err"))))
    files = maildir_files(box)
    check(len(files) == 1, "files %r" % files)
    rss_mb = hwm_kb / 1024.0
    bound = 80 if is_sanitized(env.fetch_bin) else 16
    env.info("odmr-fetch peak RSS %.1f MB for a 100 MB message (bound %d MB)"
             % (rss_mb, bound))
    check(rss_mb < bound, "peak RSS %.1f MB >= %d MB" % (rss_mb, bound))
    with open(files[0], "rb") as f:
        data_tail = f.read()
    # Return-Path, Delivered-To and odmrd's Received: come first
    check(hashlib.sha256(data_tail[data_tail.index(b"Subject: big"):]).hexdigest()
          == digest, "the 100 MB message arrived changed")


# --------------------------------------------------------------------------
# the reversed SMTP server, driven by a scripted provider

def test_fetch_receiver_protocol(env):
    root = env.path("mail")
    box = make_maildir(root, "example.org", "u1")
    seen = {}

    def script(c):
        code, kw = c.ehlo("fake.test")
        seen["ehlo"] = (code, kw)
        check_reply(c.cmd("NOOP"), 250, "2.0.0", "NOOP")
        check_reply(c.cmd("HELP"), 214, what="HELP")
        check_reply(c.cmd("STARTTLS"), 502, "5.5.1", "STARTTLS")
        check_reply(c.cmd("FOO"), 502, "5.5.1", "unknown command")
        check_reply(c.cmd("NOOP " + "x" * 600), 500, "5.5.6", "long line")
        check_reply(c.cmd("RCPT TO:<u1@example.org>"), 503, "5.5.1", "RCPT first")
        check_reply(c.cmd("DATA"), 503, "5.5.1", "DATA first")
        check_reply(c.cmd("MAIL FROM:<a@b.test> RET=FULL"), 555, what="DSN not offered")
        check_reply(c.cmd("MAIL FROM:<a@b.test"), 501, what="bad syntax")
        # a pipelined transaction: one unknown mailbox, one good
        c.send_raw(b"MAIL FROM:<s@remote.test> BODY=8BITMIME\r\n"
                   b"RCPT TO:<nobody@example.org>\r\n"
                   b"RCPT TO:<u1@example.org>\r\nDATA\r\n")
        check_reply(c.reply(), 250, "2.1.0", "pipelined MAIL")
        check_reply(c.reply(), 550, "5.1.1", "pipelined RCPT nobody")
        check_reply(c.reply(), 250, "2.1.5", "pipelined RCPT u1")
        check_reply(c.reply(), 354, what="pipelined DATA")
        c.send_raw(dot_stuff(BODY) + b".\r\n")
        check_reply(c.reply(), 250, "2.0.0", "end of data")
        # smuggling: a bare LF before ".\r\n" must not end the message
        check_reply(c.cmd("MAIL FROM:<evil@remote.test>"), 250, what="MAIL")
        check_reply(c.cmd("RCPT TO:<u1@example.org>"), 250, what="RCPT")
        check_reply(c.cmd("DATA"), 354, what="DATA")
        c.send_raw(b"Subject: smuggle\r\n\r\nfirst\n.\r\nMAIL FROM:<x@y>\r\n"
                   b"RCPT TO:<u1@example.org>\r\nDATA\r\nsecond\r\n.\r\n")
        check_reply(c.reply(), 554, "5.5.2", "bare LF")
        check_reply(c.cmd("NOOP"), 250, what="NOOP after smuggling (in sync)")
        # bare CR, and a RSET in between
        check_reply(c.cmd("MAIL FROM:<evil@remote.test>"), 250, what="MAIL")
        check_reply(c.cmd("RSET"), 250, "2.0.0", "RSET")
        check_reply(c.cmd("DATA"), 503, what="DATA after RSET")
        check_reply(c.cmd("MAIL FROM:<evil@remote.test>"), 250, what="MAIL")
        check_reply(c.cmd("RCPT TO:<u1@example.org>"), 250, what="RCPT")
        check_reply(c.cmd("DATA"), 354, what="DATA")
        c.send_raw(b"Subject: cr\r\n\r\nfirst\r.\r\nsecond\r\n.\r\n")
        check_reply(c.reply(), 554, "5.5.2", "bare CR")
        check_reply(c.cmd("QUIT"), 221, what="QUIT")

    r, p = run_fake(env, script, "maildir:%s/%%d/%%u" % root)
    expect(r, EX_OK, "scripted session")
    check(p.customer_greeting[1].endswith("ESMTP odmr-fetch"),
          "greeting %r" % (p.customer_greeting,))
    code, kw = seen["ehlo"]
    check(code == 250, "EHLO %r" % code)
    for k in ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES",
              "SMTPUTF8"):
        check(k in kw, "EHLO lacks %s: %r" % (k, kw))
    check("DSN" not in kw, "DSN advertised for a maildir target: %r" % kw)
    files = maildir_files(box)
    check(len(files) == 1, "exactly one message must be delivered: %r" % files)
    check(read(files[0]) == b"Return-Path: <s@remote.test>\n"
          b"Delivered-To: u1@example.org\n" + lf(BODY),
          "dot-unstuffing not exact: %r" % read(files[0]))
    check(os.listdir(os.path.join(box, "tmp")) == [], "tmp/ not cleaned")


def test_fetch_maildir_quoted_local_part_is_the_same_mailbox(env):
    """"bob"@example.org is bob@example.org (quoting that adds nothing):
    it goes to bob's maildir, not to a missing one named "bob" (550, a
    bounce).  Quoting that is needed still names its own mailbox."""
    root = env.path("maildirs")
    box = make_maildir(root, "example.org", "bob")
    spaced = make_maildir(root, "example.org", '"b ob"')

    def script(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        check_reply(c.cmd('RCPT TO:<"Bob"@example.org>'), 250, what="RCPT")
        check_reply(c.cmd('RCPT TO:<"b ob"@example.org>'), 250,
                    what="RCPT of a mailbox that needs its quotes")
        check_reply(c.data(b"Subject: q\r\n\r\nquoted\r\n"), 250,
                    what="end of data")
        c.cmd("QUIT")

    r, p = run_fake(env, script, "maildir:%s/%%d/%%u" % root)
    expect(r, EX_OK, "quoted local part")
    files = maildir_files(box)
    check(len(files) == 1 and b'Delivered-To: "Bob"@example.org\n' in
          read(files[0]), "bob's maildir: %r" % [read(f)[:80] for f in files])
    check(len(maildir_files(spaced)) == 1, "the quoted mailbox's own maildir")


def test_fetch_maildir_as_root_follows_no_symlinked_subdirectory(env):
    """Run as root (as the tests are) into a maildir a user could own, a
    new/ that is a symbolic link is refused (451, the mail stays at the
    provider) rather than followed: root would write the message wherever
    it points."""
    check(os.geteuid() == 0, "this test needs root, as CI runs it")
    root = env.path("maildirs")
    box = make_maildir(root, "example.org", "bob")
    alice = make_maildir(root, "example.org", "alice")
    elsewhere = env.path("elsewhere")
    os.mkdir(elsewhere)
    os.rmdir(os.path.join(box, "new"))
    os.symlink(elsewhere, os.path.join(box, "new"))
    os.symlink(alice, os.path.join(root, "example.org", "carol"))
    # links a user made (root's own, an administrator's, are followed)
    for link in (os.path.join(box, "new"),
                 os.path.join(root, "example.org", "carol")):
        os.lchown(link, 4242, 4242)
    dave = make_maildir(root, "example.org", "dave-real")
    os.symlink(dave, os.path.join(root, "example.org", "dave"))
    got = {}

    def script(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        got["bob"] = c.cmd("RCPT TO:<bob@example.org>")
        got["carol"] = c.cmd("RCPT TO:<carol@example.org>")
        check_reply(c.cmd("RCPT TO:<dave@example.org>"), 250,
                    what="RCPT through root's own link")
        c.data(b"Subject: t\r\n\r\nthrough a link\r\n")
        c.cmd("QUIT")

    r, p = run_fake(env, script, "maildir:%s/%%d/%%u" % root)
    check(got["bob"][0] == 451 and got["carol"][0] == 451,
          "RCPT into a maildir whose new/ is a link, and into one that is a "
          "link: %r %r" % (got["bob"], got["carol"]))
    check(os.listdir(elsewhere) == [] and maildir_files(alice) == [],
          "written through a link: %r %r" % (os.listdir(elsewhere),
                                              maildir_files(alice)))
    check(len(maildir_files(dave)) == 1, "dave's maildir, through root's link")


def test_fetch_receiver_follows_target(env):
    """EHLO offers what the smtp target offers; a 421 of the target is
    never passed on as 421; SIZE is enforced."""
    with Sink(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES",
                          "SIZE 10000"),
              rcpt_replies={"busy@example.org": "421 4.3.2 going down"}) as sink:
        seen = {}

        def script(c):
            seen["ehlo"] = c.ehlo("fake.test")[1]
            check_reply(c.cmd("MAIL FROM:<a@b.test> SIZE=20000"), 552, "5.3.4",
                        "SIZE over the target's limit")
            check_reply(c.cmd("MAIL FROM:<a@b.test> SIZE=100"), 250, what="MAIL")
            check_reply(c.cmd("RCPT TO:<busy@example.org>"), 451, what="RCPT 421")
            check_reply(c.cmd("RCPT TO:<u1@example.org>"), 250, what="RCPT")
            check_reply(c.data(b"Subject: s\r\n\r\nsmall\r\n"), 250,
                        what="data")
            check_reply(c.cmd("QUIT"), 221, what="QUIT")

        r, p = run_fake(env, script, "smtp:" + sink.address)
        expect(r, EX_TEMPFAIL, "a recipient was deferred")
        kw = seen["ehlo"]
        check(kw.get("SIZE") == "10000", "SIZE %r" % kw)
        for k in ("DSN", "SMTPUTF8"):
            check(k not in kw, "%s advertised but the target lacks it" % k)
        check(sink.wait(1)[0].rcpts == ["u1@example.org"], "sink")


def test_fetch_provider_replies(env):
    """Greeting, capabilities and ATRN replies -> exit codes."""
    cases = [
        (dict(greeting="554 5.7.1 go away"), EX_UNAVAILABLE),
        (dict(greeting="421 4.3.2 busy"), EX_TEMPFAIL),
        (dict(extensions=("AUTH CRAM-MD5",)), EX_PROTOCOL),
        (dict(atrn_reply="451 4.4.0 Unable to process ATRN request now"),
         EX_TEMPFAIL),
        (dict(atrn_reply="450 4.7.1 ATRN request refused"), EX_NOPERM),
        (dict(atrn_reply="501 5.5.4 Syntax"), EX_PROTOCOL),
        (dict(atrn_reply="453 You have no mail"), EX_OK),
        (dict(password="other"), EX_NOPERM),
        # CRAM-MD5 has one round: a second 334 is a protocol error, not a
        # failed password check
        (dict(extra_334=True), EX_PROTOCOL),
    ]
    for kw, code in cases:
        r, p = run_fake(env, None, "smtp:127.0.0.1:1", **kw)
        expect(r, code, "provider %r" % kw)
        if kw.get("extra_334"):
            check(p.cancel == b"*", "answer to the extra 334: %r" % p.cancel)
            check("asked for more after the exchange was complete" in r.stderr,
                  "odmr-fetch said %r" % r.stderr)
        if kw.get("extensions"):
            check(not any(c.startswith("AUTH") for c in p.commands),
                  "AUTH sent to a server without ATRN: %r" % p.commands)


def test_fetch_provider_lost_mid_data(env):
    root = env.path("mail")
    box = make_maildir(root, "example.org", "u1")

    def script(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        check_reply(c.cmd("RCPT TO:<u1@example.org>"), 250, what="RCPT")
        check_reply(c.cmd("DATA"), 354, what="DATA")
        c.send_raw(b"Subject: cut\r\n\r\nhalf a message\r\n")
        c.sock.shutdown(socket.SHUT_RDWR)

    r, p = run_fake(env, script, "maildir:%s/%%d/%%u" % root)
    expect(r, EX_TEMPFAIL, "connection lost")
    check(maildir_files(box) == [], "a cut message was delivered")
    check(os.listdir(os.path.join(box, "tmp")) == [], "tmp/ not cleaned")


def test_fetch_provider_silent(env):
    """odmrd stops talking after the reversal: 421 after --timeout, 75."""
    got = {}

    def script(c):
        c.ehlo("fake.test")
        time.sleep(3)
        got["reply"] = c.reply()

    p = FakeProvider(script=script)
    r = fetch(env, "--timeout", "1", deliver="mda:cat >/dev/null",
              server=p.server)
    p.join()
    expect(r, EX_TEMPFAIL, "silent provider")
    check(got["reply"][0] == 421 and got["reply"][1].startswith("4.4.2"),
          "expected 421 4.4.2 after the timeout, got %r" % (got["reply"],))


def up_to_data(c):
    """The fake provider's side after the reversal, up to our 354."""
    c.ehlo("fake.test")
    check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
    check_reply(c.cmd("RCPT TO:<u1@example.org>"), 250, what="RCPT")
    check_reply(c.cmd("DATA"), 354, what="DATA")


def test_fetch_mda_status_kept_with_sigchld_ignored(env):
    """odmr-fetch started with SIGCHLD ignored (a parent's setting, kept
    across exec): the kernel would reap the delivery command itself and
    its exit status, 250 or not, would be lost.  A failing command must
    still not be answered 250."""
    real = env.fetch_bin
    wrapper = env.path("ignore-sigchld")
    with open(wrapper, "w") as f:
        f.write("#!%s\nimport os, signal, sys\n"
                "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
                "os.execv(%r, [%r] + sys.argv[1:])\n"
                % (sys.executable, real, real))
    os.chmod(wrapper, 0o755)
    got = {}

    def s(c):
        up_to_data(c)
        c.send_raw(b"Subject: t\r\n\r\nbody\r\n.\r\n")
        got["dot"] = c.reply()
        c.cmd("QUIT")

    env.fetch_bin = wrapper
    try:
        for cmd, code in (("exit 1", 554), ("exit 75", 451), ("cat >/dev/null", 250)):
            r, p = run_fake(env, s, "mda:" + cmd)
            check(got["dot"][0] == code, "mda:%s with SIGCHLD ignored: %r "
                  "(stderr %r)" % (cmd, got["dot"], r.stderr[-500:]))
    finally:
        env.fetch_bin = real


def test_fetch_mda_refuses_addresses_that_look_like_options(env):
    """Shell quoting stops the shell, not the command's option parser:
    RCPT TO:<-X/tmp/log@example.org> handed to sendmail would be its -X.
    Such a recipient (and sender) gets 553, the others are delivered."""
    out = env.path("args")
    got = {}

    def s(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        got["opt"] = c.cmd("RCPT TO:<-X/tmp/log@example.org>")
        check_reply(c.cmd("RCPT TO:<u1@example.org>"), 250, what="RCPT")
        got["dot"] = c.data(b"Subject: t\r\n\r\nbody\r\n")
        check_reply(c.cmd("MAIL FROM:<-oQ/tmp@remote.test>"), 553,
                    "5.1.7", "MAIL with an option-like sender")
        # the null sender (odmrd's own bounces) is not one
        check_reply(c.cmd("MAIL FROM:<>"), 250, what="MAIL FROM:<>")
        check_reply(c.cmd("RCPT TO:<u2@example.org>"), 250, what="RCPT")
        got["bounce"] = c.data(b"Subject: b\r\n\r\nbounce\r\n")
        c.cmd("QUIT")

    r, p = run_fake(env, s, "mda:printf '%%s\\n' %r >> " + out)
    check(got["opt"][0] == 553 and got["opt"][1].startswith("5.1.3"),
          "option-like recipient: %r" % (got["opt"],))
    check(got["dot"][0] == 250 and got["bounce"][0] == 250,
          "the other recipient, the null sender: %r %r" % (got["dot"],
                                                           got["bounce"]))
    with open(out) as f:
        text = f.read()
    check(text == "u1@example.org\nu2@example.org\n",
          "the commands got %r" % text)


def test_fetch_mda_command_line_within_the_argument_limit(env):
    """The expanded command is one argument of sh -c, at most 128 KiB on
    Linux: with %r twice, recipients past that get 452 (they come next
    run) instead of an exec that fails on every run."""
    got = {}

    def s(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        codes = []
        for i in range(1000):
            codes.append(c.cmd("RCPT TO:<%s%04d@example.org>" % ("u" * 60, i))[0])
        got["codes"] = codes
        got["dot"] = c.data(b"Subject: t\r\n\r\nbody\r\n")
        c.cmd("QUIT")

    r, p = run_fake(env, s, "mda:cat >/dev/null; : %r %r")
    codes = got["codes"]
    n = codes.count(250)
    # 1,000 recipients of 79 bytes quoted with their space, twice: 158 KB;
    # some 830 fit
    check(800 < n < 1000 and codes == [250] * n + [452] * (1000 - n),
          "RCPT replies: %d accepted, then %r" % (n, sorted(set(codes[n:]))))
    check(got["dot"][0] == 250, "the message for the first %d: %r (stderr %r)"
          % (n, got["dot"], r.stderr[-300:]))


def test_fetch_mda_stops_reading(env):
    """A delivery command that stops reading for --timeout while the
    message still comes is killed and answered 451: closing its input
    would make it take the cut message for a whole one."""
    out = env.path("out")
    os.mkdir(out)
    got = {}

    def s(c):
        up_to_data(c)
        c.send_raw(b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n")
        for _ in range(400):
            c.send_raw(b"y" * 998 + b"\r\n")
        c.send_raw(b".\r\n")
        got["dot"] = c.reply()
        c.cmd("QUIT")

    # It sleeps past the 2 s timeout of the write, then would read what
    # the pipe holds and exit 0 - well inside the wait for its exit.
    p = FakeProvider(script=s)
    r = fetch(env, "--timeout", "2", deliver="mda:sleep 3; cat > %s/msg" % out,
              server=p.server)
    p.join()
    expect(r, EX_TEMPFAIL, "a command that stopped reading")
    check(got.get("dot", (0,))[0] == 451 and
          "stopped reading" in got["dot"][1],
          "reply to the final dot: %r" % (got.get("dot"),))
    time.sleep(1.5)
    check(not os.path.exists(os.path.join(out, "msg")),
          "the command was left to read a cut message")


def test_fetch_provider_trickles_data(env):
    """A provider sending message data slower than 500 bytes/s once
    --timeout has passed is cut off: 421, nothing delivered, 75."""
    out = env.path("out")
    os.mkdir(out)
    got = {}

    def s(c):
        up_to_data(c)
        t0 = time.time()
        try:
            for ch in b"Subject: slow\r\n\r\n" + b"x" * 60:
                c.send_raw(bytes([ch]))
                ready, _, _ = select.select([c.sock], [], [], 0.3)
                if ready:
                    got["reply"] = c.reply()
                    break
        except (OSError, SMTPClosed):
            pass
        got["after"] = time.time() - t0

    p = FakeProvider(script=s)
    r = fetch(env, "--timeout", "2", deliver="mda:cat > %s/msg" % out,
              server=p.server)
    p.join()
    expect(r, EX_TEMPFAIL, "a provider trickling message data")
    check(got.get("reply", (0, ""))[0] == 421 and
          "data rate" in got["reply"][1], "reply: %r" % (got.get("reply"),))
    check(1.5 <= got["after"] <= 6, "cut off after %.1fs" % got["after"])
    check("slower than 500 bytes/s" in r.stderr, "stderr: %r" % r.stderr)
    check(not os.path.exists(os.path.join(out, "msg")) or
          os.path.getsize(os.path.join(out, "msg")) == 0,
          "a cut message was delivered")


def trickling_provider(data, interval):
    """A listener that sends data one byte per interval to the first
    connection; returns (server address, thread, seconds it kept going)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    kept = []

    def run():
        sock, _ = lsock.accept()
        t0 = time.time()
        try:
            for ch in data:
                sock.sendall(bytes([ch]))
                time.sleep(interval)
        except OSError:
            pass
        kept.append(time.time() - t0)
        sock.close()
        lsock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return "127.0.0.1:%d" % lsock.getsockname()[1], t, kept


def test_fetch_provider_trickles_greeting(env):
    """A reply line must be complete within --timeout of its first byte."""
    server, t, kept = trickling_provider(b"220 fake.test ESMTP " + b"x" * 40 +
                                         b"\r\n", 0.25)
    t0 = time.time()
    r = fetch(env, "--timeout", "2", deliver="mda:cat >/dev/null",
              server=server)
    dt = time.time() - t0
    t.join(20)
    expect(r, EX_TEMPFAIL, "a trickled greeting")
    check("too slowly" in r.stderr, "stderr: %r" % r.stderr)
    check(dt < 6, "odmr-fetch waited %.1fs for a greeting trickled at "
          "4 bytes/s with --timeout 2" % dt)


def test_fetch_provider_junk_commands(env):
    """More than 100 commands that move no mail between two transactions
    end the reversed session: 421 4.7.0, exit 76.  RSET is not one of
    them (odmrd sends one after every transaction the target refused)."""
    got = {}

    def s(c):
        c.ehlo("fake.test")
        for i in range(99):
            verb, code = ("NOOP", 250) if i % 2 else ("VRFY x", 252)
            check_reply(c.cmd(verb), code, what="junk command %d" % (i + 2))
        got["last"] = c.cmd("NOOP")

    def resets(c):
        c.ehlo("fake.test")
        for i in range(150):
            check_reply(c.cmd("RSET"), 250, what="RSET %d" % (i + 1))
        got["quit"] = c.cmd("QUIT")

    r, p = run_fake(env, s, "mda:cat >/dev/null")
    expect(r, EX_PROTOCOL, "a provider sending only NOOP and RSET")
    check(got["last"][0] == 421 and "Too many commands" in got["last"][1],
          "the 101st junk command got %r" % (got["last"],))
    r, p = run_fake(env, resets, "mda:cat >/dev/null")
    expect(r, EX_OK, "a provider sending 150 RSETs")
    check(got["quit"][0] == 221, "QUIT after 150 RSETs: %r" % (got["quit"],))


def test_fetch_provider_protocol_errors_count(env):
    """Commands odmrd never sends (bad syntax, a nested MAIL, parameters
    not offered) count towards the 20 errors that end the session, as
    unknown verbs do; and mail deferred before that keeps exit 75."""
    got = {}

    def syntax(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        bad = ["RCPT TO:<no-domain", "MAIL FROM:<again@remote.test>",
               "RCPT TO:<u@example.org> NOTIFY=NEVER", "DATA now"]
        for i in range(19):
            r = c.cmd(bad[i % 4])
            check(r[0] in (501, 503, 553, 555), "error %d: %r" % (i + 1, r))
        check(c.cmd(bad[0])[0] == 501, "the 20th error")
        got["last"] = c.reply()

    def deferred_then_junk(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        check_reply(c.cmd("RCPT TO:<u@example.org>"), 250, what="RCPT")
        check_reply(c.data(b"Subject: x\r\n\r\nx\r\n"), 451,
                    what="the mda's exit 75")
        for i in range(20):
            check_reply(c.cmd("XYZZY"), 502, what="unknown verb %d" % i)
        got["last"] = c.reply()

    r, p = run_fake(env, syntax, "mda:cat >/dev/null")
    expect(r, EX_PROTOCOL, "a provider sending syntax errors")
    check(got["last"][0] == 421 and "Too many errors" in got["last"][1],
          "after the 20th error: %r" % (got["last"],))
    r, p = run_fake(env, deferred_then_junk, "mda:exit 75")
    expect(r, EX_TEMPFAIL, "mail deferred, then too many errors")
    check(got["last"][0] == 421, "after the 20th error: %r" % (got["last"],))


def test_fetch_utf8_recipient_needs_smtputf8_in_mail(env):
    """A UTF-8 recipient only in a transaction whose MAIL said SMTPUTF8
    (RFC 6531 3.4), not merely because the extension was offered."""
    got = {}

    def s(c):
        _, text = c.ehlo("fake.test")
        got["offered"] = "SMTPUTF8" in text
        c.cmd("MAIL FROM:<s@remote.test>")
        got["plain"] = c.cmd("RCPT TO:<j\u00fcrgen@example.org>")
        c.cmd("RSET")
        c.cmd("MAIL FROM:<s@remote.test> SMTPUTF8")
        got["utf8"] = c.cmd("RCPT TO:<j\u00fcrgen@example.org>")
        c.cmd("QUIT")

    r, p = run_fake(env, s, "mda:cat >/dev/null")
    check(got["offered"], "the mda target does not offer SMTPUTF8")
    check(got["plain"][0] in (501, 553), "UTF-8 RCPT without SMTPUTF8 in "
          "MAIL: %r" % (got["plain"],))
    check(got["utf8"][0] == 250, "UTF-8 RCPT with SMTPUTF8: %r"
          % (got["utf8"],))


def read_reply_lines(c, n):
    """The next n reply lines (bytes, without CRLF), read in bulk: a
    million replies through c.reply() would take minutes."""
    data, seen = c.buf, c.buf.count(b"\n")
    while seen < n:
        chunk = c.sock.recv(1 << 20)
        if not chunk:
            fail("connection closed after %d of %d reply lines" % (seen, n))
        data += chunk
        seen += chunk.count(b"\n")
    lines = data.split(b"\n")
    c.buf = b"\n".join(lines[n:])
    return [l.rstrip(b"\r") for l in lines[:n]]


def test_fetch_provider_looping_rcpt(env):
    """A transaction may have as many recipients as odmrd's largest
    max_recipients (1,000,000): all are answered (1,000 taken, the rest
    452, to come next time).  One RCPT more ends the session: a provider
    cannot hold the run (and its lock) with RCPT."""
    got = {}

    def loop(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        n, step = 1000000, 5000
        for start in range(0, n, step):
            c.send_raw("".join("RCPT TO:<u%d@example.org>\r\n" % i
                               for i in range(start, start + step)))
            lines = read_reply_lines(c, step)
            want = [b"250"] * max(0, min(step, 1000 - start))
            check([l[:3] for l in lines[:len(want)]] == want and
                  set(lines[len(want):]) <= {b"452 4.5.3 Too many recipients"},
                  "RCPTs %d-%d: %r" % (start + 1, start + step,
                                       sorted(set(lines))[:5]))
        got["last"] = c.cmd("RCPT TO:<over@example.org>")

    r, p = run_fake(env, loop, "mda:cat >/dev/null")
    # the 452s past 1,000 are deferred mail: 75
    expect(r, EX_TEMPFAIL, "a provider looping RCPT")
    check("more than 1000000 RCPT" in r.stderr, "stderr: %r" % r.stderr)
    check(got["last"][0] == 421 and "Too many recipients" in got["last"][1],
          "RCPT 1,000,001 got %r" % (got["last"],))


def test_fetch_linger_limit(env):
    """Lingering, a provider that keeps the session up with NOOPs past
    --linger and --timeout since the last message is told 421; the run
    ends with 0 (the session ended at our limit)."""
    got = {}

    def s(c):
        c.ehlo("fake.test")
        t0 = time.time()
        while time.time() - t0 < 10:
            rr = c.cmd("NOOP")
            if rr[0] != 250:
                got["reply"], got["after"] = rr, time.time() - t0
                return
            time.sleep(0.3)

    p = FakeProvider(script=s, extensions=("AUTH CRAM-MD5", "ATRN",
                                           "XLINGER 3600"))
    r = fetch(env, "--timeout", "1", "--linger", "1",
              deliver="mda:cat >/dev/null", server=p.server)
    p.join()
    expect(r, EX_OK, "a lingering session ended at our limit")
    check(got.get("reply", (0, ""))[0] == 421 and
          "Linger time over" in got["reply"][1], "reply %r" % (got.get("reply"),))
    check(1.5 <= got["after"] <= 4, "ended after %.1fs; --linger 1 and "
          "--timeout 1" % got["after"])


def test_fetch_terminated_mid_message(env):
    """SIGTERM while a delivery command reads a message: the command (and
    what it started) is killed before it sees an end of input."""
    out = env.path("out")
    os.mkdir(out)
    script = env.path("mda.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\ntouch %s/started\ncat > %s/msg && touch %s/done\n"
                % (out, out, out))
    os.chmod(script, 0o755)
    release = threading.Event()

    def s(c):
        c.ehlo("fake.test")
        check_reply(c.cmd("MAIL FROM:<s@remote.test>"), 250, what="MAIL")
        check_reply(c.cmd("RCPT TO:<u1@example.org>"), 250, what="RCPT")
        check_reply(c.cmd("DATA"), 354, what="DATA")
        c.send_raw(b"Subject: cut\r\n\r\nthe first half\r\n")
        release.wait(20)

    p = FakeProvider(script=s)
    e = dict(os.environ, ODMR_PASSWORD="secret")
    proc = env.spawn([env.fetch_bin, "-s", p.server, "-u", "alice", "--tls",
                      "off", "--lock", env.path("l"), "--deliver",
                      "mda:" + script], env=e, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(os.path.join(out, "started")), 10,
             what="the delivery command")
    time.sleep(0.3)
    proc.terminate()
    proc.wait(10)
    release.set()
    p.join()
    time.sleep(0.5)
    check(not os.path.exists(os.path.join(out, "done")),
          "the delivery command saw an end of input and finished")


def test_fetch_smtp_into_postfix_smtp_sink(env):
    """odmr-fetch relaying to Postfix's smtp-sink: every message counted
    (its -c counters, the last "mesg=" printed)."""
    smtp_sink = need("smtp-sink")
    started(env)
    n = 12
    for i in range(n):
        send(env, "s%d@remote.test" % i, ["u%d@example.org" % i])
    port = free_port()
    out_path = env.path("smtp-sink.out")
    out = open(out_path, "wb")
    argv = [smtp_sink, "-c"] + (["-u", "nobody"] if os.geteuid() == 0 else [])
    sink = env.spawn(argv + ["127.0.0.1:%d" % port, "100"],
                     stdin=subprocess.DEVNULL, stdout=out,
                     stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            check(time.time() < deadline and sink.poll() is None,
                  "smtp-sink did not start")
            time.sleep(0.05)

    def counted():
        with open(out_path, "rb") as f:
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0
    try:
        expect(fetch(env, deliver="smtp:127.0.0.1:%d" % port), EX_OK,
               "delivery into smtp-sink")
        check(env.queued() == [], "still queued: %r" % env.queued())
        wait_for(lambda: counted() >= n, 5, 0.1, "smtp-sink to count the mail")
        check(counted() == n, "smtp-sink counted %d messages, expected %d"
              % (counted(), n))
    finally:
        out.close()


# --------------------------------------------------------------------------
# the relay to the site: pipelined groups (client/target.h target_group)

class ScriptedSite:
    """An SMTP site for one connection that answers each group of
    commands only once the whole group has arrived: with pipelining,
    MAIL's reply waits until DATA (or the last RCPT) is in, so a relay in
    lock step would stall here (and is reported).  Without PIPELINING it
    checks the opposite: nothing may follow MAIL or RCPT before their
    reply.  replies: {command prefix: reply}; data_replies in order."""

    def __init__(self, pipelining=True, replies=None, data_354=None):
        self.pipelining = pipelining
        self.replies = replies or {}
        self.data_354 = data_354 or (lambda accepted: accepted > 0)
        self.groups = []        # the commands of each group, as received
        self.messages = []      # data of each message
        self.dot_followed = []  # per final dot: a whole group came with it
        self.errors = []
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.address = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.lsock.settimeout(30)
            sock, _ = self.lsock.accept()
            with sock:
                self._session(sock)
        except Exception as e:   # reported by close()
            self.errors.append(repr(e))

    def _lines(self, sock, buf, wanted):
        """Reads until the group is complete (wanted(lines) is true) or
        nothing more comes for 3 s; returns (lines, rest)."""
        sock.settimeout(3)
        while True:
            lines = buf.split(b"\r\n")[:-1]
            if lines and wanted([l.decode() for l in lines]):
                rest = b"\r\n".join(buf.split(b"\r\n")[len(lines):])
                return [l.decode() for l in lines], rest
            try:
                more = sock.recv(65536)
            except socket.timeout:
                self.errors.append("group incomplete after 3 s: %r" % buf)
                more = b""
            if not more:
                return [l.decode() for l in lines], b""
            buf += more

    def _reply(self, line):
        for prefix, reply in self.replies.items():
            if line.upper().startswith(prefix.upper()):
                return reply
        return "250 2.0.0 Ok"

    def _next_line(self, sock, buf):
        """(first line, the rest of the buffer), ("", b"") at the end."""
        lines, buf = self._lines(sock, buf, lambda ls: True)
        if not lines:
            return "", b""
        rest = b"".join(l.encode() + b"\r\n" for l in lines[1:])
        return lines[0], rest + buf

    def _session(self, sock):
        ext = "250-site.test\r\n%s250 8BITMIME\r\n" % (
            "250-PIPELINING\r\n" if self.pipelining else "")
        sock.sendall(b"220 site.test ESMTP\r\n")
        buf = b""
        while True:
            line, buf = self._next_line(sock, buf)
            verb = line.split(" ", 1)[0].upper()
            if not line:
                return
            if verb == "EHLO":
                sock.sendall(ext.encode())
            elif verb == "MAIL" and self.pipelining:
                buf = self._pipelined(sock, line, buf)
            elif verb == "MAIL":
                buf = self._stepwise(sock, line, buf)
            elif verb == "QUIT":
                sock.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                sock.sendall(b"250 2.0.0 Ok\r\n")

    def _pipelined(self, sock, first, buf):
        """MAIL and what follows it up to DATA: answered all at once."""
        lines, rest = self._lines(sock, buf, lambda ls: ls[-1] == "DATA")
        group = [first] + lines
        self.groups.append(group)
        out, accepted = [], 0
        mail_ok = self._reply(group[0]).startswith("2")
        for line in group:
            reply = self._reply(line)
            if line.startswith("RCPT") and not mail_ok:
                reply = "503 5.5.1 Need MAIL"
            if line == "DATA":
                reply = "354 go" if self.data_354(accepted) else \
                    "554 5.5.1 no valid recipients"
            accepted += line.startswith("RCPT") and reply.startswith("2")
            out.append(reply)
        sock.sendall("".join(r + "\r\n" for r in out).encode())
        if out and out[-1].startswith("354"):
            return self._data(sock, rest)
        return rest

    def _early(self, sock, buf, line):
        """Without PIPELINING nothing may follow line before its reply."""
        sock.settimeout(0.3)
        try:
            early = buf or sock.recv(65536)
        except socket.timeout:
            early = b""
        if early:
            self.errors.append("%r came before the reply to %r (no "
                               "PIPELINING offered)" % (early, line))
        return early

    def _stepwise(self, sock, line, buf):
        group = []
        while True:
            buf = self._early(sock, buf, line)
            group.append(line)
            if line == "DATA":
                self.groups.append(group)
                sock.sendall(b"354 go\r\n")
                return self._data(sock, buf)
            reply = self._reply(line)
            sock.sendall((reply + "\r\n").encode())
            if line.startswith("MAIL") and not reply.startswith("2"):
                return buf
            line, buf = self._next_line(sock, buf)
            if not line.startswith(("RCPT", "DATA")):
                self.groups.append(group)
                return line.encode() + b"\r\n" + buf

    def _data(self, sock, buf):
        sock.settimeout(10)
        while b"\r\n.\r\n" not in b"\r\n" + buf:
            more = sock.recv(65536)
            if not more:
                return b""
            buf += more
        data, rest = (b"\r\n" + buf).split(b"\r\n.\r\n", 1)
        self.messages.append(data[2:])
        if self.pipelining:   # does the next group come without our reply?
            sock.settimeout(1)
            try:
                while b"DATA\r\n" not in rest:
                    more = sock.recv(65536)
                    if not more:
                        break
                    rest += more
            except socket.timeout:
                pass
            self.dot_followed.append(b"DATA\r\n" in rest)
        sock.sendall(b"250 2.0.0 Ok: queued\r\n")
        return rest

    def close(self):
        self.thread.join(30)
        self.lsock.close()
        check(not self.thread.is_alive(), "scripted site still running")
        check(not self.errors, "scripted site: %s" % self.errors)


def pipelined_provider_script(c, seen):
    """odmrd's side: pipelined groups, refusals of each kind among them."""
    c.ehlo("fake.test")
    c.send_raw(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<bad\r\n"
               b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<u1@example.org>\r\n"
               b"DATA\r\n")
    seen["first"] = [c.reply()[0] for _ in range(5)]
    if seen["first"][-1] == 354:
        c.send_raw(b"Subject: one\r\n\r\nfirst\r\n.\r\n")
        seen["first"].append(c.reply()[0])
    # a final dot with the next group behind it, as odmrd sends them
    c.send_raw(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<u1@example.org>\r\n"
               b"DATA\r\n")
    seen["behind"] = [c.reply()[0] for _ in range(3)]
    c.send_raw(b"Subject: two\r\n\r\nsecond\r\n.\r\n"
               b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.org>\r\n"
               b"RCPT TO:<u1@example.org>\r\nDATA\r\n")
    seen["behind"] += [c.reply()[0] for _ in range(5)]
    c.send_raw(b"Subject: three\r\n\r\nthird\r\n.\r\n")
    seen["behind"].append(c.reply()[0])
    # nobody accepted: the site's 354 must not reach odmrd
    c.send_raw(b"MAIL FROM:<s@remote.test>\r\n"
               b"RCPT TO:<nobody@example.org>\r\nDATA\r\n")
    seen["none"] = [c.reply() for _ in range(3)]
    check_reply(c.cmd("RSET"), 250, what="RSET after no recipient")
    # MAIL refused by the site: the recipients are out of a transaction
    c.send_raw(b"MAIL FROM:<refused@remote.test>\r\n"
               b"RCPT TO:<u1@example.org>\r\nDATA\r\n")
    seen["nomail"] = [c.reply() for _ in range(3)]
    check_reply(c.cmd("QUIT"), 221, what="QUIT")


def test_fetch_pipelines_groups_to_the_site(env):
    """A MAIL that odmrd pipelined with its RCPTs and DATA reaches a site
    offering PIPELINING as one group, the replies come back in order and
    as they would one by one; a site without PIPELINING gets lock step."""
    for pipelining in (True, False):
        site = ScriptedSite(pipelining=pipelining, replies={
            "RCPT TO:<nobody": "550 5.1.1 no such user",
            "MAIL FROM:<refused": "550 5.7.1 sender refused"},
            data_354=lambda accepted: True)
        seen = {}
        r, p = run_fake(env, lambda c: pipelined_provider_script(c, seen),
                        "smtp:" + site.address)
        site.close()
        what = "site %s PIPELINING" % ("with" if pipelining else "without")
        check(seen.get("first") == [250, 501, 550, 250, 354, 250],
              "%s: replies to the first group %r" % (what, seen.get("first")))
        check(seen.get("behind") == [250, 250, 354, 250, 250, 550, 250, 354,
                                     250],
              "%s: replies around a dot with a group behind it %r"
              % (what, seen.get("behind")))
        check([x[0] for x in seen["none"]] == [250, 550, 554],
              "%s: no recipient: %r" % (what, seen["none"]))
        check([x[0] for x in seen["nomail"]] == [550, 503, 503],
              "%s: MAIL refused: %r" % (what, seen["nomail"]))
        # the 354s given to DATA without a recipient were answered with an
        # empty message, which the site takes (a real one refuses it)
        check(site.messages == [b"Subject: one\r\n\r\nfirst",
                                b"Subject: two\r\n\r\nsecond",
                                b"Subject: three\r\n\r\nthird"] +
              [b""] * (2 if pipelining else 0),
              "%s: messages at the site %r" % (what, site.messages))
        if pipelining:   # only the second message's dot had a group behind
            check(site.dot_followed == [False, True, False, False, False],
                  "%s: dot and next group together: %r"
                  % (what, site.dot_followed))
            check(site.groups[0] == ["MAIL FROM:<s@remote.test>",
                                     "RCPT TO:<nobody@example.org>",
                                     "RCPT TO:<u1@example.org>", "DATA"],
                  "%s: first group %r" % (what, site.groups))
        expect(r, EX_OK, what)
