"""`make run` (tools/run-demo.sh): the demo provider.

The script is run as the Makefile runs it (`sh tools/run-demo.sh BUILD`,
from the top of the tree) with ODMR_WORKDIR in the test's directory and
free high loopback ports.  On success odmrd replaces the script's shell
(exec), so the pid the test started is odmrd's and SIGTERM to it stops the
demo; every process is also tracked by the harness and killed by pid.
"""

import os
import signal
import socket
import subprocess
import time

from harness import check, fail, free_port, wait_for

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
SCRIPT = os.path.join("tools", "run-demo.sh")
KINDS = (("smtp", "SMTP", "ODMR_SMTP_PORT"), ("lmtp", "LMTP", "ODMR_LMTP_PORT"),
         ("odmr", "ODMR", "ODMR_ODMR_PORT"))
WALK_THROUGH = "Send a message in"


def demo_env(workdir, ports):
    e = {k: v for k, v in os.environ.items() if not k.startswith("ODMR_")}
    e["ODMR_WORKDIR"] = workdir
    for kind, _, var in KINDS:
        e[var] = str(ports[kind])
    return e


def distinct_ports():
    ports = {}
    while len(set(ports.values())) < len(KINDS):
        ports = {kind: free_port() for kind, _, _ in KINDS}
    return ports


def processes_using(path):
    """[(pid, cmdline)] of live processes whose command line names path."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open("/proc/%s/stat" % name) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if path in cmd and state != "Z":
            out.append((int(name), cmd.strip()))
    return out


def run_demo(env, workdir, ports, timeout=60):
    """Runs the script to its end; (exit status, stdout, stderr)."""
    p = env.spawn(["sh", SCRIPT, env.build], cwd=TOP,
                  env=demo_env(workdir, ports), stdin=subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
        fail("run-demo.sh did not end within %ss although a port was taken "
             "(odmrd running? %r)" % (timeout, processes_using(workdir)))
    return p.returncode, out.decode("utf-8", "replace"), \
        err.decode("utf-8", "replace")


def test_demo_names_the_taken_port_and_starts_nothing(env):
    """Each of the three demo ports in turn is held by a listening socket
    on 127.0.0.1: the script must exit non-zero before the walk-through,
    say which listener's port is taken and which variable moves it (and
    not blame the free ones), create nothing and leave no odmrd."""
    for kind, what, var in KINDS:
        ports = distinct_ports()
        workdir = env.path("work-" + kind)
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            busy.bind(("127.0.0.1", ports[kind]))
            busy.listen(1)
            rc, out, err = run_demo(env, workdir, ports)
        finally:
            busy.close()
        said = out + err
        left = processes_using(workdir)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
        check(not left, "%s port taken: processes left running: %r"
              % (what, left))
        check(rc != 0, "%s port %d taken, run-demo.sh exited 0:\n%s"
              % (what, ports[kind], said))
        check(WALK_THROUGH not in out, "%s port %d taken, yet the "
              "walk-through was printed:\n%s" % (what, ports[kind], said))
        lines = [l for l in err.splitlines() if var in l]
        check(len(lines) == 1 and "127.0.0.1:%d" % ports[kind] in lines[0]
              and what in lines[0] and "in use" in lines[0],
              "%s port %d taken: stderr does not name the port, the listener "
              "and %s on one line:\n%s" % (what, ports[kind], var, said))
        for _, _, other in KINDS:
            check(other == var or other not in said, "%s port taken, but "
                  "the message names %s too:\n%s" % (what, other, said))
        check("nothing started" in err, "no 'nothing started':\n%s" % said)
        if os.path.exists(workdir):
            fail("%s port taken, yet %s was created: %r"
                 % (what, workdir, os.listdir(workdir)))


def test_demo_runs_with_free_ports(env):
    """With free ports the check lets the demo start: walk-through with the
    chosen ports, odmrd (the script's own pid, exec) accepting on all three
    listeners; SIGTERM to that pid stops it and nothing is left."""
    ports = distinct_ports()
    workdir = env.path("work")
    out_path, err_path = env.path("demo.out"), env.path("demo.err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = env.spawn(["sh", SCRIPT, env.build], cwd=TOP,
                      env=demo_env(workdir, ports), stdin=subprocess.DEVNULL,
                      stdout=out, stderr=err)

    def said():
        with open(out_path) as o, open(err_path) as e:
            return o.read() + e.read()

    def accepting():
        if p.poll() is not None:
            fail("run-demo.sh exited %d with free ports:\n%s"
                 % (p.returncode, said()))
        for port in ports.values():
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
            except OSError:
                return False
        return True
    try:
        wait_for(accepting, 30, interval=0.1,
                 what="the demo's three listeners")
        text = said()
        check(WALK_THROUGH in text and "127.0.0.1:%d" % ports["smtp"] in text
              and "127.0.0.1:%d" % ports["odmr"] in text
              and "LMTP 127.0.0.1:%d" % ports["lmtp"] in text,
              "walk-through without the chosen ports:\n%s" % text)
        check("make run:" not in text, "port complaint with free ports:\n%s"
              % text)
        with open("/proc/%d/cmdline" % p.pid, "rb") as f:
            cmd = f.read().split(b"\0")
        check(os.path.basename(cmd[0]) == b"odmrd", "pid %d is %r, not the "
              "exec'ed odmrd" % (p.pid, cmd))
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
    end = time.time() + 5
    while processes_using(workdir) and time.time() < end:
        time.sleep(0.05)
    check(not processes_using(workdir), "left after SIGTERM: %r"
          % processes_using(workdir))
