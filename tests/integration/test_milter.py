"""Content filtering with the milter protocol (issue 11): real odmrd on
loopback against a scripted milter (the filter side of the protocol,
written here with the standard library only) and against milters that are
down, stop answering or break the protocol.

Accounts: alice owns example.org and example.net, bob owns example.com."""

import base64
import grp
import hashlib
import os
import pwd
import re
import socket
import struct
import subprocess
import threading
import time

from harness import (DSN_FAILURE, DSN_SUCCESS, SMTP, check, check_reply,
                     free_port, need, queue_id_of, to_crlf, wait_for)

# protocol flags (the milter's side of OPTNEG)
NOCONNECT, NOHELO = 0x01, 0x02
NR_HDR, NR_CONN, NR_HELO, NR_MAIL, NR_RCPT = 0x80, 0x1000, 0x2000, 0x4000, 0x8000
NR_DATA, NR_EOH, NR_BODY = 0x10000, 0x40000, 0x80000
ADDHDRS, CHGBODY, CHGHDRS = 0x01, 0x02, 0x10
NO_REPLY = {"C": NR_CONN, "H": NR_HELO, "M": NR_MAIL, "R": NR_RCPT,
            "T": NR_DATA, "L": NR_HDR, "N": NR_EOH, "B": NR_BODY}
SKIPPED = {"C": NOCONNECT, "H": NOHELO}


def packet(cmd, data=b""):
    return struct.pack(">I", len(data) + 1) + cmd.encode() + data


def recv_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def strings(data):
    """NUL-terminated strings of a packet's data."""
    return [s.decode("utf-8", "replace") for s in data.split(b"\0")[:-1]]


class ScriptedMilter:
    """A milter on a loopback port.  on[cmd] (cmd: "C", "H", "M", "R",
    "T", "L", "N", "B", "E") is a function (data, milter) returning the
    packets to answer with (default: continue; for steps the milter
    negotiated as "no reply", nothing).  Everything received is kept per
    connection as (cmd, data); self.events is the last connection that saw
    a MAIL (odmrd's start-up probes connect too).  The macros per stage are
    in self.macros."""

    def __init__(self, actions=ADDHDRS | CHGHDRS | CHGBODY, steps=0, on=None,
                 version=6, optneg=None):
        self.actions, self.steps, self.version = actions, steps, version
        self.optneg = optneg
        self.on = on or {}
        self.sessions = []
        self.macros = {}
        self.offered = None
        self.errors = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.spec = "inet:127.0.0.1:%d" % self.port
        self.stop = False
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.conns.append(conn)
            t = threading.Thread(target=self._talk, args=(conn,), daemon=True)
            t.start()

    def _reply_to_optneg(self, data):
        self.offered = struct.unpack(">III", data[:12])
        if self.optneg is not None:
            return self.optneg
        return packet("O", struct.pack(">III", self.version, self.actions,
                                       self.steps))

    def _answer(self, cmd, data):
        if cmd == "D":
            self.macros[chr(data[0])] = dict(zip(strings(data[1:])[::2],
                                                 strings(data[1:])[1::2]))
            return []
        if cmd in ("A", "Q", "K"):
            return []
        if cmd == "O":
            return [self._reply_to_optneg(data)]
        handler = self.on.get(cmd)
        if handler:
            return handler(data, self)
        if self.steps & NO_REPLY.get(cmd, 0):
            return []
        return [packet("c")]

    @property
    def events(self):
        with_mail = [e for e in self.sessions if any(c == "M" for c, _ in e)]
        return with_mail[-1] if with_mail else sum(self.sessions, [])

    def _talk(self, conn):
        conn.settimeout(60)
        events = []
        self.sessions.append(events)
        try:
            while not self.stop:
                (n,) = struct.unpack(">I", recv_exact(conn, 4))
                body = recv_exact(conn, n)
                cmd, data = chr(body[0]), body[1:]
                self.current = conn
                if cmd != "D":
                    events.append((cmd, data))
                for p in self._answer(cmd, data):
                    conn.sendall(p)
                if cmd == "Q":
                    break
        except (EOFError, OSError, socket.timeout):
            pass
        except Exception as e:   # a bug in a handler: shown by the test
            self.errors.append(repr(e))
        finally:
            conn.close()

    def cmds(self):
        return "".join(c for c, _ in self.events)

    def data_of(self, cmd):
        return [d for c, d in self.events if c == cmd]

    def close(self):
        self.stop = True
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()
        self.thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def started(env, milters, **conf):
    env.write_conf(milters=milters, **conf)
    env.setup_accounts()
    env.start()
    return env


def session(env, ehlo="client.test", **kw):
    s = env.smtp(**kw)
    check_reply(s.greeting, 220, what="greeting")
    check_reply(s.cmd("EHLO " + ehlo), 250, what="EHLO")
    return s


MESSAGE = ("From: Sender <sender@client.test>\n"
           "To: <alice@example.org>\n"
           "Subject: milter test\n"
           "X-Old: remove me\n"
           "X-Folded: first\n"
           "\tsecond\n"
           "\n"
           "Body line one.\n"
           "Body line two.\n")


def send(env, rcpts=("alice@example.org",), body=MESSAGE):
    """One transaction; returns the final reply."""
    with session(env) as s:
        check_reply(s.cmd("MAIL FROM:<sender@client.test>"), 250, what="MAIL")
        for r in rcpts:
            check_reply(s.cmd("RCPT TO:<%s>" % r), 250, what="RCPT")
        reply = s.data(to_crlf(body))
        s.quit()
    return reply


def only_message(env, domain="example.org"):
    ids = env.queued_ids(domain)
    check(len(ids) == 1, "expected one message for %s, spool has %r" %
          (domain, env.queued()))
    return ids[0], env.message(domain, ids[0])


def check_nothing_queued(env, what):
    check(not env.queued(), "%s: nothing should be queued, spool has %r" %
          (what, env.queued()))
    tmp = os.path.join(env.spool, "tmp")
    left = os.listdir(tmp) if os.path.isdir(tmp) else []
    check(not left, "%s: leftovers in tmp/: %r" % (what, left))


def split_message(data):
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


# --------------------------------------------------------------------------

