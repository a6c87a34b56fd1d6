"""Crash safety (SPEC 3.4, 5): kill -9 of odmrd and its children at any
instant loses no message acknowledged with 250 and leaves no half-written
message in the queue; SIGTERM lets running transactions end."""

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

from harness import (SMTP, SMTPClosed, TestFailure, check, check_reply, fail,
                     need, queue_id_of, strip_received, dot_stuff, wait_for)


def setup(env, **conf):
    env.write_conf(max_connections_per_ip="200", max_connections="500",
                   **conf)
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    env.start()


class Sender(threading.Thread):
    """Sends messages with unique Message-IDs over consecutive connections
    (several per connection) and records which were acknowledged with 250
    (msgid -> (queue id, data)).  Stops when told, or after n messages."""

    def __init__(self, port, tag, n, stop):
        super().__init__(daemon=True)
        self.port, self.tag, self.n, self.stop = port, tag, n, stop
        self.acked = {}
        self.in_flight = set()
        self.refused = []
        self.errors = 0
        self.rng = random.Random(tag)

    def message(self, i):
        mid = "crash-%s-%d@src.test" % (self.tag, i)
        lines = [b"From: <c@src.test>", b"To: <u@example.org>",
                 b"Subject: crash test %s %d" % (self.tag.encode(), i),
                 b"Message-ID: <" + mid.encode() + b">", b""]
        for j in range(self.rng.randint(5, 120)):
            lines.append(b"%s line %d %s" % (mid.encode(), j,
                                              b"." * (j % 3)))
        lines.append(b".leading dot")
        lines.append(b"end of " + mid.encode())
        return mid, b"\r\n".join(lines) + b"\r\n"

    def run(self):
        i = 0
        while i < self.n and not self.stop.is_set():
            try:
                s = SMTP(port=self.port, timeout=10)
            except (OSError, TestFailure):
                self.errors += 1
                time.sleep(0.05)
                continue
            try:
                if s.greeting[0] != 220:
                    self.refused.append(s.greeting)
                    s.close()
                    time.sleep(0.05)
                    continue
                s.cmd("EHLO crash.client.test")
                for _ in range(self.rng.randint(1, 8)):
                    if i >= self.n or self.stop.is_set():
                        break
                    mid, data = self.message(i)
                    r = s.cmd("MAIL FROM:<c@src.test>")
                    if r[0] != 250:
                        self.refused.append(r)
                        break
                    r = s.cmd("RCPT TO:<u%d@example.org>" % (i % 7))
                    if r[0] != 250:
                        self.refused.append(r)
                        break
                    r = s.cmd("DATA")
                    if r[0] != 354:
                        self.refused.append(r)
                        break
                    self.in_flight.add(mid)
                    s.send_raw(dot_stuff(data) + b".\r\n")
                    r = s.reply()
                    if r[0] == 250:
                        self.acked[mid] = (queue_id_of(r[1]), data)
                        self.in_flight.discard(mid)
                    else:
                        self.refused.append(r)
                    i += 1
                s.quit()
            except (OSError, TestFailure):
                self.errors += 1
                s.close()
                time.sleep(0.02)


def scan_messages(env, domain):
    """{message-id: [(qid, data)]} of every committed message of domain,
    plus a count of messages without a Message-ID."""
    found, other = {}, 0
    for _, qid in env.queued(domain):
        try:
            data = env.message(domain, qid)
        except OSError:
            continue   # reported by spool_problems
        m = re.search(rb"\r\nMessage-I[Dd]: <([^>]*)>\r\n", data)
        if not m:
            other += 1
            continue
        found.setdefault(m.group(1).decode(), []).append((qid, data))
    return found, other


def check_spool_after_crash(env, acked, what):
    problems = env.spool_problems()
    check(not problems, "%s: broken queue entries: %s" % (what,
          "; ".join(problems[:10])))
    found, _ = scan_messages(env, "example.org")
    lost = [m for m in acked if m not in found]
    if lost:
        fail("%s: %d of %d acknowledged messages lost, e.g. %s (queue id %s)"
             % (what, len(lost), len(acked), lost[0], acked[lost[0]][0]))
    dups = [m for m in acked if len(found[m]) != 1]
    check(not dups, "%s: acknowledged messages queued more than once: %r"
          % (what, [(m, [q for q, _ in found[m]]) for m in dups[:5]]))
    for mid, (qid, data) in acked.items():
        got_qid, got = found[mid][0]
        check(got_qid == qid, "%s: %s acknowledged as %s but queued as %s"
              % (what, mid, qid, got_qid))
        check(strip_received(got) == data, "%s: %s (%s) data differs from "
              "what was sent" % (what, mid, qid))
        e = env.envelope("example.org", qid)
        check(e["sender"] == "c@src.test" and len(e["rcpts"]) == 1,
              "%s: envelope of %s: %r" % (what, qid, e))
    return found


