"""tests/bench_odmr.py - the ODMR benchmarks of `make bench` (tests/bench.py
imports this module and lists its benchmarks in BENCHMARKS).

  odmr-drain     M queued messages of 5 KB for one domain (filled with
                 smtp-source into odmrd's inbound SMTP listener and counted
                 as .e files) are delivered over one ATRN session, per round
                 once to each of two customers:
                   python     a customer written here: EHLO, AUTH CRAM-MD5,
                              ATRN, then a minimal but correct SMTP server
                              with PIPELINING that reads every message to
                              its final dot, counts it and throws it away;
                   fetchmail  fetchmail (protocol odmr), which relays the
                              reversed SMTP dialogue to Postfix's smtp-sink.
                 The time runs from the `250 OK now reversing the
                 connection` to the end of the session (the QUIT at the
                 python customer; fetchmail's exit, whose -v trace gives the
                 moment of the 250).  Every round must leave no .e file in
                 the spool, the sink must have counted M messages and
                 odmrd's session summary must say sent=M.  Reports
                 messages/s (median of the rounds) of both, their ratio and
                 odmrd's CPU time per message.
  odmr-polls     C concurrent customers poll an empty queue: connect, EHLO,
                 AUTH CRAM-MD5, ATRN (453 You have no mail), QUIT; P polls in
                 total.  Reports polls/s, latency, odmrd's CPU per poll
                 (master + session processes, from /proc) and the client's
                 CPU (the clients run in several processes; the note says
                 when they, not odmrd, are the limit).
  odmr-polls-tls the same with STARTTLS (self-signed RSA 2048 certificate,
                 not verified; a full handshake per poll) before AUTH.

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
import socket
import ssl
import statistics
import threading
import time

import bench
from bench import BenchError, Odmrd, Row, need, run_smtp_source, wait_count

USER, PASSWORD = "bench", "bench-pw"
DOMAIN = "example.org"
DRAIN_TIMEOUT = 300          # seconds per drain
POLL_TIMEOUT = 300           # seconds per poll storm
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


def odmrd_cpu(master):
    """CPU seconds (user+system) used so far by odmrd: the master, the
    session processes it has reaped (cutime/cstime of the master) and those
    alive now (their own times plus what they reaped).  Meant to be read
    while the service is quiet, so that no child is reaped between the
    reads.  Returns (total, master_only)."""
    f = _stat_fields(master)
    if f is None:
        raise BenchError("odmrd (pid %d) is gone" % master)
    # utime stime cutime cstime are fields 14-17 of stat: 11-14 here
    own = int(f[11]) + int(f[12])
    total = own + int(f[13]) + int(f[14])
    for pid in bench.proc_children(master):
        c = _stat_fields(pid)
        if c is not None:
            total += int(c[11]) + int(c[12]) + int(c[13]) + int(c[14])
    return total / CLK_TCK, own / CLK_TCK


def quiet_cpu(od, settle=0.3):
    """odmrd_cpu() after the sessions had time to report back."""
    time.sleep(settle)
    return odmrd_cpu(od.pid)


# ---------------------------------------------------------------- SMTP client
class Conn:
    """A lean SMTP client connection (the benchmark's own CPU matters)."""

    def __init__(self, port, timeout=IO_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=timeout)
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

    def starttls(self, tls_ctx):
        self.cmd(b"STARTTLS", 220)
        if self.buf:
            raise BenchError("data after the 220 to STARTTLS")
        self.sock = tls_ctx.wrap_socket(self.sock, server_hostname="mx.test")

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


def login(port, tls_ctx=None, user=USER, password=PASSWORD):
    """Connected, greeted, EHLO (STARTTLS + EHLO), AUTH CRAM-MD5 done."""
    c = Conn(port)
    try:
        code, lines = c.reply()
        if code != 220:
            raise BenchError("ODMR greeting: %r" % lines)
        code, lines = c.cmd(b"EHLO customer.test", 250)
        if tls_ctx is not None:
            if not any(l[4:].upper() == b"STARTTLS" for l in lines):
                raise BenchError("STARTTLS not offered: %r" % lines)
            c.starttls(tls_ctx)
            c.cmd(b"EHLO customer.test", 250)
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
        serve_reversed(c.sock, c.buf, r, deadline)
        r.t_end = time.monotonic()
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
    scanned for <CRLF>.<CRLF> without copying it around."""
    sock.sendall(b"220 customer.test ESMTP ready\r\n")
    recv = sock.recv
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
            verb = line[:4].upper()
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
                    data_start, content_start, size = nl - 1, pos, 0
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
            keep = max(data_start, len(buf) - 4, pos)
            keep = max(min(keep, len(buf)), data_start)
            size += max(0, keep - content_start)
            content_start = max(0, content_start - keep)
            data_start = 0
            buf = buf[keep:]
        else:
            buf = buf[pos:]
        if time.monotonic() > deadline:
            raise BenchError("drain did not finish within %ds after %d "
                             "messages" % (DRAIN_TIMEOUT, r.messages))
        chunk = recv(1 << 20)
        if not chunk:
            return                    # EOF without QUIT: r.quit stays False
        buf = buf + chunk if buf else chunk


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
        self.proc = od.env.spawn(argv, stdin=subprocess_devnull(),
                                 stdout=self.out, stderr=subprocess_stdout())
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


def subprocess_devnull():
    import subprocess
    return subprocess.DEVNULL


def subprocess_stdout():
    import subprocess
    return subprocess.STDOUT


def fetchmail_customer(od, sink, deadline):
    """fetchmail -v as the ODMR client relaying to smtp-sink.  Returns
    (t_atrn, t_end, output): t_atrn when its trace shows the 250 to ATRN,
    t_end when it exited."""
    import subprocess
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
        raise BenchError("fetchmail did not finish within %ds" % DRAIN_TIMEOUT)
    t_end = time.monotonic()
    t.join(10)
    p.stdout.close()
    out = "\n".join(lines)
    if p.returncode not in (0, 1):
        raise BenchError("fetchmail exited %d: %s" % (p.returncode, out[-800:]))
    if "atrn" not in marks:
        raise BenchError("fetchmail's -v trace lacks %r:\n%s"
                         % (REVERSING.decode(), out[-800:]))
    return marks["atrn"], t_end, out


# ---------------------------------------------------------------- drain
def fill(ctx, od, n, check_spool=False):
    """Queues n messages with smtp-source over 20 reused connections and
    checks that n .e files are there."""
    if od.queued() != 0:
        raise BenchError("spool not empty before filling: %d" % od.queued())
    t = run_smtp_source(ctx, od.port, rcpt="user@" + DOMAIN, extra=["-d"])
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
        n += sum(1 for f in files if f.endswith(".e"))
    return n


SUMMARY_RE = re.compile(r"account=(\S+), messages=(\d+), sent=(\d+), "
                        r"deferred=(\d+), bounced=(\d+), bytes=(\d+)(.*)")


def check_drained(od, n, log_mark, who):
    """0 .e files left and odmrd's summary line says sent=n."""
    left = all_e_files(od)
    if left:
        raise BenchError("%s: %d .e files left in the spool after the drain, "
                         "expected 0\n%s" % (who, left, od.log_tail()))
    log = od.env.log()[log_mark:]
    m = None
    for m in SUMMARY_RE.finditer(log):
        pass
    if not m:
        raise BenchError("%s: no session summary in odmrd's log\n%s"
                         % (who, od.log_tail()))
    sent, deferred, bounced = int(m.group(3)), int(m.group(4)), int(m.group(5))
    if sent != n or deferred or bounced or m.group(7).strip():
        raise BenchError("%s: odmrd says %s" % (who, m.group(0)))


def bench_drain(ctx):
    need("smtp-source")
    need("smtp-sink")
    need("fetchmail")
    n = ctx.messages
    name = "odmr-drain %dx%dB" % (n, ctx.size)
    od = Odmrd(ctx, domain=DOMAIN, user=USER)
    # the Odmrd helper created USER with password "pw": use ours
    od.env.odmrctl_ok("user", "passwd", USER, input=PASSWORD + "\n")
    od.start()

    rates = {"python": [], "fetchmail": []}
    cpu = {"python": [], "fetchmail": []}
    fills = []
    for r in range(1, ctx.rounds + 1):
        for who in ("python", "fetchmail"):
            tf = fill(ctx, od, n, check_spool=(r == 1 and who == "python"))
            fills.append(n / tf)
            mark = len(od.env.log())
            cpu0, _ = quiet_cpu(od)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            if who == "python":
                res = python_customer(od.env.odmr_port, ctx.size, deadline)
                t = res.t_end - res.t_atrn
                got, extra = res.messages, " %d rcpts, %.1f MB, sizes %d-%d" % (
                    res.rcpts, res.bytes / 1e6, res.min_size or 0, res.max_size)
                if res.rcpts != n:
                    raise BenchError("python customer: %d recipients for %d "
                                     "messages" % (res.rcpts, n))
            else:
                sink = SmtpSink(od, "r%d" % r)
                try:
                    t_atrn, t_end, _ = fetchmail_customer(od, sink, deadline)
                    t = t_end - t_atrn
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
            ctx.info("round %d %-9s: %6.2fs %8.1f msgs/s, odmrd CPU %.3f ms/msg"
                     "  (filled at %.0f msgs/s;%s)"
                     % (r, who, t, n / t, 1000 * (cpu1 - cpu0) / n, n / tf,
                        extra))

    med = {k: statistics.median(v) for k, v in rates.items()}

    def rounds_note(v):
        return "median of %d rounds: %s" % (len(v), ", ".join("%.0f" % x
                                                               for x in v))

    return [
        Row(name, "python customer (PIPELINING, discards)",
            "%.1f" % med["python"], "msgs/s", rounds_note(rates["python"])),
        Row(name, "fetchmail -> smtp-sink", "%.1f" % med["fetchmail"],
            "msgs/s", rounds_note(rates["fetchmail"])),
        Row(name, "ratio python/fetchmail",
            "%.2f" % (med["python"] / med["fetchmail"]), "x",
            "how much the relaying customer costs"),
        Row(name, "odmrd CPU per message (python / fetchmail)",
            "%.3f / %.3f" % (1000 * statistics.median(cpu["python"]),
                             1000 * statistics.median(cpu["fetchmail"])),
            "ms", "user+system of master and session processes, median"),
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


def one_poll(port, tls_ctx):
    c = login(port, tls_ctx)
    try:
        code, lines = c.cmd(b"ATRN " + DOMAIN.encode())
        if code != 453:
            raise BenchError("ATRN on an empty queue: %r" % lines)
        c.cmd(b"QUIT", 221)
    finally:
        c.close()


def _poll_process(port, use_tls, counts, start, deadline, conn):
    """A client process: one thread per customer, each doing counts[i]
    polls.  Sends back (latencies, errors, cpu seconds)."""
    lat, errors = [], []
    lock = threading.Lock()
    tls_ctx = _tls_client_ctx() if use_tls else None

    def customer(k):
        mine, err = [], None
        for _ in range(k):
            if time.monotonic() > deadline:
                err = "deadline reached"
                break
            t0 = time.perf_counter()
            try:
                one_poll(port, tls_ctx)
            except (OSError, BenchError, ValueError) as e:
                err = "%s: %s" % (type(e).__name__, e)
                break
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)
            if err:
                errors.append(err)

    threads = [threading.Thread(target=customer, args=(k,), daemon=True)
               for k in counts]
    start.wait(60)
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1, deadline - time.monotonic() + 5))
    tm = os.times()
    try:
        conn.send((lat, errors, tm.user + tm.system))
    finally:
        conn.close()


