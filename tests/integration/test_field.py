"""Field defects of issue 9 (SPEC 3.4, 3.5): every domain that is accepted
is queueable (IDNA, the longest domains, a trailing root dot), and the
spool delivers only what odmrd wrote (symbolic links, NUL octets).

Black-box against the real odmrd, odmrctl and odmr-fetch (delivering into
a Maildir).  Accounts: alice ("secret") owns example.org and whatever the
test binds."""

import glob
import os

from harness import check, check_reply, queue_id_of, to_crlf

UNI = "\u00fcn\u00ef.test"              # "ünï.test"
ACE = "xn--n-nga1b.test"                # its A-label form
LONGEST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])   # 255 octets
EX_DATAERR = 65


def setup(env):
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    env.start()


def maildir(env):
    d = env.path("Maildir")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    return d


def delivered(md):
    out = []
    for f in sorted(glob.glob(os.path.join(md, "new", "*"))):
        with open(f, "rb") as fh:
            out.append(fh.read())
    return out


def fetch(env, md, *domains):
    """odmr-fetch for alice into the Maildir; returns CompletedProcess."""
    e = dict(os.environ, ODMR_PASSWORD="secret")
    return env.run([env.fetch_bin, "-s", "127.0.0.1:%d" % env.odmr_port,
                    "-u", "alice", "--tls", "off", "--timeout", "20",
                    "--lock", env.path("fetch.lock"),
                    "--deliver", "maildir:" + md] + list(domains),
                   env=e, timeout=90)


def transaction(env, rcpts, body="Subject: t\r\n\r\nbody\r\n", utf8=False,
                expect_data=250):
    """MAIL/RCPT.../DATA; every RCPT must be accepted.  Returns the reply
    to the final dot."""
    with env.smtp() as s:
        check_reply(s.cmd("EHLO client.test"), 250)
        check_reply(s.cmd("MAIL FROM:<s@remote.test>%s"
                          % (" SMTPUTF8" if utf8 else "")), 250, "2.1.0")
        for r in rcpts:
            check_reply(s.cmd("RCPT TO:<%s>" % r), 250, "2.1.5", "RCPT " + r)
        reply = s.data(to_crlf(body))
        s.quit()
    check(reply[0] == expect_data, "end of data: %r" % (reply,))
    return reply


# --------------------------------------------------------------- domains

def test_idn_domain_is_one_domain_in_both_spellings(env):
    """A U-label domain and its A-label are one binding and one queue;
    either ATRN spelling drains it; odmrctl shows the readable name."""
    setup(env)
    env.add_domain(UNI, "alice")
    r = env.odmrctl("domain", "add", ACE, "alice")
    check(r.returncode == 0, "binding the A-label again: %r" % (r,))
    listing = env.odmrctl_ok("domain", "list").stdout
    check("%s alice" % UNI in listing, "domain list: %r" % listing)
    check(ACE not in listing, "one binding, shown readable: %r" % listing)
    # mail to either spelling, and a hosted co-recipient, lands in one queue
    transaction(env, ["u@" + UNI, "alice@example.org"], utf8=True)
    transaction(env, ["v@" + ACE.upper()])
    env.odmrctl_ok("enqueue", "-f", "s@remote.test", "w@" + UNI,
                   input="Subject: pipe\n\nthird\n")
    check(len(env.queued_ids(ACE)) == 3, "queue %s: %r" % (ACE, env.queued()))
    check(len(env.queued_ids("example.org")) == 1, "co-recipient: %r"
          % env.queued())
    check(sorted(os.listdir(env.queue_dir())) == sorted([ACE, "example.org"]),
          "queue directories: %r" % os.listdir(env.queue_dir()))
    summary = env.odmrctl_ok("queue", "summary").stdout
    check(any(l.split()[:2] == [UNI, "3"] for l in summary.splitlines()),
          "queue summary: %r" % summary)
    for spelling in (UNI, ACE):
        out = env.odmrctl_ok("queue", spelling).stdout
        check(out.count("domain: " + UNI) == 3, "queue %s: %r" % (spelling, out))
    md = maildir(env)
    r = fetch(env, md, UNI)
    check(r.returncode == 0, "odmr-fetch %s: %d %s" % (UNI, r.returncode, r.stderr))
    check(len(delivered(md)) == 3, "delivered: %d" % len(delivered(md)))
    check(env.queued_ids(ACE) == [], "left: %r" % env.queued())
    # and the A-label spelling drains it too
    transaction(env, ["x@" + UNI], utf8=True)
    r = fetch(env, md, ACE)
    check(r.returncode == 0, "odmr-fetch %s: %d %s" % (ACE, r.returncode, r.stderr))
    check(len(delivered(md)) == 4 and env.queued_ids(ACE) == [],
          "after the second ATRN: %d delivered, %r" % (len(delivered(md)),
                                                      env.queued()))


