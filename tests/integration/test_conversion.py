"""8-bit to 7-bit conversion for customers without 8BITMIME (RFC 6152
section 3, issue 9) with the real odmrd.

After the ODMR role reversal the test plays the customer's SMTP server
(class Customer) and announces no 8BITMIME.  A message whose 8-bit MIME
parts are nested 60 multiparts deep must arrive converted to
quoted-printable; a message whose 8-bit data no MIME rule can make 7-bit
(8-bit header text, 8-bit octets in a base64 part, nesting beyond 100)
must never reach the customer: it is returned to its sender with an RFC
3464 report with status 5.6.3 (to a recording bounce_relay sink, or into
the local queue of a hosted sender domain) and leaves the customer's
queue; a null-sender one is logged and dropped without a report.

The helpers below are small copies of the ones in test_odmr.py, so that
this file does not depend on another test module.  Python 3 standard
library only.
"""

import email
import email.policy
import hashlib
import hmac
import base64
import re
import socket
import time

from harness import SMTP, check, check_reply, fail, wait_for
from sink import Sink

ALICE_PW = "alice-pw"
SENDER = "sender@remote.test"
CUSTOMER_7BIT = ("PIPELINING", "ENHANCEDSTATUSCODES", "DSN")


# --------------------------------------------------------------------------
# odmrd set-up, inbound mail, the log

def setup(env, relay=None, **conf):
    """alice: example.org (the customer's domain); bob: example.com (a
    hosted domain to send from).  relay: a Sink used as bounce_relay."""
    if relay is not None:
        conf["bounce_relay"] = relay.address
    if conf:
        env.write_conf(**conf)
    env.add_user("alice", ALICE_PW)
    env.add_domain("example.org", "alice")
    env.add_user("bob", "bob-pw")
    env.add_domain("example.com", "bob")
    env.start()


def smtp_in(env, rcpts, body, sender=SENDER, mail_params=" BODY=8BITMIME"):
    """One transaction on odmrd's inbound listener; returns the queue id."""
    with env.smtp() as s:
        check_reply(s.greeting, 220, what="inbound greeting")
        check_reply(s.cmd("EHLO src.test"), 250, what="inbound EHLO")
        check_reply(s.cmd("MAIL FROM:<%s>%s" % (sender, mail_params)), 250,
                    what="inbound MAIL")
        for r in rcpts:
            check_reply(s.cmd("RCPT TO:<%s>" % r), 250, what="inbound RCPT")
        reply = check_reply(s.data(body), 250, what="inbound data")
        s.quit()
    m = re.search(r"queued as ([0-9A-Fa-f]+)", reply[1])
    check(m, "no queue id in %r" % (reply,))
    return m.group(1)


def log_line_with(env, mark, *parts):
    """The first log line after offset mark containing every part."""
    for line in env.log()[mark:].splitlines():
        if all(p in line for p in parts):
            return line
    fail("no odmrd log line with all of %r; log:\n%s"
         % (parts, env.log_tail(20)))


def wait_session_end(env, mark):
    """Waits for the per-session summary line logged after mark; returns
    it."""
    def summary():
        for line in env.log()[mark:].splitlines():
            if "account=alice, messages=" in line:
                return line
        return None
    return wait_for(summary, timeout=15, what="the ODMR session to end")


# --------------------------------------------------------------------------
# the ODMR client part, up to the role reversal

def cram_md5(s, user, password):
    r = s.cmd("AUTH CRAM-MD5")
    check_reply(r, 334, what="AUTH CRAM-MD5")
    chal = base64.b64decode(r[1].strip())
    digest = hmac.new(password.encode(), chal, hashlib.md5).hexdigest()
    return s.cmd(base64.b64encode(("%s %s" % (user, digest)).encode())
                 .decode())


def reverse(env, **customer):
    """Authenticates as alice and says ATRN; returns the Customer that
    now plays the SMTP server on the same connection."""
    s = SMTP(port=env.odmr_port)
    check_reply(s.greeting, 220, what="ODMR greeting")
    check_reply(s.cmd("EHLO customer.test"), 250, what="ODMR EHLO")
    check_reply(cram_md5(s, "alice", ALICE_PW), 235, what="AUTH")
    check_reply(s.cmd("ATRN example.org"), 250, what="ATRN")
    return Customer(s, **customer)


