"""TLS session resumption between odmr-fetch runs (issue 12 goal 3) and
the account database kept open in odmrd's session workers.

odmr-fetch keeps the session next to its lock file, mode 0600, one file
per server name and port, and throws it away whenever what verification
depended on changes; odmrd's ticket keys live in memory only, survive a
reload (SIGHUP) and not a restart."""

import os
import re
import signal
import stat
import time

from harness import check, descendants, need, wait_for
from sink import Sink
from test_fetch import EX_NOPERM, EX_OK, expect, fetch, send

NO_MAIL = "smtp:127.0.0.1:1"   # nothing is queued, so never connected


def make_cert(env):
    """A certificate for both localhost and 127.0.0.1, so that two server
    names reach the same odmrd and both verify."""
    openssl = need("openssl")
    cert, key = env.path("cert.pem"), env.path("key.pem")
    r = env.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                 "-keyout", key, "-out", cert, "-days", "2",
                 "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                timeout=60)
    check(r.returncode == 0, "openssl req failed: %s" % r.stderr)
    os.chmod(key, 0o600)
    env.write_conf(tls_cert_file=cert, tls_key_file=key, require_tls="yes")
    return cert


def started(env):
    cert = make_cert(env)
    env.setup_accounts()
    env.start()
    return cert


def state_file(env, host="localhost"):
    return env.path("fetch.tls-%s-%d" % (host, env.odmr_port))


def poll(env, cert, host="localhost", what="poll", deliver=NO_MAIL):
    """One -v run with TLS required; returns its stderr."""
    r = expect(fetch(env, "-v", "--ca-file", cert, tls="require",
                     server="%s:%d" % (host, env.odmr_port), deliver=deliver),
               EX_OK, what)
    check("TLS established" in r.stderr, "%s: no TLS line in -v: %r"
          % (what, r.stderr))
    return r.stderr


def resumed(stderr):
    return "(resumed)" in stderr


