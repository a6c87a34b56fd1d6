"""harness.py - the environment integration tests run in.

Every test function receives a fresh Env: a private temporary directory
under /tmp (spool, account database, configuration, logs), free loopback
ports, and helpers to run odmrctl, start/stop/kill odmrd, talk SMTP/LMTP
over raw sockets and look at the spool.  tests/run.py creates the Env,
calls the test and then Env.cleanup(), which kills (by pid) every process
the Env started and removes the directory (unless ODMR_KEEP=1).

Python 3 standard library only.
"""

import os
import re
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time


class TestFailure(AssertionError):
    """A test expectation did not hold."""


def fail(msg):
    raise TestFailure(msg)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def check_reply(reply, code, enhanced=None, what=""):
    """reply is (code, text) from SMTP.reply(); text starts with the
    enhanced status code when the server sends one."""
    got_code, text = reply
    prefix = (what + ": ") if what else ""
    if got_code != code:
        fail("%sexpected %s%s, got %r %r" % (
            prefix, code, (" " + enhanced) if enhanced else "", got_code, text))
    if enhanced is not None and not text.startswith(enhanced):
        fail("%sexpected %s %s, got %r %r" % (prefix, code, enhanced,
                                              got_code, text))
    return reply


SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Where every instance keeps its temporary directory (spool, queue, logs).
# The benchmarks move it (bench.py --dir) to measure another file system.
TMP_ROOT = "/tmp"


def find_program(program):
    path = shutil.which(program)
    if path:
        return path
    for d in SBIN_DIRS:
        p = os.path.join(d, program)
        if os.access(p, os.X_OK):
            return p
    return None


def need(program):
    """Returns the path of a peer program; FAILS the test when it is
    missing (a missing peer is never a silent skip)."""
    path = find_program(program)
    if not path:
        fail("required program %r is not installed (make test-deps)" % program)
    return path


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_rng = random.Random(os.getpid() ^ int(time.time() * 1000))


