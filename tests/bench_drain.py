"""tests/bench_drain.py - the drain against Postfix's flush (issue 12 goal 1);
tests/bench.py imports this module and lists its benchmarks in BENCHMARKS.

  drain-vs-postfix  M messages of 5 KB (2,000 unless --messages is given;
                 --size) for one domain are drained into one and the same
                 Postfix smtp-sink, per round once by each of two paths,
                 alternating:
                   odmrd      the messages are queued in odmrd (smtp-source
                              -d into its inbound listener, counted as .q
                              files), then odmr-fetch does one ATRN and
                              relays them to the sink (the odmr-drain
                              machinery of tests/bench_odmr.py).  Timed from
                              odmr-fetch's start to its exit; the spool must
                              be empty, the sink must have counted M more
                              messages and odmrd's summary must say sent=M.
                   postfix    a private Postfix instance (own configuration
                              and queue directory, smtpd on a free loopback
                              port) holds the messages with defer_transports
                              = smtp; a transport map sends the domain to
                              smtp:[127.0.0.1]:SINKPORT (default concurrency:
                              20 connections to the destination).  The
                              messages are injected with smtp-source and
                              wait in deferred/ before the clock starts.
                              Timed from `postqueue -c DIR -f` until the
                              queue directories hold no message; the sink
                              must have counted M more messages.
                 Postfix never uses DNS here: smtp_host_lookup = native,
                 disable_dns_lookups = yes / smtp_dns_support_level =
                 disabled and the next hop is a bracketed address literal.
                 Reports msgs/s of both (median of the rounds), the ratio
                 odmrd/Postfix (goal: at least 2), the load average, and
                 the CPU time per message of odmrd (its master and session
                 processes, read while quiet) and of odmr-fetch.

Needs smtp-source, smtp-sink, postfix (root).  Only 127.0.0.1 is used;
every process is stopped by pid (odmrd and the sink through the harness
Env, Postfix with `postfix -c DIR stop` and then by pid).

Python 3 standard library only.
"""

import os
import statistics
import sys
import time

import bench
from bench import BenchError, Odmrd, Row, need, run_smtp_source, wait_count
import bench_odmr
from bench_odmr import (DOMAIN, USER, SmtpSink, check_drained, fill,
                        odmr_fetch_customer, quiet_cpu)
from postfix_instance import PostfixInstance

DRAIN_MESSAGES = 2000        # unless --messages is given
FLUSH_TIMEOUT = 300          # seconds for one Postfix flush
POLL = 0.01                  # queue polling period while Postfix flushes


def option_given(name):
    """True when --NAME was on the command line (bench.py's defaults are
    meant for other rows)."""
    flag = "--" + name
    return any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:])


def drain_messages(ctx):
    return ctx.messages if option_given("messages") else DRAIN_MESSAGES


def load_note():
    return "load average %s" % " ".join("%.2f" % x for x in os.getloadavg())


class FlushPostfix:
    """A Postfix instance that defers everything for DOMAIN until a flush
    and then delivers it to 127.0.0.1:sink_port."""

    def __init__(self, ctx, sink_port):
        self.ctx = ctx
        self.pf = PostfixInstance(
            mode="defer", name="bench-flush", keep=ctx.keep,
            domains=(DOMAIN,),
            main_extra={
                # the domain goes to the sink; nothing leaves the machine
                "transport_maps": "texthash:$config_directory/transport",
                "smtp_host_lookup": "native",
                "disable_dns_lookups": "yes",
                "smtp_dns_support_level": "disabled",
                # no retries of their own while the row waits
                "queue_run_delay": "3600s",
                "minimal_backoff_time": "3600s",
                "maximal_backoff_time": "3600s",
                "smtp_connect_timeout": "10s",
            })
        ctx.at_exit(self.pf.cleanup)
        with open(os.path.join(self.pf.config_dir, "transport"), "w") as f:
            f.write("%s smtp:[127.0.0.1]:%d\n" % (DOMAIN, sink_port))
        self.pf.start()
        for w in self.pf.check_warnings:
            ctx.info("postfix check: " + w)
        self.pf.clear_queue()

    def inject(self, n):
        """n messages through smtpd, then waits until all of them wait in
        deferred/ (the queue manager has tried and deferred them)."""
        if self.pf.queued():
            raise BenchError("postfix queue not empty before injecting: %r"
                             % self.pf.queue_counts())
        t = run_smtp_source(self.ctx, self.pf.port, rcpt="user@" + DOMAIN,
                            extra=["-d"], messages=n)
        got = self.pf.wait_queued(n, timeout=60, queue="deferred")
        if got != n:
            raise BenchError("postfix: %d messages deferred, expected %d (%r)"
                             "\n%s" % (got, n, self.pf.queue_counts(),
                                       self.pf.log_tail(10)))
        return t

    def flush(self, n):
        """postqueue -f; returns the seconds until the queue is empty."""
        t0 = time.monotonic()
        self.pf.flush()
        deadline = t0 + FLUSH_TIMEOUT
        while self.pf.queued():
            if time.monotonic() > deadline:
                raise BenchError("postfix: queue not empty %ds after "
                                 "postqueue -f: %r\n%s" % (
                                     FLUSH_TIMEOUT, self.pf.queue_counts(),
                                     self.pf.log_tail(10)))
            time.sleep(POLL)
        return time.monotonic() - t0


