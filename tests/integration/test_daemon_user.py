"""The daemon user works on the first try (SPEC 3.1 `user`, 5 "Privilege";
server/ownership.h).

odmrd -t and start-up check, as the configured user, everything odmrd
will use: the directories above spool_dir, accounts_db and pid_file, the
whole spool tree and the database.  Started as root, odmrd gives the whole
spool tree (spool, tmp/, q/, q/<domain>/ and their files, corrupt/) and
the database to the user, completely or not at all, never following a
symbolic link.  odmrctl run as root acts as the spool's owner and says so
in its permission errors.  The start line names the listeners.

These tests need root (to chown and to switch users) and the users
`nobody` and `daemon`; without them they fail, never skip.
"""

import grp
import os
import pwd
import subprocess
import time

from harness import check, fail

EX_NOPERM, EX_CONFIG = 77, 78


# --------------------------------------------------------------------------
# helpers

def need_root_and_users():
    check(os.geteuid() == 0, "these tests need root (chown, switching users)")
    try:
        nobody = pwd.getpwnam("nobody")
        pwd.getpwnam("daemon")
    except KeyError as e:
        fail("a user these tests need is missing: %s" % e)
    return nobody


def searchable_by_others(path):
    """o+x on path (the Env's directory is 0700, like the README's)."""
    os.chmod(path, os.stat(path).st_mode & 0o7777 | 0o001)
    up = os.path.dirname(path)
    while up != "/":
        check(os.stat(up).st_mode & 0o001, "%s is not searchable by others: "
              "nobody cannot reach %s" % (up, path))
        up = os.path.dirname(up)


def demo_layout(env):
    """The README's demo: D mode 0700 owned by root, spool and database in
    it.  The Env's own directory is opened for others, so D is the one
    directory nobody cannot search."""
    searchable_by_others(env.dir)
    d = env.path("demo")
    os.mkdir(d, 0o700)
    env.spool = os.path.join(d, "spool")
    env.db = os.path.join(d, "accounts.db")
    env.write_conf(spool_dir=env.spool, accounts_db=env.db)
    return d


def root_run(env):
    """A spool and a database as odmrd running as root leaves them: mail
    queued in q/example.org/ and q/example.com/, all owned by root."""
    env.write_conf(user="")
    env.setup_accounts()
    env.start()
    env.send_mail("sender@remote.test", ["a@example.org"], "Subject: 1\n\none\n")
    env.send_mail("sender@remote.test", ["b@example.org", "c@example.com"],
                  "Subject: 2\n\ntwo\n")
    check(env.stop() == 0, "odmrd as root did not stop cleanly")
    check(os.stat(env.queue_dir("example.org")).st_uid == 0,
          "the root run did not leave a root-owned q/example.org")


def tree(top):
    """Every path below top (top included), by lstat, never following."""
    out = [top]
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            out.append(os.path.join(root, name))
    return out


def not_owned_by(paths, user):
    return [(p, os.lstat(p).st_uid, os.lstat(p).st_gid) for p in paths
            if (os.lstat(p).st_uid, os.lstat(p).st_gid) !=
            (user.pw_uid, user.pw_gid)]


def not_root_owned(paths):
    return [p for p in paths if os.lstat(p).st_uid != 0]


