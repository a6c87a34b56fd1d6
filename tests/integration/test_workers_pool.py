"""odmrd's pool of session processes (server/workers.h): idle workers
beyond WORKER_MAX_IDLE are kept for a while instead of being retired the
moment their session ends, so a burst of sessions followed by another is
served by the same processes, without forking again."""

import os
import re
import socket
import time

from harness import SMTP, check, check_reply, descendants, wait_for

BURST = 40            # more than WORKER_MAX_IDLE (32)


def burst(env):
    """BURST ODMR sessions open at once, then all closed with QUIT."""
    held = [SMTP(port=env.odmr_port, source="127.0.7.%d" % (i + 1), timeout=15)
            for i in range(BURST)]
    for s in held:
        check_reply(s.cmd("QUIT"), 221)
        s.close()


def serving_pids(log):
    return set(re.findall(r"odmrd\[(\d+)\]: connect from ", log))


def idle_workers(env):
    return len(descendants(env.daemon.pid))


def test_idle_workers_kept_for_the_next_burst(env):
    env.write_conf(timeout="30s", max_connections_per_ip="100")
    env.start()
    burst(env)
    wait_for(lambda: env.log().count("disconnect from ") >= BURST,
             what="the first burst's session ends")
    first = serving_pids(env.log())
    check(len(first) == BURST, "%d processes served %d concurrent sessions"
          % (len(first), BURST))
    time.sleep(1.5)   # the master has handled every "done" by now
    check(idle_workers(env) >= BURST,
          "only %d workers left after the burst (idle ones retired at once)"
          % idle_workers(env))
    mark = len(env.log())
    burst(env)
    wait_for(lambda: env.log()[mark:].count("disconnect from ") >= BURST,
             what="the second burst's session ends")
    again = serving_pids(env.log()[mark:])
    check(again <= first, "the second burst forked %d new processes"
          % len(again - first))


def cpu_seconds(pid):
    """User plus system CPU time of one process (not its children)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_out_of_descriptors_does_not_spin(env):
    """accept4() failing with EMFILE leaves the connection in the backlog
    and the listener readable: the master must not spin on it (the
    listeners pause for a second), and it accepts again once it can
    (tests/shim/accept_shim.c makes accept4 fail while a file exists)."""
    flag = os.path.join(env.dir, "emfile")
    env.start(emfile=flag)
    open(flag, "w").close()
    s = socket.create_connection(("127.0.0.1", env.odmr_port), timeout=10)
    time.sleep(0.3)
    before = cpu_seconds(env.daemon.pid)
    time.sleep(3)
    used = cpu_seconds(env.daemon.pid) - before
    env.info("master CPU while accept fails: %.2f s in 3 s" % used)
    check(used < 0.5, "the master used %.2f s of CPU in 3 s while accept "
          "failed with EMFILE" % used)
    check("cannot accept connections" in env.log(), "no log line:\n%s"
          % env.log_tail())
    os.unlink(flag)
    s.settimeout(10)
    greeting = s.recv(512)
    check(greeting.startswith(b"220 "), "no greeting once accept works "
          "again: %r" % greeting)
    s.close()
