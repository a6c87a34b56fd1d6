"""Facing the internet (issue 10): password guessing across connections,
per-service session budgets, stress mode.  Black-box against the real
odmrd; clients come from many addresses of 127.0.0.0/8.

Accounts: alice ("secret") owns example.org."""

import base64
import hashlib
import hmac
import signal
import time

from harness import SMTP, SMTPClosed, check, check_reply, wait_for

PASSWORD = "secret"


def setup(env, **conf):
    conf.setdefault("timeout", "30s")
    env.write_conf(**conf)
    env.add_user("alice", PASSWORD)
    env.add_domain("example.org", "alice")
    env.start()


def odmr(env, source):
    return SMTP(port=env.odmr_port, source=source, timeout=30)


def cram(s, user, password):
    """AUTH CRAM-MD5 after EHLO; returns (reply, seconds the final reply
    took after the response was sent)."""
    check_reply(s.cmd("EHLO customer.test"), 250)
    code, text = s.cmd("AUTH CRAM-MD5")
    if code != 334:
        return (code, text), 0.0
    chal = base64.b64decode(text)
    digest = hmac.new(password.encode(), chal, hashlib.md5).hexdigest()
    t0 = time.monotonic()
    r = s.cmd(base64.b64encode(("%s %s" % (user, digest)).encode()).decode())
    return r, time.monotonic() - t0


def attempt(env, source, password, user="alice"):
    """One connection, one AUTH; returns (code, text, seconds)."""
    with odmr(env, source) as s:
        (code, text), took = cram(s, user, password)
        try:
            s.quit()
        except (SMTPClosed, OSError):
            pass
    return code, text, took


def test_address_is_blocked_across_connections(env):
    """auth_failure_limit failures from one address, each on a new
    connection, block it for every later AUTH (454, connection ended);
    other addresses, and the customer, are not affected."""
    setup(env, auth_failure_limit="3", auth_failure_window="60s")
    for i in range(3):
        code, text, _ = attempt(env, "127.0.0.2", "wrong-%d" % i)
        check(code == 535, "failure %d: %d %s" % (i + 1, code, text))
    with odmr(env, "127.0.0.2") as s:
        check_reply(s.cmd("EHLO customer.test"), 250)
        check_reply(s.cmd("AUTH CRAM-MD5"), 454, "4.7.0")
        check(s.expect_closed(), "the blocked session was not ended")
    # the right password does not help a blocked address ...
    code, text, _ = attempt(env, "127.0.0.2", PASSWORD)
    check(code == 454, "blocked address with the right password: %d %s"
          % (code, text))
    # ... while another address logs in at once
    code, text, took = attempt(env, "127.0.0.3", PASSWORD)
    check(code == 235 and took < 1.0, "customer: %d %s after %.2fs"
          % (code, text, took))
    log = env.log()
    check("throttle: 127.0.0.2: AUTH blocked for 60s after 3 authentication "
          "failures" in log, "no throttling line: %s" % log[-2000:])
    check("throttle: 127.0.0.2: AUTH refused: blocked" in log,
          "no line for the refused AUTH: %s" % log[-2000:])


def test_failures_are_answered_later_and_later(env):
    setup(env, auth_failure_limit="10", auth_failure_window="60s")
    took = [attempt(env, "127.0.0.4", "wrong")[2] for _ in range(4)]
    env.info("535 after %s s" % ", ".join("%.2f" % t for t in took))
    check(took[0] >= 0.4, "first failure answered after %.2fs" % took[0])
    for a, b in zip(took, took[1:]):
        check(b > a * 1.5, "delays do not grow: %r" % took)
    check(took[3] < 6, "fourth delay %.2fs" % took[3])


def test_success_forgives_the_address(env):
    setup(env, auth_failure_limit="3", auth_failure_window="60s")
    for _ in range(2):
        attempt(env, "127.0.0.5", "wrong")
    code, _, _ = attempt(env, "127.0.0.5", PASSWORD)
    check(code == 235, "login: %d" % code)
    for i in range(2):
        code, text, took = attempt(env, "127.0.0.5", "wrong")
        check(code == 535 and took < 1.5, "after the success, failure %d: %d "
              "after %.2fs" % (i + 1, code, took))
    code, _, _ = attempt(env, "127.0.0.5", PASSWORD)
    check(code == 235, "not blocked: %d" % code)


def test_ipv4_addresses_count_separately(env):
    setup(env, auth_failure_limit="2", auth_failure_window="60s")
    for _ in range(2):
        attempt(env, "127.0.0.6", "wrong")
    code, _, _ = attempt(env, "127.0.0.7", "wrong")
    check(code == 535, "a neighbour address is not blocked: %d" % code)


# ------------------------------------------------------ session budgets

def hold(env, port, n, source):
    """n connections that only read the greeting."""
    held = []
    for _ in range(n):
        held.append(SMTP(port=port, source=source, timeout=10))
        check_reply(held[-1].greeting, 220, what="held connection")
    return held


def refused(port, source):
    s = SMTP(port=port, source=source, timeout=10, greeting=False)
    try:
        return s.reply()
    finally:
        s.close()


