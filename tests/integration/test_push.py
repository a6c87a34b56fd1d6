"""Push delivery (XLINGER; server/linger.h, docs/admin-guide.md "Push
delivery"): a customer that asks stays connected after the reversal and
gets new mail as soon as it is committed, with NOOPs while idle; the
session ends at its time, on a stop or reload, or when the customer goes;
expiry, bounce and delete still work on a lingering domain; customers
without XLINGER see exactly the old dialogue."""

import os
import random
import signal
import statistics
import subprocess
import threading
import time

from harness import (SMTP, check, check_reply, fail, need, to_crlf, wait_for)
from sink import Sink
from test_odmr import cram_md5

EX_OK = 0


def fetch_argv(env, user="alice", linger=60, deliver=None, verbose="-vv",
               timeout=20):
    argv = [env.fetch_bin, "-s", "127.0.0.1:%d" % env.odmr_port, "-u", user,
            "--timeout", str(timeout), "--tls", "off",
            "--lock", env.path("fetch-%s.lock" % user)]
    if linger is not None:
        argv += ["--linger", str(linger)]
    if deliver:
        argv += ["--deliver", deliver]
    if verbose:
        argv.append(verbose)
    return argv


def fetch_env(password):
    e = dict(os.environ)
    e["ODMR_PASSWORD"] = password
    return e


class Pusher:
    """A lingering odmr-fetch in the background; stderr kept in a file."""

    def __init__(self, env, user="alice", password="secret", **kw):
        self.err_path = env.path("fetch-%s-%d.err" % (user, time.time_ns()))
        self.err = open(self.err_path, "wb")
        self.p = env.spawn(fetch_argv(env, user=user, **kw),
                           stdout=subprocess.DEVNULL, stderr=self.err,
                           env=fetch_env(password))

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            fail("odmr-fetch still running after %ss; stderr:\n%s"
                 % (timeout, self.stderr()[-2000:]))


def lingering(env, n=1):
    return env.log().count("lingering for up to") >= n


def wait_lingering(env, n=1):
    wait_for(lambda: lingering(env, n), timeout=20,
             what="%d lingering session(s) in odmrd's log" % n)


def maildir_new(root, domain, user):
    d = os.path.join(root, domain, user, "new")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def send(env, rcpt, body, sender="s@remote.test"):
    with env.smtp() as s:
        check_reply(s.greeting, 220, what="greeting")
        check_reply(s.cmd("EHLO client.test"), 250, what="EHLO")
        check_reply(s.cmd("MAIL FROM:<%s>" % sender), 250, what="MAIL")
        check_reply(s.cmd("RCPT TO:<%s>" % rcpt), 250, what="RCPT")
        check_reply(s.data(to_crlf(body)), 250, what="end of data")
        s.quit()


def make_maildirs(env):
    root = env.path("maildir")
    for dom, user in (("example.org", "u1"), ("example.org", "u2"),
                      ("example.com", "u3"), ("example.net", "u1")):
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, dom, user, sub), exist_ok=True)
    return root


def push_env(env, **conf):
    make_maildirs(env)
    env.setup_accounts()
    settings = {"odmr_linger_noop": "5s"}
    settings.update(conf)
    env.write_conf(**settings)
    env.start()


def push_one(env, root, body):
    """A lingering odmr-fetch for alice, and one message pushed to it
    (u1@example.org, the first in that Maildir)."""
    a = Pusher(env, linger=60, deliver="maildir:%s/%%d/%%u" % root)
    wait_lingering(env)
    send(env, "u1@example.org", body)
    wait_for(lambda: len(maildir_new(root, "example.org", "u1")) == 1,
             timeout=20, what="the first pushed message")
    return a


def linger_holder(env, domain):
    """pid holding the domain's .linger lock (from /proc/locks)."""
    ino = os.stat(os.path.join(env.queue_dir(domain), ".linger")).st_ino
    with open("/proc/locks") as f:
        for line in f:
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and \
                    parts[5].endswith(":%d" % ino):
                return int(parts[4])
    return None


# --------------------------------------------------------------------------

class MaildirWatch(threading.Thread):
    """Notes when each file first appears in a Maildir's new/ (10 ms)."""

    def __init__(self, root, domain, user):
        super().__init__(daemon=True)
        self.args3 = (root, domain, user)
        self.seen = {}
        self.stop = False

    def run(self):
        while not self.stop:
            now = time.monotonic()
            for name in maildir_new(*self.args3):
                self.seen.setdefault(name, now)
            time.sleep(0.01)


