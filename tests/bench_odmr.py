"""tests/bench_odmr.py - the ODMR benchmarks of `make bench` (tests/bench.py
imports this module and lists its benchmarks in BENCHMARKS).

  odmr-drain     M queued messages of 5 KB for one domain (filled with
                 smtp-source into odmrd's inbound SMTP listener and counted
                 as .q files) are delivered over one ATRN session, per round
                 once to each of three customers:
                   python     a customer written here: EHLO, AUTH CRAM-MD5,
                              ATRN, then a minimal but correct SMTP server
                              with PIPELINING that reads every message to
                              its final dot, counts it and throws it away;
                   odmr-fetch our client, relaying to Postfix's smtp-sink;
                   fetchmail  fetchmail (protocol odmr), which relays the
                              reversed SMTP dialogue to smtp-sink.
                 The two clients drain min(M, 500) messages (CLIENT_MESSAGES):
                 fetchmail's ~11 msgs/s would otherwise take most of an hour.
                 The time runs from the `250 OK now reversing the
                 connection` to the end of the session (the QUIT at the
                 python customer; fetchmail's exit, whose -v trace gives the
                 moment of the 250).  Every round must leave no message file in
                 the spool, the sink must have counted M messages and
                 odmrd's session summary must say sent=M.  Reports
                 messages/s (median of the rounds) of both, their ratio and
                 the CPU time per message of odmrd and of the customer.
                 fetchmail copies the dialogue one line per write(2), without
                 TCP_NODELAY: the second and third of the pipelined replies
                 wait in its socket for odmrd's delayed ACK, the end of the
                 data for smtp-sink's, about 2 x 40 ms per message on Linux
                 (seen with strace); that, not odmrd, sets its rate.
  odmr-polls     C concurrent customers (each its own account and domain)
                 poll an empty queue: connect, EHLO, AUTH CRAM-MD5, ATRN
                 (453 You have no mail), QUIT; P polls in total, after one
                 warm-up poll per customer.  Reports polls/s, latency,
                 odmrd's CPU per poll (master + session processes: their
                 run time from /proc/PID/schedstat, reaped ones from the
                 master's cutime/cstime, read while the service is
                 quiet) and the clients' CPU (they run in several
                 processes; the note splits the machine's CPU time
                 between odmrd, the clients and other processes and says
                 which one was the limit).
  odmr-polls-tls the same with STARTTLS (self-signed RSA 2048 certificate,
                 not verified) before AUTH, against the same odmrd and
                 customers, alternating --rounds times: a storm with a
                 full handshake per poll, then one with every poll
                 resuming the customer's previous TLS session (its
                 ticket, as odmr-fetch keeps it between runs; each
                 customer's first, unmeasured poll makes one).  Reports
                 each mode's median round and odmrd's CPU per poll full /
                 resumed (ratio of the medians, and per round).  Each
                 round also runs a plain storm and tests/floor/tls_floor
                 (OpenSSL alone, both kinds of handshake, odmrd's
                 certificate); from them, the best ratio a poll could
                 show if TLS cost odmrd nothing beyond OpenSSL's work.

Needs fetchmail, smtp-sink, smtp-source and openssl.  Only 127.0.0.1 is
used.  Every process is started through the harness Env (own session,
tracked) or as a multiprocessing child and is killed by pid at the end.

Python 3 standard library only.
"""

import base64
import hashlib
import hmac
import multiprocessing
import os
import re
import resource
import socket
import ssl
import statistics
import subprocess
import threading
import time

import bench
from bench import BenchError, Odmrd, Row, need, run_smtp_source, wait_count

USER, PASSWORD = "bench", "pw"     # what bench.Odmrd creates
DOMAIN = "example.org"
DRAIN_TIMEOUT = 300          # seconds per drain, at least ...
DRAIN_PER_MESSAGE = 0.25     # ... or this per message (fetchmail: ~0.1 s)
# fetchmail needs ~0.09 s per message (delayed ACKs): the two clients are
# compared on fewer messages than odmrd's own ceiling, so that the whole
# benchmark stays within minutes.
CLIENT_MESSAGES = 500
POLL_TIMEOUT = 300           # seconds per poll storm
TLS_FLOOR_SESSIONS = 2000    # sessions per tests/floor/tls_floor run
IO_TIMEOUT = 60              # seconds per network wait
REVERSING = b"250 OK now reversing the connection"


# ---------------------------------------------------------------- /proc CPU
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (index 0 is the
    state), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()


