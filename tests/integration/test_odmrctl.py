"""odmrctl (SPEC 3.3) and odmrd's configuration check (SPEC 3, 3.1)."""

import os
import stat
import time

from harness import (check, check_reply, fail, strip_received, to_crlf,
                     queue_id_of)


EX_OK, EX_USAGE, EX_DATAERR, EX_NOHOST, EX_CANTCREAT, EX_TEMPFAIL, \
    EX_NOPERM, EX_CONFIG = 0, 64, 65, 67, 73, 75, 77, 78


def one_line_error(r, what):
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    check(len(lines) == 1, "%s: expected one error line on stderr, got %r"
          % (what, r.stderr))


def expect_exit(r, code, what):
    if r.returncode != code:
        fail("%s: exit %d, expected %d; stderr %r stdout %r" % (
            what, r.returncode, code, r.stderr.strip()[:300],
            r.stdout.strip()[:300]))
    if code != 0:
        one_line_error(r, what)


def stored_body(data):
    """Message data without the Received: header odmrctl may prepend."""
    if data[:9].lower() == b"received:":
        return strip_received(data)
    return data


# --------------------------------------------------------------------------

def test_help_and_version(env):
    for prog in (env.odmrd_bin, env.odmrctl_bin):
        for opt in ("--help", "--version"):
            r = env.run([prog, opt], timeout=10)
            check(r.returncode == 0, "%s %s exited %d: %r" % (
                os.path.basename(prog), opt, r.returncode, r.stderr))
            check((r.stdout + r.stderr).strip() != "",
                  "%s %s printed nothing" % (os.path.basename(prog), opt))


def test_users_and_domains(env):
    env.add_user("alice")
    env.add_user("bob", "bobpw")
    env.add_domain("example.org", "alice")
    env.add_domain("Example.NET", "alice")
    env.add_domain("example.com", "bob")
    check(os.path.exists(env.db), "accounts_db %s not created" % env.db)
    mode = stat.S_IMODE(os.stat(env.db).st_mode)
    check(mode & 0o077 == 0, "accounts_db mode %o is readable by others" % mode)
    # a password of the full 1,024 bytes, given with CRLF, fits; one more
    # byte does not
    env.odmrctl_ok("user", "add", "carol", input="p" * 1024 + "\r\n")
    r = env.odmrctl("user", "add", "dave", input="p" * 1025 + "\r\n")
    check(r.returncode == 65 and "too long" in r.stderr,
          "a 1,025-byte password: exit %d %r" % (r.returncode, r.stderr))
    env.odmrctl_ok("user", "del", "carol")
    r = env.odmrctl_ok("user", "list")
    lines = {l.split()[0]: l.split()[1:] for l in r.stdout.splitlines()
             if l.strip()}
    check(set(lines) == {"alice", "bob"}, "user list %r" % r.stdout)
    check(sorted(d.strip(",").lower() for d in lines["alice"]) ==
          ["example.net", "example.org"], "alice's domains: %r" % r.stdout)
    check([d.strip(",") for d in lines["bob"]] == ["example.com"],
          "bob's domains: %r" % r.stdout)
    r = env.odmrctl_ok("domain", "list")
    pairs = sorted(tuple(l.split()[:2]) for l in r.stdout.splitlines()
                   if l.strip())
    check([(d.lower(), a) for d, a in pairs] ==
          [("example.com", "bob"), ("example.net", "alice"),
           ("example.org", "alice")], "domain list %r" % r.stdout)
    # a domain belongs to exactly one account
    r = env.odmrctl("domain", "add", "example.org", "bob")
    check(r.returncode != 0, "domain add of a domain bound to another "
          "account succeeded")
    one_line_error(r, "domain add (bound to another)")
    r = env.odmrctl("domain", "add", "EXAMPLE.ORG", "bob")
    check(r.returncode != 0, "domain add with another case of a bound domain "
          "succeeded")
    r = env.odmrctl("domain", "add", "example.edu", "nosuchuser")
    check(r.returncode != 0, "domain add for a missing account succeeded")
    r = env.odmrctl("domain", "add", "not a domain", "bob")
    expect_exit(r, EX_DATAERR, "domain add 'not a domain'")
    r = env.odmrctl("user", "add", "alice", input="again\n")
    check(r.returncode != 0, "user add of an existing account succeeded")
    # usage errors
    for args in (["user"], ["domain", "add", "x.test"], ["frobnicate"], []):
        r = env.odmrctl(*args)
        expect_exit(r, EX_USAGE, "odmrctl %s" % " ".join(args))
    env.odmrctl_ok("user", "passwd", "bob", input="newpw\n")
    env.odmrctl_ok("domain", "del", "example.net")
    r = env.odmrctl_ok("domain", "list")
    check("example.net" not in r.stdout.lower(), "domain del: %r" % r.stdout)
    env.odmrctl_ok("user", "del", "bob")
    r = env.odmrctl_ok("user", "list")
    check("bob" not in r.stdout, "user del: %r" % r.stdout)
    r = env.odmrctl_ok("domain", "list")
    check("example.com" not in r.stdout, "user del left the domain binding:"
          " %r" % r.stdout)


