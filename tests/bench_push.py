"""tests/bench_push.py - push delivery (XLINGER, issue 14) in `make bench`;
tests/bench.py imports this module and lists its benchmarks in BENCHMARKS.

  push-latency   one odmr-fetch (the real binary: --linger 3600 --tls off
                 --deliver maildir:ROOT/%d/%u, -v) lingers on the domain
                 of the account; N messages (100 unless --messages is
                 given; --size bytes of body, an X-Bench-Seq header) are
                 sent into odmrd's inbound SMTP listener by a Python sender
                 (one connection each: EHLO, MAIL, RCPT, DATA), one after
                 the other with irregular pauses (exponential, mean 0.3 s,
                 at most 2 s, seeded: bursts and gaps).  A message's
                 latency runs from the 250 to its final dot to the moment
                 its file is first seen in the Maildir's new/:
                   start  the kernel's receive time of the segment that
                          carries the 250 (SO_TIMESTAMPNS on the sender's
                          socket, CLOCK_REALTIME, converted to the
                          monotonic clock), so the sender's own scheduling
                          does not count;
                   end    new/ is listed every 0.5 ms by a separate
                          watcher process (not a thread: no GIL between
                          the sender and the watcher); a file counts as
                          seen at the end of the first listing that shows
                          it.  The figure is an upper bound, too high by
                          at most the detection window (from the start of
                          the previous listing), whose median and maximum
                          are reported.  The files' ctime is no clock for
                          this: the kernel stamps it from its coarse clock,
                          up to a tick (4 ms at HZ=250) early.
                 Every message must arrive exactly once (X-Bench-Seq), the
                 spool must end empty, odmr-fetch must log one line per
                 pushed message and odmrd's session summary must say
                 sent=N.  odmr-fetch is then stopped with SIGTERM (it dies
                 of it, odmr-fetch(1)).
                 The comparison is a site that polls every 60 s with a
                 one-shot odmr-fetch: before the push run, 5 polls each
                 fetch one message queued just before (same options,
                 without --linger) and the time from odmr-fetch's start to
                 the file seen in new/ is measured (P, median of 5: process
                 start, connect, EHLO, AUTH, ATRN, reversal, delivery).
                 The wait for the next poll is not measured, it is
                 arithmetic: for a message arriving at a uniformly random
                 moment of a 60 s cycle it is U(0, 60 s), so the polling
                 site's latency is 30 s + P at the median, 59.4 s + P at
                 p99 and 60 s + P at worst.  Reports push median, p99 and
                 maximum, P, those three polling figures and the ratio of
                 the medians (polling / push from the final dot: the
                 push figure from the 250 can be negative, see below),
                 with the load average.  Also the latency from the
                 moment the sender's write of the data and the final dot
                 returned, and how many messages were in new/ before the
                 250 reached the sender: odmrd's lingering session wakes on
                 the envelope's rename into q/DOMAIN/, while the inbound
                 session still syncs the directory before it replies, so
                 the push may win the race.
  push-rss       C customers (200 unless --customers is given), each its
                 own account and domain, linger at once: Python customers
                 (one thread each, in this process) do EHLO, AUTH CRAM-MD5,
                 XLINGER 600, ATRN, then act as the SMTP server: 220,
                 an EHLO reply with 250-PIPELINING ... 250 XLINGER 600,
                 250 to NOOP, MAIL, RCPT and the data, 221 to QUIT.  odmrd
                 runs with odmr_max_connections = max_connections_per_ip =
                 2C + 20, odmr_max_lingering = C + 20, odmr_linger_noop =
                 10s.  Every customer must really linger, else the row
                 fails: odmrd's log must say "lingering for up to" C times
                 and nothing about a linger that failed or ended, C open
                 file description locks must sit on spool/linger.slots
                 (/proc/locks), each customer domain's q/D/.linger must be
                 flock()ed by a distinct session process of odmrd, and
                 every customer must have answered at least one NOOP (so
                 each session's keepalive timer runs).  Then the sum of
                 VmRSS (/proc/PID/status) and of Pss (/proc/PID/smaps_rollup)
                 over odmrd's processes (master and all session processes)
                 is taken, minus the same sum measured before any customer
                 connected (idle master and the idle workers the start-up
                 probes left), divided by C: RSS and PSS per lingering
                 session; the same with the private pages (Private_Clean
                 + Private_Dirty, USS).  Pss divides each shared page among the
                 processes mapping it (the workers share the master's
                 pages after fork), so the Pss sum is the memory odmrd
                 really holds; the RSS sum counts shared pages once per
                 process.  Also the whole-odmrd totals, the median of the
                 lingering processes' own RSS and Pss, odmrd's CPU during
                 the idle linger (between "all lingering" and the memory
                 sample, one NOOP round included), the time until all
                 linger (20 customers logging in at once) and, at that
                 scale, push delivery: one message each for 5 of the C
                 domains (seeded choice), sent one after the other, must
                 reach exactly its customer; latency from the 250 (kernel
                 receive time, as above) to the customer's thread reading
                 the final dot.  At the end every customer closes its
                 connection and odmrd must log the end of all C sessions.
                 odmrd takes one inotify instance per lingering session,
                 and the kernel allows fs.inotify.max_user_instances (128
                 by default) per user, as the admin guide says: when that
                 is below C + 64 the row raises it for its run (root) and
                 puts the old value back at the end (the note says so);
                 a customer refused anyway fails the row.

Needs nothing beyond the build (odmrd, odmrctl, odmr-fetch).  Only
127.0.0.1 is used.  odmrd and odmr-fetch are started through the harness
Env (own session, tracked, killed by pid); the watcher is a
multiprocessing child killed by pid; the customers' sockets are shut down
and their threads joined.

Python 3 standard library only.
"""