def poll_storm(ctx, od, polls, customers, procs, use_tls):
    """Runs the storm; returns (wall, latencies, errors, client cpu)."""
    mp = multiprocessing.get_context("fork")
    per_customer = [polls // customers + (1 if i < polls % customers else 0)
                    for i in range(customers)]
    per_customer = [k for k in per_customer if k]
    groups = [per_customer[i::procs] for i in range(procs)]
    groups = [g for g in groups if g]
    start = mp.Event()
    deadline = time.monotonic() + POLL_TIMEOUT
    children = []
    try:
        for g in groups:
            rd, wr = mp.Pipe(duplex=False)
            p = mp.Process(target=_poll_process,
                           args=(od.env.odmr_port, use_tls, g, start,
                                 deadline, wr), daemon=True)
            p.start()
            wr.close()
            children.append((p, rd))
        time.sleep(0.2)       # let the processes get to start.wait()
        t0 = time.monotonic()
        start.set()
        lat, errors, ccpu = [], [], 0.0
        for p, rd in children:
            if not rd.poll(max(1, deadline - time.monotonic() + 10)):
                raise BenchError("a poll client process did not report "
                                 "within %ds" % POLL_TIMEOUT)
            l, e, c = rd.recv()
            lat.extend(l)
            errors.extend(e)
            ccpu += c
        wall = time.monotonic() - t0
    finally:
        for p, rd in children:
            if p.is_alive():
                p.kill()
            p.join(5)
            rd.close()
    return wall, lat, errors, ccpu