def load_and_kill(env, tag, kill_after, nthreads=3):
    """Runs smtp-source and nthreads Senders, kill -9s odmrd and all its
    processes after kill_after seconds; returns (acked, smtp-source output)."""
    source = need("smtp-source")
    log_path = env.path("smtp-source-%s.log" % tag)
    log = open(log_path, "wb")
    src = env.spawn([source, "-c", "-s", "10", "-m", "2000", "-l", "2000",
                     "-f", "a@src.test", "-t", "u@example.org",
                     "127.0.0.1:%d" % env.smtp_port],
                    stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT)
    stop = threading.Event()
    senders = [Sender(env.smtp_port, "%s%d" % (tag, k), 100000, stop)
               for k in range(nthreads)]
    for s in senders:
        s.start()
    t0 = time.time()
    # at least kill_after seconds, and some acknowledged messages first
    while time.time() - t0 < kill_after or \
            sum(len(s.acked) for s in senders) < 5:
        if time.time() - t0 > 30:
            break
        if not env.running():
            fail("odmrd died under load; log:\n" + env.log_tail())
        time.sleep(0.05)
    env.kill9()
    killed_at = time.time()
    stop.set()
    for s in senders:
        s.join(20)
        check(not s.is_alive(), "sender thread hung")
    # smtp-source: it gives up on its own once the server is gone
    try:
        src.wait(15)
    except subprocess.TimeoutExpired:
        env._kill_tree(src.pid)
        src.wait()
    log.close()
    with open(log_path, "rb") as f:
        src_out = f.read().decode("utf-8", "replace")
    acked = {}
    for s in senders:
        acked.update(s.acked)
    env.info("%s: killed after %.1fs: %d messages acknowledged to our "
             "clients, %d in flight; %d committed in the spool" % (
                 tag, killed_at - t0, len(acked),
                 sum(len(s.in_flight) for s in senders), len(env.queued())))
    check(acked, "no message was acknowledged before the kill (%.1fs); "
          "refusals %r" % (killed_at - t0,
                           [r for s in senders for r in s.refused][:5]))
    refused = [r for s in senders for r in s.refused]
    check(not refused, "the server refused mail under load: %r" % refused[:5])
    return acked, src_out


def test_kill9_under_load(env):
    need("smtp-source")
    setup(env)
    all_acked = {}
    for rnd, kill_after in enumerate((1.0, 0.4 + random.random())):
        acked, src_out = load_and_kill(env, "r%d-" % rnd, kill_after)
        all_acked.update(acked)
        # right after the crash, before odmrd had a chance to clean up
        check_spool_after_crash(env, all_acked, "round %d, after kill -9"
                                % rnd)
        env.start()
        found = check_spool_after_crash(env, all_acked,
                                        "round %d, after restart" % rnd)
    # smtp-source's messages were really flowing in (it sends no Message-ID
    # we know; count messages from its sender)
    n_src = sum(1 for _, q in env.queued("example.org")
                if env.envelope("example.org", q)["sender"] == "a@src.test")
    check(n_src > 0, "no smtp-source message got queued; its output:\n"
          + src_out[-1000:])
    # the restarted daemon works
    env.send_mail("after@src.test", ["u@example.org"], "Subject: after\n\nx\n")


def test_kill9_mid_data(env):
    setup(env)
    s = env.smtp()
    check_reply(s.cmd("EHLO c.test"), 250)
    check_reply(s.cmd("MAIL FROM:<c@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<u@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("DATA"), 354)
    s.send_raw(b"Subject: half\r\n\r\n" + b"h" * 100000 + b"\r\n")
    time.sleep(0.5)
    env.kill9()
    check(s.expect_closed(5), "connection still open after kill -9")
    check(env.queued() == [], "half a message is queued: %r" % env.queued())
    env.start()
    check(env.queued() == [], "half a message is queued after restart: %r"
          % env.queued())
    check(not env.spool_problems(), "%r" % env.spool_problems())
    env.send_mail("c@src.test", ["u@example.org"], "Subject: ok\n\nok\n")
    check(len(env.queued()) == 1, "spool %r" % env.queued())


def test_sigterm_graceful(env):
    setup(env)
    s = env.smtp()
    check_reply(s.cmd("EHLO c.test"), 250)
    check_reply(s.cmd("MAIL FROM:<c@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<u@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("DATA"), 354)
    s.send_raw(b"Subject: term\r\n\r\nfirst half\r\n")
    env.daemon.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # no new sessions once stopping
    try:
        n = SMTP(port=env.smtp_port, timeout=3)
        got = n.greeting
        n.close()
    except (OSError, TestFailure):
        got = None
    check(got is None or got[0] != 220, "new session greeted with 220 after "
          "SIGTERM: %r" % (got,))
    s.send_raw(b"second half\r\n.\r\n")
    check_reply(s.reply(), 250, "2.0.0", "end of data after SIGTERM")
    # the session may end itself now (421) or wait for our QUIT
    try:
        r = s.cmd("QUIT")
        check(r[0] in (221, 421), "QUIT after SIGTERM: %r" % (r,))
    except (OSError, TestFailure):
        pass
    try:
        rc = env.daemon.wait(15)
    except subprocess.TimeoutExpired:
        fail("odmrd did not exit within 15s of SIGTERM")
    check(rc == 0, "odmrd exit status %r after SIGTERM" % rc)
    q = env.queued()
    check(len(q) == 1, "spool %r" % q)
    check(strip_received(env.message(*q[0])) ==
          b"Subject: term\r\n\r\nfirst half\r\nsecond half\r\n",
          "data differs")