import math
import multiprocessing
import os
import random
import resource
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time

import bench
from bench import BenchError, Odmrd, Row, proc_status_kb
import bench_odmr
from bench_odmr import (DOMAIN, PASSWORD, REVERSING, USER, SUMMARY_RE,
                        Conn, all_e_files, login,
                        odmrd_cpu)
from bench_drain import load_note, option_given
import postfix_instance

LATENCY_MESSAGES = 100       # unless --messages is given
MEAN_GAP = 0.3               # seconds between messages (exponential) ...
MAX_GAP = 2.0                # ... at most
SEED = 2645
POLL_SAMPLES = 5             # one-shot polls for the polling comparison
POLL_INTERVAL = 60.0         # the polling site's period
WATCH_INTERVAL = 0.0005      # the watcher's sleep between listings
ARRIVAL_TIMEOUT = 30         # seconds for the last message to arrive
LOCAL = "u1"                 # the Maildir's user

RSS_CUSTOMERS = 200          # unless --customers is given
RSS_LINGER = 600             # XLINGER seconds the customers ask for
RSS_NOOP = 10                # odmr_linger_noop during push-rss
RSS_LOGIN_PARALLEL = 20      # customers logging in at the same moment
RSS_PUSHES = 5               # messages pushed at scale
LINGER_TIMEOUT = 120         # seconds for all customers to linger


def pct(values, q):
    """Nearest-rank percentile q (0-100) of values."""
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(math.ceil(q / 100.0 * len(v))) - 1))]


def ms(s):
    return "%.1f" % (1000.0 * s)


# ---------------------------------------------------------------- sender
# Linux: SO_TIMESTAMPNS (asm-generic/socket.h; Python does not export it)
# makes recvmsg() return the kernel's receive time of the data as a
# struct timespec of CLOCK_REALTIME (SCM_TIMESTAMPNS == SO_TIMESTAMPNS).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


class Sent:
    """When the sender had its 250: rx, the kernel's receive time of the
    segment carrying it, converted to time.monotonic() seconds; read, when
    this process had read it; dot, when the write of the data with its
    final dot had returned (monotonic seconds)."""

    def __init__(self, rx_ns, mono_ns, wall_ns, dot):
        # the two clocks read one after the other: their offset is known to
        # well under a microsecond (no clock step within a run assumed)
        self.rx = (rx_ns - (wall_ns - mono_ns)) / 1e9
        self.read = mono_ns / 1e9
        self.dot = dot            # the data and its final dot were written