class Tx:
    def __init__(self, mail_line):
        self.mail_line = mail_line
        self.rcpts = []
        self.data = None


class Customer:
    """The customer's SMTP server after the reversal.

    extensions: the EHLO keywords it announces.  stop_at: a command verb
    ("MAIL", "RCPT", "DATA", ".", "QUIT", or "EHLO"; "greeting" = say
    nothing at all) from which on it stops answering (stop="silent") or
    closes the connection (stop="close")."""

    def __init__(self, s, extensions=CUSTOMER_7BIT, stop_at=None,
                 stop="silent", timeout=20):
        self.s = s
        self.extensions = list(extensions)
        self.stop_at = stop_at
        self.stop = stop
        self.timeout = timeout
        self.transactions = []
        self.commands = []
        self.quit = False
        self.closed = False

    def line(self):
        """One line with its line end, or None at EOF."""
        self.s.sock.settimeout(self.timeout)
        while b"\n" not in self.s.buf:
            try:
                chunk = self.s.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                fail("customer: odmrd sent nothing for %ss (commands %r)"
                     % (self.timeout, self.commands[-5:]))
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self.s.buf += chunk
        line, self.s.buf = self.s.buf.split(b"\n", 1)
        return line + b"\n"

    def out(self, text):
        self.s.sock.sendall(text.encode() + b"\r\n")

    def stopping(self, verb):
        """Acts out stop_at; True when it did (the dialogue is over)."""
        if verb != self.stop_at:
            return False
        if self.stop == "close":
            try:
                self.s.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.s.close()
            self.closed = True
            return True
        # silent: read whatever comes until odmrd gives up and closes
        while self.line() is not None:
            pass
        return True

    def run(self):
        if self.stopping("greeting"):
            return self
        self.out("220 customer.test ESMTP")
        tx = None
        while True:
            raw = self.line()
            if raw is None:
                return self
            cmd = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            self.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if self.stopping(verb):
                return self
            if verb == "EHLO":
                lines = ["customer.test"] + self.extensions
                for i, l in enumerate(lines):
                    self.out("250%s%s" % (" " if i == len(lines) - 1 else "-", l))
            elif verb == "MAIL":
                tx = Tx(cmd)
                self.out("250 2.1.0 Ok")
            elif verb == "RCPT":
                tx.rcpts.append(re.match(r"(?i)RCPT TO:<([^>]*)>", cmd).group(1))
                self.out("250 2.1.5 Ok")
            elif verb == "DATA":
                self.out("354 go ahead")
                if not self.read_data(tx):
                    return self
                if self.stopping("."):
                    return self
                self.out("250 2.0.0 Ok delivered")
                tx = None
            elif verb == "QUIT":
                self.quit = True
                self.out("221 2.0.0 Bye")
                self.s.close()
                return self
            else:
                self.out("250 2.0.0 Ok")

    def read_data(self, tx):
        lines = []
        while True:
            raw = self.line()
            if raw is None:
                return False
            if raw == b".\r\n":
                break
            lines.append(raw[1:] if raw.startswith(b".") else raw)
        tx.data = b"".join(lines)
        self.transactions.append(tx)
        return True


# --------------------------------------------------------------------------
# messages

def header(subject):
    return (b"From: Sender <" + SENDER.encode() + b">\r\n"
            b"To: c@example.org\r\n"
            b"Subject: " + subject + b"\r\n"
            b"Message-ID: <" + str(time.time()).encode() + b"@remote.test>\r\n"
            b"MIME-Version: 1.0\r\n")