def _seq_of(path):
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"X-Seq: "):
                return int(line.split()[1])
            if line in (b"\r\n", b"\n"):
                return None
    return None


def test_push_latency_50_messages(env):
    """50 messages sent by swaks at irregular intervals over about 30 s to
    a lingering odmr-fetch delivering into a Maildir: each appears in new/
    about as soon as the sender has its 250."""
    swaks = need("swaks")
    push_env(env)
    root = env.path("maildir")
    p = Pusher(env, linger=120, deliver="maildir:%s/%%d/%%u" % root,
               verbose="-v")
    wait_lingering(env)
    watch = MaildirWatch(root, "example.org", "u1")
    watch.start()
    sent_at = {}
    rnd = random.Random(2645)
    try:
        for i in range(50):
            r = subprocess.run(
                [swaks, "--server", "127.0.0.1", "--port", str(env.smtp_port),
                 "--from", "s@remote.test", "--to", "u1@example.org",
                 "--header", "X-Seq: %d" % i, "--body", "push %d" % i,
                 "--silent", "2"], capture_output=True, timeout=30)
            sent_at[i] = time.monotonic()
            check(r.returncode == 0, "swaks %d failed: %s" % (i, r.stderr[-300:]))
            time.sleep(rnd.uniform(0.05, 1.1))
        wait_for(lambda: len(watch.seen) >= 50, timeout=20,
                 what="50 messages in the Maildir")
    finally:
        watch.stop = True
        watch.join()
    d = os.path.join(root, "example.org", "u1", "new")
    lat = []
    for name, t in watch.seen.items():
        seq = _seq_of(os.path.join(d, name))
        check(seq in sent_at, "unexpected file %s (X-Seq %r)" % (name, seq))
        lat.append(max(0.0, t - sent_at[seq]))
    check(len(lat) == 50, "%d files" % len(lat))
    med, worst = statistics.median(lat), max(lat)
    env.info("push latency over 50 messages: median %.3f s, max %.3f s "
             "(load %.2f)" % (med, worst, os.getloadavg()[0]))
    check(med < 1.0, "median latency %.3f s (want < 1 s)" % med)
    check(worst < 5.0, "max latency %.3f s" % worst)
    check(env.queued("example.org") == [], "mail left queued")
    os.kill(p.p.pid, signal.SIGTERM)
    p.wait(20)
    err = p.stderr()
    check(err.count("odmr-fetch: received message from <s@remote.test>") == 50,
          "-v: one line per pushed message:\n%s" % err[-1500:])


def test_push_noop_keepalive_and_end(env):
    """Idle: a NOOP every odmr_linger_noop; at the customer's time the
    session ends with QUIT and odmr-fetch exits 0 with its summary."""
    push_env(env, odmr_linger_noop="1s")
    root = env.path("maildir")
    t0 = time.monotonic()
    p = Pusher(env, linger=4, deliver="maildir:%s/%%d/%%u" % root)
    rc = p.wait(30)
    took = time.monotonic() - t0
    err = p.stderr()
    check(rc == EX_OK, "exit %s:\n%s" % (rc, err[-2000:]))
    check(err.count("NOOP") >= 2, "no NOOP keepalives seen:\n%s" % err[-2000:])
    check("QUIT" in err, "no QUIT:\n%s" % err[-1500:])
    check(3.5 <= took < 20, "linger of 4 s took %.1f s" % took)
    log = env.log()
    check("linger ended: linger time is up" in log, log[-1500:])
    check("XLINGER 4" in err, "XLINGER not advertised:\n%s" % err[:1500])


def test_push_without_mail_and_old_customers(env):
    """With nothing queued, ATRN still gets 453 for a customer that did not
    ask to linger (the RFC 2645 dialogue is unchanged); one that asked gets
    the reversal.  odmrd offers XLINGER in its EHLO reply."""
    push_env(env)
    with SMTP(env.odmr_port) as s:
        check_reply(s.greeting, 220)
        _, text = s.cmd("EHLO site.test")
        check("XLINGER 3600" in text, "EHLO reply: %r" % text)
        check_reply(s.cmd("XLINGER 30"), 530, what="XLINGER before AUTH")
        check_reply(cram_md5(s, "alice", "secret"), 235, what="AUTH")
        check_reply(s.cmd("XLINGER soon"), 501, what="bad XLINGER")
        check_reply(s.cmd("ATRN"), 453, what="ATRN without XLINGER")
        check_reply(s.cmd("XLINGER 30"), 250, what="XLINGER")
        check_reply(s.cmd("ATRN example.org"), 250, what="ATRN after XLINGER")
        # now odmrd is the client: it greets nothing, we greet it
        s.send("220 site.test ESMTP")
        line = s.readline().decode().strip()
        check(line.startswith("EHLO "), "expected EHLO, got %r" % line)
        s.send("250-site.test")
        s.send("250 PIPELINING")   # no XLINGER: odmrd must QUIT at once
        line = s.readline().decode().strip()
        check(line == "QUIT", "expected QUIT, got %r" % line)
        s.send("221 bye")
    env.write_conf(odmr_linger_max="0")
    env.restart()
    with SMTP(env.odmr_port) as s:
        check("XLINGER" not in s.cmd("EHLO site.test")[1], "offered while off")
        check_reply(s.cmd("XLINGER 30"), 502, what="XLINGER while off")