def timestamp_keeper(ctx):
    """A socket with SO_TIMESTAMPNS held open for the whole row: the first
    socket asking for receive times switches the kernel's time stamping on
    asynchronously (net_enable_timestamp() defers the static key to a work
    queue), so a reply arriving at once could come without one."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    ctx.at_exit(s.close)
    time.sleep(0.1)
    return s


def stamped_reply(sock):
    """One single-line reply read with recvmsg: (line, rx_ns of the first
    segment of it)."""
    buf, rx = b"", None
    while b"\n" not in buf:
        data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
        if not data:
            raise BenchError("connection closed before the reply to the "
                             "final dot")
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and \
                    rx is None and len(cdata) >= 16:
                sec, nsec = struct.unpack("qq", cdata[:16])
                rx = sec * 1000000000 + nsec
        buf += data
    if rx is None:
        raise BenchError("no SO_TIMESTAMPNS receive time on the reply")
    return buf.split(b"\n", 1)[0].rstrip(b"\r"), rx


def send_message(port, rcpt, headers, size):
    """One message over its own SMTP connection; returns a Sent."""
    body = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                    for k, v in headers) + b"\r\n"
    line = b"push benchmark payload " * 3 + b"\r\n"
    body += line * max(1, size // len(line))
    c = Conn(port)
    try:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        code, lines = c.reply()
        if code != 220:
            raise BenchError("SMTP greeting: %r" % lines)
        c.cmd(b"EHLO sender.test", 250)
        c.cmd(b"MAIL FROM:<s@remote.test>", 250)
        c.cmd(b"RCPT TO:<%s>" % rcpt.encode(), 250)
        c.cmd(b"DATA", 354)
        if c.buf:
            raise BenchError("data after the 354: %r" % c.buf[:80])
        c.sock.sendall(body + b".\r\n")
        dot = time.monotonic()
        reply, rx = stamped_reply(c.sock)
        mono_ns, wall_ns = time.monotonic_ns(), time.time_ns()
        if not reply.startswith(b"250 "):
            raise BenchError("end of data for %s: %r" % (rcpt, reply))
        if not 0 <= wall_ns - rx < 10 * 1000000000:
            raise BenchError("the 250's kernel receive time is %.6f s before "
                             "it was read" % ((wall_ns - rx) / 1e9))
        sent = Sent(rx, mono_ns, wall_ns, dot)
        try:
            c.sock.sendall(b"QUIT\r\n")
            c.sock.recv(4096)
        except OSError:
            pass
    finally:
        c.close()
    return sent


# ---------------------------------------------------------------- watcher
def _watch(path, stop, conn, interval):
    """The watcher process: lists path every interval until stop is set and
    sends back ({name: (lower, upper)}, listings): the file appeared after
    `lower` (the start of the previous listing) and before `upper` (the end
    of the listing that showed it first), monotonic seconds.  (The file's
    ctime, renewed by the rename into new/, is no clock for this: the
    kernel stamps it from its coarse clock, which runs up to a tick behind,
    4 ms at HZ=250.)"""
    seen = {}
    prev_start = time.monotonic()
    listings = 0
    try:
        while not stop.is_set():
            start = time.monotonic()
            names = os.listdir(path)
            end = time.monotonic()
            listings += 1
            if len(names) != len(seen):
                for n in names:
                    if n not in seen:
                        seen[n] = (prev_start, end)
            prev_start = start
            time.sleep(interval)
        conn.send((seen, listings))
    finally:
        conn.close()


class Watcher:
    def __init__(self, ctx, path):
        mp = multiprocessing.get_context("fork")
        self.stop_ev = mp.Event()
        self.rd, wr = mp.Pipe(duplex=False)
        self.proc = mp.Process(target=_watch, daemon=True,
                               args=(path, self.stop_ev, wr, WATCH_INTERVAL))
        self.proc.start()
        wr.close()
        self.path = path
        self.result = None
        ctx.at_exit(self.kill)

    def finish(self):
        """Stops the watcher; returns ({name: (lower, upper)}, listings)."""
        self.stop_ev.set()
        if not self.rd.poll(30):
            raise BenchError("the Maildir watcher did not report")
        self.result = self.rd.recv()
        self.proc.join(10)
        return self.result

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.rd.close()


def seq_of(path):
    """The X-Bench-Seq header of a delivered file, or None."""
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"X-Bench-Seq: "):
                return line.split()[1].decode()
            if line in (b"\r\n", b"\n"):
                return None
    return None


def wait_seen(names_fn, want, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if names_fn() >= want:
            return True
        time.sleep(0.01)
    return names_fn() >= want


# ---------------------------------------------------------------- push-latency
def fetch_argv(ctx, od, maildir, linger):
    argv = [os.path.join(ctx.build, "odmr-fetch"),
            "-s", "127.0.0.1:%d" % od.env.odmr_port, "-u", USER,
            "--tls", "off", "--deliver", "maildir:%s/%%d/%%u" % maildir,
            "--lock", od.env.path("odmr-fetch.lock"), "--timeout", "60", "-v"]
    if linger:
        argv += ["--linger", str(linger)]
    return argv


def one_shot_poll(ctx, od, maildir, new_dir, seq):
    """Queues one message, then runs a one-shot odmr-fetch; returns
    (monotonic time just before its start, its run time in s) and checks
    that it delivered."""
    send_message(od.port, "%s@%s" % (LOCAL, DOMAIN),
                 [("Subject", "poll %d" % seq),
                  ("X-Bench-Seq", "poll-%d" % seq)], ctx.size)
    before = len(os.listdir(new_dir))
    fenv = dict(os.environ, ODMR_PASSWORD=PASSWORD)
    t0 = time.monotonic()
    p = od.env.spawn(fetch_argv(ctx, od, maildir, 0),
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, env=fenv)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        bench._kill(p)
        raise BenchError("one-shot odmr-fetch did not finish within 120 s")
    run = time.monotonic() - t0
    out = out.decode("utf-8", "replace")
    if p.returncode != 0:
        raise BenchError("one-shot odmr-fetch exited %d: %s"
                         % (p.returncode, out[-800:]))
    if len(os.listdir(new_dir)) != before + 1:
        raise BenchError("one-shot poll %d: %d files in new/, expected %d"
                         % (seq, len(os.listdir(new_dir)), before + 1))
    return t0, run


def bench_push_latency(ctx):
    n = ctx.messages if option_given("messages") else LATENCY_MESSAGES
    fetch = os.path.join(ctx.build, "odmr-fetch")
    if not os.access(fetch, os.X_OK):
        raise BenchError("%s is not built (make)" % fetch)
    name = "push-latency %d msgs" % n
    load0 = load_note()
    timestamp_keeper(ctx)
    od = Odmrd(ctx, domain=DOMAIN, user=USER)
    od.start()
    maildir = od.env.path("maildir")
    new_dir = os.path.join(maildir, DOMAIN, LOCAL, "new")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, DOMAIN, LOCAL, sub))
    watcher = Watcher(ctx, new_dir)

    # (1) the polling site: one-shot polls, one message each
    polls = [one_shot_poll(ctx, od, maildir, new_dir, i)
             for i in range(POLL_SAMPLES)]
    if all_e_files(od):
        raise BenchError("mail left queued after the one-shot polls")

    # (2) the pushing site
    mark = len(od.env.log())
    err_path = od.env.path("odmr-fetch-linger.err")
    err = open(err_path, "wb")
    ctx.at_exit(err.close)
    p = od.env.spawn(fetch_argv(ctx, od, maildir, 3600),
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=err, env=dict(os.environ, ODMR_PASSWORD=PASSWORD))
    ctx.at_exit(lambda: bench._kill(p))

    def fetch_err():
        with open(err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    deadline = time.monotonic() + 30
    while "lingering for up to" not in od.env.log()[mark:]:
        if p.poll() is not None or time.monotonic() > deadline:
            raise BenchError("odmr-fetch --linger does not linger (exit %r):"
                             "\n%s\n%s" % (p.poll(), fetch_err()[-800:],
                                           od.log_tail(10)))
        time.sleep(0.02)
    rnd = random.Random(SEED)
    sent = {}           # seq -> Sent
    t_first = time.monotonic()
    for i in range(n):
        sent["push-%d" % i] = send_message(
            od.port, "%s@%s" % (LOCAL, DOMAIN),
            [("Subject", "push %d" % i), ("X-Bench-Seq", "push-%d" % i)],
            ctx.size)
        if p.poll() is not None:
            raise BenchError("odmr-fetch exited %r while messages were being "
                             "pushed:\n%s" % (p.returncode,
                                              fetch_err()[-800:]))
        time.sleep(min(MAX_GAP, rnd.expovariate(1.0 / MEAN_GAP)))
    span = time.monotonic() - t_first
    total = POLL_SAMPLES + n
    if not wait_seen(lambda: len(os.listdir(new_dir)), total, ARRIVAL_TIMEOUT):
        raise BenchError("%d of %d pushed messages in new/ %ds after the last "
                         "one was sent\n%s" % (
                             len(os.listdir(new_dir)) - POLL_SAMPLES, n,
                             ARRIVAL_TIMEOUT, od.log_tail(10)))
    seen, listings = watcher.finish()
    mid_load = load_note()
    # odmr-fetch(1): SIGTERM stops it at once (it dies of the signal);
    # odmrd sees the connection close and ends the session
    os.kill(p.pid, signal.SIGTERM)
    try:
        rc = p.wait(30)
    except subprocess.TimeoutExpired:
        raise BenchError("odmr-fetch still lingering 30 s after SIGTERM")
    text = fetch_err()
    if rc not in (0, -signal.SIGTERM):
        raise BenchError("odmr-fetch --linger exited %d after SIGTERM:\n%s"
                         % (rc, text[-800:]))
    got_lines = text.count("odmr-fetch: received message from <s@remote.test>")
    if got_lines != n:
        raise BenchError("odmr-fetch -v logged %d received messages, expected "
                         "%d" % (got_lines, n))
    bench_odmr.check_drained(od, n, mark, "the lingering session")

    # which file is which message
    by_seq = {}
    for fname, times in seen.items():
        seq = seq_of(os.path.join(new_dir, fname))
        if seq is None or seq in by_seq:
            raise BenchError("file %s in new/: X-Bench-Seq %r (duplicate or "
                             "missing)" % (fname, seq))
        by_seq[seq] = times
    want = set(sent) | {"poll-%d" % i for i in range(POLL_SAMPLES)}
    if set(by_seq) != want:
        raise BenchError("messages in new/ do not match those sent: missing "
                         "%r, unexpected %r" % (
                             sorted(want - set(by_seq))[:5],
                             sorted(set(by_seq) - want)[:5]))
    lat, user_lat, dot_lat, unc, early = [], [], [], [], []
    for seq, snd in sent.items():
        lower, upper = by_seq[seq]
        if upper <= snd.dot:
            raise BenchError("%s was in new/ before its sender had written "
                             "the data" % seq)
        if upper <= snd.rx:
            # pushed and delivered while odmrd's inbound session had still
            # to send its 250: a measured fact, reported as such
            early.append(seq)
        lat.append(upper - snd.rx)
        user_lat.append(upper - snd.read)
        dot_lat.append(upper - snd.dot)
        unc.append(upper - max(lower, snd.dot))
    poll_t = [by_seq["poll-%d" % i][1] - t0 for i, (t0, _) in enumerate(polls)]
    poll_run = [run for _, run in polls]
    p_med = statistics.median(poll_t)
    med, p99, worst = statistics.median(lat), pct(lat, 99), max(lat)
    poll_med = POLL_INTERVAL / 2 + p_med
    poll_p99 = POLL_INTERVAL * 0.99 + p_med
    poll_max = POLL_INTERVAL + p_med
    load1 = load_note()
    ctx.info("push: %d messages over %.1f s: from the 250 median %s ms, p99 "
             "%s ms, max %s ms, min %s ms (from the sender reading its 250: "
             "median %s ms; from its final dot: median %s ms, max %s ms); %d "
             "in new/ before the 250 (%s); watcher: %d listings, detection "
             "window median %s ms, max %s ms; %s" % (
                 n, span, ms(med), ms(p99), ms(worst), ms(min(lat)),
                 ms(statistics.median(user_lat)),
                 ms(statistics.median(dot_lat)), ms(max(dot_lat)), len(early),
                 ", ".join(early[:5]), listings,
                 ms(statistics.median(unc)), ms(max(unc)), mid_load))
    ctx.info("one-shot polls: start to file in new/ %s ms, start to exit %s "
             "ms" % (", ".join(ms(x) for x in poll_t),
                     ", ".join(ms(x) for x in poll_run)))
    return [
        Row(name, "push latency median", ms(med), "ms",
            "odmrd's 250 after the final dot reaching the sender (kernel "
            "receive time, SO_TIMESTAMPNS) to the file seen in new/ by a "
            "watcher process "
            "listing it every %.1f ms (upper bound; the file appeared at "
            "most %s ms earlier at the median); %d msgs over %.0f s, "
            "exponential gaps mean %.1f s" % (
                WATCH_INTERVAL * 1000, ms(statistics.median(unc)), n, span,
                MEAN_GAP)),
        Row(name, "push latency p99", ms(p99), "ms",
            "nearest rank over %d messages; detection window max %s ms"
            % (n, ms(max(unc)))),
        Row(name, "push latency max", ms(worst), "ms",
            "%s at the start, %s at the end" % (load0, load1)),
        Row(name, "push latency from the sender's final dot median / max",
            "%s / %s" % (ms(statistics.median(dot_lat)), ms(max(dot_lat))),
            "ms", "the same end, started when the sender's write of the data "
            "and the dot returned: includes odmrd's commit and its 250"),
        Row(name, "messages in new/ before the sender's 250",
            "%d" % len(early), "of %d" % n,
            "seen in new/ before the kernel had the 250 for the "
            "sender: odmrd pushes on the envelope's rename into q/DOMAIN/, "
            "its inbound session syncs the directory before replying"),
        Row(name, "one-shot poll P (odmr-fetch, 1 msg)", ms(p_med), "ms",
            "measured: odmr-fetch's start to the file seen in new/, median "
            "of %d (%s ms); start to exit median %s ms; --tls off" % (
                POLL_SAMPLES, ", ".join(ms(x) for x in poll_t),
                ms(statistics.median(poll_run)))),
        Row(name, "polling every 60 s: median / p99 / max",
            "%.2f / %.2f / %.2f" % (poll_med, poll_p99, poll_max), "s",
            "arithmetic, not measured: a uniformly random arrival waits "
            "U(0, 60 s) for the next poll (30 / 59.4 / 60 s), plus the "
            "measured P"),
        Row(name, "ratio polling/push median", "%.0f" % (
            poll_med / statistics.median(dot_lat)), "x",
            "(30 s + P) / push median from the final dot (the larger push "
            "figure: the one from the 250 can be 0 or less)"),
    ]


# ---------------------------------------------------------------- push-rss
EHLO_LINGER = (b"250-customer.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
               b"250-ENHANCEDSTATUSCODES\r\n250 XLINGER %d\r\n" % RSS_LINGER)


class Lingerer(threading.Thread):
    """A Python customer that lingers: login, XLINGER, ATRN, then the SMTP
    server side until QUIT, an error or stop()."""

    def __init__(self, port, user, domain, gate):
        super().__init__(daemon=True)
        self.port, self.user, self.domain, self.gate = port, user, domain, gate
        self.conn = None
        self.state = "new"        # new, login, reversed, lingering, ended
        self.error = None
        self.stopping = False
        self.noops = 0
        self.quit = False
        self.messages = []        # (monotonic at the final dot, X-Bench-Seq)
        self.lock = threading.Lock()

    def run(self):
        try:
            with self.gate:
                self.state = "login"
                c = login(self.port, user=self.user, password=PASSWORD)
                self.conn = c
                c.cmd(b"XLINGER %d" % RSS_LINGER, 250)
                code, lines = c.cmd(b"ATRN " + self.domain.encode())
                if code != 250 or lines[0] != REVERSING:
                    raise BenchError("ATRN: %r" % lines)
                self.state = "reversed"
                c.sock.sendall(b"220 customer.test ESMTP ready\r\n")
            self.serve(c)
        except (OSError, BenchError, ValueError) as e:
            if not self.stopping:
                self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            self.state = "ended"

    def serve(self, c):
        in_tx = False
        while True:
            line = c.line()
            verb = line.split(None, 1)[0].upper() if line.strip() else b""
            if verb == b"EHLO":
                c.sock.sendall(EHLO_LINGER)
                self.state = "lingering"
            elif verb == b"NOOP":
                c.sock.sendall(b"250 2.0.0 Ok\r\n")
                with self.lock:
                    self.noops += 1
            elif verb == b"MAIL":
                in_tx = True
                c.sock.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT" and in_tx:
                c.sock.sendall(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA" and in_tx:
                c.sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                seq = None
                while True:
                    l = c.line()
                    if l == b".":
                        break
                    if seq is None and l.startswith(b"X-Bench-Seq: "):
                        seq = l.split()[1].decode()
                t = time.monotonic()
                with self.lock:
                    self.messages.append((t, seq))
                c.sock.sendall(b"250 2.0.0 Ok: queued\r\n")
                in_tx = False
            elif verb == b"RSET":
                in_tx = False
                c.sock.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                c.sock.sendall(b"221 2.0.0 Bye\r\n")
                self.quit = True
                raise BenchError("odmrd sent QUIT (state %s)" % self.state)
            else:
                c.sock.sendall(b"502 5.5.1 Command not recognized\r\n")

    def stop(self):
        self.stopping = True
        if self.conn:
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def rss_customer(i):
    """(user, domain) of lingering customer i: each its own account and
    domain, as at a provider."""
    return "push%03d" % i, "push%03d.example.net" % i


def smaps_kb(pid):
    """{field: kB} of /proc/PID/smaps_rollup, or None."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            out = {}
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
            return out
    except (OSError, ValueError):
        return None