def test_live_account_changes(env):
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    env.start()

    def rcpt(addr):
        s = env.smtp()
        check_reply(s.greeting, 220)
        check_reply(s.cmd("EHLO client.test"), 250)
        check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
        r = s.cmd("RCPT TO:<%s>" % addr)
        s.quit()
        return r

    check_reply(rcpt("x@example.org"), 250, "2.1.5", "hosted domain")
    check_reply(rcpt("x@example.edu"), 550, "5.7.1", "before domain add")
    env.odmrctl_ok("domain", "add", "example.edu", "alice")
    check_reply(rcpt("x@example.edu"), 250, "2.1.5",
                "right after domain add (no restart)")
    env.odmrctl_ok("domain", "del", "example.edu")
    check_reply(rcpt("x@example.edu"), 550, "5.7.1",
                "right after domain del (no restart)")
    env.add_user("carol", "c")
    env.add_domain("example.com", "carol")
    check_reply(rcpt("x@example.com"), 250, "2.1.5", "new user's domain")
    env.odmrctl_ok("user", "del", "carol")
    check_reply(rcpt("x@example.com"), 550, "5.7.1", "after user del")
    check(env.running(), "odmrd died")


def enqueue(env, args, data, conf=None):
    return env.odmrctl("enqueue", *args, input=data, conf=conf)


def test_enqueue_ok(env):
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    env.add_user("bob")
    env.add_domain("example.com", "bob")
    data = (b"From: s@src.test\nSubject: pipe\n\nLF only\n.leading dot\n"
            b"8-bit: caf\xc3\xa9\n\nend\n")
    r = enqueue(env, ["-f", "s@src.test", "--", "a@example.org",
                      "b@example.com", "c@example.org"], data)
    expect_exit(r, EX_OK, "enqueue")
    q = env.queued()
    check(sorted(d for d, _ in q) == ["example.com", "example.org"],
          "spool %r" % q)
    for d, qid in q:
        e = env.envelope(d, qid)
        check(e["sender"] == "s@src.test", "sender %r" % e["sender"])
        want = {"example.org": ["a@example.org", "c@example.org"],
                "example.com": ["b@example.com"]}[d]
        check([x["addr"] for x in e["rcpts"]] == want,
              "%s recipients %r" % (d, e["rcpts"]))
        m = env.message(d, qid)
        check(e["size"] == len(m), "Z %d, file %d" % (e["size"], len(m)))
        check(stored_body(m) == to_crlf(data), "LF input not stored as CRLF:"
              "\nsent   %r\nstored %r" % (data, m))
    # CRLF input is stored unchanged; no -f means some local sender
    crlf = b"Subject: crlf\r\n\r\nbody\r\n"
    r = enqueue(env, ["a@example.org"], crlf)
    expect_exit(r, EX_OK, "enqueue without -f")
    check(len(env.queued("example.org")) == 2, "spool %r" % env.queued())
    new = [i for _, i in env.queued("example.org") if i not in
           [x for _, x in q]]
    check(len(new) == 1, "spool %r" % env.queued())
    check(stored_body(env.message("example.org", new[0])) == crlf,
          "CRLF input changed")
    # a running daemon sees it (queue listing via odmrctl)
    r = env.odmrctl_ok("queue")
    for _, qid in env.queued():
        check(qid in r.stdout, "odmrctl queue lacks %s" % qid)


