"""tests/bench_abuse.py - the "facing the internet" rows of `make bench`
(tests/bench.py lists BENCHMARKS).  Figures, not pass/fail tests: the
behaviour itself is tested in tests/integration/test_exposure.py.

  auth-guess-1addr  one address, 20 parallel connections (its per-address
                    limit), guesses alice's password with CRAM-MD5 for
                    GUESS_SECONDS, three guesses per connection, and gives
                    up waiting for an answer after ABANDON_MS (a delayed
                    535 tells a fast attacker "wrong" anyway).  The rate is
                    that of the passwords odmrd actually checked (its
                    "authentication failed" log lines), so abandoning does
                    not flatter it.  Defaults: auth_failure_limit 10 in
                    10 minutes.
  auth-guess-50addr 50 addresses, one connection each, guess the same
                    account; the same measure.  Meanwhile the customer logs
                    in every second from the address it used before the
                    attack: its success rate and latency.
  port25-flood      smtp_max_connections idle connections hold port 25
                    (from many addresses) while customers poll port 366
                    (connect, EHLO, AUTH, ATRN -> 453, QUIT): success rate
                    and latency, against the same polls without the flood
                    in the same run.

Only 127.0.0.0/8 is used; every process is started through the harness
Env and killed by pid at the end.  Python 3 standard library only.
"""

import socket
import statistics
import threading
import time

from bench import BenchError, Odmrd, Row
from bench_odmr import Conn, cram_md5_answer, login

USER, PASSWORD = "bench", "pw"     # what bench.Odmrd creates
DOMAIN = "example.org"
GUESS_SECONDS = 30
ABANDON_MS = 300


def guess_once(port, source, stop):
    """One connection, up to three wrong guesses; returns the number of
    guesses sent."""
    sent = 0
    try:
        c = Conn(port, timeout=10, source=source)
    except OSError:
        return 0
    try:
        if c.reply()[0] != 220 or c.cmd(b"EHLO attacker.test")[0] != 250:
            return 0
        for _ in range(3):
            if stop.is_set():
                break
            code, lines = c.cmd(b"AUTH CRAM-MD5")
            if code != 334:
                break                      # 454: blocked
            c.sock.settimeout(ABANDON_MS / 1000)
            c.sock.sendall(cram_md5_answer(lines[0], USER, "guess-%f" % time.time())
                           + b"\r\n")
            sent += 1
            try:
                if c.reply()[0] != 535:
                    break
            except (socket.timeout, OSError):
                break                      # no quick answer: "wrong" - move on
            c.sock.settimeout(10)
    except (OSError, ValueError, BenchError):
        pass
    finally:
        c.close()
    return sent