def _bindable(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port():
    """A free loopback port.  Taken below the kernel's ephemeral range where
    possible, so that no outgoing connection can grab it between now and
    odmrd's bind(); falls back to binding port 0."""
    lo, _ = _ephemeral_range()
    if lo > 11000:
        for _ in range(50):
            port = _rng.randint(10000, lo - 1)
            if _bindable(port):
                return port
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


# --------------------------------------------------------------------------
# processes

def _proc_stat(pid):
    """(ppid, pgid, sid, state) of pid, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    # state ppid pgrp session ...
    return int(rest[1]), int(rest[2]), int(rest[3]), rest[0]


def _all_pids():
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            out.append(int(name))
    return out


def _alive(pid):
    st = _proc_stat(pid)
    return st is not None and st[3] != "Z"


def descendants(pid):
    """All live descendants of pid (children, grandchildren, ...)."""
    children = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st:
            children.setdefault(st[0], []).append(p)
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        for c in children.get(cur, []):
            out.append(c)
            todo.append(c)
    return out


def session_members(sid):
    """Live processes whose session id is sid (other than sid itself)."""
    out = []
    for p in _all_pids():
        if p == sid:
            continue
        st = _proc_stat(p)
        if st and st[2] == sid and st[3] != "Z":
            out.append(p)
    return out


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"


# --------------------------------------------------------------------------
# SMTP over raw sockets

class SMTPClosed(TestFailure):
    pass


class SMTP:
    """Minimal SMTP/LMTP client: lines go out with CRLF, replies come back as
    (code, text) with the lines' texts (after "NNN-"/"NNN ") joined by
    "\\n".  `lines` of the last reply is kept in self.last_lines."""

    def __init__(self, port=None, host="127.0.0.1", unix=None, timeout=15.0,
                 greeting=True, source=None, rcvbuf=None):
        """source: the local address to connect from (127.0.0.0/8 lets a
        test be many clients).  rcvbuf: SO_RCVBUF, set before connecting
        (a slow reader whose buffer never fills opens its window again
        at once; loopback's default drops segments and backs off)."""
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix)
        elif rcvbuf:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            if source:
                self.sock.bind((source, 0))
            self.sock.connect((host, port))
        else:
            self.sock = socket.create_connection(
                (host, port), timeout=timeout,
                source_address=(source, 0) if source else None)
        self.buf = b""
        self.last_lines = []
        self.transcript = []
        self.greeting = self.reply() if greeting else None

    # raw I/O
    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.transcript.append(b"C: " + data[:200])
        self.sock.sendall(data)

    def send(self, line):
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send_raw(line + b"\r\n")

    def readline(self):
        """One line without its CRLF (bytes); raises SMTPClosed on EOF."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TestFailure("timed out waiting for a reply line "
                                  "(partial: %r)" % self.buf[:200])
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise SMTPClosed("connection closed by server (partial: %r)"
                                 % self.buf[:200])
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if line.endswith(b"\r"):
            line = line[:-1]
        self.transcript.append(b"S: " + line[:200])
        return line

    def reply(self):
        """Reads one (possibly multi-line) reply: (code, text)."""
        lines = []
        while True:
            raw = self.readline().decode("utf-8", "replace")
            if len(raw) < 3 or not raw[:3].isdigit() or \
                    (len(raw) > 3 and raw[3] not in " -"):
                fail("malformed reply line %r" % raw)
            lines.append(raw)
            if len(raw) == 3 or raw[3] == " ":
                break
        codes = set(l[:3] for l in lines)
        if len(codes) != 1:
            fail("reply lines with different codes: %r" % lines)
        self.last_lines = lines
        return int(lines[0][:3]), "\n".join(l[4:] for l in lines)

    def cmd(self, line):
        self.send(line)
        return self.reply()

    def ehlo(self, name="client.test", verb="EHLO"):
        """Returns (code, keywords dict upper-case keyword -> params)."""
        code, text = self.cmd("%s %s" % (verb, name))
        kw = {}
        for l in text.split("\n")[1:]:
            parts = l.split(None, 1)
            if parts:
                kw[parts[0].upper()] = parts[1] if len(parts) > 1 else ""
        return code, kw

    def data(self, body):
        """DATA + body (bytes/str, CRLF lines, dot-stuffed here) + final dot;
        returns the reply to the final dot.  Expects 354 to DATA."""
        check_reply(self.cmd("DATA"), 354, what="DATA")
        self.send_raw(dot_stuff(body) + b".\r\n")
        return self.reply()

    def starttls(self, server_hostname="mx.test", cafile=None):
        """STARTTLS (expects 220) and the TLS handshake; returns the reply.
        Without cafile the certificate is not verified."""
        import ssl
        r = self.cmd("STARTTLS")
        if r[0] != 220:
            return r
        if self.buf:
            fail("data after the 220 reply to STARTTLS (injection): %r"
                 % self.buf[:100])
        ctx = ssl.create_default_context(cafile=cafile)
        if not cafile:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        return r

    def expect_closed(self, wait=5.0):
        """True when the server closes the connection within wait seconds
        (any pending data is discarded)."""
        self.sock.settimeout(wait)
        end = time.time() + wait
        try:
            while time.time() < end:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True
        return False

    def quit(self):
        try:
            r = self.cmd("QUIT")
        except (OSError, TestFailure):
            r = None
        self.close()
        return r

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def to_crlf(data):
    """Normalises LF / CRLF line ends to CRLF; ensures a final CRLF."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def dot_stuff(data):
    """data: CRLF lines (bytes, ends with CRLF or is empty)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


# --------------------------------------------------------------------------
# spool

ENVELOPE_LETTERS = set("VIDTFZENBUCHAR")


def parse_envelope(text):
    """Parses an envelope file (server/envelope.h) into a dict.  Raises
    TestFailure when it is malformed or incomplete."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not text.endswith("\n"):
        fail("envelope does not end with a newline: %r" % text[-80:])
    lines = text[:-1].split("\n")
    if not lines or lines[0] != "V 1":
        fail("envelope does not start with 'V 1': %r" % text[:80])
    if lines[-1] != ".":
        fail("envelope has no end marker '.': %r" % text[-80:])
    env = {"rcpts": [], "smtputf8": False, "envid": None, "ret": None,
           "body": None}
    for line in lines[1:-1]:
        if line == ".":
            fail("end marker before the end of the envelope")
        letter = line[0]
        if letter not in ENVELOPE_LETTERS or (len(line) > 1 and line[1] != " "):
            fail("bad envelope record %r" % line)
        v = line[2:]
        if letter == "I":
            env["id"] = v
        elif letter == "D":
            env["domain"] = v
        elif letter == "T":
            env["arrival"] = int(v)
        elif letter == "F":
            env["sender"] = v
        elif letter == "Z":
            env["size"] = int(v)
        elif letter == "E":
            env["envid"] = v
        elif letter == "N":
            env["ret"] = v
        elif letter == "B":
            env["body"] = v
        elif letter == "U":
            env["smtputf8"] = True
        elif letter == "C":
            env["client"] = v
        elif letter == "H":
            env["helo"] = v
        elif letter == "A":
            a, t = v.split(" ")
            env["attempts"], env["last_attempt"] = int(a), int(t)
        elif letter == "R":
            f = v.split("\t")
            if len(f) != 4:
                fail("bad recipient record %r" % line)
            env["rcpts"].append({
                "addr": f[0], "notify": int(f[1]),
                "orcpt": None if f[2] == "-" else f[2],
                "last_reply": None if f[3] == "-" else f[3]})
    for k in ("id", "domain", "arrival", "sender", "size"):
        if k not in env:
            fail("envelope lacks %s: %r" % (k, text))
    return env


DSN_NEVER, DSN_SUCCESS, DSN_FAILURE, DSN_DELAY = 1, 2, 4, 8


def strip_received(data, count=1):
    """Removes the first `count` header fields from data when they are
    Received: fields (with folded continuation lines) and returns the rest.
    Fails when the data does not start with a Received: header."""
    for _ in range(count):
        if not data[:9].lower() == b"received:":
            fail("message data does not start with a Received: header: %r"
                 % data[:120])
        pos = 0
        while True:
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                fail("unterminated Received: header")
            pos = nl + 2
            if data[pos:pos + 1] not in (b" ", b"\t"):
                break
        data = data[pos:]
    return data


def received_header(data):
    """The first header field of data (the one odmrd prepends), unfolded."""
    end = 0
    while True:
        nl = data.find(b"\r\n", end)
        if nl < 0:
            return data.decode("utf-8", "replace")
        end = nl + 2
        if data[end:end + 1] not in (b" ", b"\t"):
            return data[:nl].decode("utf-8", "replace")


# --------------------------------------------------------------------------
# the environment

class Env:
    def __init__(self, build, name="test"):
        self.build = os.path.abspath(build)
        self.odmrd_bin = os.path.join(self.build, "odmrd")
        self.odmrctl_bin = os.path.join(self.build, "odmrctl")
        self.fetch_bin = os.path.join(self.build, "odmr-fetch")
        self.accept_shim = os.path.join(self.build, "tests", "accept_shim.so")
        self.keep = os.environ.get("ODMR_KEEP") == "1"
        self.dir = tempfile.mkdtemp(prefix="odmr-%s-" % name, dir=TMP_ROOT)
        self.spool = os.path.join(self.dir, "spool")
        self.db = os.path.join(self.dir, "accounts.db")
        self.conf_path = os.path.join(self.dir, "odmrd.conf")
        self.log_path = os.path.join(self.dir, "odmrd.log")
        self.ports = {"odmr": free_port(), "smtp": free_port(),
                      "lmtp": free_port()}
        self.smtp_port = self.ports["smtp"]
        self.odmr_port = self.ports["odmr"]
        self.lmtp_port = self.ports["lmtp"]
        self.conf = {
            "hostname": "mx.test",
            "odmr_listen": "127.0.0.1:%d" % self.odmr_port,
            "smtp_listen": "127.0.0.1:%d" % self.smtp_port,
            "lmtp_listen": "127.0.0.1:%d" % self.lmtp_port,
            "spool_dir": self.spool,
            "accounts_db": self.db,
            "timeout": "30s",
            "user": "",
        }
        self._port_retries = 0
        self.daemon = None          # Popen of the running odmrd
        self._log = None
        self.procs = []             # every Popen this Env started
        self.sessions = set()       # session ids (start_new_session) to sweep
        self.notes = []
        self.infos = []             # printed under the test's PASS/FAIL line
        self.write_conf()

    # ---- configuration
    def write_conf(self, **overrides):
        """Writes odmrd.conf from self.conf updated with overrides (a value
        of None removes the key)."""
        for k, v in overrides.items():
            if v is None:
                self.conf.pop(k, None)
            else:
                self.conf[k] = v
        with open(self.conf_path, "w") as f:
            f.write("# written by tests/integration/harness.py\n")
            for k, v in self.conf.items():
                f.write("%s = %s\n" % (k, v))
        return self.conf_path

    def info(self, msg):
        self.infos.append(msg)

    def new_ports(self):
        """Picks new ports for the TCP listeners that use the Env's ports
        and rewrites the configuration."""
        old = dict(self.ports)
        for k in self.ports:
            self.ports[k] = free_port()
        self.smtp_port = self.ports["smtp"]
        self.odmr_port = self.ports["odmr"]
        self.lmtp_port = self.ports["lmtp"]
        for key, kind in (("odmr_listen", "odmr"), ("smtp_listen", "smtp"),
                          ("lmtp_listen", "lmtp")):
            v = self.conf.get(key)
            if v is not None:
                self.conf[key] = v.replace(":%d" % old[kind],
                                           ":%d" % self.ports[kind])
        self.write_conf()
        self.notes.append("ports were taken; moved to %r" % self.ports)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    # ---- running programs
    def _track(self, p):
        self.procs.append(p)
        self.sessions.add(p.pid)
        return p

    def run(self, argv, input=None, timeout=60, env=None):
        """Runs a program to completion in its own session (tracked for
        cleanup); returns CompletedProcess with text stdout/stderr."""
        if isinstance(input, str):
            input = input.encode("utf-8")
        p = self._track(subprocess.Popen(
            argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env=env))
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_tree(p.pid)
            out, err = p.communicate()
            fail("%s timed out after %ss; stderr: %s" % (
                " ".join(argv), timeout, err.decode("utf-8", "replace")[-500:]))
        return subprocess.CompletedProcess(
            argv, p.returncode, out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"))

    def spawn(self, argv, **kw):
        """Starts a background process (tracked, own session)."""
        kw.setdefault("start_new_session", True)
        return self._track(subprocess.Popen(argv, **kw))

    def odmrctl(self, *args, input=None, conf=None, timeout=60):
        """odmrctl -c CONF ARGS...; returns CompletedProcess (text)."""
        check(os.access(self.odmrctl_bin, os.X_OK),
              "odmrctl not built: %s" % self.odmrctl_bin)
        return self.run([self.odmrctl_bin, "-c", conf or self.conf_path]
                        + [str(a) for a in args], input=input, timeout=timeout)

    def odmrctl_ok(self, *args, input=None):
        r = self.odmrctl(*args, input=input)
        if r.returncode != 0:
            fail("odmrctl %s exited %d: %s%s" % (" ".join(map(str, args)),
                 r.returncode, r.stderr.strip(), r.stdout.strip()))
        return r

    def add_user(self, name, password="secret"):
        return self.odmrctl_ok("user", "add", name, input=password + "\n")

    def add_domain(self, domain, user):
        return self.odmrctl_ok("domain", "add", domain, user)

    def setup_accounts(self):
        """alice: example.org, example.net; bob: example.com."""
        self.add_user("alice")
        self.add_domain("example.org", "alice")
        self.add_domain("example.net", "alice")
        self.add_user("bob", "bobpw")
        self.add_domain("example.com", "bob")

    def odmrd_check(self, conf=None):
        """odmrd -t -c CONF."""
        check(os.access(self.odmrd_bin, os.X_OK),
              "odmrd not built: %s" % self.odmrd_bin)
        return self.run([self.odmrd_bin, "-t", "-c", conf or self.conf_path],
                        timeout=30)

    # ---- the daemon
    def listeners(self):
        """[(kind, (host, port) | unix path)] from the configuration."""
        out = []
        for key in ("odmr_listen", "smtp_listen", "lmtp_listen"):
            for w in self.conf.get(key, "").replace(",", " ").split():
                if w.startswith("unix:"):
                    out.append((key, w[5:]))
                elif w.startswith("["):
                    host, port = w[1:].split("]:")
                    out.append((key, (host, int(port))))
                else:
                    host, port = w.rsplit(":", 1)
                    out.append((key, (host, int(port))))
        return out

    def log_tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self, wait=10.0, extra_args=(), sndbuf=None, emfile=None):
        """Starts odmrd -f -c CONF and waits until every listener accepts.
        With tests/shim/accept_shim.c: sndbuf, bytes of send buffer for
        every accepted connection instead of loopback's autotuning;
        emfile, a path: while it exists, accept4() fails with EMFILE."""
        check(os.access(self.odmrd_bin, os.X_OK),
              "odmrd not built: %s" % self.odmrd_bin)
        environ = None
        if sndbuf or emfile:
            check(os.access(self.accept_shim, os.R_OK),
                  "test shim not built: %s" % self.accept_shim)
            environ = dict(os.environ, LD_PRELOAD=self.accept_shim)
            if sndbuf:
                environ["ODMR_TEST_SNDBUF"] = str(sndbuf)
            if emfile:
                environ["ODMR_TEST_EMFILE"] = emfile
            # ASan wants its runtime first; the shim needs nothing of it.
            environ["ASAN_OPTIONS"] = (os.environ.get("ASAN_OPTIONS", "")
                                       + ":verify_asan_link_order=0")
        if self.daemon and self.daemon.poll() is None:
            fail("odmrd already running")
        self._log = open(self.log_path, "ab")
        self._log.write(b"=== harness: starting odmrd ===\n")
        self._log.flush()
        self.daemon = self.spawn([self.odmrd_bin, "-f", "-c", self.conf_path]
                                 + list(extra_args),
                                 stdin=subprocess.DEVNULL, stdout=self._log,
                                 stderr=subprocess.STDOUT, env=environ)
        deadline = time.time() + wait
        pending = self.listeners()
        probes = 0
        while pending:
            if self.daemon.poll() is not None:
                tail = self.log_tail(5)
                if "already in use" in tail and self._port_retries < 3:
                    # someone took a port between free_port() and bind()
                    self._port_retries += 1
                    self._close_log()
                    self.new_ports()
                    return self.start(wait=wait, extra_args=extra_args,
                                      sndbuf=sndbuf, emfile=emfile)
                fail("odmrd exited with %s during start-up; log:\n%s" % (
                    self.daemon.returncode, self.log_tail()))
            still = []
            for kind, addr in pending:
                try:
                    if isinstance(addr, str):
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    else:
                        s = socket.socket(socket.AF_INET6 if ":" in addr[0]
                                          else socket.AF_INET)
                    s.settimeout(1)
                    s.connect(addr)
                    s.close()
                    probes += 1
                except OSError:
                    still.append((kind, addr))
            pending = still
            if pending:
                if time.time() > deadline:
                    self.kill9()
                    fail("odmrd listeners %r not accepting after %ss; log:\n%s"
                         % (pending, wait, self.log_tail()))
                time.sleep(0.05)
        # The probe connections must not count against connection limits:
        # wait until odmrd has logged the end of each probe session (session
        # processes are reused, so they do not go away).
        def ended():
            run = self.log().rsplit("=== harness: starting odmrd ===", 1)[-1]
            return run.count("disconnect from ") + run.count(" refused: ")
        deadline = time.time() + 10
        while ended() < probes and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)   # the master reads the worker's "done" after the log line
        return self.daemon

    def running(self):
        return self.daemon is not None and self.daemon.poll() is None

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL after timeout; returns odmrd's exit status
        (negative signal number when it had to be killed)."""
        if not self.daemon:
            return None
        d = self.daemon
        if d.poll() is None:
            try:
                d.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                d.wait(timeout)
            except subprocess.TimeoutExpired:
                self.notes.append("odmrd did not exit within %ss of SIGTERM"
                                  % timeout)
                self._kill_tree(d.pid)
                d.wait()
        # session children that outlived the master
        for p in session_members(d.pid):
            self._kill_pid(p)
        self._close_log()
        return d.returncode

    def kill9(self):
        """kill -9 odmrd and every process of its process group/session
        and every descendant, like a crash of the whole service."""
        if not self.daemon:
            return
        d = self.daemon
        self._kill_tree(d.pid)
        try:
            d.wait(10)
        except subprocess.TimeoutExpired:
            fail("odmrd pid %d survived SIGKILL" % d.pid)
        self._close_log()

    def restart(self, wait=10.0):
        self.stop()
        return self.start(wait=wait)

    def _close_log(self):
        if self._log:
            self._log.close()
            self._log = None

    # ---- killing
    @staticmethod
    def _kill_pid(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_tree(self, pid):
        """SIGKILL pid, its process group, its session and all descendants;
        repeated until nothing of them is alive (forks racing the kill)."""
        for _ in range(50):
            victims = set(descendants(pid)) | set(session_members(pid))
            if _alive(pid):
                victims.add(pid)
            if not victims:
                return
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for v in victims:
                self._kill_pid(v)
            time.sleep(0.02)
            # reap our direct children so they do not linger as zombies
            for p in self.procs:
                if p.pid == pid:
                    try:
                        p.wait(0.5)
                    except subprocess.TimeoutExpired:
                        pass

    def leftovers(self):
        """Live processes started by this Env (directly or as descendants,
        or in one of its sessions): [(pid, cmdline)]."""
        pids = set()
        for p in self.procs:
            if p.poll() is None:
                pids.add(p.pid)
            pids.update(descendants(p.pid))
        for sid in self.sessions:
            pids.update(session_members(sid))
        pids.discard(os.getpid())
        return [(p, _cmdline(p)) for p in sorted(pids) if _alive(p)]

    def cleanup(self):
        """Kills every process started (by pid), verifies none is left and
        removes the directory.  Returns a list of problems (strings)."""
        problems = []
        try:
            if self.running():
                self.stop(timeout=5)
        except Exception as e:  # keep cleaning up
            problems.append("stopping odmrd: %s" % e)
        for p in self.procs:
            if p.poll() is None or descendants(p.pid):
                self._kill_tree(p.pid)
        for sid in self.sessions:
            for pid in session_members(sid):
                self._kill_pid(pid)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream:
                    try:
                        stream.close()
                    except OSError:
                        pass
        time.sleep(0.05)
        # Under SANITIZE=1 a session child that hits a memory error or
        # undefined behaviour may die without the test noticing: its
        # report in the log is a failure by itself.
        for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
            if marker in self.log():
                problems.append("sanitizer report in the odmrd log (%s)" % marker)
                break
        left = self.leftovers()
        if left:
            problems.append("processes left after the test: %r" % left)
            for pid, _ in left:
                self._kill_pid(pid)
        self._close_log()
        if self.keep:
            print("  ODMR_KEEP: left %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return problems

    def make_cert(self, cn="mx.test"):
        """A self-signed certificate; sets tls_cert_file/tls_key_file in the
        configuration and returns the certificate's path."""
        openssl = need("openssl")
        cert, key = self.path("cert.pem"), self.path("key.pem")
        r = self.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                      "-keyout", key, "-out", cert, "-days", "2",
                      "-subj", "/CN=" + cn,
                      "-addext", "subjectAltName=DNS:" + cn], timeout=60)
        check(r.returncode == 0, "openssl req failed: %s" % r.stderr)
        os.chmod(key, 0o600)
        self.write_conf(tls_cert_file=cert, tls_key_file=key)
        return cert

    # ---- SMTP
    def smtp(self, **kw):
        """Connected SMTP client (greeting read) to the SMTP listener."""
        kw.setdefault("port", self.smtp_port)
        return SMTP(**kw)

    def lmtp(self, **kw):
        kw.setdefault("port", self.lmtp_port)
        return SMTP(**kw)

    def send_mail(self, sender, rcpts, body, ehlo="client.test",
                  mail_params="", port=None):
        """One complete transaction; checks every step succeeds and returns
        the queue id from the final reply."""
        with self.smtp(port=port or self.smtp_port) as s:
            check_reply(s.greeting, 220, what="greeting")
            check_reply(s.cmd("EHLO " + ehlo), 250, what="EHLO")
            check_reply(s.cmd("MAIL FROM:<%s>%s" % (sender, mail_params)),
                        250, "2.1.0", "MAIL")
            for r in rcpts:
                check_reply(s.cmd("RCPT TO:<%s>" % r), 250, "2.1.5", "RCPT")
            reply = check_reply(s.data(to_crlf(body)), 250, "2.0.0",
                                "end of data")
            s.quit()
        return queue_id_of(reply[1])

    # ---- spool
    def queue_dir(self, domain=None):
        d = os.path.join(self.spool, "q")
        return os.path.join(d, domain) if domain else d

    def queued(self, domain=None):
        """Sorted [(domain, id)] of committed messages: those with a queue
        file (.q, data and envelope in one) or an envelope (.e, beside a
        data file .m)."""
        out = []
        top = self.queue_dir()
        if not os.path.isdir(top):
            return out
        domains = [domain] if domain else sorted(os.listdir(top))
        for d in domains:
            dd = os.path.join(top, d)
            if not os.path.isdir(dd):
                continue
            ids = {name[:-2] for name in os.listdir(dd)
                   if name.endswith((".e", ".q")) and not name.startswith(".")}
            out.extend((d, i) for i in sorted(ids))
        return out

    def queued_ids(self, domain=None):
        return [i for _, i in self.queued(domain)]

    def queue_file(self, domain, qid):
        """(data, envelope text) of q/<domain>/<qid>.q, checked against its
        trailer (server/qfile.h); None when the message has no queue file."""
        path = os.path.join(self.queue_dir(domain), qid + ".q")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        return split_queue_file(raw, path)

    def message_files(self, domain, qid):
        """The names of the files that hold the message in its domain."""
        dd = self.queue_dir(domain)
        return [qid + s for s in (".e", ".m", ".n", ".q")
                if os.path.exists(os.path.join(dd, qid + s))]

    def envelope_text(self, domain, qid):
        """The envelope in force: a newer one (.n) beside a queue file, the
        queue file's own, or the .e beside the data file."""
        dd = self.queue_dir(domain)
        for name in (qid + ".n", qid + ".e"):
            try:
                with open(os.path.join(dd, name), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                pass
        qf = self.queue_file(domain, qid)
        if qf is None:
            raise TestFailure("%s/%s: no envelope" % (domain, qid))
        return qf[1]

    def envelope(self, domain, qid):
        return parse_envelope(self.envelope_text(domain, qid))

    def rewrite_envelope(self, domain, qid, edit):
        """Replaces the envelope in force by edit(text) (bytes to bytes), in
        whichever file holds it; a queue file keeps its trailer exact.
        For tests of damaged or hand-edited spools."""
        dd = self.queue_dir(domain)
        for name in (qid + ".n", qid + ".e"):
            path = os.path.join(dd, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    text = f.read()
                with open(path, "wb") as f:
                    f.write(edit(text))
                return
        data, text = self.queue_file(domain, qid)
        new = edit(text)
        with open(os.path.join(dd, qid + ".q"), "wb") as f:
            f.write(data + new + b"Q1 %016X %08X\n" % (len(data), len(new)))

    def message(self, domain, qid):
        qf = self.queue_file(domain, qid)
        if qf is not None:
            return qf[0]
        with open(os.path.join(self.queue_dir(domain), qid + ".m"), "rb") as f:
            return f.read()

    def spool_problems(self):
        """Checks every committed message of the spool: the envelope parses
        and names its own file, the data is there, the sizes agree.
        Returns a list of problems."""
        problems = []
        for d, qid in self.queued():
            try:
                env = self.envelope(d, qid)
                data = self.message(d, qid)
            except (TestFailure, ValueError, UnicodeDecodeError, OSError) as e:
                problems.append("%s/%s: %s" % (d, qid, e))
                continue
            if env.get("id") != qid:
                problems.append("%s/%s: I record is %r" % (d, qid, env.get("id")))
            if env.get("domain") != d:
                problems.append("%s/%s: D record is %r" % (d, qid,
                                                         env.get("domain")))
            if env["size"] != len(data):
                problems.append("%s/%s: Z %d but the data has %d bytes"
                                % (d, qid, env["size"], len(data)))
            if not env["rcpts"]:
                problems.append("%s/%s: no recipients" % (d, qid))
        return problems

    def spool_usage(self):
        """Total size in bytes of every file under the spool."""
        total = 0
        for root, _, files in os.walk(self.spool):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total


QFILE_TRAILER = re.compile(rb"Q1 ([0-9A-F]{16}) ([0-9A-F]{8})\n\Z")


def split_queue_file(raw, name="queue file"):
    """(data, envelope) of a queue file's bytes: the data, the envelope and
    a 29-octet trailer with both lengths (server/qfile.h).  Raises
    TestFailure when the trailer does not describe the file exactly."""
    m = QFILE_TRAILER.search(raw[-29:])
    if not m:
        raise TestFailure("%s: no queue file trailer" % name)
    dlen, elen = int(m.group(1), 16), int(m.group(2), 16)
    if dlen + elen + 29 != len(raw):
        raise TestFailure("%s: trailer %d + %d, file %d octets"
                          % (name, dlen, elen, len(raw)))
    env = raw[dlen:dlen + elen]
    if not env.endswith(b".\n"):
        raise TestFailure("%s: envelope without its end marker" % name)
    return raw[:dlen], env


def queue_id_of(text):
    """The queue id from '2.0.0 Ok: queued as <ID>'."""
    marker = "queued as "
    i = text.find(marker)
    if i < 0:
        fail("no 'queued as ID' in reply %r" % text)
    rest = text[i + len(marker):].split()
    qid = rest[0].strip("<>.,") if rest else ""
    check(qid != "", "empty queue id in %r" % text)
    return qid


def wait_for(pred, timeout=5.0, interval=0.05, what="condition"):
    end = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > end:
            fail("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)
