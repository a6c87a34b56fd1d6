"""odmrd -f under systemd: stderr is the journal (JOURNAL_STREAM names
it), which syslog reaches too, so each line must be logged once, through
syslog (facility mail, with its priority), not a second time on stderr.

The syslog socket is a datagram socket of the test's, put on /dev/log in
a mount namespace of odmrd's own (unshare -m; the tests run as root, as
CI does): the machine's /dev is not touched."""
import os
import socket
import threading
import time

from harness import SMTP, check, check_reply, fail, need, wait_for

# Inside the namespace: a tmpfs on /dev with the few device nodes odmrd
# opens bound from the real one, and the test's socket as /dev/log.
NAMESPACE_SETUP = r'''
set -e
mount --make-rprivate /
mkdir -p "$T/hostdev"
mount --bind /dev "$T/hostdev"
mount -t tmpfs -o mode=0755 tmpfs /dev
for n in null zero random urandom; do
    : > "/dev/$n"
    mount --bind "$T/hostdev/$n" "/dev/$n"
done
: > /dev/log
mount --bind "$T/log.sock" /dev/log
exec "$@"
'''


class SyslogSink:
    """Collects the datagrams sent to a unix socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.lines, self.done = [], False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done:
            try:
                self.lines.append(self.sock.recv(65536).decode("utf-8",
                                                               "replace"))
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self):
        self.done = True
        self.thread.join(2)
        self.sock.close()


def run_odmrd(env, journal):
    """odmrd -f in its namespace, one SMTP session, then SIGTERM; returns
    (syslog datagrams, what odmrd wrote on stderr)."""
    unshare = need("unshare")
    t = env.path("ns")
    os.makedirs(t, exist_ok=True)
    sock_path = os.path.join(t, "log.sock")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    sink = SyslogSink(sock_path)
    err_path = env.path("stderr-%s" % ("journal" if journal else "file"))
    err = open(err_path, "wb")
    st = os.fstat(err.fileno())
    environ = dict(os.environ, T=t)
    environ.pop("JOURNAL_STREAM", None)
    if journal:
        environ["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
    p = env.spawn([unshare, "-m", "sh", "-c", NAMESPACE_SETUP, "sh",
                   env.odmrd_bin, "-f", "-c", env.conf_path],
                  stdin=open(os.devnull), stdout=err, stderr=err,
                  env=environ)
    try:
        deadline = time.time() + 10
        while True:
            if p.poll() is not None:
                with open(err_path) as f:
                    fail("odmrd in its namespace exited %s: %s" % (
                        p.returncode, f.read()[-1500:]))
            try:
                s = SMTP(env.smtp_port)
                break
            except OSError:
                if time.time() > deadline:
                    fail("odmrd in its namespace never listened")
                time.sleep(0.05)
        check_reply(s.cmd("EHLO client.test"), 250, what="EHLO")
        s.quit()
        wait_for(lambda: any("disconnect from" in l for l in sink.lines),
                 what="the session's end in syslog")
    finally:
        p.terminate()
        try:
            p.wait(10)
        except Exception:
            p.kill()
            p.wait(5)
        err.close()
        sink.close()
    with open(err_path, errors="replace") as f:
        return sink.lines, f.read()


def test_journal_gets_each_line_once(env):
    env.setup_accounts()
    lines, err = run_odmrd(env, journal=True)
    facilities = {int(l[1:l.index(">")]) >> 3 for l in lines
                  if l.startswith("<") and ">" in l[:5]}
    check(any("connect from" in l for l in lines) and facilities == {2},
          "syslog (facility mail) got %r" % lines[:5])
    check("connect from" not in err and "disconnect from" not in err,
          "stderr is the journal, yet odmrd wrote its lines there too: %r"
          % err[-800:])
    # stderr that is not the journal still gets every line
    lines, err = run_odmrd(env, journal=False)
    check("connect from" in err and "disconnect from" in err,
          "odmrd -f with a plain stderr: %r" % err[-800:])
    check(any("disconnect from" in l for l in lines), "syslog: %r" % lines)