def test_smtp_flood_does_not_refuse_customers(env):
    setup(env, max_connections="20", smtp_max_connections="4",
          odmr_max_connections="4", lmtp_max_connections="2",
          max_connections_per_ip="20")
    held = hold(env, env.smtp_port, 4, "127.0.1.1")
    try:
        check_reply(refused(env.smtp_port, "127.0.1.2"), 421, "4.7.0")
        code, text, _ = attempt(env, "127.0.1.3", PASSWORD)
        check(code == 235, "customer on the ODMR port: %d %s" % (code, text))
        check_reply(refused(env.lmtp_port, "127.0.1.3"), 220, what="LMTP")
    finally:
        for s in held:
            s.close()
    wait_for(lambda: "smtp_max_connections (4) reached" in env.log(),
             what="the refusal's log line")
    # the budget frees up again
    wait_for(lambda: refused(env.smtp_port, "127.0.1.2")[0] == 220, timeout=10,
             what="an SMTP slot after the flood")


def test_per_address_limit_counts_per_service(env):
    setup(env, max_connections_per_ip="2")
    held = hold(env, env.smtp_port, 2, "127.0.2.1")
    try:
        check_reply(refused(env.smtp_port, "127.0.2.1"), 421, "4.7.0")
        code, text, _ = attempt(env, "127.0.2.1", PASSWORD)
        check(code == 235, "the same address on the ODMR port: %d %s"
              % (code, text))
    finally:
        for s in held:
            s.close()
    check("max_connections_per_ip (2) for smtp" in env.log(),
          "log: %s" % env.log()[-1500:])


def test_defaults_share_max_connections(env):
    """Without per-service keys the budgets are shares of max_connections:
    a flood of port 25 still leaves room on port 366."""
    setup(env, max_connections="10", max_connections_per_ip="20")
    held = hold(env, env.smtp_port, 6, "127.0.3.1")   # 60% of 10
    try:
        check_reply(refused(env.smtp_port, "127.0.3.2"), 421, "4.7.0")
        code, text, _ = attempt(env, "127.0.3.3", PASSWORD)
        check(code == 235, "customer: %d %s" % (code, text))
    finally:
        for s in held:
            s.close()


def test_stress_mode_is_logged(env):
    setup(env, max_connections="20", smtp_max_connections="5",
          max_connections_per_ip="20")
    held = hold(env, env.smtp_port, 5, "127.0.4.1")
    try:
        wait_for(lambda: "stress: smtp sessions 5 of 5" in env.log(),
                 what="the stress line")
    finally:
        for s in held:
            s.close()
    wait_for(lambda: "stress: smtp sessions" in env.log() and
             "back to normal timeouts" in env.log(), timeout=10,
             what="the end of stress")


def test_throttling_needs_no_restart_and_survives_reload(env):
    """The table is the master's: a SIGHUP keeps it."""
    setup(env, auth_failure_limit="2", auth_failure_window="60s")
    for _ in range(2):
        attempt(env, "127.0.5.1", "wrong")
    env.daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in env.log(), what="reload")
    code, text, _ = attempt(env, "127.0.5.1", PASSWORD)
    check(code == 454, "after a reload the block holds: %d %s" % (code, text))


def test_server_closes_sessions_of_new_workers(env):
    """A worker forked for a connection must not keep an inherited copy
    of it: after 221 (or a 421 that ends a session) the client sees the
    connection closed, whichever worker served it."""
    setup(env)
    held = [SMTP(port=env.smtp_port, source="127.0.6.%d" % (i + 1), timeout=10)
            for i in range(6)]
    for s in held:
        check_reply(s.cmd("QUIT"), 221)
    for i, s in enumerate(held):
        check(s.expect_closed(wait=3), "connection %d stayed open after 221"
              % (i + 1))
        s.close()


def test_account_under_attack_is_slowed_but_not_locked(env):
    """Failures for one account from many addresses space its password
    checks for unknown addresses; the customer, from the address it
    logged in from before, still gets in at once."""
    setup(env, auth_failure_limit="10", auth_failure_window="60s")
    code, _, _ = attempt(env, "127.0.11.100", PASSWORD)
    check(code == 235, "customer's first login: %d" % code)
    for i in range(5):
        code, _, _ = attempt(env, "127.0.11.%d" % (i + 1), "wrong")
        check(code == 535, "guess %d: %d" % (i + 1, code))
    wait_for(lambda: "throttle: account alice: 5 authentication failures"
             in env.log(), what="the account's throttling line")
    results = []

    def guess(src):
        t0 = time.monotonic()
        code, _, _ = attempt(env, src, "wrong")
        results.append((code, time.monotonic() - t0))

    import threading
    threads = [threading.Thread(target=guess, args=("127.0.11.%d" % (10 + i),))
               for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    code, text, took = attempt(env, "127.0.11.100", PASSWORD)
    for t in threads:
        t.join(30)
    env.info("guesses answered after %s s; customer in %.2f s" % (
        ", ".join("%.1f" % t for _, t in sorted(results, key=lambda r: r[1])),
        took))
    check(code == 235 and took < 1.0, "the customer: %d %s after %.2fs"
          % (code, text, took))
    times = sorted(t for _, t in results)
    check(len(times) == 3 and all(c == 535 for c, _ in results),
          "guesses: %r" % results)
    check(times[2] - times[0] >= 3.0, "checks for the account are not spaced: "
          "%r" % times)


def test_many_customers_behind_one_address(env):
    """A NAT or CGNAT address: 30 customers log in at the same moment, well
    over auth_failure_limit, and every one gets in."""
    setup(env, auth_failure_limit="5", auth_failure_window="60s",
          max_connections_per_ip="40")
    import threading
    codes = []

    def login():
        codes.append(attempt(env, "127.0.12.1", PASSWORD)[0])

    threads = [threading.Thread(target=login) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    check(codes.count(235) == 30, "logins: %r" % sorted(codes))