def test_milter_sees_every_stage_and_macros(env):
    with ScriptedMilter() as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, "2.0.0", "end of data")
        qid = queue_id_of(reply[1])
        check(m.errors == [], "milter errors: %r" % m.errors)
        check(m.offered and m.offered[0] == 6, "OPTNEG offered %r" % (m.offered,))
        wait_for(lambda: "E" in m.cmds(), what="end of message at the milter")
        c = m.cmds()
        check(c.startswith("OCHMRTLLLLLNBE"), "stages seen: %r" % c)
        conn = m.data_of("C")[0]
        check(conn.startswith(b"[127.0.0.1]\x004") and
              conn.endswith(b"127.0.0.1\x00"), "connect data %r" % conn)
        check(strings(m.data_of("H")[0]) == ["client.test"], "HELO %r" %
              m.data_of("H"))
        check(strings(m.data_of("M")[0])[0] == "<sender@client.test>",
              "MAIL %r" % m.data_of("M"))
        check(strings(m.data_of("R")[0]) == ["<alice@example.org>"],
              "RCPT %r" % m.data_of("R"))
        headers = [strings(d) for d in m.data_of("L")]
        check(["Subject", "milter test"] in headers, "headers %r" % headers)
        check(["X-Folded", "first\n\tsecond"] in headers, "folded %r" % headers)
        body = b"".join(m.data_of("B"))
        check(body == b"Body line one.\r\nBody line two.\r\n", "body %r" % body)
        mc = m.macros
        check(mc["C"].get("j") == "mx.test" and
              mc["C"].get("{client_addr}") == "127.0.0.1" and
              mc["C"].get("{daemon_name}") == "odmrd" and
              mc["C"].get("{client_port}", "").isdigit() and
              mc["C"].get("{if_addr}") == "127.0.0.1" and
              "_" in mc["C"], "connect macros %r" % mc.get("C"))
        check(mc["M"].get("{mail_addr}") == "sender@client.test",
              "MAIL macros %r" % mc.get("M"))
        check(mc["R"].get("{rcpt_addr}") == "alice@example.org",
              "RCPT macros %r" % mc.get("R"))
        check(mc["T"].get("i") == qid and mc["E"].get("i") == qid,
              "queue id macros %r (queued as %s)" % (mc, qid))
        _, data = only_message(env)
        check(data.startswith(b"Received: "), "odmrd's Received: on top")


def test_milter_rejects_one_recipient(env):
    def rcpt(data, m):
        if b"bad@" in data:
            return [packet("y", b"550 5.7.1 <bad@example.org>: not wanted\0")]
        return [packet("c")]
    with ScriptedMilter(on={"R": rcpt}) as m:
        started(env, m.spec)
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<a@client.test>"), 250, what="MAIL")
            r = s.cmd("RCPT TO:<bad@example.com>")
            check_reply(r, 550, "5.7.1", "RCPT refused by the milter")
            check("not wanted" in r[1], "the milter's text: %r" % (r,))
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, what="RCPT")
            check_reply(s.data(to_crlf(MESSAGE)), 250, what="end of data")
            s.quit()
        check(env.queued_ids("example.com") == [],
              "nothing for the refused recipient's domain: %r" % env.queued())
        only_message(env)
        check("milter-reject: RCPT from 127.0.0.1" in env.log(),
              "the refusal is logged")


def test_milter_multiline_reply_at_end_of_message(env):
    text = b"550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 last\0"
    with ScriptedMilter(on={"E": lambda d, m: [packet("y", text)]}) as m:
        started(env, m.spec)
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<a@client.test>"), 250, what="MAIL")
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, what="RCPT")
            check_reply(s.cmd("DATA"), 354, what="DATA")
            s.send_raw(to_crlf(MESSAGE) + b".\r\n")
            lines = [s.readline().decode() for _ in range(3)]
            s.quit()
        check(lines == ["550-5.7.1 first line", "550-5.7.1 second line",
                        "550 5.7.1 last"], "multi-line reply: %r" % lines)
        check_nothing_queued(env, "refused at end of data")


def test_milter_tempfail_and_reject_at_mail(env):
    def mail(data, m):
        if b"temp@" in data:
            return [packet("t")]
        if b"rej@" in data:
            return [packet("r")]
        return [packet("c")]
    with ScriptedMilter(on={"M": mail}) as m:
        started(env, m.spec)
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<temp@client.test>"), 451, "4.7.1",
                        "tempfail at MAIL")
            check_reply(s.cmd("MAIL FROM:<rej@client.test>"), 550, "5.7.1",
                        "reject at MAIL")
            check_reply(s.cmd("MAIL FROM:<ok@client.test>"), 250, what="MAIL")
            s.quit()
        check(m.cmds().count("A") >= 2, "the milter hears of each refused "
              "transaction's end: %r" % m.cmds())


def test_milter_421_ends_the_session(env):
    """A milter that answers 421 (SMFIR_REPLYCODE) closes the session, as
    RFC 5321 3.8 has it and Sendmail and Postfix do."""
    with ScriptedMilter(on={"R": lambda d, m: [
            packet("y", b"421 4.7.0 too busy\0")]}) as m:
        started(env, m.spec)
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<sender@client.test>"), 250,
                        what="MAIL")
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 421, "4.7.0",
                        "RCPT")
            s.sock.settimeout(5)
            try:
                rest = s.sock.recv(100)     # b"": odmrd closed it
            except socket.timeout:
                rest = "(still open after 5 s)"
            except ConnectionResetError:
                rest = b""
            check(rest == b"", "the session went on after 421: %r" % (rest,))
        check_nothing_queued(env, "421 from a milter")


def test_milter_refuses_data(env):
    """A refusal at DATA ends the transaction (the milters were told to
    abort it): a second DATA needs MAIL and RCPT again."""
    with ScriptedMilter(on={"T": lambda d, m: [packet("r")]}) as m:
        started(env, m.spec)
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<s@client.test>"), 250, what="MAIL")
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, what="RCPT")
            check_reply(s.cmd("DATA"), 550, "5.7.1", "DATA refused by a milter")
            check_reply(s.cmd("DATA"), 503, "5.5.1", "DATA after the refusal")
            s.quit()
        check_nothing_queued(env, "DATA refused")
        cmds = m.cmds()
        check(cmds.count("T") == 1, "the milter saw DATA again without a "
              "transaction: %r" % cmds)


def test_milter_body_of_a_message_with_too_many_headers(env):
    """Past 10,000 headers odmrd does not record where each one is, so a
    new body from a milter cannot be written after them: 451, not a
    message with headers missing."""
    new = b"Replaced body.\r\n"
    with ScriptedMilter(on={"E": lambda d, m: [packet("b", new),
                                               packet("c")]}) as m:
        started(env, m.spec)
        body = "".join("X-H%d: v\n" % i for i in range(10001)) + "\nbody\n"
        reply = send(env, body=body)
        check_reply(reply, 451, "4.3.0", "a new body after 10,001 headers")
        check_nothing_queued(env, "new body after 10,001 headers")


def test_milter_discard(env):
    with ScriptedMilter(on={"E": lambda d, m: [packet("d")]}) as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, "2.0.0", "a discarded message is acknowledged")
        qid = queue_id_of(reply[1])
        check_nothing_queued(env, "discarded")
        check("%s: discarded by milter %s" % (qid, m.spec) in env.log(),
              "the discard is logged with the queue id: %s" % env.log_tail())


