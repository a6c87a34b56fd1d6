"""odmrd's pool of session processes (server/workers.h): idle workers
beyond WORKER_MAX_IDLE are kept for a while instead of being retired the
moment their session ends, so a burst of sessions followed by another is
served by the same processes, without forking again."""

import re
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