def _run_seconds(pid, fields):
    """CPU seconds pid has run itself: /proc/PID/schedstat's first field
    (the scheduler's nanoseconds), else utime+stime from fields.  The
    ticks are too coarse here: /proc/PID/stat counts in 10 ms units,
    utime and stime each rounded down, while a session process uses a
    millisecond per poll and ~50 of them share a storm, so the rounding
    of each process's two fields at each of the two readings was of the
    order of the quantity measured (seen: 0.73 vs 1.39 ms per poll)."""
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def odmrd_cpu(master):
    """CPU seconds used so far by odmrd: the master, the session
    processes it has reaped (cutime/cstime of the master: one sum, so
    rounded once) and those alive now (their own run time plus what
    they reaped).  Meant to be read while the service is quiet, so that
    no child is reaped between the reads.  Returns (total, master_only)."""
    f = _stat_fields(master)
    if f is None:
        raise BenchError("odmrd (pid %d) is gone" % master)
    # utime stime cutime cstime are fields 14-17 of stat: 11-14 here
    own = _run_seconds(master, f)
    total = own + (int(f[13]) + int(f[14])) / CLK_TCK
    for pid in bench.proc_children(master):
        c = _stat_fields(pid)
        if c is not None:
            total += _run_seconds(pid, c) + (int(c[13]) + int(c[14])) / CLK_TCK
    return total, own


def machine_cpu():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)      # idle + iowait
    total = sum(v[:8])                             # without guest times
    return total - idle, total


def quiet_cpu(od, settle=0.3):
    """odmrd_cpu() after the sessions had time to report back."""
    time.sleep(settle)
    return odmrd_cpu(od.pid)


# ---------------------------------------------------------------- SMTP client
class Conn:
    """A lean SMTP client connection (the benchmark's own CPU matters)."""

    def __init__(self, port, timeout=IO_TIMEOUT, source=None):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None)
        self.buf = b""

    def line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                l, self.buf = self.buf[:i], self.buf[i + 1:]
                return l.rstrip(b"\r")
            if len(self.buf) > 65536:
                raise BenchError("reply line too long: %r" % self.buf[:100])
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("connection closed by odmrd (partial %r)"
                                 % self.buf[:100])
            self.buf += chunk

    def reply(self):
        """(code, [lines])."""
        lines = []
        while True:
            l = self.line()
            if len(l) < 3 or not l[:3].isdigit():
                raise BenchError("malformed reply line %r" % l)
            lines.append(l)
            if len(l) == 3 or l[3:4] == b" ":
                return int(l[:3]), lines

    def cmd(self, line, want=None):
        self.sock.sendall(line + b"\r\n")
        code, lines = self.reply()
        if want is not None and code != want:
            raise BenchError("%s: expected %d, got %r" % (
                line.split()[0].decode(), want, b" / ".join(lines)))
        return code, lines

    def starttls(self, tls_ctx, session=None):
        self.cmd(b"STARTTLS", 220)
        if self.buf:
            raise BenchError("data after the 220 to STARTTLS")
        self.sock = tls_ctx.wrap_socket(self.sock, server_hostname="mx.test",
                                        session=session)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def cram_md5_answer(reply_line, user, password):
    """The response line to `334 <base64 challenge>`."""
    chal = base64.b64decode(reply_line[4:].strip(), validate=True)
    digest = hmac.new(password.encode(), chal, hashlib.md5).hexdigest()
    return base64.b64encode(("%s %s" % (user, digest)).encode())


def login(port, tls_ctx=None, user=USER, password=PASSWORD, tls_state=None):
    """Connected, greeted, EHLO (STARTTLS + EHLO), AUTH CRAM-MD5 done.
    tls_state (a dict): offer its "session", keep the new one there and
    count resumed handshakes in "resumed"."""
    c = Conn(port)
    try:
        code, lines = c.reply()
        if code != 220:
            raise BenchError("ODMR greeting: %r" % lines)
        code, lines = c.cmd(b"EHLO customer.test", 250)
        if tls_ctx is not None:
            if not any(l[4:].upper() == b"STARTTLS" for l in lines):
                raise BenchError("STARTTLS not offered: %r" % lines)
            c.starttls(tls_ctx, tls_state.get("session") if tls_state
                       else None)
            c.cmd(b"EHLO customer.test", 250)
            if tls_state is not None:   # TLS 1.3: the ticket came by now
                tls_state["resumed"] += c.sock.session_reused
                tls_state["session"] = c.sock.session
        code, lines = c.cmd(b"AUTH CRAM-MD5", 334)
        c.cmd(cram_md5_answer(lines[0], user, password), 235)
    except BaseException:
        c.close()
        raise
    return c


# ---------------------------------------------------------------- customer
EHLO_REPLY = (b"250-customer.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
              b"250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n")


class DrainResult:
    def __init__(self):
        self.messages = 0
        self.rcpts = 0
        self.bytes = 0
        self.min_size = None
        self.max_size = 0
        self.quit = False
        self.t_atrn = None
        self.t_end = None
        self.cpu = 0.0


def python_customer(port, expect_min_size, deadline):
    """One ODMR session as the customer: AUTH, ATRN, then the SMTP server
    side until odmrd's QUIT.  Returns a DrainResult."""
    r = DrainResult()
    c = login(port)
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        code, lines = c.cmd(b"ATRN " + DOMAIN.encode())
        if code != 250 or lines[0] != REVERSING:
            raise BenchError("ATRN: %r" % lines)
        r.t_atrn = time.monotonic()
        cpu0 = time.thread_time()
        serve_reversed(c.sock, c.buf, r, deadline)
        r.t_end = time.monotonic()
        r.cpu = time.thread_time() - cpu0
    finally:
        c.close()
    if not r.quit:
        raise BenchError("odmrd closed the reversed session without QUIT "
                         "after %d messages" % r.messages)
    if r.messages and r.min_size < expect_min_size:
        raise BenchError("a message of %d bytes arrived, expected at least %d"
                         % (r.min_size, expect_min_size))
    return r