def test_repeated_atrn_and_xlinger_are_junk(env):
    """An ATRN answered 453 and a repeated XLINGER move no mail: like NOOP
    they end the session after 100, so a client cannot hold a connection
    and a linger slot for ever by repeating them."""
    push_env(env)
    with SMTP(env.odmr_port) as s:
        s.cmd("EHLO site.test")
        check_reply(cram_md5(s, "alice", "secret"), 235, what="AUTH")
        for i in range(10):   # 453s also count as refused commands (20)
            check_reply(s.cmd("ATRN"), 453, what="ATRN %d" % (i + 1))
        for i in range(89):
            check_reply(s.cmd("XLINGER 30"), 250, what="XLINGER %d" % (i + 1))
        check_reply(s.cmd("XLINGER 30"), 421, "4.7.0", "the 101st")
    check("on the ODMR port also ATRN/XLINGER" in env.log(),
          "no log line:\n%s" % env.log_tail())


def odmrd_inotify_instances(env):
    """inotify instances open in odmrd's processes (master and workers)."""
    pids = [env.daemon.pid]
    for d in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % d) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pids[0]:
                    pids.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    n = 0
    for pid in pids:
        fds = "/proc/%d/fd" % pid
        try:
            for fd in os.listdir(fds):
                try:
                    n += os.readlink(os.path.join(fds, fd)) == \
                        "anon_inode:inotify"
                except OSError:
                    pass
        except OSError:
            pass
    return n


def test_unused_linger_slot_gives_back_its_inotify_instance(env):
    """XLINGER reserves an inotify instance with its slot; a session that
    never reverses must give it back: workers serve many sessions, and each
    keeping one would use up the user's instances with nobody lingering."""
    push_env(env)
    for i in range(4):
        with SMTP(env.odmr_port) as s:
            s.cmd("EHLO site.test")
            check_reply(cram_md5(s, "alice", "secret"), 235, what="AUTH")
            check_reply(s.cmd("XLINGER 30"), 250, what="XLINGER %d" % i)
            check_reply(s.cmd("QUIT"), 221, what="QUIT")
    # the last session ends after its 221: give it up to 5 s
    deadline = time.monotonic() + 5
    n = odmrd_inotify_instances(env)
    while n and time.monotonic() < deadline:
        time.sleep(0.05)
        n = odmrd_inotify_instances(env)
    check(n == 0, "%d inotify instance(s) held by odmrd after four sessions "
                  "that did not linger" % n)


def test_push_stops_when_the_domain_changes_hands(env):
    """A domain moved to another account while its old owner lingers:
    the next pass asks the database again, as ATRN did, and ends the
    linger instead of pushing the new owner's mail to the old one."""
    push_env(env)
    root = env.path("maildir")
    a = Pusher(env, linger=60, deliver="maildir:%s/%%d/%%u" % root)
    wait_lingering(env)
    env.odmrctl_ok("domain", "del", "example.org")
    env.odmrctl_ok("domain", "add", "example.org", "bob")
    send(env, "u1@example.org", b"Subject: for bob now\r\n\r\nx\r\n")
    rc = a.wait(20)
    check(rc == EX_OK, "exit %s:\n%s" % (rc, a.stderr()[-1500:]))
    check("example.org is no longer a domain of the account" in env.log(),
          env.log_tail())
    check(maildir_new(root, "example.org", "u1") == [],
          "bob's mail was pushed to alice")
    check(len(env.queued_ids("example.org")) == 1,
          "queue: %r" % env.queued())