def test_second_run_resumes(env):
    cert = started(env)
    first = poll(env, cert, what="first run")
    check("(full handshake)" in first, "first run: %r" % first)
    path = state_file(env)
    check(os.path.isfile(path), "no session saved in %s" % path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    check(mode == 0o600, "session file mode %o, not 600" % mode)
    with open(path) as f:
        text = f.read()
    full = re.search(r"\nfull (\d+)\n", text)
    check(text.startswith("odmr-fetch TLS session 2\n") and full and
          abs(int(full.group(1)) - time.time()) < 120 and
          "BEGIN SSL SESSION PARAMETERS" in text, "format: %r" % text[:200])
    check(not [n for n in os.listdir(env.dir) if ".tls-" in n and
               n != os.path.basename(path)], "temporary files left behind")
    second = poll(env, cert, what="second run")
    check(resumed(second), "second run did not resume: %r" % second)
    # mail still flows over a resumed session
    q = send(env, "s@remote.test", ["u1@example.org"])
    with Sink() as sink:
        third = poll(env, cert, what="delivery", deliver="smtp:" + sink.address)
        sink.wait(1)
    check(resumed(third), "third run did not resume: %r" % third)
    check(q not in env.queued_ids(), "not delivered over a resumed session")


def test_ca_change_discards(env):
    cert = started(env)
    poll(env, cert, what="first run")
    check(resumed(poll(env, cert, what="second run")), "no resumption")
    st = os.stat(cert)
    os.utime(cert, (st.st_atime, st.st_mtime + 10))   # "a new CA file"
    out = poll(env, cert, what="after the CA file changed")
    check("(full handshake)" in out, "resumed across a CA change: %r" % out)
    check("other verification settings" in out, "no -v reason: %r" % out)
    check(resumed(poll(env, cert, what="after")), "new session not saved")


def test_system_store_from_the_environment(env):
    """Without --ca-file the system store is what OpenSSL reads, which
    SSL_CERT_FILE can name: another file there discards the session."""
    cert = started(env)
    other = env.path("other-ca.pem")
    with open(cert) as f, open(other, "w") as g:
        g.write(f.read())

    d1, d2 = env.path("certs1"), env.path("certs2")
    os.mkdir(d1)
    os.mkdir(d2)
    dirs = d1 + ":" + d2

    def run(store, what):
        r = expect(fetch(env, "-v", tls="require",
                         server="localhost:%d" % env.odmr_port,
                         deliver=NO_MAIL,
                         env_extra={"SSL_CERT_FILE": store,
                                    "SSL_CERT_DIR": dirs}), EX_OK, what)
        return r.stderr

    check("(full handshake)" in run(cert, "first run"), "first run resumed?")
    check(resumed(run(cert, "second run")), "no resumption from the store")
    out = run(other, "SSL_CERT_FILE names another file")
    check("(full handshake)" in out, "resumed across another SSL_CERT_FILE: "
          "%r" % out)
    check(resumed(run(other, "again")), "no resumption from the store")
    # SSL_CERT_DIR is a list: a change in its second directory counts too
    with open(os.path.join(d2, "new.pem"), "w") as f:
        f.write("")
    out = run(other, "a certificate added to SSL_CERT_DIR's second entry")
    check("(full handshake)" in out, "resumed across a change in "
          "SSL_CERT_DIR: %r" % out)


def test_server_name_change_discards(env):
    """A session made for one name is never offered under another, even
    when the file is copied by hand."""
    cert = started(env)
    poll(env, cert, what="first run")
    with open(state_file(env)) as src, \
            open(state_file(env, "127.0.0.1"), "w") as dst:
        dst.write(src.read())
    os.chmod(state_file(env, "127.0.0.1"), 0o600)
    out = poll(env, cert, host="127.0.0.1", what="other name")
    check("(full handshake)" in out and "other verification settings" in out,
          "session offered under another name: %r" % out)


def test_older_format_discarded_with_its_own_reason(env):
    """A file an older odmr-fetch saved (format 1, no time of the full
    handshake) is discarded under -v as that, not as other settings."""
    cert = started(env)
    poll(env, cert, what="first run")
    path = state_file(env)
    with open(path) as f:
        good = f.read().split("\n")
    old = ["odmr-fetch TLS session 1"] + [l for l in good[1:]
                                          if not l.startswith("full ")]
    with open(path, "w") as f:
        f.write("\n".join(old))
    out = poll(env, cert, what="format-1 file")
    check("(full handshake)" in out and "saved by an older odmr-fetch" in out
          and "other verification settings" not in out,
          "format-1 file: %r" % out)
    check(resumed(poll(env, cert, what="after")), "not saved anew")


def test_corrupt_state_ignored(env):
    cert = started(env)
    poll(env, cert, what="first run")
    path = state_file(env)
    for junk in ("garbage\n",
                 "odmr-fetch TLS session 2\nverify %s\nfull 1\n-----BEGIN SSL "
                 "SESSION PARAMETERS-----\nAAAA\n-----END SSL SESSION "
                 "PARAMETERS-----\n",
                 "odmr-fetch TLS session 2\nverify %s\n-----BEGIN SSL SESSION "
                 "PARAMETERS-----\nAAAA\n-----END SSL SESSION PARAMETERS-----\n",
                 "\0\1\2binary"):
        with open(path) as f:
            good = f.read()
        if junk.startswith("odmr-fetch"):
            verify = good.split("\n")[1].split(" ")[1]
            junk = junk % verify
        with open(path, "w") as f:
            f.write(junk)
        out = poll(env, cert, what="corrupt state file")
        check("ignoring TLS session file %s" % path in out,
              "no clear line about the corrupt file: %r" % out)
        check("(full handshake)" in out, "resumed from junk?: %r" % out)
        check(resumed(poll(env, cert, what="after")), "not saved anew")
    os.chmod(path, 0o644)
    out = poll(env, cert, what="state file readable by others")
    check("ignoring TLS session file" in out and "(full handshake)" in out,
          "a world-readable session file was used: %r" % out)


def test_resumption_rests_on_a_recent_full_handshake(env):
    """Every resumption renews the ticket, so a site polling daily would
    resume for ever on one certificate check: the file keeps the time of
    the full handshake behind it, resumptions keep it, and once it is a
    week old the next run does a full handshake (RFC 8446 4.6.1)."""
    cert = started(env)
    poll(env, cert, what="first run")
    path = state_file(env)
    full = lambda: int(open(path).read().split("\n")[2].split(" ")[1])
    first = full()
    time.sleep(1.1)
    check(resumed(poll(env, cert, what="second run")), "no resumption")
    check(full() == first, "a resumption moved the full handshake time: "
          "%d -> %d" % (first, full()))
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("\nfull %d\n" % first,
                             "\nfull %d\n" % (first - 7 * 86400)))
    out = poll(env, cert, what="a week later")
    check("(full handshake)" in out, "resumed on a week-old full "
          "handshake: %r" % out)
    check(full() > first, "the new full handshake's time was not kept")
    check(resumed(poll(env, cert, what="after")), "not saved anew")