def test_milter_discard_at_mail_ends_the_message_for_all(env):
    """The first milter discards at MAIL: the second never saw that MAIL,
    so it must not get RCPT, DATA or the content either (libmilter takes
    RCPT without MAIL for a protocol error).  Both are told ABORT; the
    message is acknowledged and dropped."""
    with ScriptedMilter(on={"M": lambda d, m: [packet("d")]}) as m1, \
            ScriptedMilter() as m2:
        started(env, "%s %s" % (m1.spec, m2.spec))
        reply = send(env)
        check_reply(reply, 250, "2.0.0", "a discarded message is acknowledged")
        check_nothing_queued(env, "discarded at MAIL")
        wait_for(lambda: "A" in m2.cmds(), what="the second milter's ABORT")
        for m, name in ((m1, "first"), (m2, "second")):
            seen = m.cmds()
            check(not any(c in seen for c in "RTLNBE"),
                  "the %s milter heard more of the message: %r" % (name, seen))
        check(m1.errors == [] and m2.errors == [], "milter errors: %r %r"
              % (m1.errors, m2.errors))


def test_milter_header_changes(env):
    def eom(data, m):
        return [packet("h", b"X-Added\0at the end\0"),
                packet("i", struct.pack(">I", 0) + b"X-Top\0first\0"),
                packet("m", struct.pack(">I", 1) + b"Subject\0changed\0"),
                packet("m", struct.pack(">I", 1) + b"X-Old\0\0"),
                packet("h", b"X-Multi\0one\n\ttwo\0"),
                packet("c")]
    with ScriptedMilter(on={"E": eom}) as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, what="end of data")
        qid, data = only_message(env)
        check(qid in reply[1], "the changed copy keeps the queue id")
        head, body = split_message(data)
        check(head[0].startswith(b"Received: from client.test"),
              "odmrd's Received: stays on top: %r" % head[:3])
        names = [h.split(b":")[0] for h in head if not h[:1].isspace()]
        check(names == [b"Received", b"X-Top", b"From", b"To", b"Subject",
                        b"X-Folded", b"X-Added", b"X-Multi"],
              "headers in order: %r" % names)
        check(b"Subject: changed" in head and b"X-Old: remove me" not in head,
              "changed and deleted: %r" % head)
        check(b"X-Multi: one" in head and b"\ttwo" in head, "folded value")
        check(body == b"Body line one.\r\nBody line two.\r\n",
              "body unchanged: %r" % body)
        env_ = env.envelope("example.org", qid)
        check(int(env_.get("size", len(data))) == len(data),
              "envelope size %r matches the file (%d)" % (env_.get("size"),
                                                          len(data)))


def test_milter_replaces_body(env):
    new = b"Replaced body.\nSecond line\r\n" + b"x" * 70000 + b"\r\n"
    def eom(data, m):
        return [packet("b", new[:40000]), packet("b", new[40000:]),
                packet("c")]
    with ScriptedMilter(on={"E": eom}) as m:
        started(env, m.spec)
        check_reply(send(env), 250, what="end of data")
        qid, data = only_message(env)
        head, body = split_message(data)
        check(b"Subject: milter test" in head, "headers kept")
        check(body == new.replace(b"line.\n", b"line.\r\n").replace(
                  b"body.\n", b"body.\r\n"),
              "new body with CRLF lines (%d bytes)" % len(body))
        e = env.envelope("example.org", qid)
        check(int(e.get("size", -1)) == len(data),
              "size from the result: %r vs %d" % (e.get("size"), len(data)))


def test_milter_replacement_body_bare_cr_and_nul(env):
    """A bare CR in a replacement body ends its line (CRLF), also across
    chunks and at the very end: it must never reach the customer bare.
    A NUL is a broken milter (milter_default_action, tempfail here)."""
    def eom(data, m):
        return [packet("b", b"one\rtwo\r"), packet("b", b"\nthree\r"),
                packet("b", b"four\r"), packet("c")]
    with ScriptedMilter(on={"E": eom}) as m:
        started(env, m.spec)
        check_reply(send(env), 250, what="end of data")
        qid, data = only_message(env)
        head, body = split_message(data)
        check(body == b"one\r\ntwo\r\nthree\r\nfour\r\n",
              "bare CRs made line ends: %r" % body)
    env.stop()

    def eom_nul(data, m):
        return [packet("b", b"text\0more\r\n"), packet("c")]
    with ScriptedMilter(on={"E": eom_nul}) as m:
        env.write_conf(milters=m.spec)
        env.start()
        check_reply(send(env), 451, what="end of data, NUL in the body")
        check("replacement body contains a NUL octet" in env.log(),
              "no log line:\n%s" % env.log_tail())


def test_milter_replacement_body_over_max_message_size(env):
    """A replacement body must fit max_message_size like a client's: a
    milter streaming more is a broken milter (milter_default_action,
    tempfail here), and nothing is queued."""
    def eom(data, m):
        return [packet("b", b"y" * 60000 + b"\r\n"),
                packet("b", b"z" * 60000 + b"\r\n"), packet("c")]
    with ScriptedMilter(on={"E": eom}) as m:
        started(env, m.spec, max_message_size="100k")
        check_reply(send(env), 451, what="end of data")
        check_nothing_queued(env, "replacement body too big")
        check("over max_message_size" in env.log(), "no log line:\n%s"
              % env.log_tail())


def test_milter_version_2_gets_no_data_command(env):
    """SMFIC_DATA came with protocol version 4: a milter that negotiated
    2 (or 3) would take it for a protocol error.  It gets none, and the
    message goes through."""
    with ScriptedMilter(version=2) as m:
        started(env, m.spec)
        check_reply(send(env), 250, what="end of data")
        wait_for(lambda: "E" in m.cmds(), what="end of message")
        check("T" not in m.cmds(), "DATA sent to a version 2 milter: %r"
              % m.cmds())
        only_message(env)


def test_milter_no_reply_steps_and_skipped_stages(env):
    steps = NOHELO | NR_CONN | NR_MAIL | NR_RCPT | NR_DATA | NR_HDR | NR_EOH | NR_BODY
    with ScriptedMilter(steps=steps) as m:
        started(env, m.spec)
        check_reply(send(env), 250, what="end of data with no-reply steps")
        wait_for(lambda: "E" in m.cmds(), what="end of message")
        check("H" not in m.cmds(), "HELO skipped: %r" % m.cmds())
        check(m.errors == [], "milter errors: %r" % m.errors)
        only_message(env)


def test_milter_no_reply_steps_below_version_6(env):
    """libmilter leaves a step unanswered when the no-reply flag for it was
    offered and taken, whatever protocol version was agreed: odmrd must not
    wait for those replies from a version 2 or 4 milter either."""
    steps = NR_CONN | NR_MAIL | NR_RCPT | NR_HDR | NR_EOH | NR_BODY
    env.setup_accounts()
    for n, version in enumerate((2, 4), 1):
        with ScriptedMilter(steps=steps, version=version) as m:
            env.write_conf(milters=m.spec, milter_command_timeout="3s",
                           milter_content_timeout="3s")
            env.start()
            check_reply(send(env), 250, what="end of data, version %d with "
                        "no-reply steps" % version)
            check(m.errors == [], "milter errors: %r" % m.errors)
            check(len(env.queued()) == n, "queued: %r" % env.queued())
            env.stop()


