#!/usr/bin/env python3
"""tests/bench.py - the `make bench` entry point.

    python3 tests/bench.py --build DIR [--rounds N] [--messages N]
                           [--polls N] [--customers N] [--poll-procs N]
                           [--only NAME] [--keep] [--out FILE] [--dir DIR]

Runs every benchmark of BENCHMARKS (functions taking a Context and returning
a list of Row) and prints one table, which is also written to DIR/bench.txt.
A benchmark that fails (a peer program missing, a wrong message count, a
timeout) is reported as an error and makes the exit status 1; the other
benchmarks still run.

Benchmarks:
  smtp-inbound   smtp-source (Postfix's SMTP load generator) sends M
                 messages of 5 KB, 20 sessions in parallel, one message per
                 connection, one recipient in a hosted domain, alternately
                 into odmrd's inbound SMTP listener and into a private
                 Postfix instance that keeps the mail on its hold queue.
                 Both say 250 only after the message is durably on disk.
                 Wall time is smtp-source's run time; after each run the
                 queued count is checked (odmrd: M new .q files under
                 SPOOL/q/example.org/; Postfix: M queue files).  Reports
                 messages/s (median of the rounds) of both, the ratio and
                 odmrd's peak RSS (VmHWM of the master at the end; of the
                 session children sampled every 50 ms while they run).
                 In each round, tests/floor/fs_floor commits as many
                 files with as many writers on the spool's file system,
                 with no SMTP at all (odmrd's two syncs, and one sync):
                 the rate no server syncing that way could pass here.
  smtp-inbound-reuse  the same with smtp-source -d: the messages go over
                 the 20 connections (one session each), which separates
                 the cost per message from the cost per connection.
  smtp-inbound-rspamd  smtp-inbound (1,000 messages) with both odmrd and
                 Postfix handing every message to the same private rspamd
                 (proxy worker in milter mode, DNS at 127.0.0.1): the
                 shared cost is rspamd, the ratio says what each MTA adds.
                 Also CPU per message of each MTA and of rspamd in each
                 side's rounds.  One message per connection, so each
                 session connects to rspamd anew (Postfix's smtpd too).
                 2026-12-02, load 5-6: odmrd 118, Postfix 112 msgs/s,
                 1.06x; odmrd 3.0 ms CPU/msg vs 3.4, rspamd 3.5 vs 3.3.
  auth-guess-1addr, auth-guess-50addr, port25-flood  password guessing
                 from one and from 50 addresses, and customers polling
                 while port 25 is full (tests/bench_abuse.py).
  odmr-drain, odmr-polls, odmr-polls-tls  the ODMR service: M messages
                 delivered over one ATRN session to a Python customer and
                 to fetchmail + smtp-sink; C concurrent customers polling
                 an empty queue, without and with STARTTLS
                 (tests/bench_odmr.py describes them).

Needs root (the Postfix instance), /usr/sbin/smtp-source, smtp-sink,
postfix, fetchmail and openssl (`make test-deps`).  Only 127.0.0.1 is
used.  Every process started is killed by pid at the end, also on errors
and Ctrl-C.

Python 3 standard library only.
"""

import argparse
import collections
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "integration"))

import harness  # noqa: E402
import postfix_instance  # noqa: E402
from postfix_instance import PostfixInstance, PostfixError  # noqa: E402

ROUND_TIMEOUT = 300          # seconds per smtp-source run
SAMPLE_INTERVAL = 0.05       # RSS sampling period

Row = collections.namedtuple("Row", "bench metric value unit note")


class BenchError(Exception):
    """A benchmark could not produce a valid result."""


def need(program):
    p = postfix_instance.find_program(program)
    if not p:
        raise BenchError("required program %r is not installed "
                         "(make test-deps)" % program)
    return p