def test_enqueue_exit_codes(env):
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    msg = b"Subject: x\n\nbody\n"
    expect_exit(enqueue(env, [], msg), EX_USAGE, "enqueue without recipient")
    expect_exit(enqueue(env, ["--bogus-option", "a@example.org"], msg),
                EX_USAGE, "enqueue with an unknown option")
    expect_exit(enqueue(env, ["not an address"], msg), EX_DATAERR,
                "enqueue to 'not an address'")
    expect_exit(enqueue(env, ["a@"], msg), EX_DATAERR, "enqueue to 'a@'")
    expect_exit(enqueue(env, ["-f", "bad sender@", "a@example.org"], msg),
                EX_DATAERR, "enqueue with a bad sender")
    expect_exit(enqueue(env, ["x@unhosted.test"], msg), EX_NOHOST,
                "enqueue to an unhosted domain")
    expect_exit(enqueue(env, ["a@example.org", "x@unhosted.test"], msg),
                EX_NOHOST, "enqueue to a hosted and an unhosted domain")
    # what RCPT refuses: sender routing, a user not in the domain's list
    # (queued, it would only come back as a bounce)
    r = enqueue(env, ["a%other.test@example.org"], msg)
    expect_exit(r, EX_NOHOST, "enqueue with sender routing")
    check("sender-specified routing" in r.stderr, "stderr %r" % r.stderr)
    env.odmrctl_ok("recipient", "add", "example.org", "a")
    r = enqueue(env, ["nobody@example.org"], msg)
    expect_exit(r, EX_NOHOST, "enqueue to a user not in the list")
    check("unknown user" in r.stderr, "stderr %r" % r.stderr)
    check(env.queued() == [], "a failed enqueue queued something: %r"
          % env.queued())
    expect_exit(enqueue(env, ["a@example.org"], msg), EX_OK,
                "enqueue to a listed user")
    env.odmrctl_ok("recipient", "del", "example.org", "a")
    for d, q in env.queued():
        env.odmrctl_ok("queue", "delete", q)
    # bad configuration
    bad = env.path("bad.conf")
    with open(bad, "w") as f:
        f.write("spool_dir = %s\nno_such_key = 1\n" % env.spool)
    expect_exit(enqueue(env, ["a@example.org"], msg, conf=bad), EX_CONFIG,
                "enqueue with an unknown config key")
    expect_exit(enqueue(env, ["a@example.org"], msg,
                        conf=env.path("missing.conf")),
                EX_CONFIG, "enqueue with a missing config file")
    # temporary failure: the domain is over its quota
    env.write_conf(domain_quota="1k")
    big = b"Subject: big\n\n" + b"z" * 1500 + b"\n"
    rs = [enqueue(env, ["a@example.org"], big) for _ in range(3)]
    codes = [r.returncode for r in rs]
    check(codes[0] == 0 or codes[0] == EX_TEMPFAIL, "codes %r" % codes)
    check(EX_TEMPFAIL in codes, "over quota never gave 75: exit codes %r "
          "(%r)" % (codes, [r.stderr for r in rs]))
    bad_one = rs[codes.index(EX_TEMPFAIL)]
    one_line_error(bad_one, "enqueue over quota")
    check(len(env.queued()) <= 1, "over-quota enqueue queued: %r"
          % env.queued())
    # cannot create: the spool is below a regular file
    blocker = env.path("blocker")
    with open(blocker, "w") as f:
        f.write("x")
    env.write_conf(domain_quota="0", spool_dir=os.path.join(blocker, "spool"))
    r = enqueue(env, ["a@example.org"], msg)
    check(r.returncode in (EX_CANTCREAT, EX_TEMPFAIL, EX_NOPERM),
          "enqueue with an unusable spool: exit %d, expected 73 (or 75/77); "
          "stderr %r" % (r.returncode, r.stderr))
    one_line_error(r, "enqueue with an unusable spool")