def bench_drain_vs_postfix(ctx):
    need("smtp-source")
    need("smtp-sink")
    need("postfix")
    n = drain_messages(ctx)
    name = "drain-vs-postfix %dx%dB" % (n, ctx.size)
    load0 = load_note()
    od = Odmrd(ctx, domain=DOMAIN, user=USER)
    od.start()
    # one sink for both paths; its mesg= counter is cumulative
    sink = SmtpSink(od, "drain-vs-postfix")
    ctx.at_exit(sink.stop)
    pf = FlushPostfix(ctx, sink.port)

    rates = {"odmrd": [], "postfix": []}
    cpu = {"odmrd": [], "odmr-fetch": []}   # ms per message
    limit = max(bench_odmr.DRAIN_TIMEOUT, bench_odmr.DRAIN_PER_MESSAGE * n)
    for r in range(1, ctx.rounds + 1):
        # (a) odmrd -> odmr-fetch -> smtp-sink, one ATRN
        fill(ctx, od, n, check_spool=(r == 1))
        base = sink.messages()
        mark = len(od.env.log())
        od_cpu0 = quiet_cpu(od)[0]
        t_start, t_end, fetch_cpu = odmr_fetch_customer(
            ctx, od, sink, time.monotonic() + limit)
        t = t_end - t_start
        got = wait_count(lambda: sink.messages() - base, n, timeout=10)
        if got != n:
            raise BenchError("odmrd round %d: the sink counted %d messages, "
                             "expected %d" % (r, got, n))
        check_drained(od, n, mark, "odmrd round %d" % r)
        cpu["odmrd"].append((quiet_cpu(od)[0] - od_cpu0) * 1000 / n)
        cpu["odmr-fetch"].append(fetch_cpu * 1000 / n)
        rates["odmrd"].append(n / t)
        ctx.info("round %d odmrd  : %6.2fs %8.1f msgs/s, CPU per message "
                 "odmrd %.3f ms, odmr-fetch %.3f ms  (%s)"
                 % (r, t, n / t, cpu["odmrd"][-1], cpu["odmr-fetch"][-1],
                    load_note()))
        # (b) Postfix deferred queue, postqueue -f -> smtp-sink
        pf.inject(n)
        base = sink.messages()
        t = pf.flush(n)
        got = wait_count(lambda: sink.messages() - base, n, timeout=10)
        if got != n:
            raise BenchError("postfix round %d: the sink counted %d messages, "
                             "expected %d\n%s" % (r, got, n,
                                                  pf.pf.log_tail(10)))
        rates["postfix"].append(n / t)
        ctx.info("round %d postfix: %6.2fs %8.1f msgs/s  (%s)"
                 % (r, t, n / t, load_note()))

    med = {k: statistics.median(v) for k, v in rates.items()}

    def rounds_note(v):
        return "median of %d rounds: %s" % (len(v), ", ".join("%.0f" % x
                                                               for x in v))

    load1 = load_note()
    cpu_rows = [Row(name, "CPU per message drained, %s" % who,
                    "%.3f" % statistics.median(v), "ms",
                    "median of %d rounds: %s" % (len(v), ", ".join(
                        "%.3f" % x for x in v)))
                for who, v in cpu.items()]
    return cpu_rows + [
        Row(name, "odmrd -> odmr-fetch -> smtp-sink (one ATRN)",
            "%.1f" % med["odmrd"], "msgs/s",
            "%s; odmr-fetch start to exit" % rounds_note(rates["odmrd"])),
        Row(name, "postfix %s deferred, postqueue -f -> smtp-sink"
            % bench.postfix_version(), "%.1f" % med["postfix"], "msgs/s",
            "%s; postqueue -f until the queue is empty, 20 connections"
            % rounds_note(rates["postfix"])),
        Row(name, "ratio odmrd/postfix", "%.2f" % (med["odmrd"] /
                                                   med["postfix"]), "x",
            "same sink, alternating rounds (per round: %s); goal >= 2; %s "
            "at the start, %s at the end" % (
                ", ".join("%.2f" % (o / p) for o, p in
                          zip(rates["odmrd"], rates["postfix"])),
                load0, load1)),
    ]


BENCHMARKS = [
    ("drain-vs-postfix", bench_drain_vs_postfix),
]
