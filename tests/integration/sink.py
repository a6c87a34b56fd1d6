"""sink.py - a small SMTP/LMTP server for integration tests.

Runs in a thread of the test process on a free loopback port and records
every transaction: HELO/EHLO name, MAIL FROM address and parameters, the
accepted (and refused) recipients and the message data exactly as received
after undoing dot-stuffing.  Replies are configurable, per recipient too,
so that delivery tests can make a recipient fail with 4xx or 5xx.

    with Sink(rcpt_replies={"bad@x.test": "550 5.1.1 no such user"}) as s:
        ... point odmrd at ("127.0.0.1", s.port) ...
        tx = s.wait(1)[0]
        tx.mail_from, tx.rcpts, tx.data

Python 3 standard library only.
"""

import socket
import socketserver
import threading
import time

from harness import fail

LINE_MAX = 65536       # longest line accepted (data lines included)
IDLE_TIMEOUT = 60      # seconds a connection may stay silent


class Transaction:
    """One MAIL ... DATA exchange that reached the end of data."""

    def __init__(self, helo, mail_from, mail_params):
        self.helo = helo                # (verb, name), e.g. ("EHLO", "mx.test")
        self.mail_from = mail_from      # "" for the null sender
        self.mail_params = mail_params  # "BODY=8BITMIME SMTPUTF8" etc.
        self.rcpts = []                 # accepted recipients, in order
        self.rcpt_params = {}           # recipient -> its parameters
        self.rejected = []              # (recipient, reply) refused at RCPT
        self.data = b""                 # message, dot-stuffing undone
        self.raw = b""                  # data as sent, dot-stuffed, w/o final dot
        self.replies = []               # reply line(s) given after the data

    def __repr__(self):
        return "<Transaction from=%r rcpts=%r %d bytes>" % (
            self.mail_from, self.rcpts, len(self.data))


