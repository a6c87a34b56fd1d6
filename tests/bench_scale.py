"""tests/bench_scale.py - the big-spool scale row (issue 12 goal 4);
tests/bench.py imports this module and lists its benchmarks in BENCHMARKS.

  scale-spool    two odmrd instances run side by side, one with an empty
                 spool and one whose spool holds 500,000 queued messages in
                 50,000 other domains (10 each; ODMR_SCALE_MESSAGES and
                 ODMR_SCALE_DOMAINS in the environment change the figures,
                 and the row scales them down by itself, saying so, when
                 the file system lacks the space or inodes, or when
                 writing takes longer than ODMR_SCALE_BUDGET seconds, 150
                 by default: the rest of the run should take minutes).
                 The big spool is written straight into q/ by the bench:
                 one message of --size bytes is sent to the instance with
                 smtp-source; its queue files serve as the template (so the
                 envelope format is whatever odmrd writes today).  Every
                 generated message gets its own queue id (arrival times
                 spread over the last 4 days, inside queue_lifetime, in
                 queue-id order), its own envelope (id, domain, arrival and
                 recipient rewritten) and a hard link of a shared data file
                 (a new data inode every 60,000 links: ext4 allows 65,000).
                 Then sync(2), so that write-back does not run during the
                 measurement, `odmrctl queue DOMAIN` must list a sample
                 domain's 10 ids, and the instance is restarted so that
                 its start-up maintenance pass runs over the big spool.
                 Then, against the empty spool in the same run, alternating:
                   ATRN latency   10 messages queued for the customer's
                                  domain (smtp-source), one ATRN by a Python
                                  customer (tests/bench_odmr.py) that
                                  discards: time from sending ATRN to
                                  odmrd's QUIT after the last message;
                                  median of 5 per round;
                   inbound        smtp-source -s 20, one message per
                                  connection, 2,000 messages (--messages
                                  when given) into the same domain;
                   maintenance    the pass odmrd forks at start-up, every
                                  five minutes and on SIGUSR1 (leftover
                                  cleanup and queue_lifetime expiry): wall
                                  time from SIGUSR1 until that child is
                                  gone, CPU from the master's cutime.
                 At the end one generated domain (bound to the account) is
                 drained with ATRN: its 10 messages must arrive.  Reports
                 both figures and the ratio big/empty (goal: at most 1.2)
                 and the load average.  The 50,000 domains are not in the
                 account database (only their queues exist); the ATRN'd
                 domain and the inbound domain are bound.

The spool lives in the harness Env's temporary directory and is removed
afterwards (unless --keep / ODMR_KEEP=1).  Needs smtp-source.  Only
127.0.0.1 is used; odmrd is stopped by pid through the harness.

Python 3 standard library only.
"""

import multiprocessing
import os
import re
import shutil
import signal
import statistics
import time

import bench
from bench import BenchError, Odmrd, Row, need, run_smtp_source, wait_count
import bench_odmr
from bench_odmr import DOMAIN, USER, SUMMARY_RE, fill, login, quiet_cpu
import bench_drain

SCALE_MESSAGES = 500000
SCALE_DOMAINS = 50000
TEMPLATE_DOMAIN = "template.scale.test"
INBOUND_MESSAGES = 2000
ATRN_MESSAGES = 10
ATRN_PER_ROUND = 5
LINKS_PER_INODE = 60000      # ext4: at most 65,000 links to one inode
SPREAD = 4 * 86400           # arrival times over the last 4 days
MAINT_TIMEOUT = 900          # seconds for one maintenance pass
MAINT_PASSES = 3
GEN_BUDGET = 150             # seconds at most for writing the big spool


def domain_name(i):
    return "d%05d.scale.test" % i


def env_int(name, default):
    v = os.environ.get(name)
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        raise BenchError("%s=%r is not a number" % (name, v))
    if n < 1:
        raise BenchError("%s must be positive" % name)
    return n