def test_slow_milter_does_not_count_against_the_client(env):
    """The data deadline (timeout + bytes / data_min_rate) is the
    client's: time odmrd spends waiting for a milter that is slow but
    within its own timeouts must not end the session as a slow client."""
    def slow(data, m):
        time.sleep(3)
        return [packet("c")]
    body = MESSAGE + ("y" * 76 + "\n") * 20000
    with ScriptedMilter(on={"N": slow}) as m:
        # a fast minimum rate: the 1.5 MB still to read after the headers
        # earn almost no time of their own
        started(env, m.spec, timeout="2s", data_min_rate="1000000")
        check_reply(send(env, body=body), 250,
                    what="end of data after a 3 s milter")
        only_message(env)
        check("data rate" not in env.log(), env.log_tail())


def test_milter_batched_headers_fill_the_buffer_exactly(env):
    """With no-reply headers odmrd gathers the header packets in one
    8 KB buffer.  Ten messages whose first header grows by one byte each
    time end the gathering at every offset near the buffer's end; each
    must reach the milter whole and be queued (an unsigned subtraction
    once let a packet past the end when fewer than 5 bytes were left)."""
    with ScriptedMilter(steps=NR_HDR) as m:
        started(env, m.spec)
        many = "".join("Xa: b\n" for _ in range(1700))
        for j in range(10):
            body = ("X-Pad: " + "p" * (j + 1) + "\n" + many +
                    "Subject: pad %d\n\nbody %d\n" % (j, j))
            check_reply(send(env, body=body), 250,
                        what="end of data, padding %d" % (j + 1))
            got = m.data_of("L")
            check(len(got) == 1702 and got[-1] == b"Subject\0pad %d\0" % j,
                  "padding %d: the milter got %d headers, last %r"
                  % (j + 1, len(got), got[-1:]))
        check(m.errors == [], "milter errors: %r" % m.errors)
        check(len(env.queued()) == 10, "queued: %r" % env.queued())


def test_milter_inserts_header_with_addhdrs_only(env):
    """smfi_insheader needs only SMFIF_ADDHDRS (as in libmilter): a
    milter that negotiated that alone may insert a header."""
    def eom(data, m):
        return [packet("i", struct.pack(">I", 0) + b"X-Inserted\0yes\0"),
                packet("c")]
    with ScriptedMilter(actions=ADDHDRS, on={"E": eom}) as m:
        started(env, m.spec)
        check_reply(send(env), 250, what="end of data")
        _, data = only_message(env)
        head, _ = split_message(data)
        check(b"X-Inserted: yes" in head, "header not inserted: %r" % head)


def test_milter_applies_to_lmtp(env):
    with ScriptedMilter(on={"E": lambda d, m: [packet("y", b"554 5.7.1 spam\0")]}) as m:
        started(env, m.spec)
        s = env.lmtp()
        check_reply(s.greeting, 220, what="LMTP greeting")
        check_reply(s.cmd("LHLO client.test"), 250, what="LHLO")
        check_reply(s.cmd("MAIL FROM:<a@client.test>"), 250, what="MAIL")
        check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, what="RCPT")
        check_reply(s.cmd("RCPT TO:<bob@example.com>"), 250, what="RCPT")
        check_reply(s.cmd("DATA"), 354, what="DATA")
        s.send_raw(to_crlf(MESSAGE) + b".\r\n")
        r1, r2 = s.readline().decode(), s.readline().decode()
        s.close()
        check(r1.startswith("554 5.7.1 spam") and r2.startswith("554 5.7.1 spam"),
              "one refusal per recipient: %r %r" % (r1, r2))
        check_nothing_queued(env, "LMTP refused")


# ---------------------------------------------------------- failing milters

def dead_spec():
    return "inet:127.0.0.1:%d" % free_port()


def test_dead_milter_default_tempfail(env):
    spec = dead_spec()
    started(env, spec)
    with session(env) as s:
        check_reply(s.cmd("MAIL FROM:<a@client.test>"), 451, "4.7.1",
                    "milter down, milter_default_action = tempfail (default)")
        s.quit()
    check("milter %s: connect" % spec in env.log(), "logged with the "
          "milter's name: %s" % env.log_tail())


def test_dead_milter_accept_and_reject(env):
    spec = dead_spec()
    started(env, spec, milter_default_action="accept")
    check_reply(send(env), 250, what="milter down, default accept")
    only_message(env)
    env.stop()
    env.write_conf(milter_default_action="reject")
    env.start()
    with session(env) as s:
        check_reply(s.cmd("MAIL FROM:<a@client.test>"), 550, "5.7.1",
                    "milter down, default reject")
        s.quit()


def test_milter_stops_answering(env):
    hang = threading.Event()
    def eom(data, m):
        hang.wait(30)          # never answers within the timeout
        return []
    with ScriptedMilter(on={"E": eom}) as m:
        started(env, m.spec, milter_content_timeout="2s")
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<a@client.test>"), 250, what="MAIL")
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, what="RCPT")
            t0 = time.time()
            r = s.data(to_crlf(MESSAGE))
            took = time.time() - t0
            check_reply(r, 451, "4.7.1", "milter timed out: tempfail")
            check(took < 10, "the timeout is kept (%.1f s)" % took)
            check_reply(s.cmd("MAIL FROM:<a@client.test>"), 451, "4.7.1",
                        "the broken milter stays broken for the session")
            s.quit()
        hang.set()
        check_nothing_queued(env, "milter timed out")
        check("milter %s: end of message: timed out" % m.spec in env.log(),
              "logged: %s" % env.log_tail())


def test_milter_breaks_the_protocol(env):
    bad = [("huge length", b"\xff\xff\xff\xffc"),
           ("unknown reply", packet("Z")),
           ("reply code of the wrong class", packet("y", b"250 ok\0")),
           ("modification not negotiated", packet("+", b"<x@example.org>\0")),
           ("header without NUL", packet("h", b"X-A\0v"))]
    for what, pkt in bad:
        env.stop() if env.running() else None
        with ScriptedMilter(on={"E": lambda d, m, p=pkt: [p]}) as m:
            started_once = env.daemon is not None
            if started_once:
                env.write_conf(milters=m.spec)
                env.start()
            else:
                started(env, m.spec)
            r = send(env)
            check_reply(r, 451, "4.7.1", what)
            check_nothing_queued(env, what)
            check("milter %s: end of message:" % m.spec in env.log(),
                  "%s logged: %s" % (what, env.log_tail()))