def serve_reversed(sock, buf, r, deadline):
    """The SMTP server after the role reversal.  Replies to everything that
    is complete in the input in one write (which is what RFC 2920 asks of a
    pipelining server: flush before waiting for more input).  Data is
    scanned for <CRLF>.<CRLF> without copying it around.  Reads go into
    one preallocated 1 MB buffer: sock.recv(N) with N above glibc's mmap
    threshold (128 KB) maps and unmaps N bytes per call, which made this
    customer cost more CPU per message than odmrd."""
    sock.sendall(b"220 customer.test ESMTP ready\r\n")
    rbuf = bytearray(1 << 20)
    rview = memoryview(rbuf)
    recv_into = sock.recv_into
    in_tx = in_data = False
    rcpts = 0
    data_start = content_start = 0    # in buf, while in_data
    size = 0                          # bytes of the message before buf
    out = []
    while True:
        pos = 0
        while True:
            if in_data:
                i = buf.find(b"\r\n.\r\n", data_start)
                if i < 0:
                    break
                n = size + max(0, i + 2 - content_start)
                r.messages += 1
                r.rcpts += rcpts
                r.bytes += n
                if r.min_size is None or n < r.min_size:
                    r.min_size = n
                if n > r.max_size:
                    r.max_size = n
                out.append(b"250 2.0.0 Ok: discarded\r\n")
                pos = i + 5
                in_data = in_tx = False
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > 4096:
                    raise BenchError("command line too long from odmrd")
                break
            line = buf[pos:nl].rstrip(b"\r")
            pos = nl + 1
            verb = line.split(None, 1)[0].upper() if line.strip() else b""
            if verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"HELO":
                out.append(b"250 customer.test\r\n")
            elif verb == b"MAIL":
                if in_tx:
                    out.append(b"503 5.5.1 Nested MAIL command\r\n")
                else:
                    in_tx, rcpts = True, 0
                    out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if in_tx:
                    rcpts += 1
                    out.append(b"250 2.1.5 Ok\r\n")
                else:
                    out.append(b"503 5.5.1 Need MAIL command\r\n")
            elif verb == b"DATA":
                if not in_tx or not rcpts:
                    out.append(b"554 5.5.1 No valid recipients\r\n")
                    in_tx = False
                else:
                    out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    in_data = True
                    # the CRLF of the DATA line may end the (empty) data
                    data_start = nl - 1 if buf[nl - 1:nl] == b"\r" else pos
                    content_start, size = pos, 0
            elif verb == b"RSET":
                in_tx = False
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"NOOP":
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                sock.sendall(b"".join(out))
                r.quit = True
                return
            else:
                out.append(b"502 5.5.1 Command not recognized\r\n")
        if out:
            sock.sendall(b"".join(out))
            out = []
        # keep what is not consumed; in data mode only the last 4 bytes
        # (a terminator may straddle two reads)
        if in_data:
            keep = max(data_start, len(buf) - 4)
            size += max(0, keep - content_start)
            content_start = max(0, content_start - keep)
            data_start = 0
            buf = buf[keep:]
        else:
            buf = buf[pos:]
        if time.monotonic() > deadline:
            raise BenchError("drain did not finish in time (%d messages "
                             "received)" % r.messages)
        got = recv_into(rbuf)
        if not got:
            return                    # EOF without QUIT: r.quit stays False
        buf = buf + rview[:got] if buf else bytes(rview[:got])