# ---------------------------------------------------------------- sizing
def choose_size(ctx, spool_parent):
    """(messages, domains, note): the requested size, or a smaller one
    when the file system cannot hold it twice over."""
    msgs = env_int("ODMR_SCALE_MESSAGES", SCALE_MESSAGES)
    doms = min(env_int("ODMR_SCALE_DOMAINS", SCALE_DOMAINS), msgs)
    st = os.statvfs(spool_parent)
    free = st.f_bavail * st.f_frsize
    ifree = st.f_favail if st.f_favail else st.f_ffree
    block = max(st.f_frsize, 4096)

    def need_bytes(m, d):
        # an envelope block per message, a directory (and .lock) per
        # domain, the shared data inodes
        return m * block + d * 2 * block + (m // LINKS_PER_INODE + 1) * 65536

    def need_inodes(m, d):
        return m + 2 * d + m // LINKS_PER_INODE + 1

    wanted = (msgs, doms)
    while msgs > 1000 and (2 * need_bytes(msgs, doms) + (1 << 30) > free or
                           2 * need_inodes(msgs, doms) > ifree):
        msgs //= 2
        doms = max(1, doms // 2)
    note = ""
    if (msgs, doms) != wanted:
        note = ("scaled down from %d messages in %d domains: %.1f GB and %d "
                "inodes free" % (wanted[0], wanted[1], free / 1e9, ifree))
        ctx.info(note)
    ctx.info("big spool: %d messages in %d domains, needs about %.2f GB and "
             "%d inodes (%.1f GB, %d inodes free)" % (
                 msgs, doms, need_bytes(msgs, doms) / 1e9,
                 need_inodes(msgs, doms), free / 1e9, ifree))
    return msgs, doms, note


# ---------------------------------------------------------------- the spool
def take_template(ctx, od):
    """Queues one message of ctx.size bytes for TEMPLATE_DOMAIN and returns
    (id, {".e": envelope, ".m": data}) of its queue file in
    q/TEMPLATE_DOMAIN/.  The big spool is written from it in the two-file
    layout that odmrd also reads (server/queue.h): data files shared by
    hard links keep 500,000 messages at 500,000 small files, where one
    queue file each would write 2.5 GB."""
    run_smtp_source(ctx, od.port, rcpt="user@" + TEMPLATE_DOMAIN, messages=1)
    d = os.path.join(od.env.spool, "q", TEMPLATE_DOMAIN)
    deadline = time.monotonic() + 10
    while True:
        names = [n for n in os.listdir(d) if not n.startswith(".")] \
            if os.path.isdir(d) else []
        ids = sorted({n.split(".", 1)[0] for n in names})
        if any(n.endswith(".q") for n in names) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if len(ids) != 1 or names != [ids[0] + ".q"]:
        raise BenchError("the template message's files in %s are %r, expected "
                         "ID.q (server/qfile.h): the spool layout changed, "
                         "update tests/bench_scale.py" % (d, names))
    qid = ids[0]
    with open(os.path.join(d, qid + ".q"), "rb") as f:
        try:
            data, text = od.harness.split_queue_file(f.read())
        except od.harness.TestFailure as e:
            raise BenchError("the template message: %s" % e)
    files = {".e": text, ".m": data}
    env = od.harness.parse_envelope(files[".e"])
    if env["id"] != qid or env["domain"] != TEMPLATE_DOMAIN or \
            env["size"] != len(files[".m"]):
        raise BenchError("the template envelope does not match its files: %r"
                         % env)
    # gone from the queue again, the way an administrator removes mail
    r = od.env.odmrctl("queue", "delete", "--domain", TEMPLATE_DOMAIN)
    if r.returncode != 0:
        raise BenchError("odmrctl queue delete --domain %s: %s"
                         % (TEMPLATE_DOMAIN, (r.stderr or r.stdout).strip()))
    return qid, files


def envelope_pattern(qid, text):
    """The template envelope as a %-format with id, dom and t."""
    text = text.decode("utf-8")
    if not re.search(r"^T \d+$", text, re.M):
        raise BenchError("template envelope without a T record: %r" % text)
    text = text.replace("%", "%%")
    text = text.replace(qid, "%(id)s").replace(TEMPLATE_DOMAIN, "%(dom)s")
    text = re.sub(r"^T \d+$", "T %(t)d", text, count=1, flags=re.M)
    return text


def _generate_part(spool, pattern, data, msgs, doms, pid, part, parts,
                   deadline):
    """Writes the messages of the domains i with i % parts == part, until
    the monotonic clock passes deadline (message k goes to domain k % doms,
    so a spool cut short is still spread evenly); returns ({domain: [ids]}
    of the sample domains among them, messages written)."""
    top = os.path.join(spool, "q")
    dirs = {}
    for i in range(part, doms, parts):
        dirs[i] = os.path.join(top, domain_name(i))
        os.mkdir(dirs[i], 0o700)
    samples = {i: [] for i in (0, doms // 2, doms - 1) if i % parts == part}
    base = int(time.time()) - SPREAD
    step_us = SPREAD * 1000000 // max(1, msgs)
    pid_hex = "%X" % pid
    link_src, links = None, 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    written = 0
    for k in range(msgs):
        i = k % doms
        if i % parts != part:
            continue
        if written % 1000 == 0 and time.monotonic() > deadline:
            break
        written += 1
        sec, usec = divmod(base * 1000000 + k * step_us, 1000000)
        new = "%08X%05X%s" % (sec, usec, pid_hex)
        stem = os.path.join(dirs[i], new)
        if link_src is None or links >= LINKS_PER_INODE:
            fd = os.open(stem + ".m", flags, 0o600)
            os.write(fd, data)
            os.close(fd)
            link_src, links = stem + ".m", 1
        else:
            os.link(link_src, stem + ".m")
            links += 1
        fd = os.open(stem + ".e", flags, 0o600)
        os.write(fd, (pattern % {"id": new, "dom": domain_name(i), "t": sec})
                 .encode("utf-8"))
        os.close(fd)
        if i in samples:
            samples[i].append(new)
    return {domain_name(i): ids for i, ids in samples.items()}, written


def _in_parallel(fn, args_for, parts):
    """Runs fn(*args_for(part)) in `parts` forked processes; returns their
    results; raises BenchError with the first failure."""
    mp = multiprocessing.get_context("fork")

    def child(part, conn):
        try:
            conn.send(("ok", fn(*args_for(part))))
        except BaseException as e:        # reported, never lost
            conn.send(("error", "%s: %s" % (type(e).__name__, e)))
        finally:
            conn.close()

    procs = []
    try:
        for part in range(parts):
            rd, wr = mp.Pipe(duplex=False)
            p = mp.Process(target=child, args=(part, wr), daemon=True)
            p.start()
            wr.close()
            procs.append((p, rd))
        out, errors = [], []
        for p, rd in procs:
            try:
                kind, value = rd.recv()
            except EOFError:
                kind, value = "error", "worker %d died" % p.pid
            (out if kind == "ok" else errors).append(value)
        if errors:
            raise BenchError(errors[0])
        return out
    finally:
        for p, rd in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
            rd.close()


def generate(spool, qid, files, msgs, doms, pid, budget):
    """Writes the big spool (one process per CPU, at most 2) for at most
    budget seconds; returns ({domain: [ids]} for a few sample domains (the
    first, one in the middle, the last), messages written)."""
    pattern = envelope_pattern(qid, files[".e"])
    os.makedirs(os.path.join(spool, "q"), exist_ok=True)
    parts = max(1, min(2, os.cpu_count() or 1, doms))
    deadline = time.monotonic() + budget
    samples, total = {}, 0
    for part, n in _in_parallel(_generate_part, lambda part: (
            spool, pattern, files[".m"], msgs, doms, pid, part, parts,
            deadline), parts):
        samples.update(part)
        total += n
    return samples, total


def _remove_part(spool, doms, part, parts):
    top = os.path.join(spool, "q")
    for i in range(part, doms, parts):
        shutil.rmtree(os.path.join(top, domain_name(i)), ignore_errors=True)
    return 0


def remove_generated(ctx, od, doms):
    """Cleanup: stops odmrd and removes the generated domains in parallel
    (the harness then removes the rest of its directory)."""
    if ctx.keep:
        return
    od.env.stop()
    t0 = time.monotonic()
    parts = max(1, min(2, os.cpu_count() or 1, doms))
    _in_parallel(_remove_part, lambda part: (od.env.spool, doms, part, parts),
                 parts)
    ctx.info("removed the big spool in %.1fs" % (time.monotonic() - t0))


def verify_sample(od, samples):
    """odmrctl queue DOMAIN lists exactly the ids generated for it, and the
    envelopes parse like the harness parses odmrd's own."""
    for dom, ids in samples.items():
        if not ids:                   # a spool cut short (ODMR_SCALE_BUDGET)
            continue
        r = od.env.odmrctl("queue", dom)
        out = r.stdout or ""
        if r.returncode != 0:
            raise BenchError("odmrctl queue %s exited %d: %s" % (
                dom, r.returncode, (r.stderr or out).strip()[:300]))
        listed = set(re.findall(r"\b[0-9A-F]{14,}\b", out))
        if listed != set(ids):
            raise BenchError("odmrctl queue %s lists %d of the %d generated "
                             "ids:\n%s" % (dom, len(listed & set(ids)),
                                           len(ids), out[:600]))
        for qid in ids[:2]:
            env = od.env.envelope(dom, qid)
            if env["id"] != qid or env["domain"] != dom:
                raise BenchError("generated envelope %s/%s reads back as %r"
                                 % (dom, qid, env))


# ---------------------------------------------------------------- odmrd
def master_ticks(pid):
    """(cutime + cstime) of the master in clock ticks."""
    f = bench_odmr._stat_fields(pid)
    if f is None:
        raise BenchError("odmrd (pid %d) is gone" % pid)
    return int(f[13]) + int(f[14])


def children_busy(pid):
    """{child pid: (state, utime+stime)} of the master's children."""
    out = {}
    for c in bench.proc_children(pid):
        f = bench_odmr._stat_fields(c)
        if f is not None:
            out[c] = (f[0], int(f[11]) + int(f[12]))
    return out


def wait_startup_pass(od):
    """After a start over a big spool: waits until the start-up
    maintenance child has been reaped (the master's cutime grows), or,
    should the pass take no measurable CPU, until every child has been
    asleep without using CPU for a second.  Returns the seconds waited."""
    t0 = time.monotonic()
    last, quiet_since = None, None
    while master_ticks(od.pid) == 0:
        now = time.monotonic()
        if now - t0 > MAINT_TIMEOUT:
            raise BenchError("the start-up maintenance pass did not end "
                             "within %ds" % MAINT_TIMEOUT)
        kids = children_busy(od.pid)
        idle = last is not None and all(
            st == "S" and last.get(c, (None, -1))[1] == cpu
            for c, (st, cpu) in kids.items())
        if not idle:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since > 1.0:
            break
        last = kids
        time.sleep(0.05)
    return time.monotonic() - t0


def time_maintenance(od):
    """SIGUSR1 -> the maintenance child is forked and runs; returns (wall
    seconds until it is gone, CPU seconds from the master's cutime), or
    (None, cpu) when the pass ended before it could be seen."""
    master = od.pid
    before = set(bench.proc_children(master))
    ticks0 = master_ticks(master)
    t0 = time.monotonic()
    os.kill(master, signal.SIGUSR1)
    child = None
    while child is None:
        new = set(bench.proc_children(master)) - before
        if new:
            child = min(new)
        elif time.monotonic() - t0 > 0.5:
            break
    if child is not None:
        while True:
            st = bench.postfix_instance._proc_stat(child)
            if st is None or st[3] == "Z":
                break
            if time.monotonic() - t0 > MAINT_TIMEOUT:
                raise BenchError("the maintenance pass did not end within "
                                 "%ds" % MAINT_TIMEOUT)
            time.sleep(0.001)
    wall = time.monotonic() - t0 if child is not None else None
    # the master reaps it a moment later
    deadline = time.monotonic() + 2
    while master_ticks(master) == ticks0 and time.monotonic() < deadline:
        time.sleep(0.005)
    return wall, (master_ticks(master) - ticks0) / bench_odmr.CLK_TCK


def clear_domain(od):
    """Removes the files of the inbound domain (not the big spool)."""
    d = od.domain_dir()
    for n in os.listdir(d) if os.path.isdir(d) else []:
        if not n.startswith("."):
            try:
                os.unlink(os.path.join(d, n))
            except FileNotFoundError:
                pass


def summary_sent(od, mark, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        m = None
        for m in SUMMARY_RE.finditer(od.env.log()[mark:]):
            pass
        if m or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def atrn_once(od, domain, n, min_size):
    """One ATRN by the Python customer; returns the seconds from sending
    ATRN to odmrd's QUIT.  Checks n messages arrived and odmrd says
    sent=n."""
    mark = len(od.env.log())
    c = login(od.env.odmr_port)
    r = bench_odmr.DrainResult()
    try:
        t0 = time.perf_counter()
        c.sock.sendall(b"ATRN " + domain.encode() + b"\r\n")
        code, lines = c.reply()
        if code != 250 or lines[0] != bench_odmr.REVERSING:
            raise BenchError("ATRN %s: %r" % (domain, lines))
        bench_odmr.serve_reversed(c.sock, c.buf, r, time.monotonic() + 60)
        t = time.perf_counter() - t0
    finally:
        c.close()
    if not r.quit or r.messages != n:
        raise BenchError("ATRN %s: %d messages received (expected %d), "
                         "QUIT %s" % (domain, r.messages, n,
                                      "seen" if r.quit else "missing"))
    if r.min_size < min_size:
        raise BenchError("ATRN %s: a message of %d bytes, expected at least %d"
                         % (domain, r.min_size, min_size))
    m = summary_sent(od, mark)
    if not m or int(m.group(3)) != n or int(m.group(4)) or int(m.group(5)):
        raise BenchError("ATRN %s: odmrd's summary says %s" % (
            domain, m.group(0) if m else "nothing"))
    return t


def inbound_once(ctx, od, n):
    """smtp-source -s 20, one message per connection; returns (msgs/s,
    odmrd CPU ms per message)."""
    clear_domain(od)
    cpu0, _ = quiet_cpu(od, settle=0.1)
    t = run_smtp_source(ctx, od.port, messages=n)
    got = wait_count(od.queued, n, timeout=10)
    if got != n:
        raise BenchError("inbound: %d messages queued, expected %d\n%s"
                         % (got, n, od.log_tail(5)))
    cpu1, _ = quiet_cpu(od, settle=0.1)
    clear_domain(od)
    return n / t, 1000 * (cpu1 - cpu0) / n


# ---------------------------------------------------------------- the row
def bench_scale(ctx):
    need("smtp-source")
    n_in = bench_drain.drain_messages(ctx) \
        if bench_drain.option_given("messages") else INBOUND_MESSAGES
    load0 = bench_drain.load_note()
    empty = Odmrd(ctx, domain=DOMAIN, user=USER)
    big = Odmrd(ctx, domain=DOMAIN, user=USER)
    msgs, doms, scaled = choose_size(ctx, big.env.dir)
    sample_domain = domain_name(0)
    try:
        big.env.add_domain(TEMPLATE_DOMAIN, USER)
        big.env.add_domain(sample_domain, USER)
    except big.harness.TestFailure as e:
        raise BenchError(str(e))
    empty.start()
    big.start()
    ctx.at_exit(lambda: remove_generated(ctx, big, doms))

    qid, files = take_template(ctx, big)
    t0 = time.monotonic()
    budget = env_int("ODMR_SCALE_BUDGET", GEN_BUDGET)
    samples, written = generate(big.env.spool, qid, files, msgs, doms,
                                big.pid, budget)
    t_gen = time.monotonic() - t0
    if written < msgs:
        scaled = ("%sgeneration stopped after %ds (ODMR_SCALE_BUDGET) at %d "
                  "of %d messages: the disk was slow" % (
                      scaled + "; " if scaled else "", budget, written, msgs))
        ctx.info(scaled)
        msgs = written
    t0 = time.monotonic()
    os.sync()
    t_sync = time.monotonic() - t0
    ctx.info("wrote %d messages in %d domains in %.1fs (%.0f/s), sync %.1fs"
             % (msgs, doms, t_gen, msgs / t_gen, t_sync))
    verify_sample(big, samples)

    # restart (both, alike): the start-up pass runs over the big spool,
    # and the periodic pass is five minutes away again
    big.env.stop()
    empty.env.stop()
    empty.start()
    t0 = time.monotonic()
    big.start()
    wait_startup_pass(big)
    t_startup = time.monotonic() - t0
    ctx.info("restarted over the big spool; start-up maintenance pass done "
             "%.2fs after the start (%s)" % (t_startup,
                                             bench_drain.load_note()))

    maint = {"empty": [], "big": []}
    maint_cpu = {"empty": [], "big": []}
    for _ in range(MAINT_PASSES):
        for side, od in (("empty", empty), ("big", big)):
            w, c = time_maintenance(od)
            maint[side].append(w)
            maint_cpu[side].append(c)
    ctx.info("maintenance passes: empty %s s, big %s s (CPU %s / %s s)" % (
        ["%.4f" % w if w is not None else "-" for w in maint["empty"]],
        ["%.3f" % w if w is not None else "-" for w in maint["big"]],
        ["%.2f" % c for c in maint_cpu["empty"]],
        ["%.2f" % c for c in maint_cpu["big"]]))

    lat = {"empty": [], "big": []}
    rate = {"empty": [], "big": []}
    cpu = {"empty": [], "big": []}
    for r in range(1, ctx.rounds + 1):
        order = (("empty", empty), ("big", big))
        if r % 2 == 0:
            order = order[::-1]
        mine = {"empty": [], "big": []}
        for _ in range(ATRN_PER_ROUND):
            for side, od in order:
                fill(ctx, od, ATRN_MESSAGES)
                mine[side].append(atrn_once(od, DOMAIN, ATRN_MESSAGES,
                                            ctx.size))
        for side, od in order:
            lat[side].extend(mine[side])
            v, c = inbound_once(ctx, od, n_in)
            rate[side].append(v)
            cpu[side].append(c)
            ctx.info("round %d %-5s: ATRN of %d msgs %s ms; inbound %.0f "
                     "msgs/s, odmrd CPU %.3f ms/msg  (%s)" % (
                         r, side, ATRN_MESSAGES,
                         " ".join("%.1f" % (1000 * x) for x in mine[side]),
                         v, c, bench_drain.load_note()))

    # the generated messages are deliverable like odmrd's own
    atrn_once(big, sample_domain, len(samples[sample_domain]), ctx.size)
    load1 = bench_drain.load_note()

    def k(x):
        return "%dk" % (x // 1000) if x >= 1000 else "%d" % x
    name = "scale-spool %s msgs/%s domains" % (k(msgs), k(doms))
    lm = {k: 1000 * statistics.median(v) for k, v in lat.items()}
    rm = {k: statistics.median(v) for k, v in rate.items()}
    cm = {k: statistics.median(v) for k, v in cpu.items()}
    big_w = [w for w in maint["big"] if w is not None]
    emp_w = [w for w in maint["empty"] if w is not None]
    loads = "%s at the start, %s at the end" % (load0, load1)
    return [
        Row(name, "ATRN drain of %d msgs, empty / big spool" % ATRN_MESSAGES,
            "%.2f / %.2f" % (lm["empty"], lm["big"]), "ms",
            "ATRN sent to odmrd's QUIT, Python customer; median of %d each "
            "(fastest %.2f / %.2f ms)" % (len(lat["big"]),
                                          1000 * min(lat["empty"]),
                                          1000 * min(lat["big"]))),
        Row(name, "ratio ATRN latency big/empty",
            "%.2f" % (lm["big"] / lm["empty"]), "x", "goal <= 1.2"),
        Row(name, "inbound, empty / big spool (smtp-source -s %d, %d msgs)"
            % (ctx.sessions, n_in), "%.0f / %.0f" % (rm["empty"], rm["big"]),
            "msgs/s", "rounds: %s / %s; odmrd CPU %.3f / %.3f ms/msg" % (
                ", ".join("%.0f" % x for x in rate["empty"]),
                ", ".join("%.0f" % x for x in rate["big"]),
                cm["empty"], cm["big"])),
        Row(name, "ratio inbound time big/empty",
            "%.2f" % (rm["empty"] / rm["big"]), "x",
            "goal <= 1.2 (time per message, so that higher is worse); "
            "per round: %s" % ", ".join(
                "%.2f" % (e / b) for e, b in zip(rate["empty"], rate["big"]))),
        Row(name, "maintenance pass over the big spool",
            "%.2f" % statistics.median(big_w) if big_w else "?", "s",
            "SIGUSR1 to the child's exit, median of %d (%s); CPU %.2f s; "
            "start-up pass (creates the .lock files) done %.1f s after the "
            "start; empty spool %s ms" % (
                len(big_w), ", ".join("%.2f" % w for w in big_w),
                statistics.median(maint_cpu["big"]), t_startup,
                "%.2f" % (1000 * statistics.median(emp_w)) if emp_w
                else "too short to see")),
        Row(name, "spool generation", "%.0f" % (msgs / t_gen), "msgs/s",
            "%d messages in %d domains in %.1f s, hard-linked data, then "
            "sync %.1f s%s; %s" % (msgs, doms, t_gen, t_sync,
                                   "; " + scaled if scaled else "", loads)),
    ]


BENCHMARKS = [
    ("scale-spool", bench_scale),
]
