"""fail2ban (issue 10): contrib/fail2ban/filter.d/odmrd.conf, run by the
real fail2ban-regex (Debian package fail2ban) on the lines the real odmrd
wrote during the test, in the formats fail2ban reads them in.

Clients come from distinct loopback addresses, so that the number of lines
the filter matches can be checked per address, exactly: a filter that is
too loose (counts a successful login, a require_tls refusal, a connection
limit) or too strict (misses a throttling line) fails.

  127.0.0.21  3 failed CRAM-MD5 logins                 3 matches
  ::1         1 failed login over IPv6                  1 match
  127.0.0.22  2 failures with auth_failure_limit = 2,   4 matches
              then an AUTH refused by the throttle      (2 failed, blocked,
                                                         refused)
  127.0.0.23  2 RCPTs to a domain odmrd does not serve  2 matches
  127.0.0.25  a successful login                        none
  127.0.0.26  AUTH refused by require_tls = yes         none
  127.0.0.27  refused by max_connections_per_ip         none

odmrd -f writes to stderr what it sends to syslog (facility mail) as
"odmrd[PID]: TEXT"; the test puts a date and a host name in front, as
rsyslog (/var/log/mail.log) and "journalctl -o short" would.

Accounts: alice ("secret") owns example.org."""

import ast
import base64
import collections
import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import shutil
import socket

from harness import SMTP, SMTPClosed, check, check_reply, fail, need, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FILTER = os.path.join(ROOT, "contrib", "fail2ban", "filter.d", "odmrd.conf")
PASSWORD = "secret"
MONTHS = ("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec").split()
ODMRD_LINE = re.compile(r"^odmrd\[\d+\]: ")


# ------------------------------------------------------------ clients

def cram(env, source, password, host="127.0.0.1"):
    """One connection, EHLO, AUTH CRAM-MD5; returns the final reply."""
    with SMTP(port=env.odmr_port, host=host, source=source, timeout=30) as s:
        check_reply(s.cmd("EHLO customer.test"), 250)
        code, text = s.cmd("AUTH CRAM-MD5")
        if code == 334:
            chal = base64.b64decode(text)
            digest = hmac.new(password.encode(), chal, hashlib.md5).hexdigest()
            code, text = s.cmd(base64.b64encode(
                ("alice %s" % digest).encode()).decode())
        try:
            s.quit()
        except (SMTPClosed, OSError):
            pass
    return code, text


def ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6)
        try:
            s.bind(("::1", 0))
        finally:
            s.close()
        return True
    except OSError:
        return False


def setup(env, **conf):
    env.write_conf(**conf)
    if not os.path.exists(env.db):
        env.add_user("alice", PASSWORD)
        env.add_domain("example.org", "alice")
    env.start()


def provoke(env):
    """Runs the clients of the table above against three odmrd runs (the
    log accumulates) and returns whether ::1 took part."""
    v6 = ipv6_loopback()
    # run 1: failures that stay below auth_failure_limit, relay probing,
    # a customer logging in
    listen = "127.0.0.1:%d" % env.odmr_port
    if v6:
        listen += ", [::1]:%d" % env.odmr_port
    setup(env, odmr_listen=listen, auth_failure_limit="10",
          auth_failure_window="60s")
    for i in range(3):
        code, text = cram(env, "127.0.0.21", "wrong-%d" % i)
        check(code == 535, "127.0.0.21 failure %d: %d %s" % (i + 1, code, text))
    if v6:
        code, text = cram(env, None, "wrong", host="::1")
        check(code == 535, "::1 failure: %d %s" % (code, text))
    with SMTP(port=env.smtp_port, source="127.0.0.23") as s:
        check_reply(s.cmd("EHLO probe.test"), 250)
        check_reply(s.cmd("MAIL FROM:<probe@probe.test>"), 250)
        for rcpt in ("victim@example.com", "other@example.net"):
            check_reply(s.cmd("RCPT TO:<%s>" % rcpt), 550, "5.7.1")
        s.quit()
    code, text = cram(env, "127.0.0.25", PASSWORD)
    check(code == 235, "127.0.0.25 login: %d %s" % (code, text))
    env.stop()

    # run 2: odmrd's own throttling
    setup(env, odmr_listen="127.0.0.1:%d" % env.odmr_port,
          auth_failure_limit="2", auth_failure_window="60s")
    for i in range(2):
        code, text = cram(env, "127.0.0.22", "wrong-%d" % i)
        check(code == 535, "127.0.0.22 failure %d: %d %s" % (i + 1, code, text))
    code, text = cram(env, "127.0.0.22", PASSWORD)
    check(code == 454, "127.0.0.22 after the limit: %d %s" % (code, text))
    env.stop()

    # run 3: things that are not attacks
    env.make_cert()
    setup(env, auth_failure_limit="10", require_tls="yes",
          max_connections_per_ip="1")
    with SMTP(port=env.odmr_port, source="127.0.0.26") as s:
        check_reply(s.cmd("EHLO customer.test"), 250)
        check_reply(s.cmd("AUTH CRAM-MD5"), 530, "5.7.0")
        s.quit()
    held = SMTP(port=env.smtp_port, source="127.0.0.27", timeout=10)
    try:
        check_reply(held.greeting, 220, what="held connection")
        s = SMTP(port=env.smtp_port, source="127.0.0.27", timeout=10,
                 greeting=False)
        try:
            check_reply(s.reply(), 421, "4.7.0", what="second connection")
        finally:
            s.close()
    finally:
        held.close()
    wait_for(lambda: "connection from 127.0.0.27 refused" in env.log(),
             what="the max_connections_per_ip line")
    env.stop()

    log = env.log()
    for what in ("127.0.0.25: authenticated as alice",
                 "127.0.0.26: AUTH refused: require_tls = yes",
                 "throttle: 127.0.0.22: AUTH blocked for 60s after 2 "
                 "authentication",
                 "throttle: 127.0.0.22: AUTH refused: blocked"):
        check(what in log, "odmrd did not log %r; log:\n%s" % (what, log[-3000:]))
    return v6