def test_milter_optneg_refused(env):
    # a milter that wants a newer protocol than milter_protocol allows
    with ScriptedMilter(version=6) as m:
        started(env, m.spec, milter_protocol="4")
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<a@client.test>"), 451, "4.7.1",
                        "OPTNEG failed: default action")
            s.quit()
        check(m.offered and m.offered[0] == 4, "offered version 4: %r" %
              (m.offered,))
        check("protocol version 6" in env.log(), "logged: %s" % env.log_tail())


def test_milter_conf_keys(env):
    env.setup_accounts()
    for key, value in (("milters", "tcp:127.0.0.1:1"),
                       ("milters", "inet:127.0.0.1"),
                       ("milters", "unix:relative"),
                       ("milter_default_action", "quarantine"),
                       ("milter_protocol", "7"),
                       ("milter_protocol", "1"),
                       ("milter_command_timeout", "soon")):
        env.write_conf(**{key: value})
        r = env.odmrd_check()
        check(r.returncode != 0 and key.split("_")[0] in (r.stdout + r.stderr),
              "%s = %s must be refused: %r" % (key, value, r))
        env.write_conf(**{key: None})
    env.write_conf(milters="inet:127.0.0.1:11332 unix:/run/opendkim.sock",
                   milter_default_action="accept", milter_protocol="6",
                   milter_connect_timeout="5s", milter_command_timeout="10s",
                   milter_content_timeout="1m")
    r = env.odmrd_check()
    check(r.returncode == 0, "good milter keys accepted: %r" % r)


def peak_rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_milter_streams_100mb(env):
    """100 MB through a milter: every body byte reaches it in chunks of at
    most 64 KB, and the session's peak RSS stays under 16 MB."""
    seen = {"bytes": 0, "max": 0}
    def body(data, m):
        seen["bytes"] += len(data)
        seen["max"] = max(seen["max"], len(data))
        return [packet("c")]
    with ScriptedMilter(on={"B": body}) as m:
        started(env, m.spec, max_message_size="200M")
        line = b"y" * 998 + b"\r\n"
        count = 100 * 1024 * 1024 // len(line)
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<a@client.test>"), 250, what="MAIL")
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, what="RCPT")
            check_reply(s.cmd("DATA"), 354, what="DATA")
            s.send_raw(b"Subject: big\r\n\r\n")
            chunk = line * 1024
            for _ in range(count // 1024):
                s.send_raw(chunk)
            s.send_raw(b".\r\n")
            r = s.reply()
            check_reply(r, 250, what="end of data")
            pids = [int(x) for x in re.findall(
                r"odmrd\[(\d+)\]: connect from 127\.0\.0\.1 \(SMTP\)", env.log())]
            rss = peak_rss_kb(pids[-1])
            s.quit()
        total = (count // 1024) * 1024 * len(line)
        check(seen["bytes"] == total, "the milter got %d of %d body bytes" %
              (seen["bytes"], total))
        check(seen["max"] <= 65535, "chunks of at most 65535 bytes (%d)" %
              seen["max"])
        env.info("session peak RSS %.1f MB for a 100 MB message" % (rss / 1024))
        check(0 < rss < 16 * 1024, "peak RSS %d kB >= 16 MB" % rss)
        only_message(env)


def test_milter_adds_and_removes_recipients(env):
    ADDRCPT, DELRCPT = 0x04, 0x08
    def eom(data, m):
        return [packet("+", b"<bob@example.com>\0"),
                packet("+", b"<victim@elsewhere.test>\0"),   # never relayed
                packet("-", b"<alice@example.org>\0"),
                packet("c")]
    with ScriptedMilter(actions=ADDRCPT | DELRCPT, on={"E": eom}) as m:
        started(env, m.spec)
        reply = send(env, rcpts=("alice@example.org", "alice@example.net"))
        check_reply(reply, 250, what="end of data")
        qid = queue_id_of(reply[1])
        check(env.queued_ids("example.org") == [],
              "alice@example.org removed: %r" % env.queued())
        check(env.queued_ids("example.net") == [qid], "example.net kept")
        check(env.queued_ids("example.com") == [qid],
              "bob@example.com added: %r" % env.queued())
        rc = [r["addr"] for r in env.envelope("example.com", qid)["rcpts"]]
        check(rc == ["bob@example.com"], "added recipient %r" % rc)
        check(not os.path.exists(env.queue_dir("elsewhere.test")),
              "a milter cannot make odmrd relay")
        check("recipient <victim@elsewhere.test> not added" in env.log(),
              "the refused addition is logged: %s" % env.log_tail())


def test_milter_adds_recipient_with_a_long_orcpt(env):
    """An added recipient's ORCPT may be as long as a client's (500
    characters, the address and arguments over 530): it is kept whole,
    not cut with the recipient dropped."""
    ADDRCPT_PAR = 0x80
    orcpt = "rfc822;carol+2B" + "x" * 473 + "@example.com"
    def eom(data, m):
        return [packet("2", b"<bob@example.com>\0NOTIFY=FAILURE ORCPT=" +
                       orcpt.encode() + b"\0"), packet("c")]
    with ScriptedMilter(actions=ADDRCPT_PAR, on={"E": eom}) as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, what="end of data")
        qid = queue_id_of(reply[1])
        rc = env.envelope("example.com", qid)["rcpts"]
        check([(r["addr"], r["orcpt"]) for r in rc] ==
              [("bob@example.com", orcpt)], "added: %r" % rc)


def test_milter_adds_recipient_with_esmtp_args(env):
    """SMFIR_ADDRCPT_PAR: NOTIFY= and ORCPT= reach the added recipient's
    envelope record; an unknown arg and a bad NOTIFY are logged and
    dropped; the hosted-domain rule still holds."""
    ADDRCPT_PAR = 0x80
    def eom(data, m):
        return [packet("2", b"<bob@example.com>\0NOTIFY=SUCCESS,FAILURE "
                            b"ORCPT=rfc822;bob+2Borig@example.com X-FOO=1\0"),
                packet("2", b"alice@example.net\0NOTIFY=BOGUS\0"),
                packet("2", b"<victim@elsewhere.test>\0NOTIFY=NEVER\0"),
                packet("c")]
    with ScriptedMilter(actions=ADDRCPT_PAR, on={"E": eom}) as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, what="end of data")
        qid = queue_id_of(reply[1])
        check(m.offered[1] & ADDRCPT_PAR, "ADDRCPT_PAR offered: %r" % (m.offered,))
        rc = env.envelope("example.com", qid)["rcpts"]
        check([r["addr"] for r in rc] == ["bob@example.com"], "added: %r" % rc)
        check(rc[0]["notify"] == DSN_SUCCESS | DSN_FAILURE and
              rc[0]["orcpt"] == "rfc822;bob+2Borig@example.com",
              "NOTIFY and ORCPT of the added recipient: %r" % rc[0])
        rn = env.envelope("example.net", qid)["rcpts"]
        check([(r["addr"], r["notify"]) for r in rn] == [("alice@example.net", 0)],
              "a bad NOTIFY is dropped, the recipient kept: %r" % rn)
        check(not os.path.exists(env.queue_dir("elsewhere.test")),
              "ADDRCPT_PAR cannot make odmrd relay either")
        log = env.log()
        check("ESMTP arguments ignored: X-FOO=1" in log and
              "ESMTP arguments ignored: NOTIFY=BOGUS" in log,
              "dropped arguments are logged: %s" % env.log_tail())