def test_idn_bare_atrn_and_raw_atrn_spellings(env):
    """The ATRN command itself accepts either spelling; a bare ATRN
    covers the IDN domain."""
    setup(env)
    env.add_domain(UNI, "alice")
    transaction(env, ["u@" + UNI], utf8=True)
    md = maildir(env)
    r = fetch(env, md)                     # bare ATRN: all of alice's domains
    check(r.returncode == 0 and len(delivered(md)) == 1,
          "bare ATRN: exit %d, %d delivered; %s" % (r.returncode,
                                                   len(delivered(md)), r.stderr))


def test_invalid_idna_is_refused_everywhere(env):
    setup(env)
    for bad in ("\u2603.net", "xn--zz.test", "xn--a.test"):
        r = env.odmrctl("domain", "add", bad, "alice")
        check(r.returncode == EX_DATAERR, "domain add %r: %r" % (bad, r))
        check("invalid domain name" in r.stderr, "message: %r" % r.stderr)
        r = env.odmrctl("enqueue", "-f", "s@remote.test", "u@" + bad,
                        input="Subject: x\n\nx\n")
        check(r.returncode == EX_DATAERR, "enqueue to %r: %r" % (bad, r))
    with env.smtp() as s:
        check_reply(s.cmd("EHLO client.test"), 250)
        check_reply(s.cmd("MAIL FROM:<s@remote.test> SMTPUTF8"), 250)
        check_reply(s.cmd("RCPT TO:<u@\u2603.net>"), 501, "5.1.3")
        check_reply(s.cmd("RCPT TO:<u@xn--zz.test>"), 501, "5.1.3")
        check_reply(s.cmd("RCPT TO:<u@example.org>"), 250, "2.1.5")
        s.quit()
    check(env.queued() == [], "queued: %r" % env.queued())


def test_longest_domain_queues_and_drains(env):
    """255 octets (four 63-octet labels) is a valid domain: it must queue
    (today its temporary name was too long), list and be delivered."""
    setup(env)
    env.add_domain(LONGEST, "alice")
    transaction(env, ["u@" + LONGEST, "alice@example.org"])
    env.odmrctl_ok("enqueue", "-f", "s@remote.test", "v@" + LONGEST,
                   input="Subject: pipe\n\nlong\n")
    check(len(env.queued_ids(LONGEST)) == 2, "queued: %r" % env.queued())
    summary = env.odmrctl_ok("queue", "summary").stdout
    check(LONGEST in summary, "queue summary: %r" % summary)
    md = maildir(env)
    r = fetch(env, md, LONGEST)
    check(r.returncode == 0, "odmr-fetch: %d %s" % (r.returncode, r.stderr))
    check(len(delivered(md)) == 2 and env.queued_ids(LONGEST) == [],
          "delivered %d, left %r" % (len(delivered(md)), env.queued()))


def test_trailing_root_dot_is_the_hosted_domain(env):
    setup(env)
    reply = transaction(env, ["u@EXAMPLE.ORG."])
    qid = queue_id_of(reply[1])
    check(env.queued() == [("example.org", qid)], "queued: %r" % env.queued())
    rcpts = [r["addr"] for r in env.envelope("example.org", qid)["rcpts"]]
    check(rcpts == ["u@EXAMPLE.ORG"], "recipient stored as %r" % rcpts)


# ------------------------------------------------------- what the spool holds

def setup_two_domains(env):
    """alice has example.org and example.net: a message for both is a
    data file linked into each with an envelope each (server/queue.h)."""
    env.add_user("alice")
    env.add_domain("example.org", "alice")
    env.add_domain("example.net", "alice")
    env.start()


def test_symlinked_data_file_is_never_delivered(env):
    setup_two_domains(env)
    secret = env.path("secret.txt")
    with open(secret, "wb") as f:
        f.write(b"Subject: not from the queue\r\n\r\nSECRET-CONTENT\r\n")
    qid = queue_id_of(transaction(env, ["u@example.org", "u@example.net"])[1])
    m = os.path.join(env.queue_dir("example.org"), qid + ".m")
    os.unlink(m)
    os.symlink(secret, m)
    md = maildir(env)
    fetch(env, md, "example.org")
    for msg in delivered(md):
        check(b"SECRET-CONTENT" not in msg, "the linked file was delivered")
    check(delivered(md) == [], "delivered: %r" % delivered(md))
    check(("example.org", qid) in env.queued(), "the message must be left "
          "alone: %r" % env.queued())
    check(os.path.islink(m), "the link was touched")
    log = env.log()
    check("%s: cannot open message data" % qid in log and
          "symbolic links" in log, "no log line for the link: %s" % log[-1500:])
    check("%s: to=" % qid not in log or "status=sent" not in log,
          "logged as sent")