# ------------------------------------------------------------ fail2ban

def stamp(i, journal):
    """A date of line i as rsyslog ("Dec  2 05:06:19") or journalctl -o
    short ("Dec 02 05:06:19") writes it, in the C locale."""
    t = datetime.datetime(2000, 12, 2, 5, 6, 19) + datetime.timedelta(seconds=i)
    day = ("%02d" if journal else "%2d") % t.day
    return "%s %s %s" % (MONTHS[t.month - 1], day, t.strftime("%H:%M:%S"))


def write_log(env, name, lines, journal=False, prefix=""):
    path = env.path(name)
    with open(path, "w") as f:
        for i, line in enumerate(lines):
            f.write("%s mx1 %s%s\n" % (stamp(i, journal), prefix, line))
    return path


def regex(env, log, mode="normal"):
    """Runs fail2ban-regex on the file; returns a Counter of the addresses
    of the matched lines.  Also checks fail2ban read every line of the file
    (fail2ban-regex takes a file name it cannot open for a log line)."""
    prog = need("fail2ban-regex")
    check(os.path.isfile(log), "no log file %s" % log)
    with open(log) as f:
        nlines = sum(1 for _ in f)
    flt = FILTER if mode == "normal" else "%s[mode=%s]" % (FILTER, mode)
    r = env.run([prog, "-r", log, flt], timeout=120)
    check(r.returncode == 0, "fail2ban-regex %s %s: exit %d\n%s%s" % (
        log, flt, r.returncode, r.stdout[-3000:], r.stderr[-2000:]))
    m = re.search(r"^Lines: (\d+) lines, (\d+) ignored, (\d+) matched, "
                  r"(\d+) missed", r.stdout, re.M)
    check(m, "no summary from fail2ban-regex:\n%s" % r.stdout[-3000:])
    total, ignored, matched, _ = (int(x) for x in m.groups())
    check(total == nlines, "fail2ban-regex read %d of the %d lines of %s:\n%s"
          % (total, nlines, log, r.stdout[-3000:]))
    check(ignored == 0, "%d lines ignored" % ignored)
    check("Found a match but no valid date" not in r.stdout + r.stderr,
          "fail2ban found no date:\n%s" % r.stdout[-2000:])

    r = env.run([prog, "-r", "-o", "ip", log, flt], timeout=120)
    check(r.returncode == 0, "fail2ban-regex -o ip %s: exit %d\n%s%s" % (
        flt, r.returncode, r.stdout[-3000:], r.stderr[-2000:]))
    got = collections.Counter()
    for line in r.stdout.splitlines():
        try:
            got[str(ipaddress.ip_address(line.strip()))] += 1
        except ValueError:
            fail("fail2ban-regex -o ip printed %r:\n%s" % (line, r.stdout[-2000:]))
    check(sum(got.values()) == matched, "%d addresses for %d matched lines"
          % (sum(got.values()), matched))
    return got


