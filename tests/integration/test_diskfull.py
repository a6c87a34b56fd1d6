"""Disk full while receiving: 452 4.3.1 and nothing partial left behind.

The spool is a small tmpfs mounted for the test (the tests run as root, as
CI does); a mount that fails is a test failure, never a skip."""
import os
import subprocess

from harness import check, check_reply, fail, to_crlf

SPOOL_FS_SIZE = "1m"


class SmallSpool:
    """A tmpfs of SPOOL_FS_SIZE mounted on env.spool for the test."""

    def __init__(self, env):
        self.path = env.spool
        os.makedirs(self.path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o",
                            "size=%s,mode=0700" % SPOOL_FS_SIZE, "tmpfs",
                            self.path], capture_output=True, text=True)
        if r.returncode != 0:
            fail("cannot mount a small tmpfs for the spool (need root): %s"
                 % r.stderr.strip())

    def close(self):
        subprocess.run(["umount", "-l", self.path], capture_output=True)


def leftovers(spool):
    """Files in the spool other than lock files."""
    locks = (".lock", ".linger", "linger.slots")
    out = []
    for root, _, files in os.walk(spool):
        out += [os.path.join(root, f) for f in files if f not in locks]
    return out


def body_of(size):
    line = "x" * 76 + "\n"
    return "Subject: big\n\n" + line * (size // len(line))


def test_disk_full_smtp_and_enqueue(env):
    fs = SmallSpool(env)
    try:
        env.setup_accounts()
        env.start()
        # 1. a message bigger than the file system: 452 4.3.1, nothing left
        with env.smtp() as s:
            check_reply(s.greeting, 220, what="greeting")
            check_reply(s.cmd("EHLO client.test"), 250, what="EHLO")
            check_reply(s.cmd("MAIL FROM:<a@src.test>"), 250, what="MAIL")
            check_reply(s.cmd("RCPT TO:<u@example.org>"), 250, what="RCPT")
            r = s.data(to_crlf(body_of(2 * 1024 * 1024)))
            check_reply(r, 452, "4.3.1", "end of data on a full disk")
            # the session goes on: a small message still fits
            check_reply(s.cmd("MAIL FROM:<a@src.test>"), 250, what="MAIL 2")
            check_reply(s.cmd("RCPT TO:<u@example.org>"), 250, what="RCPT 2")
            check_reply(s.data(to_crlf("Subject: small\n\nhi\n")), 250, "2.0.0",
                        "small message after the failure")
            s.quit()
        queued = env.queued("example.org")
        check(len(queued) == 1, "expected only the small message queued, got %r"
              % queued)
        extra = [p for p in leftovers(env.spool)
                 if not p.endswith(tuple(queued[0][1] + x for x in (".e", ".m", ".q")))]
        check(not extra, "partial files left after a full disk: %r" % extra)
        check(not env.spool_problems(), "spool problems: %r" % env.spool_problems())

        # 2. odmrctl enqueue on a full disk: 75 (try again), nothing left
        r = env.odmrctl("enqueue", "-f", "a@src.test", "--", "u@example.org",
                        input=body_of(2 * 1024 * 1024))
        check(r.returncode == 75, "enqueue on a full disk: exit %d (%s), want 75"
              % (r.returncode, r.stderr.strip()))
        check(len(env.queued("example.org")) == 1,
              "enqueue on a full disk queued something")
        extra = [p for p in leftovers(env.spool)
                 if not p.endswith(tuple(queued[0][1] + x for x in (".e", ".m", ".q")))]
        check(not extra, "partial files left by enqueue: %r" % extra)
        env.stop()
    finally:
        try:
            env.stop()
        finally:
            fs.close()