def test_tickets_survive_reload_not_restart(env):
    cert = started(env)
    poll(env, cert, what="first run")
    mark = env.log().count("configuration reloaded")
    env.daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: env.log().count("configuration reloaded") > mark,
             what="the reload")
    out = poll(env, cert, what="after SIGHUP")
    check(resumed(out), "ticket not accepted after a reload: %r" % out)
    env.restart()
    out = poll(env, cert, what="after a restart")
    check("(full handshake)" in out,
          "a ticket survived a restart (keys on disk?): %r" % out)
    check(resumed(poll(env, cert, what="after the restart")),
          "no resumption with the new keys")


def test_no_state_without_tls(env):
    env.setup_accounts()
    env.start()
    expect(fetch(env, tls="off", deliver=NO_MAIL), EX_OK, "plain poll")
    check(not [n for n in os.listdir(env.dir) if ".tls-" in n],
          "a TLS session file without TLS")


# ---- the account database kept open ----------------------------------

def workers_holding_db(env):
    n = 0
    for pid in descendants(env.daemon.pid):
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == env.db:
                    n += 1
            except OSError:
                pass
    return n


def test_accounts_change_seen_at_once(env):
    env.setup_accounts()
    time.sleep(2.5)   # past the settling time: workers keep the handle
    env.start()
    for _ in range(3):
        expect(fetch(env, deliver=NO_MAIL), EX_OK, "alice")
    check(workers_holding_db(env) >= 1,
          "no session worker keeps the account database open")
    # an idle handle blocks no writer: odmrctl is quick and succeeds
    t0 = time.time()
    env.odmrctl_ok("user", "add", "carol", input="carolpw\n")
    env.odmrctl_ok("domain", "add", "carol.test", "carol")
    check(time.time() - t0 < 2.5, "odmrctl waited for odmrd's lock")
    for i in range(3):   # more than one worker may serve these
        expect(fetch(env, user="carol", password="carolpw", deliver=NO_MAIL),
               EX_OK, "account added while odmrd runs, try %d" % i)
    env.odmrctl_ok("user", "passwd", "carol", input="newpass\n")
    for i in range(3):
        expect(fetch(env, user="carol", password="carolpw", deliver=NO_MAIL),
               EX_NOPERM, "old password after passwd, try %d" % i)
        expect(fetch(env, user="carol", password="newpass", deliver=NO_MAIL),
               EX_OK, "new password, try %d" % i)
    env.odmrctl_ok("user", "del", "carol")
    for i in range(3):
        expect(fetch(env, user="carol", password="newpass", deliver=NO_MAIL),
               EX_NOPERM, "deleted account, try %d" % i)
    expect(fetch(env, deliver=NO_MAIL), EX_OK, "alice still works")