def compare(got, want, lines, what):
    """Exact per-address counts; on a difference shows that address's lines."""
    for addr in sorted(set(got) | set(want)):
        if got[addr] != want.get(addr, 0):
            mine = [l for l in lines if re.search(r"(?<![\w:.])%s(?![\w:.])"
                                                  % re.escape(addr), l)]
            fail("%s: %s matched %d times, expected %d; its lines:\n%s" % (
                what, addr, got[addr], want.get(addr, 0), "\n".join(mine)))


def test_filter_matches_odmrds_own_lines(env):
    need("fail2ban-regex")
    check(os.path.isfile(FILTER), "no filter %s" % FILTER)
    v6 = provoke(env)
    lines = [l for l in env.log().splitlines() if ODMRD_LINE.match(l)]
    check(len(lines) > 20, "only %d odmrd lines in the log" % len(lines))
    want = {"127.0.0.21": 3, "127.0.0.22": 4, "127.0.0.23": 2}
    if v6:
        want["::1"] = 1
    else:
        env.info("no IPv6 loopback: IPv6 covered by constructed lines only")
    for mode in ("normal", "aggressive"):
        # /var/log/mail.log of rsyslog (Debian's default template)
        got = regex(env, write_log(env, "mail.log", lines), mode)
        compare(got, want, lines, "mail.log, mode %s" % mode)
        # journalctl -o short: zero-padded day.  (fail2ban's own systemd
        # backend reads the journal, not a file: it needs a running
        # journald and is not tested here; it hands the filter
        # "HOST odmrd[PID]: TEXT" lines, the same text as these.)
        got = regex(env, write_log(env, "journal.txt", lines, journal=True),
                    mode)
        compare(got, want, lines, "journal, mode %s" % mode)
    for addr in ("127.0.0.25", "127.0.0.26", "127.0.0.27"):
        check(got[addr] == 0, "%s matched" % addr)
    # odmrd -f under systemd: the stderr copy of each line reaches the
    # journal (and /var/log/syslog) as "odmrd[PID]: odmrd[PID]: TEXT" and
    # must not count a second time
    got = regex(env, write_log(env, "stderr-copy.txt", lines, journal=True,
                               prefix="odmrd[4242]: "), "aggressive")
    compare(got, {}, lines, "stderr copies")


def test_filter_on_constructed_lines(env):
    """Lines this test cannot make the real odmrd write, constructed from
    the exact formats in the C sources:
      - 550 5.1.1 (smtp_session.c): needs a recipient list, which this test
        does not depend on (odmrctl's recipient commands are another part
        of issue 10); only the aggressive mode counts it;
      - "the account is under attack" (guard.c): needs many password
        checks of one account queued at the same moment;
      - 2001:db8::1 (a documentation address: no route on loopback);
      - customer lines of delivery.c after the ODMR reversal: the address
        there is our customer's, and "customer refused" quotes the
        customer's reply, which a customer could make look like a
        rejection;
      - a client-chosen account name and recipient that try to name
        another address."""
    need("fail2ban-regex")
    lines = [
        "odmrd[100]: reject: RCPT from 127.0.0.24: 550 5.1.1 <nobody@example."
        "org>: Recipient address rejected: User unknown",
        "odmrd[100]: throttle: 127.0.0.28: AUTH for account alice refused: "
        "the account is under attack, too many password checks queued",
        "odmrd[100]: 2001:db8::1: authentication failed, mechanism "
        "SCRAM-SHA-256 (authentication failure)",
        "odmrd[100]: warning: throttle: 2001:db8::1: AUTH blocked for 600s "
        "after 10 authentication attempts without success",
        "odmrd[100]: throttle: 2001:db8::1: AUTH refused: blocked after 10 "
        "authentication attempts in 600s",
        "odmrd[100]: 4XbZ2k1Q7Qz: timeout after RCPT TO to customer 127.0.0.29",
        "odmrd[100]: timeout after EHLO to customer 127.0.0.29",
        "odmrd[100]: 127.0.0.29: customer refused RCPT TO: 550 5.7.1 "
        "<x@example.com>: Relay access denied",
        "odmrd[100]: warning: throttle: account alice: 12 authentication "
        "failures from other addresses in 600s: its password checks are "
        "spaced 100ms apart (addresses it logged in from are not slowed); "
        "last from 127.0.0.30",
        "odmrd[100]: debug: throttle: 127.0.0.30: AUTH for account alice "
        "waits 100ms",
        "odmrd[100]: warning: connection from 127.0.0.31 refused: "
        "max_connections (100) reached",
        "odmrd[100]: 127.0.0.32: AUTH refused: require_tls = yes and the "
        "session is not encrypted (fetchmail never uses STARTTLS for ODMR)",
        "odmrd[100]: 127.0.0.33: authenticated as alice with CRAM-MD5 over TLS",
        "odmrd[100]: reject: RCPT from 127.0.0.34: 550 5.7.1 <a@127.0.0.35: "
        "authentication failed, mechanism X>: Relay access denied",
        "odmrd[100]: throttle: 127.0.0.36: AUTH for account 127.0.0.37: "
        "refused: the account is under attack, too many password checks "
        "queued",
        "odmrd[100]: reject: RCPT from 127.0.0.38: 452 4.2.2 quota exceeded "
        "for example.org",
    ]
    normal = {"127.0.0.28": 1, "2001:db8::1": 3, "127.0.0.34": 1,
              "127.0.0.36": 1}
    aggressive = dict(normal, **{"127.0.0.24": 1})
    for journal in (False, True):
        log = write_log(env, "constructed.log", lines, journal=journal)
        compare(regex(env, log), normal, lines, "normal")
        compare(regex(env, log, "aggressive"), aggressive, lines, "aggressive")