def chgfrom_milter(data):
    return ScriptedMilter(actions=0x40, on={"E": lambda d, m: [
        packet("e", data), packet("c")]})


def test_milter_changes_the_sender(env):
    with chgfrom_milter(b"<new@client.test>\0") as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, what="end of data")
        qid = queue_id_of(reply[1])
        check(m.offered[1] & 0x40, "CHGFROM offered: %r" % (m.offered,))
        e = env.envelope("example.org", qid)
        check(e["sender"] == "new@client.test", "new sender: %r" % e)
        check(e["envid"] is None and e["ret"] is None, "no DSN args: %r" % e)
        check("sender <sender@client.test> changed to <new@client.test>"
              in env.log(), "the change is logged: %s" % env.log_tail())


def test_milter_changes_the_sender_with_args(env):
    args = b"RET=HDRS ENVID=new+2Did BODY=8BITMIME SIZE=99 X-UNKNOWN=1"
    with chgfrom_milter(b"bounces@client.test\0" + args + b"\0") as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, what="end of data")
        e = env.envelope("example.org", queue_id_of(reply[1]))
        check(e["sender"] == "bounces@client.test", "sender: %r" % e)
        check(e["ret"] == "HDRS" and e["envid"] == "new+2Did" and
              e["body"] == "8BITMIME", "RET, ENVID, BODY applied: %r" % e)
        check("ESMTP arguments ignored: X-UNKNOWN=1" in env.log(),
              "the unknown arg is logged: %s" % env.log_tail())


def test_milter_changes_the_sender_to_the_null_sender(env):
    with chgfrom_milter(b"<>\0") as m:
        started(env, m.spec)
        reply = send(env)
        check_reply(reply, 250, what="end of data")
        e = env.envelope("example.org", queue_id_of(reply[1]))
        check(e["sender"] == "", "null sender: %r" % e)


def test_milter_bad_sender_is_default_action(env):
    bad = [b"<not an address>\0", b"<a@b.test>\0BODY=NONSENSE\0",
           b"<j\xc3\xb6rg@client.test>\0"]   # UTF-8 without SMTPUTF8
    todo = list(bad)
    with ScriptedMilter(actions=0x40, on={"E": lambda d, m: [
            packet("e", todo.pop(0)), packet("c")]}) as m:
        started(env, m.spec)
        for b in bad:
            reply = send(env)
            check_reply(reply, 451, "4.7.1", "bad CHGFROM %r: tempfail" % b)
            check_nothing_queued(env, "bad CHGFROM %r" % b)
    log = env.log()
    check(log.count("bad sender") == 3 and
          "milter_default_action = tempfail" in log,
          "each logged with the milter's name: %s" % env.log_tail())


def test_milter_removes_every_recipient(env):
    def eom(data, m):
        return [packet("-", b"<alice@example.org>\0"), packet("c")]
    with ScriptedMilter(actions=0x08, on={"E": eom}) as m:
        started(env, m.spec)
        check_reply(send(env), 250, what="end of data")
        check_nothing_queued(env, "no recipient left")


def test_milter_quarantine_reason_without_control_characters(env):
    """The reason is shown by odmrctl queue quarantine and logged: a
    milter's escape sequence must not reach the operator's terminal (the
    queue writes the reason file printable, server/queue.c)."""
    QUARANTINE = 0x20
    def eom(data, m):
        return [packet("q", b"evil\x1b]0;owned\x07 \x1b[2J\0"), packet("c")]
    with ScriptedMilter(actions=QUARANTINE, on={"E": eom}) as m:
        started(env, m.spec)
        check_reply(send(env), 250, what="end of data")
    out = env.odmrctl_ok("queue", "quarantine").stdout
    check("\x1b" not in out and "\x07" not in out and
          "reason: evil?]0;owned? ?[2J" in out, "listing: %r" % out)
    check("\x1b" not in env.log(), "log: %r" % env.log_tail())
    # nor the reason file, which other tools may print
    held = os.path.join(env.spool, "quarantine", "example.org")
    whys = [f for f in os.listdir(held) if f.endswith(".why")]
    check(len(whys) == 1, "reason files: %r" % whys)
    with open(os.path.join(held, whys[0]), "rb") as f:
        why = f.read()
    check(b"\x1b" not in why and b"\x07" not in why and
          b"evil?]0;owned? ?[2J" in why, "reason file: %r" % why)


def test_milter_quarantine_list_release_delete(env):
    QUARANTINE = 0x20
    def eom(data, m):
        return [packet("q", b"looks like phishing\0"), packet("c")]
    with ScriptedMilter(actions=QUARANTINE, on={"E": eom}) as m:
        started(env, m.spec)
        r1 = send(env)
        r2 = send(env, rcpts=("alice@example.org", "bob@example.com"))
    for r in (r1, r2):
        check_reply(r, 250, "2.0.0", "a quarantined message is accepted")
    q1, q2 = queue_id_of(r1[1]), queue_id_of(r2[1])
    check(env.queued() == [], "held, not queued: %r" % env.queued())
    held = os.path.join(env.spool, "quarantine", "example.org")
    check(os.path.exists(os.path.join(held, q1 + ".e")) and
          os.path.exists(os.path.join(held, q1 + ".m")),
          "in the quarantine area: %r" % (os.listdir(held),))
    with open(os.path.join(held, q1 + ".why")) as f:
        why = f.read()
    check("looks like phishing" in why and m.spec in why, "reason %r" % why)
    check("%s: quarantined by milter %s: looks like phishing" % (q1, m.spec)
          in env.log(), "logged: %s" % env.log_tail())
    out = env.odmrctl_ok("queue", "quarantine").stdout
    check(q1 in out and q2 in out and "reason: looks like phishing" in out,
          "queue quarantine lists both with the reason: %s" % out)
    check("Queue is empty" in env.odmrctl_ok("queue").stdout,
          "the queue shows none")
    env.odmrctl_ok("queue", "release", q1)
    check(env.queued() == [("example.org", q1)], "released into the queue: "
          "%r" % env.queued())
    e = env.envelope("example.org", q1)
    check(e["size"] == len(env.message("example.org", q1)), "envelope intact")
    check(not os.path.exists(os.path.join(held, q1 + ".m")) and
          not os.path.exists(os.path.join(held, q1 + ".why")),
          "nothing of it left in the quarantine")
    env.odmrctl_ok("queue", "delete", q2)
    out = env.odmrctl_ok("queue", "quarantine").stdout
    check("Quarantine is empty" in out, "deleted from the quarantine: %s" % out)
    r = env.odmrctl("queue", "release", q2)
    check(r.returncode == 65, "releasing an unknown id: 65, got %r" % (r,))
    check(not env.spool_problems(), "spool consistent: %r" % env.spool_problems())