def bench_polls(ctx, use_tls=False):
    need("openssl")
    polls, customers = ctx.args.polls, ctx.args.customers
    ncpu = os.cpu_count() or 1
    procs = ctx.args.poll_procs or min(customers, max(2, ncpu))
    name = "odmr-polls%s c=%d" % (" STARTTLS" if use_tls else "", customers)
    od = Odmrd(ctx, domain=DOMAIN, user=USER,
               max_connections_per_ip=str(max(100, 2 * customers)))
    od.env.odmrctl_ok("user", "passwd", USER, input=PASSWORD + "\n")
    try:
        od.env.make_cert()
    except od.harness.TestFailure as e:
        raise BenchError(str(e))
    od.start()
    if od.queued() != 0:
        raise BenchError("queue of %s is not empty" % DOMAIN)

    # warm-up: one poll per customer, so that the session processes exist
    _, _, errors, _ = poll_storm(ctx, od, customers, customers, procs, use_tls)
    if errors:
        raise BenchError("warm-up: %d customers failed, e.g. %s"
                         % (len(errors), errors[0]))
    mark = len(od.env.log())
    cpu0, m0 = quiet_cpu(od)
    wall, lat, errors, ccpu = poll_storm(ctx, od, polls, customers, procs,
                                         use_tls)
    cpu1, m1 = quiet_cpu(od)
    if errors:
        raise BenchError("%d of %d customers failed, e.g. %s\n%s"
                         % (len(errors), customers, errors[0],
                            od.log_tail(10)))
    if len(lat) != polls:
        raise BenchError("%d polls done, expected %d" % (len(lat), polls))
    log = od.env.log()[mark:]
    nomail = log.count("disconnect from ")
    if nomail < polls:
        raise BenchError("odmrd logged %d session ends for %d polls"
                         % (nomail, polls))
    rate = polls / wall
    od_cpu = cpu1 - cpu0
    lat.sort()
    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    busy = (od_cpu + ccpu) / (wall * ncpu)
    client_share = ccpu / (od_cpu + ccpu) if od_cpu + ccpu else 0
    if busy > 0.85 and client_share > 0.5:
        limit = "client-bound: the clients used more CPU than odmrd"
    elif busy > 0.85:
        limit = "CPU-bound (all %d CPUs busy), odmrd the larger part" % ncpu
    else:
        limit = "CPUs %.0f%% busy: latency-bound" % (100 * busy)
    ctx.info("%d polls in %.2fs: %.1f polls/s, p50 %.1f ms, p99 %.1f ms, "
             "odmrd CPU %.2fs (master %.2fs), client CPU %.2fs in %d "
             "processes" % (polls, wall, rate, p50, p99, od_cpu, m1 - m0,
                            ccpu, len(lat) and procs))
    return [
        Row(name, "polls/s", "%.1f" % rate, "polls/s",
            "%d polls: connect, EHLO, %sAUTH CRAM-MD5, ATRN 453, QUIT; "
            "latency p50 %.1f ms, p99 %.1f ms" % (
                polls, "STARTTLS, EHLO, " if use_tls else "", p50, p99)),
        Row(name, "odmrd CPU per poll", "%.3f" % (1000 * od_cpu / polls), "ms",
            "master + session processes (master %.3f ms)"
            % (1000 * (m1 - m0) / polls)),
        Row(name, "client CPU per poll", "%.3f" % (1000 * ccpu / polls), "ms",
            "%d client processes; %s" % (procs, limit)),
    ]


def bench_polls_tls(ctx):
    return bench_polls(ctx, use_tls=True)


BENCHMARKS = [
    ("odmr-drain", bench_drain),
    ("odmr-polls", bench_polls),
    ("odmr-polls-tls", bench_polls_tls),
]