def start_expecting_failure(env, what):
    """odmrd -f must refuse to start: returns its output (stderr, the log
    lines).  Fails when it keeps running."""
    p = env.spawn([env.odmrd_bin, "-f", "-c", env.conf_path],
                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        env._kill_tree(p.pid)
        p.communicate()
        fail("%s: odmrd kept running instead of refusing to start" % what)
    out = out.decode("utf-8", "replace")
    check(p.returncode == EX_CONFIG, "%s: odmrd exited %d, expected %d; "
          "output:\n%s" % (what, p.returncode, EX_CONFIG, out[-2000:]))
    check("started: odmrd" not in out, "%s: odmrd logged a start:\n%s" % (what, out))
    return out


def problem_lines(stderr):
    """odmrd -t's problems: its lines other than notes and warnings."""
    return [l for l in stderr.splitlines()
            if l.startswith("odmrd: ") and not l.startswith("odmrd: note: ")
            and "warning: " not in l]


def expect_check(env, code, what):
    r = env.odmrd_check()
    if r.returncode != code:
        fail("%s: odmrd -t exited %d, expected %d; stdout %r stderr:\n%s" % (
            what, r.returncode, code, r.stdout, r.stderr))
    if code == 0:
        check("configuration ok" in r.stdout, "%s: no 'configuration ok': %r"
              % (what, r.stdout))
    else:
        check("configuration ok" not in r.stdout, "%s: 'configuration ok' "
              "with exit %d" % (what, code))
    return r


def line_with(text, *parts, what=""):
    for l in text.splitlines():
        if all(p in l for p in parts):
            return l
    fail("%s: no line with %r in:\n%s" % (what, parts, text))


def master_uid(env):
    with open("/proc/%d/status" % env.daemon.pid) as f:
        for l in f:
            if l.startswith("Uid:"):
                return [int(x) for x in l.split()[1:]]
    fail("no Uid line for odmrd pid %d" % env.daemon.pid)


def run_as(env, user, group, argv, timeout=30):
    """argv as another user (no supplementary groups); (rc, stdout, stderr)."""
    p = env.spawn(argv, user=user, group=group, extra_groups=[],
                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        env._kill_tree(p.pid)
        p.communicate()
        fail("%s as %s timed out" % (" ".join(argv), user))
    return p.returncode, out.decode("utf-8", "replace"), \
        err.decode("utf-8", "replace")


def fetch_all(env, account, password):
    """odmr-fetch for the account into a Maildir; returns (rc, files)."""
    maildir = env.path("Maildir-" + account)
    e = dict(os.environ)
    e["ODMR_PASSWORD"] = password
    r = env.run([env.fetch_bin, "-s", "127.0.0.1:%d" % env.odmr_port,
                 "-u", account, "--tls", "off", "--timeout", "20",
                 "--lock", env.path("fetch.lock"),
                 "--deliver", "maildir:" + maildir], env=e, timeout=60)
    new = os.path.join(maildir, "new")
    files = sorted(os.listdir(new)) if os.path.isdir(new) else []
    return r, files


# --------------------------------------------------------------------------

def test_check_names_the_directory_the_user_cannot_search(env):
    """The issue's README layout: -t said "configuration ok", odmrd started
    and answered 421 to everything.  Now -t and start-up name D and the
    chmod, and once that is done -t is happy and odmrd works as nobody."""
    nobody = need_root_and_users()
    d = demo_layout(env)
    root_run(env)
    env.write_conf(user="nobody")
    r = expect_check(env, EX_CONFIG, "D is 0700 root")
    line_with(r.stderr, d + ":", "nobody", "fix: chmod o+x " + d,
              what="odmrd -t")
    check(len(problem_lines(r.stderr)) == 1, "one problem expected (D, once "
          "for spool_dir and accounts_db), got:\n%s" % r.stderr)
    out = start_expecting_failure(env, "D is 0700 root")
    line_with(out, "fix: chmod o+x " + d, what="start-up log")
    left = not_root_owned(tree(env.spool) + [env.db])
    check(not left, "a refused start changed owners: %r" % left[:10])

    os.chmod(d, 0o711)
    r = expect_check(env, 0, "after chmod o+x D")
    line_with(r.stderr, "note: ", "nobody:nogroup", env.spool,
              what="odmrd -t note about the chown at start")
    env.start()
    check(master_uid(env)[:2] == [nobody.pw_uid, nobody.pw_uid],
          "odmrd master runs as %r, not nobody" % master_uid(env))
    qid = env.send_mail("s@remote.test", ["x@example.org"], "Subject: 3\n\n3\n")
    check(qid, "no queue id for mail accepted as nobody")


def test_start_gives_the_whole_spool_to_the_user(env):
    """A spool that ran as root, then `user = nobody`: every q/<domain>/,
    every file in it, corrupt/ and the database become nobody's; a symbolic
    link's target is never touched.  Then inbound mail gets 250 (it got 452),
    ATRN delivers (it got 451), `odmrctl queue summary` exits 0 (it got 77)."""
    nobody = need_root_and_users()
    searchable_by_others(env.dir)
    root_run(env)
    corrupt = os.path.join(env.spool, "corrupt", "example.org")
    os.makedirs(corrupt, 0o700)
    with open(os.path.join(corrupt, "0123456789ABCDEF.e"), "w") as f:
        f.write("garbage\n")
    outside = env.path("outside-file")
    with open(outside, "w") as f:
        f.write("not odmrd's\n")
    os.chmod(outside, 0o600)
    link = os.path.join(env.queue_dir("example.org"), "planted-link")
    os.symlink(outside, link)
    env.write_conf(user="nobody")

    env.start()
    wrong = not_owned_by(tree(env.spool) + [env.db], nobody)
    check(not wrong, "not given to nobody:nogroup: %r" % wrong[:10])
    st = os.stat(outside)
    check((st.st_uid, st.st_gid) == (0, 0), "the target of a symbolic link "
          "in the spool was given away: %d:%d" % (st.st_uid, st.st_gid))
    line_with(env.log(), "gave ", "nobody:nogroup", what="odmrd log")

    env.send_mail("s@remote.test", ["new@example.org"], "Subject: new\n\nnew\n")
    r = env.odmrctl("queue", "summary")
    check(r.returncode == 0, "odmrctl queue summary exited %d: %s"
          % (r.returncode, r.stderr.strip()))
    line_with(r.stdout, "example.org", what="queue summary")
    r, files = fetch_all(env, "alice", "secret")
    check(r.returncode == 0, "odmr-fetch exited %d (ATRN as nobody): %s"
          % (r.returncode, r.stderr.strip()[-500:]))
    check(len(files) == 3, "alice got %d messages, expected 3" % len(files))
    check(env.queued("example.org") == [], "example.org still queued: %r"
          % env.queued("example.org"))


def test_start_refuses_rather_than_give_away_half(env):
    """What would make the hand-over incomplete or unsafe (a file with a
    hard link outside the spool, a directory deeper than the queue layout)
    is found before anything changes: -t names it, start-up refuses with
    78 and leaves every owner as it was."""
    need_root_and_users()
    searchable_by_others(env.dir)
    root_run(env)
    env.write_conf(user="nobody")
    secret = env.path("secret")
    with open(secret, "w") as f:
        f.write("root's\n")
    os.chmod(secret, 0o600)
    hard = os.path.join(env.queue_dir("example.org"), "hard.m")
    os.link(secret, hard)

    r = expect_check(env, EX_CONFIG, "hard link out of the spool")
    line_with(r.stderr, "hard link", "find / -xdev -inum %d"
              % os.stat(secret).st_ino, what="odmrd -t")
    out = start_expecting_failure(env, "hard link out of the spool")
    line_with(out, "hard link", what="start-up log")
    left = not_root_owned(tree(env.spool) + [env.db, secret])
    check(not left, "a refused start changed owners: %r" % left[:10])
    os.unlink(hard)

    deep = os.path.join(env.queue_dir("example.com"), "a", "b")
    os.makedirs(deep)
    r = expect_check(env, EX_CONFIG, "directory below a domain directory")
    line_with(r.stderr, os.path.dirname(deep), "deeper", what="odmrd -t")
    start_expecting_failure(env, "directory below a domain directory")
    left = not_root_owned(tree(env.spool) + [env.db])
    check(not left, "a refused start changed owners: %r" % left[:10])
    os.rmdir(deep)
    os.rmdir(os.path.dirname(deep))

    expect_check(env, 0, "nothing odd left")
    env.start()
    check(os.stat(env.queue_dir("example.com")).st_uid ==
          pwd.getpwnam("nobody").pw_uid, "q/example.com not given to nobody")


def test_check_as_root_reports_what_start_cannot_fix(env):
    """-t as root: the chown start-up will do is a note; a file the user
    could not use even as its owner (mode 0400) and a pid_file directory
    it cannot write are problems with their chmod/chown, and start-up
    refuses on them too."""
    nobody = need_root_and_users()
    searchable_by_others(env.dir)
    root_run(env)
    run = env.path("run")
    os.mkdir(run, 0o755)
    pid_file = os.path.join(run, "odmrd.pid")
    env.write_conf(user="nobody", pid_file=pid_file)
    qid = env.queued_ids("example.com")[0]
    envelope = os.path.join(env.queue_dir("example.com"),
                            env.message_files("example.com", qid)[0])
    os.chmod(envelope, 0o400)

    other = os.path.join(run, "someone-else.pid")
    open(other, "w").close()
    r = expect_check(env, EX_CONFIG, "pid dir of root that holds more")
    line_with(r.stderr, pid_file, "install -d -m 0755 -o nobody -g nogroup "
              + run + "/odmr", "set pid_file = " + run + "/odmr/odmrd.pid",
              what="odmrd -t: a shared directory is not given away")
    os.unlink(other)
    r = expect_check(env, EX_CONFIG, "mode 0400 envelope, pid dir of root")
    line_with(r.stderr, envelope, "fix: chmod u+rw " + envelope,
              what="odmrd -t")
    line_with(r.stderr, pid_file, "fix: chown nobody:nogroup " + run,
              what="odmrd -t")
    line_with(r.stderr, "note: ", "nobody:nogroup", what="odmrd -t")
    check(len(problem_lines(r.stderr)) == 2, "two problems expected:\n%s"
          % r.stderr)
    out = start_expecting_failure(env, "mode 0400 envelope")
    line_with(out, "fix: chmod u+rw " + envelope, what="start-up log")

    os.chmod(envelope, 0o600)
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    expect_check(env, 0, "after the fixes")
    env.start()
    with open(pid_file) as f:
        check(int(f.read().strip()) == env.daemon.pid, "pid_file content")
    check(os.stat(pid_file).st_uid == nobody.pw_uid, "pid_file not nobody's")
    check(env.stop() == 0, "odmrd did not stop cleanly")
    check(not os.path.exists(pid_file), "pid_file left after the stop")


def test_odmrctl_as_root_acts_as_the_user_and_says_so(env):
    """Against a spool odmrd gave to nobody, odmrctl run as root works as
    nobody (what it queues is nobody's), and a permission error says that
    it acted as nobody (a root shell would not guess it)."""
    nobody = need_root_and_users()
    searchable_by_others(env.dir)
    root_run(env)
    env.write_conf(user="nobody")
    env.start()
    check(env.stop() == 0, "odmrd did not stop cleanly")
    before = set(env.queued_ids("example.net"))
    r = env.odmrctl("enqueue", "-f", "s@remote.test", "z@example.net",
                    input="Subject: z\n\nz\n")
    check(r.returncode == 0, "odmrctl enqueue as root exited %d: %s"
          % (r.returncode, r.stderr.strip()))
    new = set(env.queued_ids("example.net")) - before
    check(len(new) == 1, "enqueue queued %r" % new)
    wrong = not_owned_by(tree(env.queue_dir("example.net")), nobody)
    check(not wrong, "what odmrctl queued as root is not nobody's: %r" % wrong)
    r = env.odmrctl("queue", "summary")
    check(r.returncode == 0, "queue summary exited %d: %s"
          % (r.returncode, r.stderr.strip()))

    os.chown(env.db, 0, 0)
    r = env.odmrctl("user", "list")
    check(r.returncode == EX_NOPERM, "user list with a root-owned database "
          "exited %d, expected %d: %s" % (r.returncode, EX_NOPERM, r.stderr))
    lines = r.stderr.strip().splitlines()
    check(len(lines) == 1 and "acting as user nobody" in lines[0],
          "the permission error does not say it acted as nobody: %r"
          % r.stderr)
    os.chown(env.db, nobody.pw_uid, nobody.pw_gid)
    os.chown(env.queue_dir("example.org"), 0, 0)
    r = env.odmrctl("queue", "summary")
    check(r.returncode == EX_NOPERM and "acting as user nobody" in r.stderr,
          "queue summary with a root-owned q/example.org: exit %d %r"
          % (r.returncode, r.stderr))


def test_check_run_by_the_user_itself_and_by_others(env):
    """-t run by nobody itself checks as nobody (the spool still root's:
    a problem with the chown to run as root); run by a third user it says
    in a note that it could not check for nobody, and does not fail on
    that alone."""
    need_root_and_users()
    searchable_by_others(env.dir)
    root_run(env)
    env.write_conf(user="nobody")
    os.chmod(env.conf_path, 0o644)
    rc, out, err = run_as(env, "nobody", "nogroup",
                          [env.odmrd_bin, "-t", "-c", env.conf_path])
    check(rc == EX_CONFIG, "-t as nobody with a root spool exited %d: %s"
          % (rc, err))
    line_with(err, env.spool, "fix: chown nobody:nogroup " + env.spool,
              what="odmrd -t as nobody")
    daemon_group = grp.getgrgid(pwd.getpwnam("daemon").pw_gid).gr_name
    rc, out, err = run_as(env, "daemon", daemon_group,
                          [env.odmrd_bin, "-t", "-c", env.conf_path])
    check(rc == 0 and "configuration ok" in out, "-t as daemon exited %d: "
          "%r %r" % (rc, out, err))
    line_with(err, "note: ", "daemon", "nobody", "as root", what="-t as daemon")
    check(not problem_lines(err), "-t as daemon printed problems for the "
          "wrong user:\n%s" % err)


def test_start_line_names_the_listeners(env):
    """The start line says where odmrd listens, for each listener."""
    sock = env.path("lmtp.sock")
    env.write_conf(lmtp_listen="unix:" + sock)
    env.start()
    want = "listening on 127.0.0.1:%d (smtp), 127.0.0.1:%d (odmr), unix:%s " \
           "(lmtp)" % (env.smtp_port, env.odmr_port, sock)
    deadline = time.time() + 5
    while want not in env.log() and time.time() < deadline:
        time.sleep(0.05)
    line_with(env.log(), "started: ", want, what="odmrd start line")