# ---------------------------------------------------------------- context
class Context:
    def __init__(self, args):
        self.args = args
        self.build = os.path.abspath(args.build)
        self.rounds = args.rounds
        self.messages = args.messages
        self.sessions = args.sessions
        self.size = args.size
        self.keep = args.keep
        self.cleanups = []           # callables, run in reverse order

    def at_exit(self, fn):
        self.cleanups.append(fn)
        return fn

    def run_cleanups(self):
        problems = []
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                r = fn()
                if isinstance(r, list):
                    problems.extend(r)
            except BaseException as e:  # keep cleaning up
                problems.append("cleanup: %s" % e)
        return problems

    def info(self, msg):
        sys.stdout.write("  " + msg + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------- /proc
def proc_children(pid):
    """Direct children of pid: /proc/PID/task/*/children, or a scan of
    /proc when the kernel lacks that file."""
    out = []
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    try:
        for tid in tids:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out.extend(int(x) for x in f.read().split())
        return out
    except FileNotFoundError:
        if not os.path.exists("/proc/%d" % pid):
            return []
    except OSError:
        return []
    return [int(n) for n in os.listdir("/proc")
            if n.isdigit() and postfix_instance.proc_ppid(int(n)) == pid]


def proc_status_kb(pid, field="VmHWM"):
    """A kB field of /proc/PID/status, or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"


class RSSSampler:
    """While active(), a thread reads every SAMPLE_INTERVAL the VmHWM of the
    children of `root` (all descendants with deep=True) and keeps the
    largest per process name (comm) and the distinct pids seen."""

    def __init__(self, root, deep=False):
        self.root = root
        self.deep = deep
        self.peak = {}            # comm -> kB
        self.seen = {}            # comm -> set of pids
        self.samples = 0

    def sample(self):
        if self.deep:
            pids = postfix_instance.proc_descendants(self.root)
        else:
            pids = proc_children(self.root)
        for pid in pids:
            kb = proc_status_kb(pid)
            if kb is None:
                continue
            comm = proc_comm(pid)
            if kb > self.peak.get(comm, 0):
                self.peak[comm] = kb
            self.seen.setdefault(comm, set()).add(pid)
        self.samples += 1

    @contextlib.contextmanager
    def active(self):
        halt = threading.Event()

        def loop():
            while not halt.is_set():
                self.sample()
                halt.wait(SAMPLE_INTERVAL)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield self
        finally:
            halt.set()
            t.join(5)

    def largest(self):
        """(kB, comm) of the largest peak seen, or (None, None)."""
        if not self.peak:
            return None, None
        comm = max(self.peak, key=lambda c: self.peak[c])
        return self.peak[comm], comm

    def nseen(self):
        return sum(len(s) for s in self.seen.values())


# ---------------------------------------------------------------- odmrd
class Odmrd:
    """odmrd with a private spool, account database and configuration,
    started in the foreground; built on tests/integration/harness.Env."""

    def __init__(self, ctx, domain="example.org", user="bench", **conf):
        self.harness = harness
        for prog in ("odmrd", "odmrctl"):
            p = os.path.join(ctx.build, prog)
            if not os.access(p, os.X_OK):
                raise BenchError("%s is not built (make)" % p)
        self.env = harness.Env(ctx.build, name="bench")
        if ctx.keep:
            self.env.keep = True
        ctx.at_exit(self.env.cleanup)
        settings = {"hostname": "mx.test", "lmtp_listen": "",
                    "max_connections_per_ip": "100", "timeout": "60s"}
        settings.update(conf)
        self.env.write_conf(**settings)
        self.domain = domain
        try:
            self.env.add_user(user, "pw")
            self.env.add_domain(domain, user)
        except harness.TestFailure as e:
            raise BenchError(str(e))

    @property
    def port(self):
        return self.env.smtp_port

    @property
    def pid(self):
        return self.env.daemon.pid if self.env.daemon else None

    def start(self):
        try:
            self.env.start(wait=15)
        except self.harness.TestFailure as e:
            raise BenchError(str(e))

    def domain_dir(self):
        return os.path.join(self.env.spool, "q", self.domain)

    def queued(self):
        """Number of committed messages (.q queue files, or .e envelopes
        beside a data file) of the domain."""
        try:
            return sum(1 for n in os.listdir(self.domain_dir())
                       if n.endswith((".e", ".q")))
        except FileNotFoundError:
            return 0

    def clear_spool(self):
        """Removes every queued message (files of q/*/ and tmp/) while the
        daemon runs; the directories stay."""
        for sub in ("q", "tmp"):
            top = os.path.join(self.env.spool, sub)
            if not os.path.isdir(top):
                continue
            for root, dirs, files in os.walk(top):
                for f in files:
                    if f == ".lock":
                        continue
                    try:
                        os.unlink(os.path.join(root, f))
                    except FileNotFoundError:
                        pass

    def log_tail(self, n=20):
        return self.env.log_tail(n)


# ---------------------------------------------------------------- smtp-source
def run_smtp_source(ctx, port, rcpt="user@example.org", sender="sender@src.test",
                    extra=(), messages=None):
    """Runs smtp-source against 127.0.0.1:port; returns the wall time in
    seconds from its start to its exit.  Raises BenchError on a non-zero
    exit, any output on stderr, or a timeout."""
    argv = [need("smtp-source"), "-s", str(ctx.sessions),
            "-l", str(ctx.size), "-m", str(messages or ctx.messages),
            "-f", sender, "-t", rcpt] + list(extra) + ["127.0.0.1:%d" % port]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    ctx.at_exit(lambda: _kill(p))
    try:
        out, err = p.communicate(timeout=ROUND_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill(p)
        raise BenchError("smtp-source did not finish within %ds"
                         % ROUND_TIMEOUT)
    elapsed = time.monotonic() - t0
    err = err.decode("utf-8", "replace").strip()
    if p.returncode != 0 or err:
        raise BenchError("smtp-source exited %d: %s" % (p.returncode,
                                                       err[-600:]))
    return elapsed


def _kill(p):
    if p.poll() is None:
        try:
            p.kill()
        except ProcessLookupError:
            pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
    for s in (p.stdout, p.stderr):
        if s:
            s.close()


def wait_count(fn, want, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def postfix_version():
    try:
        out = subprocess.run([need("postconf"), "-d", "-h", "mail_version"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=30).stdout.decode().strip()
        return out or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def mb(kb):
    return "%.1f" % (kb / 1024.0) if kb is not None else "?"


# ---------------------------------------------------------------- benchmarks
MILTER_MESSAGES = 1000       # rspamd scans every message: keep the rounds short


def start_bench_rspamd(ctx, od):
    """rspamd (milter mode, private, DNS at 127.0.0.1) in odmrd's Env, so
    that its cleanup stops it by pid; returns (its pid, its milter port)."""
    import test_milter
    try:
        proc, port = test_milter.start_rspamd(od.env)
    except od.harness.TestFailure as e:
        raise BenchError("rspamd: %s" % e)
    return proc.pid, port


def tree_cpu_s(root, system_only=False):
    """CPU seconds (user + system, or system alone) used so far by root and
    its descendants, children they have reaped included (cutime/cstime),
    so that a worker that exited during a round still counts."""
    ticks = 0
    for pid in [root] + postfix_instance.proc_descendants(root):
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # utime stime cutime cstime
        times = [int(x) for x in fields[11:15]]
        ticks += times[1] + times[3] if system_only else sum(times)
    return ticks / float(os.sysconf("SC_CLK_TCK"))


class CPUMeter:
    """CPU per message of named process trees, summed over the rounds one
    side of a comparison ran in (milliseconds per message)."""

    def __init__(self, roots):
        self.roots = roots               # name -> pid
        self.used = {}                   # (side, name, system_only) -> s
        self.messages = {}               # side -> messages

    @contextlib.contextmanager
    def round(self, side, messages):
        kinds = (False, True)
        before = {(k, so): tree_cpu_s(p, so)
                  for k, p in self.roots.items() for so in kinds}
        yield
        for k, p in self.roots.items():
            for so in kinds:
                key = (side, k, so)
                self.used[key] = (self.used.get(key, 0.0) + tree_cpu_s(p, so)
                                  - before[(k, so)])
        self.messages[side] = self.messages.get(side, 0) + messages

    def ms_per_msg(self, side, name, system_only=False):
        n = self.messages.get(side)
        used = self.used.get((side, name, system_only), 0.0)
        return 1000.0 * used / n if n else 0.0


def bench_smtp_inbound(ctx, reuse=False, milter=False):
    """odmrd inbound SMTP vs. a Postfix instance that keeps mail queued.
    reuse: smtp-source -d (all messages over the `sessions` connections
    instead of one connection per message).  milter: both hand every
    message to the same private rspamd (milter protocol 6)."""
    need("smtp-source")
    need("postfix")
    n = min(ctx.messages, MILTER_MESSAGES) if milter else ctx.messages
    name = "smtp-inbound%s%s %dx%dB s=%d" % (" -d" if reuse else "",
                                           " +rspamd" if milter else "",
                                           n, ctx.size, ctx.sessions)
    extra = ["-d"] if reuse else []

    od = Odmrd(ctx)
    main_extra = {}
    rspamd_pid = None
    if milter:
        rspamd_pid, port = start_bench_rspamd(ctx, od)
        spec = "inet:127.0.0.1:%d" % port
        od.env.write_conf(milters=spec, milter_default_action="tempfail")
        main_extra = {"smtpd_milters": spec, "milter_default_action": "tempfail",
                      "milter_protocol": "6"}
    od.start()
    pf = PostfixInstance(mode="hold", name="bench-postfix", keep=ctx.keep,
                         main_extra=main_extra)
    ctx.at_exit(pf.cleanup)
    pf.start()
    for w in pf.check_warnings:
        ctx.info("postfix check: " + w)
    pf.clear_queue()

    # Postfix's master forks all its daemons itself, odmrd's master its
    # sessions: sampling direct children is enough for both.  Each sampler
    # only runs while its own side is under load.
    od_sampler = RSSSampler(od.pid)
    pf_sampler = RSSSampler(pf.master_pid)
    cpu = CPUMeter({"odmrd": od.pid, "postfix": pf.master_pid})
    if rspamd_pid:
        cpu.roots["rspamd"] = rspamd_pid

    rates = {"odmrd": [], "postfix": []}
    floor_rates = {mode: [] for mode, _ in FLOOR_MODES}
    floor_error = []
    # The rounds add to the queues instead of emptying them first: deleting
    # a round's files just before the next round makes its file creation
    # dearer on an ext4 without a journal (see filesystem_lines), by an
    # amount that depends on what else was deleted in the last minutes.
    # Both queues are emptied when the benchmark ends.
    if od.queued() or pf.queued():
        raise BenchError("queues not empty before round 1 (odmrd %d, "
                         "postfix %d)" % (od.queued(), pf.queued()))
    # per round and message: odmrd's file, Postfix's, and two of fs_floor
    check_room(od.env.dir, ctx.rounds * n * (2 if milter else 4), ctx.size)

    def odmrd_round(r):
        base = od.queued()
        with od_sampler.active(), cpu.round("odmrd", n):
            t = run_smtp_source(ctx, od.port, extra=extra, messages=n)
            got = wait_count(lambda: od.queued() - base, n, timeout=10)
        if got != n:
            raise BenchError("odmrd round %d: %d messages queued in %s, "
                             "expected %d\n%s" % (r, got, od.domain_dir(), n,
                                                  od.log_tail()))
        if r == 1:
            problems = od.env.spool_problems()   # envelopes parse, sizes agree
            if problems:
                raise BenchError("odmrd spool after round 1: %d problems, "
                                 "e.g. %s" % (len(problems), problems[0]))
        rates["odmrd"].append(n / t)
        ctx.info("round %d odmrd:   %7.2fs %8.1f msgs/s  (%d queued, "
                 "master VmRSS %s MB)" % (r, t, n / t, got,
                                          mb(proc_status_kb(od.pid, "VmRSS"))))

    def postfix_round(r):
        base = pf.queued()
        with pf_sampler.active(), cpu.round("postfix", n):
            t = run_smtp_source(ctx, pf.port, extra=extra, messages=n)
            got = pf.wait_queued(base + n, timeout=10) - base
        if got != n:
            raise BenchError("postfix round %d: %d messages queued, expected "
                             "%d (%r)\n%s" % (r, got, n, pf.queue_counts(),
                                              pf.log_tail()))
        rates["postfix"].append(n / t)
        ctx.info("round %d postfix: %7.2fs %8.1f msgs/s  (%d queued)"
                 % (r, t, n / t, got))

    for r in range(1, ctx.rounds + 1):
        # odmrd first in odd rounds, Postfix in even ones: a side that runs
        # right after deletions elsewhere (the previous benchmark's clean-up)
        # pays for them on an ext4 without a journal
        for side in ((odmrd_round, postfix_round) if r % 2
                     else (postfix_round, odmrd_round)):
            side(r)
        if not milter and not floor_error:
            try:
                for mode, _ in FLOOR_MODES:
                    floor_rates[mode].append(run_fs_floor(ctx, od, mode, n))
                ctx.info("round %d fs floor: %s files/s" % (r, ", ".join(
                    "%s %.0f" % (m, floor_rates[m][-1]) for m, _ in FLOOR_MODES)))
            except BenchError as e:   # the rounds' own figures still count
                floor_error.append(str(e))

    master_kb = proc_status_kb(od.pid)
    od.clear_spool()
    pf.clear_queue()

    med = {k: statistics.median(v) for k, v in rates.items()}
    floor = [] if milter else (
        [Row(name, "fs floor", "n/a", "", "not measured: " + floor_error[0])]
        if floor_error else fs_floor_rows(ctx, name, med, floor_rates))

    def rounds_note(v):
        return "median of %d rounds: %s" % (
            len(v), ", ".join("%.0f" % x for x in v))

    child_kb, _ = od_sampler.largest()
    pf_smtpd = pf_sampler.peak.get("smtpd")
    pf_cleanup = pf_sampler.peak.get("cleanup")
    return [
        Row(name, "odmrd", "%.1f" % med["odmrd"], "msgs/s",
            rounds_note(rates["odmrd"])),
        Row(name, "postfix %s (hold queue)" % postfix_version(),
            "%.1f" % med["postfix"], "msgs/s", rounds_note(rates["postfix"])),
        Row(name, "ratio odmrd/postfix", "%.2f" % (med["odmrd"] / med["postfix"]),
            "x", "higher is better for odmrd"),
        Row(name, "odmrd master peak RSS", mb(master_kb), "MB",
            "VmHWM at the end of the run"),
        Row(name, "odmrd session peak RSS", mb(child_kb), "MB",
            "largest VmHWM of %d session children sampled every %dms"
            % (od_sampler.nseen(), SAMPLE_INTERVAL * 1000)),
        Row(name, "postfix smtpd / cleanup peak RSS",
            "%s / %s" % (mb(pf_smtpd), mb(pf_cleanup)), "MB",
            "for comparison, sampled the same way"),
    ] + cpu_rows(name, cpu) + floor


# Bytes a message takes in its queue file beyond the body: the Received
# header, the envelope and the trailer (about 400 in the bench).
QUEUE_FILE_EXTRA = 512
FLOOR_MODES = (("two", "fs floor, odmrd's commit (write, fsync, link, "
                       "fsync of the directory)"),
               ("one", "fs floor, one sync per message (write, link, fsync; "
                       "Postfix syncs its queue file once)"))


def check_room(path, files, size):
    """Fails the benchmark, before it starts, when the file system of path
    cannot hold its files until the end: each takes an inode and the body
    plus up to 2 KB (headers, envelope), rounded up to 4 KB blocks."""
    st = os.statvfs(path)
    need = files * ((size + 2048 + 4095) // 4096 * 4096)
    free = st.f_bavail * st.f_frsize
    if free < need or (st.f_files and st.f_favail < files):
        raise BenchError("%s: the rounds keep about %d files (%d MB) until "
                         "the benchmark ends; %d MB and %d inodes are free "
                         "(fewer --messages or --rounds, or another --dir)"
                         % (path, files, need >> 20, free >> 20, st.f_favail))


def run_fs_floor(ctx, od, mode, files):
    """tests/floor/fs_floor in a new directory beside odmrd's spool (the
    same file system): files/s.  Its files stay until the benchmark ends
    (with odmrd's directory), as the rounds' messages do: deleting them
    between rounds would make the next odmrd round, not Postfix's, pay for
    their freed inodes on an ext4 without a journal (filesystem_lines)."""
    prog = os.path.join(ctx.build, "floor", "fs_floor")
    if not os.access(prog, os.X_OK):
        raise BenchError("%s is not built (make bench builds it)" % prog)
    d = tempfile.mkdtemp(prefix="fs-floor-", dir=os.path.dirname(od.env.spool))
    try:
        r = subprocess.run([prog, d, str(ctx.sessions), str(files),
                            str(ctx.size + QUEUE_FILE_EXTRA), mode],
                           capture_output=True, text=True, timeout=ROUND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError("fs_floor %s: no result within %ds" % (mode, ROUND_TIMEOUT))
    if r.returncode != 0 or not r.stdout.startswith("files/s "):
        raise BenchError("fs_floor %s: %s" % (mode, (r.stderr or r.stdout).strip()))
    return float(r.stdout.split()[1])


def fs_floor_rows(ctx, name, med, floor_rates):
    """What the spool's file system allowed with no SMTP at all, measured
    in each round after Postfix's part: as many writers as smtp-source
    has sessions, committing as many files as a round has messages.  A
    server that cost no CPU and synced the way odmrd does could not pass
    the first figure.  The disk's sync latency moves from minute to
    minute on a shared machine, hence a median of the rounds."""
    rates = {mode: statistics.median(v) for mode, v in floor_rates.items()}
    rows = [Row(name, label, "%.1f" % rates[mode], "files/s",
                "%d writers, files of %d bytes on the spool's file system, "
                "median of the rounds (%s); best ratio to Postfix's rate "
                "this allows: %.2fx"
                % (ctx.sessions, ctx.size + QUEUE_FILE_EXTRA,
                   ", ".join("%.0f" % x for x in floor_rates[mode]),
                   rates[mode] / med["postfix"]))
            for mode, label in FLOOR_MODES]
    rows.append(Row(name, "odmrd / fs floor of its commit",
                    "%.2f" % (med["odmrd"] / rates["two"]), "x",
                    "1.00 would mean the SMTP work costs nothing"))
    return rows


def cpu_rows(name, cpu):
    """Where the CPU went: each MTA's own share and, with a milter, what
    the milter spent on the messages each MTA handed it."""
    rows = [Row(name, "CPU per message odmrd / postfix",
                "%.2f / %.2f" % (cpu.ms_per_msg("odmrd", "odmrd"),
                                 cpu.ms_per_msg("postfix", "postfix")),
                "ms", "user+system of each MTA's process tree in its "
                "rounds; of it system time (kernel threads not counted): "
                "%.2f / %.2f"
                % (cpu.ms_per_msg("odmrd", "odmrd", True),
                   cpu.ms_per_msg("postfix", "postfix", True)))]
    if "rspamd" in cpu.roots:
        rows.append(Row(name, "rspamd CPU per message fed by odmrd / postfix",
                        "%.2f / %.2f" % (cpu.ms_per_msg("odmrd", "rspamd"),
                                         cpu.ms_per_msg("postfix", "rspamd")),
                        "ms", "the shared cost, measured in each side's rounds"))
    return rows


def bench_smtp_inbound_rspamd(ctx):
    return bench_smtp_inbound(ctx, milter=True)


def bench_smtp_inbound_reuse(ctx):
    """The same over 20 long connections: separates the per-message cost
    (queue writes) from the per-connection cost (odmrd forks a session per
    connection, Postfix re-uses its smtpd processes)."""
    return bench_smtp_inbound(ctx, reuse=True)


# The ODMR benchmarks live in tests/bench_odmr.py, which imports the helpers
# above from this module (also when it runs as __main__).
sys.modules.setdefault("bench", sys.modules[__name__])
import bench_odmr  # noqa: E402
import bench_abuse  # noqa: E402
import bench_drain  # noqa: E402
import bench_scale  # noqa: E402
import bench_push  # noqa: E402

# (name, function): each function takes a Context and returns [Row]
BENCHMARKS = [
    ("smtp-inbound", bench_smtp_inbound),
    ("smtp-inbound-reuse", bench_smtp_inbound_reuse),
    ("smtp-inbound-rspamd", bench_smtp_inbound_rspamd),
] + bench_odmr.BENCHMARKS + bench_abuse.BENCHMARKS + bench_drain.BENCHMARKS \
    + bench_scale.BENCHMARKS + bench_push.BENCHMARKS


# ---------------------------------------------------------------- output
def format_table(rows, errors):
    head = Row("benchmark", "metric", "value", "unit", "notes")
    table = [head] + list(rows)
    widths = [max(len(str(r[i])) for r in table) for i in range(4)]
    lines = []
    for i, r in enumerate(table):
        cells = [str(r[0]).ljust(widths[0]), str(r[1]).ljust(widths[1]),
                 str(r[2]).rjust(widths[2]), str(r[3]).ljust(widths[3]),
                 str(r[4])]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  -----")
    for name, msg in errors:
        lines.append("ERROR %s: %s" % (name, msg.splitlines()[0] if msg else ""))
    return "\n".join(lines) + "\n"


def system_line():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f
                          if l.startswith("model name")), "?")
    except OSError:
        model = "?"
    return "%s, %d CPU (%s), kernel %s, load average %s" % (
        platform.node(), os.cpu_count() or 0, model, platform.release(),
        " ".join("%.2f" % x for x in os.getloadavg()))


def filesystem_of(path):
    """(type, source, mount point, journal) of the file system path is on,
    from /proc/self/mountinfo.  journal is True or False for ext3/ext4
    (whether the kernel runs a jbd2 journal for the device); None for other
    file systems, or when /sys or /proc/fs/jbd2 cannot tell."""
    st = os.stat(path)
    dev = "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
    real = os.path.realpath(path)
    found, best = ("?", "?", "?"), -1

    def below(mnt):
        return real == mnt or real.startswith(mnt.rstrip("/") + "/")

    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 2 or fields[2] != dev:
                continue
            # of several mounts of one device: the deepest that holds path
            mnt = fields[4]
            rank = len(mnt) if below(mnt) else -1
            if found[2] == "?" or rank > best:
                found, best = (tail[0], tail[1], mnt), rank
    journal = None
    sysdev = "/sys/dev/block/" + dev
    if found[0] in ("ext3", "ext4") and os.path.exists(sysdev):
        name = os.path.basename(os.path.realpath(sysdev))
        try:   # jbd2 names its entry DEVICE-INODE, or DEVICE when external
            journal = any(e == name or e.startswith(name + "-")
                          for e in os.listdir("/proc/fs/jbd2"))
        except OSError:
            journal = None   # unknown, not absent
    return found + (journal,)


def filesystem_lines(path):
    """The file system the spools are on, and what to keep in mind."""
    fstype, source, mnt, journal = filesystem_of(path)
    kind = {True: ", with a journal", False: ", without a journal"}.get(
        journal, "")
    lines = ["spools and queues in %s: %s on %s at %s%s"
             % (path, fstype, source, mnt, kind)]
    if journal is False:
        lines.append(
            "note: ext4 without a journal does not reuse an inode freed in the "
            "last 60 s (360 s while its table block is unwritten) and steps "
            "over each of them whenever it creates a file: files deleted in the "
            "minutes before (by an earlier run or benchmark) make file "
            "creation cost more kernel time (docs/benchmarks.md)")
    elif fstype == "tmpfs":
        lines.append("note: on tmpfs fsync does nothing: these figures leave "
                     "the disk out")
    return lines


def _parents(path):
    """The directories above an absolute path, up to /."""
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        yield path


def main():
    ap = argparse.ArgumentParser(description="odmr benchmarks")
    ap.add_argument("--build", default="build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--polls", type=int, default=2000,
                    help="odmr-polls*: polls in total (default 2000)")
    ap.add_argument("--customers", type=int, default=50,
                    help="odmr-polls*: concurrent customers (default 50)")
    ap.add_argument("--poll-procs", type=int, default=0,
                    help="odmr-polls*: client processes (default: one per "
                         "CPU, at least 2)")
    ap.add_argument("--only", action="append", default=[],
                    help="run only this benchmark (or those whose name contains "
                         "this); repeatable")
    ap.add_argument("--out", help="table file (default BUILD/bench.txt)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directories")
    ap.add_argument("--dir", default="/tmp",
                    help="where the instances keep their spools and queues "
                         "(default /tmp): a directory on the file system to "
                         "measure")
    args = ap.parse_args()
    if args.rounds < 1 or args.messages < 1:
        ap.error("--rounds and --messages must be positive")
    if args.polls < 1 or args.customers < 1 or args.poll_procs < 0:
        ap.error("--polls and --customers must be positive")
    if os.environ.get("ODMR_KEEP") == "1":
        args.keep = True
    if not os.path.isdir(args.dir):
        ap.error("--dir %s: not a directory" % args.dir)
    args.dir = os.path.abspath(args.dir)
    for d in [args.dir] + list(_parents(args.dir)):
        if not os.stat(d).st_mode & 0o001:
            ap.error("--dir %s: Postfix's daemons (user postfix) cannot enter "
                     "%s; every directory on the way must be searchable by "
                     "all (as /tmp is)" % (args.dir, d))
    harness.TMP_ROOT = args.dir
    out_path = args.out or os.path.join(args.build, "bench.txt")

    rows, errors = [], []
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    header = [system_line()] + filesystem_lines(args.dir)
    print("odmr benchmarks, %s" % started)
    print("\n".join(header))
    load = os.getloadavg()[0]
    if load > 1.0:
        print("warning: the machine is busy (load average %.2f): other work "
              "competes for the CPUs and disk, figures will be noisy" % load)
    if os.geteuid() != 0:
        errors.append(("all", "must run as root (private Postfix instance)"))
    names = [n for n, _ in BENCHMARKS]

    def wanted(n):
        # --only NAME: that benchmark exactly, else every name containing it
        return any(o == n or (o not in names and o in n) for o in args.only)

    selected = [(n, f) for n, f in BENCHMARKS if not args.only or wanted(n)]
    if not selected:
        errors.append(("all", "no benchmark matches %r" % args.only))
    for name, fn in (selected if not errors else []):
        print("== %s" % name)
        ctx = Context(args)
        t0 = time.monotonic()
        try:
            rows.extend(fn(ctx))
        except KeyboardInterrupt:
            problems = ctx.run_cleanups()
            for p in problems:
                print("  cleanup: %s" % p)
            print("interrupted")
            return 130
        except (BenchError, PostfixError) as e:
            errors.append((name, str(e)))
            print("  ERROR: %s" % e)
        except Exception as e:
            errors.append((name, "%s: %s" % (type(e).__name__, e)))
            traceback.print_exc()
        finally:
            for p in ctx.run_cleanups():
                print("  cleanup: %s" % p)
        print("  (%.0fs)" % (time.monotonic() - t0))

    table = format_table(rows, errors)
    print()
    sys.stdout.write(table)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            f.write("# odmr benchmarks, %s\n" % started)
            f.write("".join("# %s\n" % line for line in header))
            f.write(table)
        print("table written to %s" % out_path)
    except OSError as e:
        print("cannot write %s: %s" % (out_path, e))
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