def odmrd_memory(master):
    """{pid: (VmRSS kB, Pss kB, Private kB)} of odmrd's master and all its
    descendants (Private: Private_Clean + Private_Dirty, the pages no other
    process maps);
    sampled until two samples 0.3 s apart show the same processes (a
    maintenance child comes and goes)."""
    for _ in range(20):
        pids = sorted([master] + postfix_instance.proc_descendants(master))
        out = {}
        for pid in pids:
            rss = proc_status_kb(pid, "VmRSS")
            sm = smaps_kb(pid)
            if rss is None or sm is None or "Pss" not in sm:
                break
            out[pid] = (rss, sm["Pss"], sm.get("Private_Clean", 0) +
                        sm.get("Private_Dirty", 0))
        time.sleep(0.3)
        again = sorted([master] + postfix_instance.proc_descendants(master))
        if len(out) == len(pids) and again == pids:
            return out
    raise BenchError("odmrd's processes do not hold still for a memory sample")


def linger_locks(spool, domains):
    """(OFD locks on spool/linger.slots, {domain: pid holding the flock of
    q/D/.linger})."""
    def key(path):
        st = os.stat(path)
        return "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev),
                                 st.st_ino)
    slots = key(os.path.join(spool, "linger.slots"))
    by_key = {}
    for d in domains:
        try:
            by_key[key(os.path.join(spool, "q", d, ".linger"))] = d
        except FileNotFoundError:
            pass
    n_slots, holders = 0, {}
    with open("/proc/locks") as f:
        for line in f:
            # "12: OFDLCK ADVISORY WRITE -1 08:01:1234 0 0"
            # "13: FLOCK  ADVISORY WRITE 4321 08:01:5678 0 EOF"
            parts = line.split()
            if len(parts) < 6 or parts[1] == "->":
                continue
            if parts[1] == "OFDLCK" and parts[5] == slots:
                n_slots += 1
            elif parts[1] == "FLOCK" and parts[5] in by_key:
                holders[by_key[parts[5]]] = int(parts[4])
    return n_slots, holders