def _path(arg):
    """'<a@b> PARAMS' -> ('a@b', 'PARAMS')."""
    arg = arg.strip()
    if arg.startswith("<") and ">" in arg:
        end = arg.index(">")
        return arg[1:end], arg[end + 1:].strip()
    parts = arg.split(None, 1)
    return (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")


class _Handler(socketserver.StreamRequestHandler):
    timeout = IDLE_TIMEOUT

    def setup(self):
        super().setup()
        self.sink = self.server.sink
        self.sink._connected(self.request)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        self.sink._disconnected(self.request)

    def out(self, line):
        self.wfile.write(line.encode("utf-8") + b"\r\n")
        self.wfile.flush()

    def readline(self):
        line = self.rfile.readline(LINE_MAX)
        if not line:
            return None
        return line

    def handle(self):
        s = self.sink
        try:
            self.out(s.greeting)
            self.session()
        except (OSError, socket.timeout):
            pass

    def session(self):
        s = self.sink
        helo = None
        tx = None
        while True:
            raw = self.readline()
            if raw is None:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            s._log(line)
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb):].strip()
            if verb in ("EHLO", "LHLO"):
                if s.ehlo_reply:
                    self.out(s.ehlo_reply)
                    continue
                helo = (verb, arg)
                tx = None
                ext = list(s.extensions)
                lines = ["sink.test"] + ext
                for i, l in enumerate(lines):
                    sep = " " if i == len(lines) - 1 else "-"
                    self.out("250" + sep + l)
            elif verb == "HELO":
                helo = (verb, arg)
                tx = None
                self.out("250 sink.test")
            elif verb == "MAIL":
                if not line.upper().startswith("MAIL FROM:"):
                    self.out("501 5.5.4 Syntax: MAIL FROM:<address>")
                    continue
                if helo is None and s.require_helo:
                    self.out("503 5.5.1 Say hello first")
                    continue
                addr, params = _path(line[10:])
                reply = s.mail_reply(addr) if callable(s.mail_reply) else s.mail_reply
                self.out(reply)
                if reply.startswith("2"):
                    tx = Transaction(helo, addr, params)
            elif verb == "RCPT":
                if tx is None:
                    self.out("503 5.5.1 Need MAIL first")
                    continue
                addr, params = _path(line[8:] if line.upper().startswith(
                    "RCPT TO:") else "")
                reply = s._rcpt_reply(addr)
                self.out(reply)
                if reply.startswith("2"):
                    tx.rcpts.append(addr)
                    tx.rcpt_params[addr] = params
                else:
                    tx.rejected.append((addr, reply))
            elif verb == "DATA":
                if tx is None or not tx.rcpts:
                    self.out("503 5.5.1 Need RCPT first")
                    continue
                self.out("354 End data with <CR><LF>.<CR><LF>")
                if s.after_354:
                    self.out(s.after_354)
                if not self.read_data(tx):
                    return
                self.reply_data(tx)
                tx = None
            elif verb == "RSET":
                tx = None
                self.out("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.out("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.out("221 2.0.0 Bye")
                return
            else:
                self.out("502 5.5.1 Command not implemented")

    def read_data(self, tx):
        raw, data = [], []
        while True:
            line = self.readline()
            if line is None:
                return False
            if line == b".\r\n":
                break
            raw.append(line)
            data.append(line[1:] if line.startswith(b".") else line)
        tx.raw = b"".join(raw)
        tx.data = b"".join(data)
        return True

    def reply_data(self, tx):
        s = self.sink
        n = s._next_number()
        if s.lmtp:
            for r in tx.rcpts:
                reply = s.data_replies.get(r.lower(), s.data_reply)
                reply = reply.replace("%d", str(n)) if "%d" in reply else reply
                tx.replies.append(reply)
                self.out(reply)
        else:
            reply = s.data_reply.replace("%d", str(n))
            tx.replies.append(reply)
            self.out(reply)
        if tx.replies and any(r.startswith("2") for r in tx.replies):
            s._record(tx)
        else:
            s._record_refused(tx)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Sink:
    """A recording SMTP (or LMTP, lmtp=True) server on 127.0.0.1.

    rcpt_replies: {address (any case): reply} or a function address ->
    reply-or-None; None / missing = rcpt_reply.  data_replies (LMTP): per
    recipient reply after the data.  data_reply may contain %d, replaced by
    a serial number ("queued as SINK%d").  ehlo_reply: a reply to give to
    EHLO/LHLO instead of the capability list (e.g. "502 5.5.1 no")."""

    def __init__(self, host="127.0.0.1", port=0, lmtp=False,
                 greeting="220 sink.test ESMTP test sink",
                 extensions=("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN",
                             "ENHANCEDSTATUSCODES", "SIZE 0"),
                 ehlo_reply=None, mail_reply="250 2.1.0 Ok",
                 rcpt_reply="250 2.1.5 Ok", rcpt_replies=None,
                 data_reply="250 2.0.0 Ok: queued as SINK%d",
                 data_replies=None, require_helo=False, after_354=None):
        self.lmtp = lmtp
        self.after_354 = after_354   # a line sent out of turn after 354
        self.greeting = greeting
        self.extensions = extensions
        self.ehlo_reply = ehlo_reply
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.rcpt_replies = rcpt_replies or {}
        self.data_reply = data_reply
        self.data_replies = {k.lower(): v for k, v in (data_replies or {}).items()}
        self.require_helo = require_helo
        self.transactions = []      # accepted (some recipient got 2xx)
        self.refused = []           # reached end of data, refused
        self.lines = []             # every command line received
        self.connections = 0        # connections accepted so far
        self._cond = threading.Condition()
        self._serial = 0
        self._socks = set()
        self._server = _Server((host, port), _Handler)
        self._server.sink = self
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    # ---- configuration helpers
    @property
    def address(self):
        """'127.0.0.1:PORT', as odmrd.conf and odmr-fetch want it."""
        return "%s:%d" % (self.host, self.port)

    def _rcpt_reply(self, addr):
        if callable(self.rcpt_replies):
            r = self.rcpt_replies(addr)
        else:
            r = {k.lower(): v for k, v in self.rcpt_replies.items()}.get(
                addr.lower())
        return r or self.rcpt_reply

    # ---- recording (handler threads)
    def _log(self, line):
        with self._cond:
            self.lines.append(line)

    def _next_number(self):
        with self._cond:
            self._serial += 1
            return self._serial

    def _record(self, tx):
        with self._cond:
            self.transactions.append(tx)
            self._cond.notify_all()

    def _record_refused(self, tx):
        with self._cond:
            self.refused.append(tx)
            self._cond.notify_all()

    def _connected(self, sock):
        with self._cond:
            self.connections += 1
            self._socks.add(sock)

    def _disconnected(self, sock):
        with self._cond:
            self._socks.discard(sock)
            self._cond.notify_all()

    # ---- for tests
    def wait(self, count=1, timeout=10.0, what=None):
        """Waits until at least count transactions were accepted; returns
        the list of them.  Fails the test on timeout."""
        end = time.time() + timeout
        with self._cond:
            while len(self.transactions) < count:
                left = end - time.time()
                if left <= 0:
                    fail("sink: %s: %d of %d transaction(s) after %ss; "
                         "commands seen: %r" % (
                             what or "waiting for mail",
                             len(self.transactions), count, timeout,
                             self.lines[-20:]))
                self._cond.wait(left)
            return list(self.transactions)

    def wait_idle(self, timeout=10.0):
        """Waits until no client is connected."""
        end = time.time() + timeout
        with self._cond:
            while self._socks:
                left = end - time.time()
                if left <= 0:
                    fail("sink: a client is still connected after %ss"
                         % timeout)
                self._cond.wait(left)

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