def test_queue_list_and_summary(env):
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    env.add_user("bob")
    env.add_domain("example.com", "bob")
    env.start()
    org1 = env.send_mail("one@src.test", ["a@example.org"], "Subject: 1\n\n1\n")
    org2 = env.send_mail("two@src.test", ["b@example.org", "c@example.org"],
                         "Subject: 2\n\n" + "2" * 3000 + "\n")
    com = env.send_mail("three@src.test", ["d@example.com"], "Subject: 3\n\n3\n")
    r = env.odmrctl_ok("queue")
    for qid, sender, rcpt in ((org1, "one@src.test", "a@example.org"),
                              (org2, "two@src.test", "c@example.org"),
                              (com, "three@src.test", "d@example.com")):
        check(qid in r.stdout, "queue lacks %s:\n%s" % (qid, r.stdout))
        check(sender in r.stdout, "queue lacks sender %s:\n%s"
              % (sender, r.stdout))
        check(rcpt in r.stdout, "queue lacks recipient %s:\n%s"
              % (rcpt, r.stdout))
    r = env.odmrctl_ok("queue", "example.org")
    check(org1 in r.stdout and org2 in r.stdout, "queue example.org:\n"
          + r.stdout)
    check(com not in r.stdout and "d@example.com" not in r.stdout,
          "queue example.org lists example.com mail:\n" + r.stdout)
    # a hosted domain without mail is empty; a typo is not
    env.add_domain("example.net", "alice")
    r = env.odmrctl_ok("queue", "example.net")
    check("Queue for example.net is empty" in r.stdout, "queue example.net: %r"
          % r.stdout)
    r = env.odmrctl("queue", "frobnicate")
    expect_exit(r, 67, "queue frobnicate")
    check("not a hosted domain" in r.stderr, "queue frobnicate: %r" % r.stderr)
    r = env.odmrctl_ok("queue", "summary")
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    org = [l for l in lines if "example.org" in l]
    comm = [l for l in lines if "example.com" in l]
    check(len(org) == 1 and len(comm) == 1, "queue summary:\n" + r.stdout)
    check(" 2 " in " %s " % " ".join(org[0].split()),
          "summary for example.org should say 2 messages: %r" % org[0])
    check(" 1 " in " %s " % " ".join(comm[0].split()),
          "summary for example.com should say 1 message: %r" % comm[0])


def test_queue_delete(env):
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    env.add_domain("example.net", "alice")
    env.add_user("bob")
    env.add_domain("example.com", "bob")
    env.start()
    a = env.send_mail("s@src.test", ["a@example.org"], "Subject: a\n\na\n")
    b = env.send_mail("s@src.test", ["b@example.org", "b@example.com"],
                      "Subject: b\n\nb\n")
    c = env.send_mail("s@src.test", ["c@example.org"], "Subject: c\n\nc\n")
    d = env.send_mail("s@src.test", ["d@example.net"], "Subject: d\n\nd\n")
    # by id: from every domain that holds it
    env.odmrctl_ok("queue", "delete", b)
    check(sorted(env.queued()) == sorted([("example.org", a),
                                          ("example.org", c),
                                          ("example.net", d)]),
          "after queue delete %s: %r" % (b, env.queued()))
    for dom in ("example.org", "example.com"):
        check(not os.path.isdir(env.queue_dir(dom)) or
              env.message_files(dom, b) == [],
              "files of %s left in %s" % (b, dom))
    r = env.odmrctl_ok("queue")
    check(b not in r.stdout, "deleted id still listed:\n" + r.stdout)
    r = env.odmrctl("queue", "delete", "NOSUCHID0000")
    check(r.returncode != 0, "queue delete of an unknown id succeeded")
    one_line_error(r, "queue delete of an unknown id")
    # by domain
    env.odmrctl_ok("queue", "delete", "--domain", "example.org")
    check(env.queued() == [("example.net", d)], "after queue delete --domain:"
          " %r" % env.queued())
    left = os.listdir(env.queue_dir("example.org")) \
        if os.path.isdir(env.queue_dir("example.org")) else []
    check(not [f for f in left if f.endswith((".e", ".m", ".n", ".q"))],
          "files left in example.org: %r" % left)
    r = env.odmrctl("queue", "delete")
    expect_exit(r, EX_USAGE, "queue delete without argument")
    # the daemon still sees a consistent queue and takes mail
    env.send_mail("s@src.test", ["e@example.org"], "Subject: e\n\ne\n")
    check(len(env.queued("example.org")) == 1, "spool %r" % env.queued())


def without_key(conf, line):
    """conf without the lines that set the key that line sets."""
    key = line.split("=")[0].strip()
    return "".join(l for l in conf.splitlines(True)
                   if l.split("=")[0].strip() != key)