def inotify_limit():
    try:
        with open("/proc/sys/fs/inotify/max_user_instances") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def raise_inotify_limit(ctx, want):
    """fs.inotify.max_user_instances >= want for this run; returns a note
    ("" when nothing changed)."""
    path = "/proc/sys/fs/inotify/max_user_instances"
    old = inotify_limit()
    if old is None or old >= want:
        return ""
    try:
        with open(path, "w") as f:
            f.write("%d\n" % want)
    except OSError as e:
        raise BenchError("%d lingering customers need %s >= %d (now %d) and "
                         "it cannot be raised: %s" % (want - 64, path, want,
                                                      old, e))

    def restore():
        with open(path, "w") as f:
            f.write("%d\n" % old)
    ctx.at_exit(restore)
    return "; fs.inotify.max_user_instances raised from %d to %d for the run" \
        % (old, want)


def linger_failures(log):
    """Log lines that say a linger was refused, failed or ended."""
    return [l for l in log.splitlines()
            if "XLINGER" in l and ("refused" in l or "cannot" in l or
                                   "inotify" in l or "ignored" in l)
            or "linger ended" in l]


def bench_push_rss(ctx):
    C = ctx.args.customers if option_given("customers") else RSS_CUSTOMERS
    name = "push-rss c=%d" % C
    load0 = load_note()
    timestamp_keeper(ctx)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need_fds = 4 * C + 200
    if soft < need_fds:
        if hard != resource.RLIM_INFINITY and hard < need_fds:
            raise BenchError("RLIMIT_NOFILE is %d/%d, %d customers need %d "
                             "(ulimit -n)" % (soft, hard, C, need_fds))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need_fds, hard))
    budget = 2 * C + 20
    sysctl_note = raise_inotify_limit(ctx, C + 64)
    if sysctl_note:
        ctx.info(sysctl_note[2:])
    od = Odmrd(ctx, domain=DOMAIN, user=USER,
               max_connections=str(budget + 200),
               smtp_max_connections="100", lmtp_max_connections="10",
               odmr_max_connections=str(budget),
               max_connections_per_ip=str(budget),
               odmr_max_lingering=str(C + 20),
               odmr_linger_noop="%ds" % RSS_NOOP,
               odmr_linger_max="%ds" % RSS_LINGER)
    t0 = time.monotonic()
    accounts = [rss_customer(i) for i in range(C)]
    for user, domain in accounts:
        try:
            od.env.add_user(user, PASSWORD)
            od.env.add_domain(domain, user)
        except od.harness.TestFailure as e:
            raise BenchError(str(e))
    ctx.info("%d accounts and domains in %.1f s" % (C, time.monotonic() - t0))
    od.start()
    time.sleep(1.0)   # the start-up maintenance pass
    idle = odmrd_memory(od.pid)
    idle_rss = sum(v[0] for v in idle.values())
    idle_pss = sum(v[1] for v in idle.values())
    idle_uss = sum(v[2] for v in idle.values())
    ctx.info("idle odmrd: %d processes, VmRSS %s MB, Pss %s MB, private %s "
             "MB" % (len(idle), bench.mb(idle_rss), bench.mb(idle_pss),
                     bench.mb(idle_uss)))

    mark = len(od.env.log())
    gate = threading.BoundedSemaphore(RSS_LOGIN_PARALLEL)
    custs = [Lingerer(od.env.odmr_port, u, d, gate) for u, d in accounts]

    def stop_all():
        for c in custs:
            c.stop()
        for c in custs:
            c.join(10)
        for c in custs:
            if c.conn:
                c.conn.close()
    ctx.at_exit(stop_all)
    t_conn = time.monotonic()
    for c in custs:
        c.start()
    deadline = time.monotonic() + LINGER_TIMEOUT
    while True:
        log = od.env.log()[mark:]
        n_log = log.count("lingering for up to")
        states = [c.state for c in custs]
        bad = [c for c in custs if c.error or c.state == "ended"]
        if bad or linger_failures(log):
            break
        if n_log >= C and states.count("lingering") == C:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    t_all = time.monotonic() - t_conn
    fails = linger_failures(log)
    if bad or fails or n_log < C or states.count("lingering") < C:
        time.sleep(1)   # let the rest of the story reach the log
        log = od.env.log()[mark:]
        n_log = log.count("lingering for up to")
        fails = linger_failures(log)
        bad = [c for c in custs if c.error or c.state == "ended"]
        states = [c.state for c in custs]
        lim = inotify_limit()
        hint = ""
        if any("inotify" in l for l in fails):
            hint = (" -- odmrd takes one inotify instance per lingering "
                    "session; fs.inotify.max_user_instances is %s per user "
                    "(and odmr_max_lingering was %d)" % (lim, C + 20))
        raise BenchError(
            "only %d of %d customers linger after %.0f s (odmrd's log says "
            "\"lingering for up to\" %d times; customer states then %r); %d "
            "customers failed, e.g. %s; %d log lines about failed or ended "
            "lingers, e.g. %r%s" % (
                min(states.count("lingering"), n_log), C, t_all, n_log,
                {s: states.count(s) for s in set(states)}, len(bad),
                bad[0].error if bad else None, len(fails),
                fails[:2], hint))
    ctx.info("%d customers lingering after %.1f s; %s"
             % (C, t_all, load_note()))
    n_slots, holders = linger_locks(od.env.spool, [d for _, d in accounts])
    workers = set(bench.proc_children(od.pid))
    if n_slots != C:
        raise BenchError("%d locks on linger.slots, expected %d"
                         % (n_slots, C))
    if len(holders) != C or len(set(holders.values())) != C or \
            not set(holders.values()) <= workers:
        raise BenchError("the .linger locks of %d of %d domains are held, by "
                         "%d distinct processes, %d of them odmrd's session "
                         "processes" % (len(holders), C,
                                        len(set(holders.values())),
                                        len(set(holders.values()) & workers)))
    cpu0, _ = odmrd_cpu(od.pid)
    tc0 = time.monotonic()
    # every session's keepalive runs: at least one NOOP answered by each
    deadline = time.monotonic() + RSS_NOOP + 30
    while min(c.noops for c in custs) < 1:
        if time.monotonic() > deadline or any(c.error or c.state == "ended"
                                              for c in custs):
            silent = sum(1 for c in custs if c.noops < 1)
            bad = [c.error for c in custs if c.error]
            raise BenchError("%d customers got no NOOP within %d s; %d "
                             "failed, e.g. %r\n%s" % (
                                 silent, RSS_NOOP + 30, len(bad),
                                 bad[:1], od.log_tail(10)))
        time.sleep(0.1)
    time.sleep(0.5)   # the NOOP round is over
    busy = odmrd_memory(od.pid)
    cpu1, _ = odmrd_cpu(od.pid)
    idle_window = time.monotonic() - tc0
    noops = sum(c.noops for c in custs)
    busy_rss = sum(v[0] for v in busy.values())
    busy_pss = sum(v[1] for v in busy.values())
    busy_uss = sum(v[2] for v in busy.values())
    lingering_pids = set(holders.values())
    own = [busy[p] for p in lingering_pids if p in busy]
    if len(own) != C:
        raise BenchError("memory of %d of the %d lingering processes read"
                         % (len(own), C))
    per_rss = (busy_rss - idle_rss) / C
    per_pss = (busy_pss - idle_pss) / C
    per_uss = (busy_uss - idle_uss) / C
    master_idle, master_busy = idle[od.pid], busy[od.pid]
    ctx.info("lingering odmrd: %d processes, VmRSS %s MB, Pss %s MB; per "
             "session VmRSS %.0f kB, Pss %.0f kB; master VmRSS %d -> %d kB; "
             "CPU %.3f s in %.1f s (%d NOOPs)" % (
                 len(busy), bench.mb(busy_rss), bench.mb(busy_pss), per_rss,
                 per_pss, master_idle[0], master_busy[0], cpu1 - cpu0,
                 idle_window, noops))

    # push at that scale
    rnd = random.Random(SEED)
    picks = rnd.sample(range(C), min(RSS_PUSHES, C))
    lat, dot_lat = [], []
    for k, i in enumerate(picks):
        user, domain = accounts[i]
        seq = "scale-%d" % k
        snd = send_message(od.port, "u@%s" % domain,
                           [("Subject", seq), ("X-Bench-Seq", seq)], ctx.size)
        deadline = time.monotonic() + 30
        while not custs[i].messages:
            if time.monotonic() > deadline or custs[i].error:
                raise BenchError("the message for %s did not reach its "
                                 "lingering customer within 30 s (%s)\n%s"
                                 % (domain, custs[i].error,
                                    od.log_tail(10)))
            time.sleep(0.001)
        t_dot, got_seq = custs[i].messages[0]
        if got_seq != seq:
            raise BenchError("customer %s got %r, expected %r"
                             % (user, got_seq, seq))
        if t_dot <= snd.dot:
            raise BenchError("%s reached its customer before the sender had "
                             "written it" % seq)
        lat.append(t_dot - snd.rx)
        dot_lat.append(t_dot - snd.dot)
    time.sleep(0.5)
    others = [c.user for j, c in enumerate(custs)
              if j not in picks and c.messages]
    if others or any(len(custs[i].messages) != 1 for i in picks):
        raise BenchError("pushed messages went astray: %r got mail" % others)
    if all_e_files(od):
        raise BenchError("%d messages left queued after the pushes"
                         % all_e_files(od))
    errs = [c.error for c in custs if c.error]
    if errs or any(c.state != "lingering" for c in custs):
        raise BenchError("%d customers failed while lingering, e.g. %s"
                         % (len(errs), errs[:1]))

    # the end: every customer closes, every session ends
    end_mark = len(od.env.log())
    stop_all()
    deadline = time.monotonic() + 60
    while True:
        tail = od.env.log()[end_mark:]
        ended = len(SUMMARY_RE.findall(tail))
        if ended >= C or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if ended < C:
        raise BenchError("odmrd logged the end of %d of %d sessions within "
                         "60 s of the customers closing" % (ended, C))
    sent_total = sum(int(m.group(3)) for m in SUMMARY_RE.finditer(tail))
    if sent_total != len(picks):
        raise BenchError("odmrd's session summaries say sent=%d in all, "
                         "expected %d" % (sent_total, len(picks)))
    closed = tail.count("linger ended: customer closed the connection")
    if closed != C:
        raise BenchError("%d of %d lingers ended with \"customer closed the "
                         "connection\"" % (closed, C))
    load1 = load_note()
    med_own_rss = statistics.median(v[0] for v in own)
    med_own_pss = statistics.median(v[1] for v in own)
    med_own_uss = statistics.median(v[2] for v in own)
    return [
        Row(name, "RSS per lingering session", "%.0f" % per_rss, "kB",
            "(sum of VmRSS over odmrd's %d processes with %d lingering - the "
            "same over its %d idle processes) / %d; shared pages counted in "
            "every process" % (len(busy), C, len(idle), C)),
        Row(name, "PSS per lingering session", "%.0f" % per_pss, "kB",
            "the same with Pss (smaps_rollup): shared pages split among the "
            "processes mapping them (other programs mapping the same "
            "libraries lower it)"),
        Row(name, "private memory per lingering session", "%.0f" % per_uss,
            "kB", "the same with Private_Clean + Private_Dirty (USS): pages "
            "only that process maps, what its end would free"),
        Row(name, "odmrd total VmRSS / Pss / private, %d lingering" % C,
            "%s / %s / %s" % (bench.mb(busy_rss), bench.mb(busy_pss),
                              bench.mb(busy_uss)), "MB",
            "%d processes; idle: %s / %s / %s MB (%d processes: master and "
            "idle workers); master VmRSS %d kB idle, %d kB with %d "
            "lingering" % (len(busy), bench.mb(idle_rss), bench.mb(idle_pss),
                           bench.mb(idle_uss), len(idle), master_idle[0],
                           master_busy[0], C)),
        Row(name, "lingering process VmRSS / Pss / private (median)",
            "%.0f / %.0f / %.0f" % (med_own_rss, med_own_pss, med_own_uss),
            "kB", "each session process's own figures, median of %d" % C),
        Row(name, "odmrd CPU while %d sessions linger" % C,
            "%.1f" % (1000.0 * (cpu1 - cpu0) / idle_window), "ms/s",
            "master + session processes: %.3f s CPU in %.1f s of idle "
            "linger, %d NOOPs answered (odmr_linger_noop=%ds)" % (
                cpu1 - cpu0, idle_window, noops, RSS_NOOP)),
        Row(name, "push latency at c=%d median / max" % C,
            "%.2f / %.2f" % (1000 * statistics.median(lat), 1000 * max(lat)),
            "ms", "%d of %d read by the customer before the 250 reached the "
            "sender (see push-latency); from the sender's final dot: median "
            "%.2f ms, max %.2f ms; " % (
                sum(1 for x in lat if x <= 0), len(lat),
                1000 * statistics.median(dot_lat), 1000 * max(dot_lat)) +
            "%d messages, each to one of the lingering domains: odmrd's 250 "
            "after the final dot reaching the sender (kernel receive time) "
            "to its customer's "
            "thread reading the final dot (no fsync there); %s"
            % (len(lat), load1)),
        Row(name, "time until all %d linger" % C, "%.1f" % t_all, "s",
            "connect, EHLO, AUTH CRAM-MD5, XLINGER, ATRN, reversal; %d "
            "logging in at once; %s at the start%s" % (
                RSS_LOGIN_PARALLEL, load0, sysctl_note)),
    ]


BENCHMARKS = [
    ("push-latency", bench_push_latency),
    ("push-rss", bench_push_rss),
]