def test_push_max_lingering(env):
    """odmr_max_lingering reached: the next customer is served and QUITs
    as usual (and is told why); a second ATRN for a lingering domain gets
    451."""
    push_env(env, odmr_max_lingering="1")
    root = env.path("maildir")
    a = Pusher(env, linger=60, deliver="maildir:%s/%%d/%%u" % root)
    wait_lingering(env)
    send(env, "u3@example.com", "Subject: b\n\nfor bob\n")
    r = subprocess.run(fetch_argv(env, user="bob", linger=60,
                                  deliver="maildir:%s/%%d/%%u" % root),
                       capture_output=True, text=True, timeout=60,
                       env=fetch_env("bobpw"))
    check(r.returncode == EX_OK, "bob: exit %d\n%s" % (r.returncode, r.stderr))
    check("push delivery refused" in r.stderr and "451" in r.stderr,
          r.stderr[-1500:])
    check(len(maildir_new(root, "example.com", "u3")) == 1, "bob's mail")
    check("odmr_max_lingering (1)" in env.log(), env.log_tail())
    # alice lingers on example.org and example.net: a second session of
    # hers finds them taken (mail must be queued to get past 453)
    os.kill(a.p.pid, signal.SIGSTOP)   # so the pushed mail stays queued
    try:
        send(env, "u1@example.org", "Subject: a\n\nqueued\n")
        with SMTP(env.odmr_port) as s:
            s.cmd("EHLO site.test")
            check_reply(cram_md5(s, "alice", "secret"), 235, what="AUTH")
            check_reply(s.cmd("ATRN example.org"), 451, what="second ATRN")
    finally:
        os.kill(a.p.pid, signal.SIGCONT)
    wait_for(lambda: len(maildir_new(root, "example.org", "u1")) == 1,
             timeout=20, what="the message pushed after SIGCONT")
    os.kill(a.p.pid, signal.SIGTERM)
    a.wait(20)


def test_push_kill9_fetch_and_session(env):
    """kill -9 of odmr-fetch, then of odmrd's session process, while
    lingering: the locks are free at once and the next session gets
    everything not delivered."""
    push_env(env)
    root = env.path("maildir")
    a = push_one(env, root, "X-Seq: 1\n\none\n")
    os.kill(a.p.pid, signal.SIGKILL)
    a.wait(10)
    # odmrd's session sees the connection close and lets go of the domains
    # at once (a busy machine may take a moment to schedule it)
    t0 = time.monotonic()
    wait_for(lambda: "account=alice, messages=1, sent=1" in env.log(),
             timeout=5, what="the session to end after kill -9 of odmr-fetch")
    check("linger ended: customer closed the connection" in env.log(),
          env.log_tail())
    env.info("session ended %.3f s after kill -9 of odmr-fetch"
             % (time.monotonic() - t0))
    send(env, "u1@example.org", "X-Seq: 2\n\ntwo\n")
    b = Pusher(env, linger=60, deliver="maildir:%s/%%d/%%u" % root)
    wait_lingering(env, 2)
    wait_for(lambda: len(maildir_new(root, "example.org", "u1")) == 2,
             timeout=10, what="the message queued after kill -9 of odmr-fetch")
    holder = linger_holder(env, "example.org")
    check(holder and holder != env.daemon.pid, "linger lock holder %r" % holder)
    os.kill(holder, signal.SIGKILL)
    rc = b.wait(30)
    check(rc != EX_OK, "odmr-fetch exit %s after its session was killed" % rc)
    send(env, "u1@example.org", "X-Seq: 3\n\nthree\n")
    r = subprocess.run(fetch_argv(env, linger=None,
                                  deliver="maildir:%s/%%d/%%u" % root),
                       capture_output=True, text=True, timeout=60,
                       env=fetch_env("secret"))
    check(r.returncode == EX_OK, "next poll: %d\n%s" % (r.returncode, r.stderr))
    check(len(maildir_new(root, "example.org", "u1")) == 3, "messages lost")
    check(env.queued("example.org") == [], "still queued")