def test_odmrd_config_check(env):
    env.add_user("alice")
    r = env.odmrd_check()
    check(r.returncode == 0, "odmrd -t on a good configuration exited %d: %s%s"
          % (r.returncode, r.stdout, r.stderr))
    base = open(env.conf_path).read()
    cases = [
        ("unknown key", "no_such_key = 1\n"),
        ("bad size", "max_message_size = lots\n"),
        ("bad duration", "timeout = 5x\n"),
        ("bad listen address", "smtp_listen = 127.0.0.1\n"),
        ("bad boolean", "require_tls = perhaps\n"),
        ("missing '='", "hostname mx.test\n"),
        ("ANONYMOUS", "sasl_mechanisms = ANONYMOUS PLAIN\n"),
        ("no mechanism", "sasl_mechanisms =\n"),
        ("empty bracketed host", "bounce_relay = []:25\n"),
        ("long socket path", "lmtp_listen = unix:/%s\n" % ("a" * 120)),
        ("NUL byte", "hostname = mx\0evil.test\n"),
        ("trailing comment", "queue_lifetime = 5d   # five days\n"),
    ]
    for what, line in cases:
        path = env.path("bad.conf")
        head = without_key(base, line) + "# padding\n"
        with open(path, "w") as f:
            f.write(head + line)
        r = env.odmrd_check(conf=path)
        out = r.stdout + r.stderr
        check(r.returncode == 78, "odmrd -t with %s exited %d (expected 78): "
              "%s" % (what, r.returncode, out.strip()))
        want = "%s:%d:" % (path, head.count("\n") + 1)
        check(want in out, "odmrd -t with %s: message lacks %r: %r"
              % (what, want, out.strip()))
    r = env.odmrd_check(conf=env.path("missing.conf"))
    check(r.returncode == 78, "odmrd -t with a missing file exited %d"
          % r.returncode)
    # a key set twice: which one was meant is not guessed
    path = env.path("bad.conf")
    with open(path, "w") as f:
        f.write(base + "hostname = other.test\n")
    r = env.odmrd_check(conf=path)
    out = r.stdout + r.stderr
    check(r.returncode == 78 and "hostname: set again (first on line" in out,
          "odmrd -t with hostname twice: exit %d, %r" % (r.returncode, out))
    r = env.odmrd_check()
    check(r.returncode == 0, "odmrd -t on the unchanged configuration: %r"
          % r.stderr)
    # listeners: an address this host does not have, a socket directory
    # that does not exist; a port in use (the running daemon) is fine
    for what, line, want in (
            ("trailing comment", "queue_lifetime = 5d   # five days\n",
             "starts a comment only at the beginning of a line"),
            ("mechanism nobody provides", "sasl_mechanisms = FOO-BAR\n",
             "none of \"FOO-BAR\" is provided"),
            ("listener used twice", "lmtp_listen = %s\n" % base.split(
                "smtp_listen = ")[1].split("\n")[0],
             "smtp_listen and lmtp_listen both listen on 127.0.0.1:"),
            ("foreign address", "smtp_listen = 192.0.2.1:2525\n",
             "smtp_listen 192.0.2.1:2525: Cannot assign requested address"),
            ("missing socket directory",
             "lmtp_listen = unix:%s/lmtp\n" % env.path("no-such-dir"),
             "no-such-dir: No such file or directory")):
        path = env.path("bad.conf")
        with open(path, "w") as f:
            f.write(without_key(base, line) + line)
        r = env.odmrd_check(conf=path)
        out = r.stdout + r.stderr
        check(r.returncode == 78 and want in out,
              "odmrd -t with a %s: exit %d, %r" % (what, r.returncode, out))
    env.start()
    r = env.odmrd_check()
    check(r.returncode == 0, "odmrd -t while odmrd runs (listeners in use) "
          "exited %d: %s" % (r.returncode, (r.stdout + r.stderr).strip()))
    env.stop()
    # odmrd itself refuses to start with a bad configuration
    path = env.path("bad.conf")
    with open(path, "w") as f:
        f.write(base + "no_such_key = 1\n")
    r = env.run([env.odmrd_bin, "-f", "-c", path], timeout=10)
    check(r.returncode == 78, "odmrd -f with a bad config exited %d: %s"
          % (r.returncode, (r.stdout + r.stderr).strip()))
    # odmrctl too
    r = env.odmrctl("user", "list", conf=path)
    expect_exit(r, EX_CONFIG, "odmrctl with a bad config")