def nested(depth, tag):
    """A message whose 8-bit text part sits depth multiparts deep."""
    m = header(tag)
    for i in range(1, depth + 1):
        m += (b"Content-Type: multipart/mixed; boundary=\"lvl%d\"\r\n\r\n"
              b"--lvl%d\r\n" % (i, i))
    m += (b"Content-Type: text/plain; charset=utf-8\r\n"
          b"Content-Transfer-Encoding: 8bit\r\n\r\n"
          b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln, 5 \xe2\x82\xac\r\n")
    for i in range(depth, 0, -1):
        m += b"--lvl%d--\r\n" % i
    return m


def text_message(subject, body, cte=b"8bit"):
    return (header(subject) +
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + body)


def leaves(data):
    """(type, decoded payload) of every leaf part."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [(p.get_content_type(), p.get_payload(decode=True))
            for p in msg.walk() if not p.is_multipart()]


def dsn_fields(tx):
    """(per-recipient field dicts, the report) of a DSN the sink got."""
    check(tx.mail_from == "", "DSN MAIL FROM <%s>" % tx.mail_from)
    return report_fields(tx.data)


def report_fields(data):
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    check(msg.get_content_type() == "multipart/report" and
          msg.get_param("report-type") == "delivery-status",
          "not a DSN: %r" % msg.get("Content-Type"))
    status = msg.get_payload()[1]
    check(status.get_content_type() == "message/delivery-status",
          "second part %r" % status.get_content_type())
    return [dict(b.items()) for b in status.get_payload()[1:]], msg


def all_7bit(data):
    return all(b < 128 for b in data)


# ==========================================================================

def test_nested_60_deep_converted(env):
    """8-bit text 60 multiparts deep (beyond the old limit of 32) is
    converted to quoted-printable, not sent raw."""
    setup(env)
    body = nested(60, b"deep 60")
    qid = smtp_in(env, ["c@example.org"], body)
    stored = env.message("example.org", qid)
    mark = len(env.log())
    c = reverse(env).run()
    check(c.quit, "odmrd did not QUIT: %r" % c.commands)
    check(len(c.transactions) == 1, "customer got %r" % c.transactions)
    t = c.transactions[0]
    check("BODY=" not in t.mail_line.upper(), "BODY= sent: %r" % t.mail_line)
    check(all_7bit(t.data), "8-bit octets reached the 7-bit customer")
    check(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
          b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, 5 =E2=82=AC\r\n--lvl60--" in t.data,
          "the innermost part is not quoted-printable:\n%s"
          % t.data[-600:].decode(errors="replace"))
    check(leaves(t.data) == leaves(stored), "decoded parts differ")
    log_line_with(env, mark, qid, "converted to quoted-printable")
    wait_session_end(env, mark)
    check(env.queued() == [], "queue: %r" % env.queued())
    check("cannot encode" not in env.log()[mark:], "a residual warning was "
          "logged:\n%s" % env.log_tail(10))


def test_unconvertible_returned_with_5_6_3(env):
    """8-bit header text, 8-bit octets in a base64 part and 8-bit data 101
    multiparts deep cannot be made 7-bit: each message is returned with a
    5.6.3 DSN naming the reason, removed, and never offered to the
    customer; a convertible message in the same session still goes."""
    with Sink() as relay:
        setup(env, relay=relay)
        cases = {
            "header text": text_message(b"Gr\xc3\xbc\xc3\x9fe", b"ascii body\r\n"),
            "already encoded": text_message(b"b64", b"AAEC\xff\xfe\r\n",
                                            cte=b"base64"),
            "100 multiparts deep": nested(101, b"deep 101"),
        }
        qids = {why: smtp_in(env, ["c@example.org", "d@example.org"], m)
                for why, m in cases.items()}
        ok_qid = smtp_in(env, ["c@example.org"], nested(3, b"fine"))
        mark = len(env.log())
        c = reverse(env).run()
        check(c.quit, "odmrd did not QUIT: %r" % c.commands)
        check(len(c.transactions) == 1 and b"fine" in c.transactions[0].data,
              "the customer got %r, expected only the convertible message"
              % [t.mail_line for t in c.transactions])
        check(all_7bit(c.transactions[0].data), "8-bit data was sent")
        dsns = relay.wait(len(cases), what="the 5.6.3 reports")
        wait_session_end(env, mark)
        time.sleep(0.3)
        check(len(relay.transactions) == len(cases),
              "relay got %d reports" % len(relay.transactions))
        by_qid = {}
        for tx in dsns:
            per, msg = dsn_fields(tx)
            check(tx.rcpts == [SENDER], "DSN to %r" % tx.rcpts)
            m = re.search(rb"queued under the id ([0-9A-F]+)", tx.data)
            check(m, "DSN without the queue id")
            by_qid[m.group(1).decode()] = per
        for why, qid in qids.items():
            per = by_qid.get(qid)
            check(per is not None, "no DSN for %s (%s)" % (qid, why))
            check(sorted(f.get("Final-Recipient") for f in per) ==
                  ["rfc822; c@example.org", "rfc822; d@example.org"],
                  "DSN recipients %r" % per)
            for f in per:
                check(f.get("Action") == "failed" and f.get("Status") == "5.6.3",
                      "DSN fields %r" % f)
                check(why in f.get("Diagnostic-Code", ""),
                      "Diagnostic-Code %r lacks %r" % (f.get("Diagnostic-Code"), why))
            line = log_line_with(env, mark, qid, "does not offer 8BITMIME", why)
            check("5.6.3" in line, "log line %r" % line)
            log_line_with(env, mark, qid, "sender non-delivery notification")
        check(env.queued() == [], "queue after the session: %r" % env.queued())
        log_line_with(env, mark, ok_qid, "status=sent")


def test_unconvertible_dsn_queued_locally(env):
    """Without bounce_relay the report for a hosted sender domain goes
    into that domain's queue; the original leaves the customer's."""
    setup(env)
    sender = "writer@example.com"
    qid = smtp_in(env, ["c@example.org"],
                  text_message(b"K\xc3\xb6ln", b"body\r\n"), sender=sender)
    mark = len(env.log())
    c = reverse(env).run()
    check(c.quit and c.transactions == [], "customer got %r" % c.transactions)
    wait_session_end(env, mark)
    check(env.queued_ids("example.org") == [], "original still queued")
    local = env.queued_ids("example.com")
    check(len(local) == 1, "example.com queue: %r" % local)
    e = env.envelope("example.com", local[0])
    check([r["addr"] for r in e["rcpts"]] == [sender], "DSN envelope %r" % e)
    per, _ = report_fields(env.message("example.com", local[0]))
    check(per and per[0].get("Status") == "5.6.3", "DSN fields %r" % per)
    log_line_with(env, mark, qid, "header text", "5.6.3")
    log_line_with(env, mark, qid, "queued for example.com")


def test_unconvertible_null_sender_dropped(env):
    """A null-sender message that cannot be made 7-bit gets no report
    (SPEC 3.6), is not sent raw either, and is logged and dropped like a
    null-sender message the customer refused."""
    with Sink() as relay:
        setup(env, relay=relay)
        qid = smtp_in(env, ["c@example.org"],
                      text_message(b"\xe9t\xe9", b"body\r\n"), sender="")
        mark = len(env.log())
        c = reverse(env).run()
        check(c.quit and c.transactions == [],
              "customer got %r" % c.transactions)
        wait_session_end(env, mark)
        check(env.queued() == [], "queue: %r" % env.queued())
        log_line_with(env, mark, qid, "header text", "null sender")
        log_line_with(env, mark, qid, "no bounce for null sender")
        log_line_with(env, mark, qid, "status=bounced")
        time.sleep(0.3)
        check(relay.connections == 0, "a report was sent for a null sender")


def test_8bitmime_customer_gets_header_text(env):
    """The same 8-bit header text goes unchanged to a customer that
    offers 8BITMIME: only a 7-bit customer makes it a problem."""
    setup(env)
    body = text_message(b"Gr\xc3\xbc\xc3\x9fe", b"K\xc3\xb6ln\r\n")
    qid = smtp_in(env, ["c@example.org"], body)
    stored = env.message("example.org", qid)
    c = reverse(env, extensions=CUSTOMER_7BIT + ("8BITMIME",)).run()
    check(len(c.transactions) == 1 and c.transactions[0].data == stored,
          "customer got %r" % c.transactions)
    check("BODY=8BITMIME" in c.transactions[0].mail_line.upper(),
          "MAIL %r" % c.transactions[0].mail_line)
    check(env.queued() == [], "queue: %r" % env.queued())