def attack(port, sources, per_source, seconds):
    stop = threading.Event()
    counts = []
    lock = threading.Lock()

    def worker(src):
        n = 0
        while not stop.is_set():
            got = guess_once(port, src, stop)
            n += got
            if got == 0:
                time.sleep(0.05)
        with lock:
            counts.append(n)

    threads = [threading.Thread(target=worker, args=(src,), daemon=True)
               for src in sources for _ in range(per_source)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(15)
    return sum(counts)


def checked(od, mark):
    """Passwords odmrd checked (and found wrong) since the log mark."""
    return sum(1 for l in od.env.log()[mark:].splitlines()
               if ": authentication failed" in l)


def bench_guess_one(ctx):
    od = Odmrd(ctx, domain=DOMAIN, user=USER)
    od.start()
    mark = len(od.env.log())
    sent = attack(od.env.odmr_port, ["127.0.8.1"], 20, GUESS_SECONDS)
    n = checked(od, mark)
    return [
        Row("auth-guess-1addr", "passwords checked for one address",
            "%.3f" % (n / GUESS_SECONDS), "guesses/s",
            "%d checked, %d sent in %ds by 20 connections; limit 10 per 10 min "
            "plus those under way when it is reached (before the failure "
            "table: ~3,700/s)" % (n, sent, GUESS_SECONDS)),
    ]


def customer_logins(od, source, stop, out):
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            c = Conn(od.env.odmr_port, timeout=10, source=source)
            c.reply()
            c.cmd(b"EHLO customer.test", 250)
            code, lines = c.cmd(b"AUTH CRAM-MD5", 334)
            c.cmd(cram_md5_answer(lines[0], USER, PASSWORD), 235)
            c.cmd(b"QUIT")
            c.close()
            out.append(time.perf_counter() - t0)
        except (OSError, BenchError, ValueError):
            out.append(None)
        stop.wait(1.0)


def bench_guess_many(ctx):
    od = Odmrd(ctx, domain=DOMAIN, user=USER)
    od.start()
    login(od.env.odmr_port).close()       # the customer, from 127.0.0.1
    mark = len(od.env.log())
    stop, lat = threading.Event(), []
    cust = threading.Thread(target=customer_logins,
                            args=(od, "127.0.0.1", stop, lat), daemon=True)
    cust.start()
    sources = ["127.0.9.%d" % (i + 1) for i in range(50)]
    sent = attack(od.env.odmr_port, sources, 1, GUESS_SECONDS)
    stop.set()
    cust.join(15)
    n = checked(od, mark)
    ok = [x for x in lat if x is not None]
    return [
        Row("auth-guess-50addr", "passwords checked for one account",
            "%.3f" % (n / GUESS_SECONDS), "guesses/s",
            "%d checked, %d sent in %ds from 50 addresses (goal: under 1/s)"
            % (n, sent, GUESS_SECONDS)),
        Row("auth-guess-50addr", "customer logins during the attack",
            "%d/%d" % (len(ok), len(lat)), "ok",
            "median %.1f ms, max %.1f ms, from its usual address"
            % (1000 * statistics.median(ok) if ok else 0,
               1000 * max(ok) if ok else 0)),
    ]


def polls(od, n):
    lat, failed = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            c = login(od.env.odmr_port)
            c.cmd(b"ATRN " + DOMAIN.encode(), 453)
            c.cmd(b"QUIT", 221)
            c.close()
            lat.append(time.perf_counter() - t0)
        except (OSError, BenchError, ValueError):
            failed += 1
    return lat, failed


def hold_port25(od, count):
    """count connections from many addresses (15 each) that read the
    greeting and stay; returns (held, refused with 421)."""
    held, refused = [], 0
    for i in range(count):
        try:
            s = socket.create_connection(
                ("127.0.0.1", od.env.smtp_port), timeout=10,
                source_address=("127.0.10.%d" % (1 + i // 15), 0))
            greeting = s.recv(512)
        except OSError:
            refused += 1
            continue
        if greeting.startswith(b"220"):
            held.append(s)
        else:
            refused += 1
            s.close()
    return held, refused


def bench_port25_flood(ctx):
    od = Odmrd(ctx, domain=DOMAIN, user=USER, max_connections="100",
               max_connections_per_ip="20")
    od.start()
    base, base_failed = polls(od, 100)
    budget = 60                             # 60% of max_connections
    held, refused = hold_port25(od, budget + 10)
    try:
        flood, flood_failed = polls(od, 100)
    finally:
        for s in held:
            s.close()
    if not base or not flood:
        raise BenchError("polls failed: %d without, %d with the flood"
                         % (base_failed, flood_failed))
    return [
        Row("port25-flood", "customer polls while port 25 is full",
            "%d/%d" % (len(flood), len(flood) + flood_failed), "ok",
            "%d SMTP connections held, %d more refused (smtp budget: 60%% of "
            "max_connections 100)" % (len(held), refused)),
        Row("port25-flood", "poll latency, flood / no flood",
            "%.1f / %.1f" % (1000 * statistics.median(flood),
                             1000 * statistics.median(base)), "ms",
            "medians of 100 polls each, same run; %d polls failed without "
            "the flood" % base_failed),
    ]


BENCHMARKS = [
    ("auth-guess-1addr", bench_guess_one),
    ("auth-guess-50addr", bench_guess_many),
    ("port25-flood", bench_port25_flood),
]