# ------------------------------------------------------------ real milters

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def wait_listening(port, proc, what, timeout=90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            check(False, "%s exited with %s before listening" % (what,
                                                                 proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    check(False, "%s did not listen on 127.0.0.1:%d within %ds" % (
        what, port, timeout))


def stop_by_pid(proc, timeout=20):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except Exception:
            proc.kill()
            proc.wait(5)


def run_as():
    return (pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name)


def start_rspamd(env):
    """rspamd with a private configuration directory: its proxy worker in
    milter mode scanning by itself, every worker on a private loopback
    port, its DNS resolver at 127.0.0.1 (so it never sends a query
    elsewhere), no Redis, the fuzzy check off.  Returns (proc, port)."""
    prog = need("rspamd")
    d = env.path("rspamd")
    os.makedirs(os.path.join(d, "local.d"))
    os.makedirs(os.path.join(d, "override.d"))
    port, normal, controller = free_port(), free_port(), free_port()
    files = {
        "override.d/worker-proxy.inc":
            'bind_socket = "127.0.0.1:%d";\nmilter = yes;\nself_scan = yes;\n'
            'timeout = 120s;\ncount = 1;\n'
            'upstream "local" { default = yes; self_scan = yes; }\n' % port,
        "override.d/worker-normal.inc":
            'bind_socket = "127.0.0.1:%d";\ncount = 1;\n' % normal,
        "override.d/worker-controller.inc":
            'bind_socket = "127.0.0.1:%d";\ncount = 1;\n' % controller,
        "local.d/options.inc": 'dns { nameserver = ["127.0.0.1:53"]; }\n',
        "override.d/logging.inc":
            'type = "file";\nfilename = "%s/rspamd.log";\nlevel = "info";\n' % d,
        "local.d/fuzzy_check.conf": "enabled = false;\n",
        "local.d/milter_headers.conf":
            'use = ["x-rspamd-queue-id", "x-spamd-result"];\n'
            'skip_local = false;\nskip_authenticated = false;\n',
        # a symbol for one test subject, scored between add_header (6) and
        # rewrite_subject (8): rspamd's "add header" action
        "local.d/multimap.conf":
            'ODMR_ADD_HEADER { type = "header"; header = "Subject"; '
            'regexp = true; map = "%s/addheader.map"; score = 7.0; }\n' % d,
        "addheader.map": "/odmr add header test/\n",
    }
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    user, group = run_as()
    argv = [prog, "-f", "-i", "-u", user, "-g", group, "-c",
            "/etc/rspamd/rspamd.conf"] + \
        ["--var=%s=%s" % (k, d) for k in ("LOCAL_CONFDIR", "RUNDIR", "DBDIR",
                                          "LOGDIR")]
    proc = env.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proc, "rspamd")
    return proc, port


def test_rspamd_gtube_and_headers(env):
    proc, port = start_rspamd(env)
    try:
        started(env, "inet:127.0.0.1:%d" % port)
        gtube = MESSAGE.replace("Body line one.", GTUBE)
        r = send(env, body=gtube)
        check_reply(r, 554, "5.7.1", "GTUBE refused at end of data")
        check("Gtube pattern" in r[1], "rspamd's reply: %r" % (r,))
        check_nothing_queued(env, "GTUBE")
        r = send(env)
        check_reply(r, 250, what="an ordinary message")
        qid, data = only_message(env)
        head, body = split_message(data)
        check(b"X-Rspamd-Queue-Id: " + qid.encode() in head,
              "rspamd's headers, with odmrd's queue id: %r" % head)
        check(head[0].startswith(b"Received: from client.test"),
              "odmrd's Received: on top")
        check(body == b"Body line one.\r\nBody line two.\r\n", "body intact")
        spam = MESSAGE.replace("Subject: milter test",
                               "Subject: odmr add header test")
        r = send(env, body=spam)
        check_reply(r, 250, what="an add-header message is accepted")
        q2 = queue_id_of(r[1])
        head, _ = split_message(env.message("example.org", q2))
        check(b"X-Spam: Yes" in head, "rspamd's add header action: %r" % head)
    finally:
        stop_by_pid(proc)


def start_opendkim(env):
    """opendkim signing for example.org with a key made here; returns
    (proc, port, public key record)."""
    prog = need("opendkim")
    genkey = need("opendkim-genkey")
    d = env.path("opendkim")
    os.makedirs(d)
    r = env.run([genkey, "-b", "1024", "-D", d, "-d", "example.org", "-s", "t"])
    check(r.returncode == 0, "opendkim-genkey: %r" % (r,))
    port = free_port()
    conf = os.path.join(d, "opendkim.conf")
    with open(conf, "w") as f:
        f.write("Mode s\nDomain example.org\nSelector t\nKeyFile %s/t.private\n"
                "Socket inet:%d@127.0.0.1\nCanonicalization relaxed/simple\n"
                "Background no\nSyslog no\nPidFile %s/opendkim.pid\n"
                "InternalHosts 127.0.0.1\n"
                # the test's key lies under /tmp, which others may write
                "RequireSafeKeys false\n" % (d, port, d))
    proc = env.spawn([prog, "-f", "-x", conf], stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)
    wait_listening(port, proc, "opendkim", timeout=20)
    return proc, port


def test_opendkim_signs(env):
    proc, port = start_opendkim(env)
    try:
        started(env, "inet:127.0.0.1:%d" % port)
        # a customer's own mail (From: in the signing domain), relayed in
        r = send(env, body=MESSAGE.replace("sender@client.test",
                                           "newsletter@example.org"))
        check_reply(r, 250, what="signed message")
        qid, data = only_message(env)
        head, body = split_message(data)
        check(body == b"Body line one.\r\nBody line two.\r\n",
              "body unchanged byte for byte: %r" % body)
        text = b"\r\n".join(head)
        check(b"DKIM-Signature:" in text, "signed: %r" % head)
        check(head[0].startswith(b"Received: from client.test"),
              "odmrd's Received: on top")
        sig = text[text.index(b"DKIM-Signature:"):]
        m = re.search(rb"bh=([A-Za-z0-9+/=\s]+);", sig)
        check(m, "bh= in %r" % sig[:300])
        bh = base64.b64encode(hashlib.sha256(body).digest())
        check(re.sub(rb"\s", b"", m.group(1)) == bh,
              "the body hash opendkim signed is that of the queued body")
        check(b"d=example.org" in sig and b"s=t" in sig, "domain and selector")
    finally:
        stop_by_pid(proc)


def test_end_of_message_has_one_deadline_for_the_chain(env):
    """Each milter within its own content timeout, the chain together
    past EOM_TIMEOUTS_MAX (4) of them: the milter still going then counts
    as failed and the ones after it are not asked (milter_default_action,
    accept here), rather than odmrd answering the final dot after the
    client has given up (a client waits 10 minutes; mail accepted later
    comes again)."""
    def slow(data, m):
        time.sleep(0.8)
        return [packet("c")]
    milters = [ScriptedMilter(on={"E": slow}) for _ in range(8)]
    try:
        started(env, " ".join(m.spec for m in milters),
                milter_content_timeout="1s", milter_default_action="accept")
        t0 = time.monotonic()
        reply = send(env)
        took = time.monotonic() - t0
        # 4 s for the chain; all eight would take 6.4 s.  With accept, the
        # one cut off and the ones not asked let the message through.
        check_reply(reply, 250, what="end of data, eight 0.8 s milters")
        check(took < 5.6, "the final dot's reply took %.1f s" % took)
        log = env.log()
        check("end of message: timed out" in log and
              "end of message: not asked, the milters' time for it is spent"
              in log, env.log_tail())
        only_message(env)
        # the ones not asked heard the abort and kept their connection to
        # the session's end (its QUIT); the one cut off was closed
        for i, m in enumerate(milters):
            wait_for(lambda: i == 4 or "Q" in m.cmds(),
                     what="milter %d's QUIT" % (i + 1))
        cmds = [m.cmds() for m in milters]
        check(all("E" in c and "A" not in c for c in cmds[:4]) and
              "E" in cmds[4] and "Q" not in cmds[4] and
              all("E" not in c and "A" in c for c in cmds[5:]),
              "what each milter heard: %r" % cmds)
    finally:
        for m in milters:
            m.close()


def test_two_milters_in_order_and_half_changes_dropped(env):
    def first(data, m):
        return [packet("h", b"X-First\0yes\0"), packet("c")]
    def broken(data, m):
        # a change, then garbage: with milter_default_action = accept the
        # message goes on without any of this milter's changes
        return [packet("h", b"X-Broken\0half\0"), packet("b", b"half body\r\n"),
                packet("Z")]
    with ScriptedMilter(on={"E": first}) as m1, \
            ScriptedMilter(on={"E": broken}) as m2:
        started(env, "%s %s" % (m1.spec, m2.spec),
                milter_default_action="accept")
        check_reply(send(env), 250, what="end of data")
        wait_for(lambda: "E" in m2.cmds(), what="the second milter's turn")
        check(m1.cmds().startswith("OCHMRTL") and m2.cmds().startswith("OCHMRTL"),
              "both milters hear the message: %r %r" % (m1.cmds(), m2.cmds()))
        _, data = only_message(env)
        head, body = split_message(data)
        check(b"X-First: yes" in head, "the first milter's header: %r" % head)
        check(b"X-Broken: half" not in head and b"half body" not in body,
              "nothing of the broken milter's changes: %r" % data[-200:])
        check("milter %s: end of message: unknown reply command 0x5a" % m2.spec
              in env.log(), "logged: %s" % env.log_tail())


def test_milter_dies_during_the_body(env):
    def die(data, m):
        raise EOFError   # the scripted milter closes its socket
    with ScriptedMilter(on={"B": die}) as m:
        started(env, m.spec)
        with session(env) as s:
            check_reply(s.cmd("MAIL FROM:<a@client.test>"), 250, what="MAIL")
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, what="RCPT")
            r = s.data(to_crlf(MESSAGE))
            check_reply(r, 451, "4.7.1", "milter gone during the body: tempfail "
                        "at the end of data")
            s.quit()
        check_nothing_queued(env, "milter died during the body")
        check("milter %s: body: connection closed by the milter" % m.spec
              in env.log(), "logged: %s" % env.log_tail())


def test_milter_progress_extends_the_wait(env):
    def slow(data, m):
        for _ in range(2):       # 2 x 1.2 s: more than the 2 s timeout in all
            time.sleep(1.2)
            m_conn_send(m, packet("p"))
        return [packet("c")]
    with ScriptedMilter(on={"E": slow}) as m:
        started(env, m.spec, milter_content_timeout="2s")
        t0 = time.time()
        check_reply(send(env), 250, what="a milter reporting progress")
        check(time.time() - t0 >= 2.4, "the milter took its time")
        only_message(env)


def test_milter_slow_on_every_header_meets_the_message_budget(env):
    """Each header answered just within milter_content_timeout (1 s): the
    headers and body of one message together get 4 of them, so ten
    headers at 0.7 s each end in the default action (tempfail) after
    about 4 s instead of holding the session for 7."""
    def slow(data, m):
        time.sleep(0.7)
        return [packet("c")]
    with ScriptedMilter(on={"L": slow}) as m:
        started(env, m.spec, milter_content_timeout="1s")
        body = "".join("X-H%d: v\n" % i for i in range(10)) + "\nbody\n"
        t0 = time.time()
        check_reply(send(env, body=body), 451, what="a milter slow on "
                    "every header")
        dt = time.time() - t0
        check(dt < 6, "the milter held the message for %.1f s" % dt)
        check_nothing_queued(env, "slow milter")


def m_conn_send(m, data):
    """Sends data at once on the milter's current connection (for replies
    that must go out before the handler returns)."""
    m.current.sendall(data)


def test_rspamd_gtube_reply_same_as_postfix(env):
    """The same rspamd behind a private Postfix instance and behind odmrd:
    the GTUBE message gets the same reply from both (the milter's, not the
    MTA's own)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from postfix_instance import PostfixInstance, PostfixError
    need("postfix")
    proc, port = start_rspamd(env)
    pf = None
    try:
        spec = "inet:127.0.0.1:%d" % port
        started(env, spec)
        gtube = to_crlf(MESSAGE.replace("Body line one.", GTUBE))
        ours = send(env, body=gtube)
        try:
            pf = PostfixInstance(mode="hold", name="milter-postfix",
                                 main_extra={"smtpd_milters": spec,
                                             "milter_protocol": "6",
                                             "milter_default_action": "tempfail"})
            pf.start()
        except PostfixError as e:
            check(False, "Postfix instance: %s" % e)
        with SMTP(port=pf.port) as s:
            check_reply(s.cmd("EHLO client.test"), 250, what="Postfix EHLO")
            check_reply(s.cmd("MAIL FROM:<sender@client.test>"), 250)
            check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250)
            theirs = s.data(gtube)
            s.quit()
        env.info("odmrd: %d %s / Postfix: %d %s" % (ours + theirs))
        check(ours == theirs, "odmrd said %r, Postfix %r" % (ours, theirs))
        check(ours[0] == 554 and "Gtube pattern" in ours[1], "reply %r" % (ours,))
    finally:
        if pf is not None:
            pf.cleanup()
        stop_by_pid(proc)