def test_symlinked_queue_file_is_never_delivered(env):
    """A queue file (data and envelope in one, server/qfile.h) replaced by
    a link to a well-formed copy elsewhere: refused as a link, left alone,
    and what it points at is never delivered."""
    setup(env)
    qid = queue_id_of(transaction(env, ["u@example.org"])[1])
    q = os.path.join(env.queue_dir("example.org"), qid + ".q")
    with open(q, "rb") as f:
        raw = f.read()
    check(b"\r\nSubject: t\r\n" in raw and raw.count(b"body") == 1,
          "queue file: %r" % raw[:200])
    elsewhere = env.path("outside.q")
    with open(elsewhere, "wb") as f:
        f.write(raw.replace(b"body", b"SECR"))   # same length: still exact
    os.unlink(q)
    os.symlink(elsewhere, q)
    md = maildir(env)
    fetch(env, md, "example.org")
    check(delivered(md) == [], "delivered through a linked queue file: %r"
          % delivered(md))
    check(os.path.islink(q), "the link was touched")
    check("a symbolic link" in env.log(), "log: %s" % env.log()[-1500:])


def test_symlinked_envelope_is_left_alone(env):
    setup_two_domains(env)
    qid = queue_id_of(transaction(env, ["u@example.org", "u@example.net"])[1])
    e = os.path.join(env.queue_dir("example.org"), qid + ".e")
    elsewhere = env.path("outside.e")
    os.rename(e, elsewhere)
    os.symlink(elsewhere, e)
    md = maildir(env)
    fetch(env, md, "example.org")
    check(delivered(md) == [], "delivered through a linked envelope")
    check("a symbolic link" in env.log(), "log: %s" % env.log()[-1500:])


def test_symlinked_domain_directory_is_refused(env):
    """ATRN for a domain whose queue directory is a link: 451, not 250
    followed by nothing; inbound mail for it: 451 4.3.0 (a local error,
    not a full disk)."""
    setup(env)
    env.add_domain("example.net", "alice")
    transaction(env, ["u@example.net"])
    real = env.queue_dir("example.net")
    moved = env.path("elsewhere")
    os.rename(real, moved)
    os.symlink(moved, real)
    md = maildir(env)
    r = fetch(env, md, "example.net")
    check(r.returncode == 75, "odmr-fetch: exit %d (%s)" % (r.returncode, r.stderr))
    check("451" in r.stderr, "odmr-fetch stderr: %r" % r.stderr)
    check(delivered(md) == [], "delivered through a linked directory")
    check("ATRN for example.net refused" in env.log(), "log: %s"
          % env.log()[-1500:])
    with env.smtp() as s:
        check_reply(s.cmd("EHLO client.test"), 250)
        check_reply(s.cmd("MAIL FROM:<s@remote.test>"), 250)
        check_reply(s.cmd("RCPT TO:<v@example.net>"), 250)
        check_reply(s.cmd("DATA"), 451, "4.3.0")
        s.quit()


def nul_session(env, lmtp, data):
    s = env.lmtp() if lmtp else env.smtp()
    with s:
        check_reply(s.cmd(("LHLO" if lmtp else "EHLO") + " client.test"), 250)
        check_reply(s.cmd("MAIL FROM:<s@remote.test>"), 250)
        check_reply(s.cmd("RCPT TO:<u@example.org>"), 250)
        check_reply(s.cmd("DATA"), 354)
        s.send_raw(data)
        check_reply(s.reply(), 554, "5.6.0", "end of data")
        # the session goes on: the NUL did not end the data early
        check_reply(s.cmd("NOOP"), 250)
        s.quit()


def test_nul_in_data_is_refused(env):
    setup(env)
    for lmtp in (False, True):
        for data in (b"Subject: a\r\n\r\nx\r\n\x00.\r\nafter\r\n.\r\n",
                     b"Subject: b\r\n\r\nx\r\n.\x00\r\nafter\r\n.\r\n",
                     b"Subject: c\x00\r\n\r\nx\r\n.\r\n"):
            nul_session(env, lmtp, data)
    check(env.queued() == [], "queued: %r" % env.queued())
    r = env.odmrctl("enqueue", "-f", "s@remote.test", "u@example.org",
                    input=b"Subject: d\n\nx\n\x00.\nmore\n")
    check(r.returncode == EX_DATAERR, "enqueue with NUL: %r" % (r,))
    check("NUL" in r.stderr, "message: %r" % r.stderr)
    check(env.queued() == [], "queued: %r" % env.queued())
    check(env.spool_problems() == [], "spool: %r" % env.spool_problems())