def test_push_expiry_and_delete_while_lingering(env):
    """A message the site defers (4xx) stays queued and is retried with
    back-off, not in a loop; while the domain lingers the maintenance pass
    still expires it, and odmrctl queue delete still works."""
    with Sink(rcpt_reply="451 4.3.0 try later") as site, Sink() as relay:
        env.setup_accounts()
        env.write_conf(odmr_linger_noop="5s", queue_lifetime="3s",
                       bounce_relay=relay.address)
        env.start()
        a = Pusher(env, linger=60, deliver="smtp:127.0.0.1:%d" % site.port)
        wait_lingering(env)
        send(env, "u1@example.org", "Subject: one\n\ndeferred\n")
        wait_for(lambda: any(l.upper().startswith("RCPT")
                             for l in site.lines), timeout=10,
                 what="the pushed message at the site")
        time.sleep(2)
        rcpts = [l for l in site.lines if l.upper().startswith("RCPT")]
        check(len(rcpts) == 1, "deferred message retried at once: %r" % rcpts)
        check(len(env.queued("example.org")) == 1, "deferred message gone")
        time.sleep(2.5)   # well past queue_lifetime (whole seconds)
        # a maintenance pass that meets the session's lock in the moment
        # of a pass skips the domain until its next run: ask again
        for _ in range(10):
            os.kill(env.daemon.pid, signal.SIGUSR1)
            if len(relay.transactions) >= 1 or \
                    (time.sleep(2) or len(relay.transactions) >= 1):
                break
        relay.wait(1, timeout=5, what="the expiry notice")
        wait_for(lambda: env.queued("example.org") == [], timeout=10,
                 what="the expired message to leave a lingering domain")
        check(lingering(env) and "linger ended" not in env.log(),
              "the linger ended: %s" % env.log_tail())
        # odmrctl queue delete on a lingering domain
        a_pid = a.p.pid
        os.kill(a_pid, signal.SIGSTOP)
        try:
            send(env, "u2@example.org", "Subject: two\n\nto delete\n")
            ids = env.queued_ids("example.org")
        finally:
            os.kill(a_pid, signal.SIGCONT)
        # the session may have pushed it (and been deferred) meanwhile
        for qid in ids:
            r = env.odmrctl("queue", "delete", qid)
            check(r.returncode == 0, "queue delete: %s" % r.stderr)
        check(env.queued("example.org") == [], "queue delete")
        os.kill(a.p.pid, signal.SIGTERM)
        a.wait(20)


def test_push_reload_and_stop_end_linger(env):
    """A reload (SIGHUP) ends a lingering session with QUIT, so the
    customer reconnects to the new configuration; so does a stop."""
    push_env(env)
    root = env.path("maildir")
    a = Pusher(env, linger=60, deliver="maildir:%s/%%d/%%u" % root)
    wait_lingering(env)
    os.kill(env.daemon.pid, signal.SIGHUP)
    rc = a.wait(20)
    check(rc == EX_OK, "exit %s after reload:\n%s" % (rc, a.stderr()[-1500:]))
    check("linger ended: odmrd is stopping or reloading" in env.log(),
          env.log_tail())
    b = Pusher(env, linger=60, deliver="maildir:%s/%%d/%%u" % root)
    wait_lingering(env, 2)
    env.stop()
    rc = b.wait(20)
    check(rc == EX_OK, "exit %s after stop:\n%s" % (rc, b.stderr()[-1500:]))


def test_push_inotify_limit(env):
    """Each lingering session needs an inotify instance, and the kernel
    gives odmrd's user only fs.inotify.max_user_instances of them: odmrd -t
    warns when odmr_max_lingering does not fit under that, and a customer
    beyond it is told 451 at XLINGER (and polls), not granted a push that
    cannot start."""
    import ctypes
    with open("/proc/sys/fs/inotify/max_user_instances") as f:
        limit = int(f.read())
    push_env(env, odmr_max_lingering=str(limit))
    r = env.odmrd_check()
    check("fs.inotify.max_user_instances" in r.stdout + r.stderr,
          "odmrd -t does not warn: %r" % (r.stdout + r.stderr))
    libc = ctypes.CDLL(None, use_errno=True)
    held = []
    try:
        # every instance this user may still have, for a moment
        for _ in range(limit + 1):
            fd = libc.inotify_init1(0o2000000)   # IN_CLOEXEC
            if fd < 0:
                break
            held.append(fd)
        check(ctypes.get_errno() == 24, "inotify_init1 did not run out "
              "(errno %d after %d)" % (ctypes.get_errno(), len(held)))
        with SMTP(env.odmr_port) as s:
            s.cmd("EHLO site.test")
            check_reply(cram_md5(s, "alice", "secret"), 235, what="AUTH")
            check_reply(s.cmd("XLINGER 60"), 451, "4.3.2",
                        "XLINGER without an inotify instance")
            check_reply(s.cmd("ATRN"), 453, what="ATRN as usual")
    finally:
        for fd in held:
            os.close(fd)
    check("no inotify instance left" in env.log(), env.log_tail())
    # with instances back, push works again
    a = push_one(env, env.path("maildir"), "Subject: p\n\npushed\n")
    os.kill(a.p.pid, signal.SIGTERM)
    a.wait(20)