# ---------------------------------------------------------------- fetchmail
class SmtpSink:
    """Postfix's smtp-sink on a free port with running counters (-c) in a
    file; tracked by the Env, stopped by pid."""

    def __init__(self, od, tag):
        import harness
        self.od = od
        self.port = harness.free_port()
        self.out_path = od.env.path("smtp-sink-%s.out" % tag)
        argv = [need("smtp-sink"), "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += ["127.0.0.1:%d" % self.port, "1000"]
        self.out = open(self.out_path, "wb")
        self.proc = od.env.spawn(argv, stdin=subprocess.DEVNULL,
                                 stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise BenchError("smtp-sink exited %s: %s" % (
                    self.proc.returncode, self.text()[-300:]))
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("smtp-sink does not accept on port %d"
                                     % self.port)
                time.sleep(0.05)

    def text(self):
        try:
            with open(self.out_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def messages(self):
        """smtp-sink's mesg= counter (the last one printed)."""
        found = re.findall(r"mesg=(\d+)", self.text())
        return int(found[-1]) if found else 0

    def stop(self):
        bench._kill(self.proc)
        self.out.close()


def fetchmail_customer(od, sink, deadline):
    """fetchmail -v as the ODMR client relaying to smtp-sink.  Returns
    (t_atrn, t_end, cpu): t_atrn when its trace shows the 250 to ATRN,
    t_end when it exited, cpu its user+system seconds."""
    fm = need("fetchmail")
    rc = od.env.path("fetchmailrc")
    with open(rc, "w") as f:
        f.write('set no syslog\n'
                'poll 127.0.0.1 protocol odmr service %d auth cram-md5\n'
                '  user "%s" password "%s"\n'
                '  fetchdomains %s\n'
                '  smtphost 127.0.0.1/%d\n'
                '  sslproto ""\n' % (od.env.odmr_port, USER, PASSWORD, DOMAIN,
                                     sink.port))
    os.chmod(rc, 0o600)
    fenv = dict(os.environ, HOME=od.env.dir, FETCHMAILHOME=od.env.dir,
                LC_ALL="C")
    argv = [fm, "-f", rc, "-N", "--nosyslog", "-v",
            "--pidfile", od.env.path("fetchmail.pid"),
            "-i", od.env.path("fetchids")]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = od.env.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, env=fenv)
    marks = {}
    lines = []

    def reader():
        for raw in iter(p.stdout.readline, b""):
            if "atrn" not in marks and REVERSING in raw:
                marks["atrn"] = time.monotonic()
            if len(lines) < 400:
                lines.append(raw.decode("utf-8", "replace").rstrip())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        p.wait(max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        bench._kill(p)
        raise BenchError("fetchmail did not finish in time; its last lines:"
                         "\n%s" % "\n".join(lines[-5:]))
    t_end = time.monotonic()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    t.join(10)
    p.stdout.close()
    out = "\n".join(lines)
    if p.returncode not in (0, 1):
        raise BenchError("fetchmail exited %d: %s" % (p.returncode,
                                                      out[-800:]))
    if "atrn" not in marks:
        raise BenchError("fetchmail's -v trace lacks %r:\n%s"
                         % (REVERSING.decode(), out[-800:]))
    return marks["atrn"], t_end, cpu


def odmr_fetch_customer(ctx, od, sink, deadline):
    """Our own client, odmr-fetch, relaying to smtp-sink with full protocol
    checking.  Returns (t_start, t_end, cpu)."""
    argv = [os.path.join(ctx.build, "odmr-fetch"),
            "-s", "127.0.0.1:%d" % od.env.odmr_port, "-u", USER,
            "--tls", "off", "--deliver", "smtp:127.0.0.1:%d" % sink.port,
            "--lock", od.env.path("odmr-fetch.lock"),
            "--timeout", "60", "-v", DOMAIN]
    fenv = dict(os.environ, ODMR_PASSWORD=PASSWORD)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = od.env.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, env=fenv)
    try:
        out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        bench._kill(p)
        raise BenchError("odmr-fetch did not finish in time")
    t_end = time.monotonic()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if p.returncode != 0:
        raise BenchError("odmr-fetch exited %d: %s" % (
            p.returncode, out.decode("utf-8", "replace")[-800:]))
    return t0, t_end, cpu


# ---------------------------------------------------------------- drain
def fill(ctx, od, n, check_spool=False):
    """Queues n messages with smtp-source over 20 reused connections and
    checks that n messages are queued."""
    if od.queued() != 0:
        raise BenchError("spool not empty before filling: %d" % od.queued())
    t = run_smtp_source(ctx, od.port, rcpt="user@" + DOMAIN, extra=["-d"],
                        messages=n)
    got = wait_count(od.queued, n, timeout=10)
    if got != n:
        raise BenchError("%d messages queued in %s, expected %d\n%s"
                         % (got, od.domain_dir(), n, od.log_tail()))
    if check_spool:
        problems = od.env.spool_problems()
        if problems:
            raise BenchError("spool after filling: %d problems, e.g. %s"
                             % (len(problems), problems[0]))
    return t


def all_e_files(od):
    n = 0
    for _, _, files in os.walk(os.path.join(od.env.spool, "q")):
        n += sum(1 for f in files if f.endswith((".e", ".q")))
    return n


SUMMARY_RE = re.compile(r"account=(\S+), messages=(\d+), sent=(\d+), "
                        r"deferred=(\d+), bounced=(\d+), bytes=(\d+)(.*)")


def check_drained(od, n, log_mark, who):
    """No message file (.e or .q) left and odmrd's summary line says
    sent=n."""
    left = all_e_files(od)
    if left:
        raise BenchError("%s: %d messages left in the spool after the drain, "
                         "expected 0\n%s" % (who, left, od.log_tail()))
    # odmrd logs the summary after the customer's reply to QUIT, which may
    # be after the customer has gone
    deadline = time.monotonic() + 15
    while True:
        m = None
        for m in SUMMARY_RE.finditer(od.env.log()[log_mark:]):
            pass
        if m or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not m:
        raise BenchError("%s: no session summary in odmrd's log\n%s"
                         % (who, od.log_tail()))
    sent, deferred, bounced = int(m.group(3)), int(m.group(4)), int(m.group(5))
    if sent != n or deferred or bounced or m.group(7).strip():
        raise BenchError("%s: odmrd says %s" % (who, m.group(0)))


def fetchmail_version():
    try:
        out = subprocess.run([need("fetchmail"), "--version"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(rb"release (\d[\w.]*)", out)
    return m.group(1).decode() if m else "?"


def bench_drain(ctx):
    need("smtp-source")
    need("smtp-sink")
    need("fetchmail")
    n_all = ctx.messages
    n_clients = min(n_all, CLIENT_MESSAGES)
    name = "odmr-drain %dx%dB" % (n_all, ctx.size)
    od = Odmrd(ctx, domain=DOMAIN, user=USER)
    od.start()

    rates = {"python": [], "fetchmail": [], "odmr-fetch": []}
    cpu = {"python": [], "fetchmail": [], "odmr-fetch": []}
    ccpu = {"python": [], "fetchmail": [], "odmr-fetch": []}
    fills = []
    limit = max(DRAIN_TIMEOUT, DRAIN_PER_MESSAGE * n_all)
    for r in range(1, ctx.rounds + 1):
        for who in ("python", "odmr-fetch", "fetchmail"):
            n = n_all if who == "python" else n_clients
            tf = fill(ctx, od, n, check_spool=(r == 1 and who == "python"))
            fills.append(n / tf)
            mark = len(od.env.log())
            cpu0, _ = quiet_cpu(od)
            deadline = time.monotonic() + limit
            if who == "python":
                res = python_customer(od.env.odmr_port, ctx.size, deadline)
                t = res.t_end - res.t_atrn
                ccpu[who].append(res.cpu / n)
                got = res.messages
                extra = " %d rcpts, %.1f MB, sizes %d-%d" % (
                    res.rcpts, res.bytes / 1e6, res.min_size or 0,
                    res.max_size)
                if res.rcpts != n:
                    raise BenchError("python customer: %d recipients for %d "
                                     "messages" % (res.rcpts, n))
            else:
                sink = SmtpSink(od, "r%d-%s" % (r, who))
                try:
                    run = (fetchmail_customer if who == "fetchmail" else
                           lambda o, sk, dl: odmr_fetch_customer(ctx, o, sk, dl))
                    t_atrn, t_end, c = run(od, sink, deadline)
                    t = t_end - t_atrn
                    ccpu[who].append(c / n)
                    got = wait_count(sink.messages, n, timeout=5)
                finally:
                    sink.stop()
                extra = ""
            if got != n:
                raise BenchError("%s round %d: the sink counted %d messages, "
                                 "expected %d" % (who, r, got, n))
            check_drained(od, n, mark, "%s round %d" % (who, r))
            cpu1, _ = quiet_cpu(od)
            rates[who].append(n / t)
            cpu[who].append((cpu1 - cpu0) / n)
            ctx.info("round %d %-9s: %6.2fs %8.1f msgs/s, CPU ms/msg: odmrd "
                     "%.3f, customer %.3f  (filled at %.0f msgs/s;%s)"
                     % (r, who, t, n / t, 1000 * (cpu1 - cpu0) / n,
                        1000 * ccpu[who][-1], n / tf, extra))

    med = {k: statistics.median(v) for k, v in rates.items()}

    def rounds_note(v):
        return "median of %d rounds: %s" % (len(v), ", ".join("%.0f" % x
                                                               for x in v))

    def ms(v):
        return 1000 * statistics.median(v)

    return [
        Row(name, "python customer (PIPELINING, discards)",
            "%.1f" % med["python"], "msgs/s",
            "%s; %.2f ms/msg" % (rounds_note(rates["python"]),
                                 1000 / med["python"])),
        Row(name, "fetchmail %s -> smtp-sink (%d msgs)"
            % (fetchmail_version(), n_clients),
            "%.1f" % med["fetchmail"], "msgs/s",
            "%s; %.2f ms/msg" % (rounds_note(rates["fetchmail"]),
                                 1000 / med["fetchmail"])),
        Row(name, "odmr-fetch -> smtp-sink (%d msgs)" % n_clients,
            "%.1f" % med["odmr-fetch"], "msgs/s",
            "%s; %.2f ms/msg; full protocol checking, 250 only after the "
            "sink's 250" % (rounds_note(rates["odmr-fetch"]),
                            1000 / med["odmr-fetch"])),
        Row(name, "ratio odmr-fetch/fetchmail",
            "%.2f" % (med["odmr-fetch"] / med["fetchmail"]), "x",
            "same sink, same odmrd, alternating rounds"),
        Row(name, "ratio python/fetchmail",
            "%.2f" % (med["python"] / med["fetchmail"]), "x",
            "fetchmail relays line by line: ~2 delayed-ACK waits per message"),
        Row(name, "odmrd CPU per message (python / odmr-fetch / fetchmail)",
            "%.3f / %.3f / %.3f" % (ms(cpu["python"]), ms(cpu["odmr-fetch"]),
                                    ms(cpu["fetchmail"])),
            "ms", "user+system of master and session processes, median"),
        Row(name, "customer CPU per message (python / odmr-fetch / fetchmail)",
            "%.3f / %.3f / %.3f" % (ms(ccpu["python"]), ms(ccpu["odmr-fetch"]),
                                    ms(ccpu["fetchmail"])),
            "ms", "the python customer's thread; the client processes"),
        Row(name, "queue fill (smtp-source -d -s %d)" % ctx.sessions,
            "%.1f" % statistics.median(fills), "msgs/s",
            "not part of the drain; median of %d fills" % len(fills)),
    ]


# ---------------------------------------------------------------- poll storm
def _tls_client_ctx():
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    return c


def customer_account(i):
    """(user, domain) of poll customer i: every customer has its own
    account and domain, as at a provider (customers polling the same domain
    at the same moment would contend for its lock)."""
    return "cust%02d" % i, "cust%02d.example.net" % i


def one_poll(port, tls_ctx, user, domain, tls_state=None):
    c = login(port, tls_ctx, user, PASSWORD, tls_state)
    try:
        code, lines = c.cmd(b"ATRN " + domain.encode())
        if code != 453:
            raise BenchError("ATRN on an empty queue: %r" % lines)
        c.cmd(b"QUIT", 221)
    finally:
        c.close()


def _prime_sessions(port, tls_ctx, counts):
    """One unmeasured poll per customer, for a TLS session to resume."""
    states = {}
    for user, domain, _ in counts:
        states[user] = {"session": None, "resumed": 0}
        one_poll(port, tls_ctx, user, domain, states[user])
        states[user]["resumed"] = 0
    return states


def _poll_process(port, tls_mode, counts, ready, start, deadline, conn):
    """A client process: one thread per (user, domain, polls) of counts;
    tls_mode None, "full" or "resumed".  Sends back (latencies, errors,
    cpu seconds, resumed handshakes)."""
    lat, errors = [], []
    lock = threading.Lock()
    tls_ctx = _tls_client_ctx() if tls_mode else None
    states = {}
    try:
        if tls_mode == "resumed":
            states = _prime_sessions(port, tls_ctx, counts)
    except (OSError, BenchError, ValueError) as e:
        errors.append("priming: %s: %s" % (type(e).__name__, e))
    ready.release()

    def customer(user, domain, k):
        mine, err = [], None
        for _ in range(k):
            if time.monotonic() > deadline:
                err = "deadline reached"
                break
            t0 = time.perf_counter()
            try:
                one_poll(port, tls_ctx, user, domain, states.get(user))
            except (OSError, BenchError, ValueError) as e:
                err = "%s: %s" % (type(e).__name__, e)
                break
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)
            if err:
                errors.append(err)

    threads = [threading.Thread(target=customer, args=job, daemon=True)
               for job in counts]
    start.wait(60)
    cpu0 = sum(os.times()[:2])
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1, deadline - time.monotonic() + 5))
    tm = os.times()
    try:
        conn.send((lat, errors, tm.user + tm.system - cpu0,
                   sum(st["resumed"] for st in states.values())))
    finally:
        conn.close()


def poll_storm(ctx, od, polls, customers, procs, tls_mode, probe=None):
    """Runs the storm; returns (wall, latencies, errors, client cpu,
    busy jiffies of the machine, resumed handshakes, (probe() before,
    probe() after)): probe runs once the clients are ready to start and
    again when they are done."""
    mp = multiprocessing.get_context("fork")
    per_customer = [customer_account(i) +
                    (polls // customers + (1 if i < polls % customers else 0),)
                    for i in range(customers)]
    per_customer = [job for job in per_customer if job[2]]
    groups = [per_customer[i::procs] for i in range(procs)]
    groups = [g for g in groups if g]
    start, ready = mp.Event(), mp.Semaphore(0)
    deadline = time.monotonic() + POLL_TIMEOUT
    children = []
    try:
        for g in groups:
            rd, wr = mp.Pipe(duplex=False)
            p = mp.Process(target=_poll_process,
                           args=(od.env.odmr_port, tls_mode, g, ready, start,
                                 deadline, wr), daemon=True)
            p.start()
            wr.close()
            children.append((p, rd))
        for _ in children:    # primed (resumed mode) and started
            if not ready.acquire(timeout=max(1, deadline - time.monotonic())):
                raise BenchError("a poll client process did not get ready")
        time.sleep(0.2)       # let the processes get to start.wait()
        before = probe() if probe else None
        m0, _ = machine_cpu()
        t0 = time.monotonic()
        start.set()
        lat, errors, ccpu, resumed = [], [], 0.0, 0
        for p, rd in children:
            if not rd.poll(max(1, deadline - time.monotonic() + 10)):
                raise BenchError("a poll client process did not report "
                                 "within %ds" % POLL_TIMEOUT)
            l, e, c, r = rd.recv()
            lat.extend(l)
            errors.extend(e)
            ccpu += c
            resumed += r
        wall = time.monotonic() - t0
        m1, _ = machine_cpu()
        after = probe() if probe else None
    finally:
        for p, rd in children:
            if p.is_alive():
                p.kill()
            p.join(5)
            rd.close()
    return wall, lat, errors, ccpu, m1 - m0, resumed, (before, after)


def polls_odmrd(ctx, customers):
    """An odmrd with a certificate and one account + domain per customer."""
    need("openssl")
    od = Odmrd(ctx, domain=DOMAIN, user=USER,
               max_connections_per_ip=str(max(100, 2 * customers)))
    try:
        od.env.make_cert()
    except od.harness.TestFailure as e:
        raise BenchError(str(e))
    for i in range(customers):
        user, domain = customer_account(i)
        try:
            od.env.add_user(user, PASSWORD)
            od.env.add_domain(domain, user)
        except od.harness.TestFailure as e:
            raise BenchError(str(e))
    od.start()
    if all_e_files(od) != 0:
        raise BenchError("the queue is not empty")
    return od


def cpu_shares(wall, mbusy, od_cpu, ccpu):
    """The note on who used the machine's CPUs, and what limited the rate."""
    cap = wall * (os.cpu_count() or 1)
    busy = mbusy / CLK_TCK / cap
    od_share, cl_share = od_cpu / cap, ccpu / cap
    other = max(0.0, busy - od_share - cl_share)
    shares = ("CPUs %.0f%% busy: odmrd %.0f%%, clients %.0f%%, other "
              "processes %.0f%%" % (100 * busy, 100 * od_share,
                                    100 * cl_share, 100 * other))
    if busy < 0.85:
        limit = "not CPU-bound (latency-bound)"
    elif other > max(od_share, cl_share):
        limit = "CPU-bound, mostly by other processes: noisy"
    elif ccpu >= od_cpu:
        limit = ("client-bound: the Python clients need more CPU than odmrd, "
                 "polls/s is a lower bound for odmrd")
    else:
        limit = "CPU-bound, odmrd the larger part"
    return shares, limit


def measure_polls(ctx, od, name, tls_mode, procs):
    """One measured storm; returns (rows, odmrd CPU seconds per poll)."""
    polls, customers = ctx.args.polls, ctx.args.customers
    mark = len(od.env.log())
    wall, lat, errors, ccpu, mbusy, resumed, (before, after) = poll_storm(
        ctx, od, polls, customers, procs, tls_mode, probe=lambda: quiet_cpu(od))
    (cpu0, m0), (cpu1, m1) = before, after
    if errors:
        raise BenchError("%d of %d customers failed, e.g. %s\n%s"
                         % (len(errors), customers, errors[0],
                            od.log_tail(10)))
    if len(lat) != polls:
        raise BenchError("%d polls done, expected %d" % (len(lat), polls))
    if tls_mode == "resumed" and resumed < polls:
        raise BenchError("only %d of %d polls resumed their TLS session"
                         % (resumed, polls))
    log = od.env.log()[mark:]
    ends = log.count("disconnect from ")
    if ends < polls:
        raise BenchError("odmrd logged %d session ends for %d polls"
                         % (ends, polls))
    # session processes that served the storm (forked or reused)
    spids = set(re.findall(r"odmrd\[(\d+)\]: connect from ", log))
    rate = polls / wall
    od_cpu = cpu1 - cpu0
    lat.sort()
    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    shares, limit = cpu_shares(wall, mbusy, od_cpu, ccpu)
    ctx.info("%s: %d polls in %.2fs: %.1f polls/s, p50 %.1f ms, p99 %.1f ms, "
             "odmrd CPU %.2fs (master %.2fs, %d session processes), client "
             "CPU %.2fs in %d processes; %d resumed; %s" % (
                 name, polls, wall, rate, p50, p99, od_cpu, m1 - m0,
                 len(spids), ccpu, procs, resumed, shares))
    tls_steps = {None: "", "full": "STARTTLS (full handshake), EHLO, ",
                 "resumed": "STARTTLS (resumed session), EHLO, "}[tls_mode]
    return [
        Row(name, "polls/s", "%.1f" % rate, "polls/s",
            "%d polls: connect, EHLO, %sAUTH CRAM-MD5, ATRN 453, QUIT; "
            "latency p50 %.1f ms, p99 %.1f ms" % (polls, tls_steps, p50, p99)),
        Row(name, "odmrd CPU per poll", "%.3f" % (1000 * od_cpu / polls), "ms",
            "master + session processes (master %.3f ms; %d session "
            "processes served the polls)" % (1000 * (m1 - m0) / polls,
                                             len(spids))),
        Row(name, "client CPU per poll", "%.3f" % (1000 * ccpu / polls), "ms",
            "%d client processes; %s; %s" % (procs, shares, limit)),
    ], od_cpu / polls


def bench_polls(ctx, use_tls=False):
    customers = ctx.args.customers
    ncpu = os.cpu_count() or 1
    procs = ctx.args.poll_procs or min(customers, max(2, ncpu))
    od = polls_odmrd(ctx, customers)
    tls_mode = "full" if use_tls else None
    # warm-up: one poll per customer, so that the session processes exist
    errors = poll_storm(ctx, od, customers, customers, procs, tls_mode)[2]
    if errors:
        raise BenchError("warm-up: %d customers failed, e.g. %s"
                         % (len(errors), errors[0]))
    name = "odmr-polls%s c=%d" % (" STARTTLS" if use_tls else "", customers)
    if not use_tls:
        return measure_polls(ctx, od, name, tls_mode, procs)[0]
    # The same odmrd and customers, each poll resuming the session of the
    # customer's previous one (issue 12: at least halve odmrd's CPU).
    # Full and resumed storms alternate, ctx.rounds of each, so that both
    # see the same moments of a shared machine; the rows shown are each
    # mode's median round.
    name_r = "odmr-polls STARTTLS resumed c=%d" % customers
    runs = {"full": [], "resumed": [], "plain": []}
    floor = {"full": [], "resumed": []}
    floor_error = []
    for _ in range(ctx.rounds):
        runs["full"].append(measure_polls(ctx, od, name, "full", procs))
        runs["resumed"].append(measure_polls(ctx, od, name_r, "resumed",
                                             procs))
        runs["plain"].append(measure_polls(ctx, od, "plain", None, procs))
        try:
            for mode in ("full", "resumed") if not floor_error else ():
                floor[mode].append(tls_floor(ctx, od, mode))
        except BenchError as e:   # the storms' own figures still count
            floor_error.append(str(e))
    full, resumed, plain = (statistics.median(c for _, c in runs[m])
                            for m in ("full", "resumed", "plain"))
    ratio = full / resumed if resumed > 0 else float("inf")
    per_round = ", ".join("%.2f" % (f / r) for (_, f), (_, r)
                          in zip(runs["full"], runs["resumed"]))
    return median_rows(runs["full"]) + median_rows(runs["resumed"]) + [
        Row(name_r, "odmrd CPU full / resumed", "%.2f" % ratio, "x",
            "same odmrd, alternating rounds: median %.3f ms per poll with a "
            "full handshake, %.3f ms resumed; per round %s (goal: at least "
            "2x)" % (1000 * full, 1000 * resumed, per_round)),
    ] + ([Row(name_r, "OpenSSL floor", "n/a", "", "not measured: " +
              floor_error[0])] if floor_error
         else tls_floor_rows(name_r, plain, floor))


def tls_floor(ctx, od, mode):
    """tests/floor/tls_floor with odmrd's certificate: OpenSSL's own
    server CPU seconds per session (handshake, one record each way)."""
    prog = os.path.join(ctx.build, "floor", "tls_floor")
    if not os.access(prog, os.X_OK):
        raise BenchError("%s is not built (make bench builds it)" % prog)
    try:
        r = subprocess.run([prog, od.env.path("cert.pem"),
                            od.env.path("key.pem"), str(TLS_FLOOR_SESSIONS),
                            mode], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise BenchError("tls_floor %s: no result within 120 s" % mode)
    if r.returncode != 0 or not r.stdout.startswith("server_ms "):
        raise BenchError("tls_floor %s: %s" % (mode, (r.stderr or r.stdout).strip()))
    return float(r.stdout.split()[1]) / 1000


def tls_floor_rows(name, plain, floor):
    """The bound on the full/resumed ratio of whole polls: the part of a
    poll that TLS does not change (a plain poll of the same odmrd), plus
    what OpenSSL alone spends on each kind of handshake."""
    f_full, f_res = (statistics.median(floor[m]) for m in ("full", "resumed"))
    best = (plain + f_full) / (plain + f_res)
    return [
        Row(name, "odmrd CPU per plain poll", "%.3f" % (1000 * plain), "ms",
            "the same odmrd and customers without STARTTLS, in the same "
            "rounds (median)"),
        Row(name, "OpenSSL floor full / resumed", "%.3f / %.3f"
            % (1000 * f_full, 1000 * f_res), "ms",
            "server CPU per session of tests/floor/tls_floor (one process, "
            "a BIO pair, odmrd's certificate, %d sessions; median of the "
            "rounds): %.2fx" % (TLS_FLOOR_SESSIONS, f_full / f_res)),
        Row(name, "best full / resumed a poll could show", "%.2f" % best, "x",
            "(plain poll + floor full) / (plain poll + floor resumed): the "
            "ratio if TLS cost odmrd nothing beyond OpenSSL's own work"),
    ]


def median_rows(runs):
    """The rows of the round with the median CPU per poll (the lower
    middle one for an even count), noted as such."""
    ordered = sorted(runs, key=lambda run: run[1])
    rows, _ = ordered[(len(ordered) - 1) // 2]
    if len(runs) == 1:
        return rows
    note = "; median of %d rounds (CPU ms per poll %s)" % (
        len(runs), ", ".join("%.3f" % (1000 * c) for _, c in runs))
    return [r._replace(note=r.note + note) if r.metric == "odmrd CPU per poll"
            else r for r in rows]


def bench_polls_tls(ctx):
    return bench_polls(ctx, use_tls=True)


BENCHMARKS = [
    ("odmr-drain", bench_drain),
    ("odmr-polls", bench_polls),
    ("odmr-polls-tls", bench_polls_tls),
]