def test_jail_configuration(env):
    """contrib/fail2ban/jail.d/odmrd.conf as fail2ban-client reads it
    (-d: prints the commands it would send; no server is started) with
    Debian's /etc/fail2ban around it: the systemd backend with the journal
    match, ports 25 and 366, the limits, and "mode = aggressive" reaching
    the filter."""
    client = need("fail2ban-client")
    check(os.path.isfile("/etc/fail2ban/jail.conf"),
          "no /etc/fail2ban/jail.conf (Debian package fail2ban)")
    conf = env.path("fail2ban")
    shutil.copytree("/etc/fail2ban", conf, symlinks=True)
    for name in ("jail.local", "fail2ban.local"):   # this machine's own
        if os.path.exists(os.path.join(conf, name)):
            os.remove(os.path.join(conf, name))
    for d in ("jail.d", "filter.d"):
        for name in os.listdir(os.path.join(conf, d)):
            if d == "jail.d" or name.startswith("odmrd."):
                os.remove(os.path.join(conf, d, name))
        shutil.copy(os.path.join(ROOT, "contrib", "fail2ban", d, "odmrd.conf"),
                    os.path.join(conf, d))

    def dump():
        r = env.run([client, "-c", conf, "-d"], timeout=60)
        check(r.returncode == 0, "fail2ban-client -d: exit %d\n%s%s" % (
            r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
        cmds = [ast.literal_eval(l) for l in r.stdout.splitlines()
                if l.startswith("['")]
        return [c for c in cmds if len(c) > 1 and c[1] == "odmrd"], r.stdout

    cmds, out = dump()
    check(["add", "odmrd", "systemd"] in cmds, "no systemd jail odmrd:\n%s"
          % out[-2000:])
    check(["set", "odmrd", "addjournalmatch", "_SYSTEMD_UNIT=odmrd.service",
           "_TRANSPORT=syslog"] in cmds, "journal match:\n%s" % out[-2000:])
    for opt, value in (("maxretry", 15), ("findtime", "1h"), ("bantime", "1h")):
        check(["set", "odmrd", opt, value] in cmds, "%s is not %r" % (opt, value))
    check(["start", "odmrd"] in cmds, "the jail is not enabled")
    check("['port', 'smtp,366']" in out, "ports: %s" % out[-2000:])

    def failregexes(cmds):
        for c in cmds:
            if c[:3] == ["multi-set", "odmrd", "addfailregex"]:
                return c[3]
        fail("no failregex in %s" % cmds)
    check(not any("5\\.1\\.1" in r for r in failregexes(cmds)),
          "5.1.1 counted in mode normal")
    with open(os.path.join(conf, "jail.d", "odmrd.local"), "w") as f:
        f.write("[odmrd]\nmode = aggressive\n")
    cmds, out = dump()
    check(sum("5\\.1\\.1" in r for r in failregexes(cmds)) == 1,
          "mode = aggressive does not reach the filter: %s" % failregexes(cmds))
