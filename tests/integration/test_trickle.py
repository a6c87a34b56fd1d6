"""Trickling clients cannot hold a session slot (issue 10): the real odmrd
on loopback.

`timeout` bounds each wait for the client; `command_deadline` bounds a
whole command line (and a SASL response line) once its first byte is in;
the DATA phase must end within timeout + bytes / data_min_rate; more than
100 NOOP/RSET/HELP/VRFY/EHLO/HELO end the session; a session that starts
while its service is above 80% of its budget has a 10 s idle timeout;
20 refused commands end it; a refused message is not read past twice
max_message_size; under TLS the handshake and each record keep to
command_deadline.

Accounts (harness.Env.setup_accounts): alice owns example.org.
Python 3 standard library only."""

import re
import select
import time

from harness import (SMTP, SMTPClosed, check, check_reply, fail, to_crlf)

DEADLINE_LINE = b"NOOP still typing, one byte per second\r\n"


def started(env, **conf):
    env.write_conf(**conf)
    env.setup_accounts()
    env.start()
    return env


def smtp_session(env):
    s = env.smtp()
    check_reply(s.greeting, 220, what="greeting")
    check_reply(s.cmd("EHLO client.test"), 250, what="EHLO")
    return s


def odmr_session(env):
    s = SMTP(port=env.odmr_port)
    check_reply(s.greeting, 220, what="ODMR greeting")
    check_reply(s.cmd("EHLO customer.test"), 250, what="EHLO")
    return s


def in_data(env):
    """An SMTP session that has just had its 354."""
    s = smtp_session(env)
    check_reply(s.cmd("MAIL FROM:<sender@remote.test>"), 250, "2.1.0", "MAIL")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5", "RCPT")
    check_reply(s.cmd("DATA"), 354, what="DATA")
    return s


def answer_within(s, seconds):
    """The server's reply if one starts arriving within seconds, else None;
    None also when the server reset the connection instead."""
    ready, _, _ = select.select([s.sock], [], [], seconds)
    if not ready:
        return None
    try:
        return s.reply()
    except SMTPClosed:
        return None


def trickle(s, data, what, chunk=1, interval=1.0, give_up=10.0):
    """Sends data chunk bytes every interval until the server says
    something; returns (reply or None if it reset the connection, seconds
    since the first byte).  Fails when the server lets it go on for
    give_up seconds."""
    t0 = time.time()
    for off in range(0, len(data), chunk):
        try:
            s.send_raw(data[off:off + chunk])
        except OSError:
            return None, time.time() - t0
        ready, _, _ = select.select([s.sock], [], [], interval)
        if ready:
            try:
                return s.reply(), time.time() - t0
            except SMTPClosed:
                return None, time.time() - t0
        if time.time() - t0 > give_up:
            break
    fail("%s: the server still waits after %.0fs of trickling"
         % (what, time.time() - t0))


def check_closed(s, what):
    check(s.expect_closed(), "%s: connection not closed after 421" % what)


def check_no_stress(env):
    check("stress mode" not in env.log(),
          "a session of an idle service was in stress mode:\n%s"
          % env.log_tail())


# --------------------------------------------------------------------------

def test_command_line_deadline(env):
    started(env, timeout="30s", command_deadline="3s")
    s = smtp_session(env)
    r, dt = trickle(s, DEADLINE_LINE, "command line at 1 byte/s")
    check(r is not None, "no 421 before the connection was closed")
    check_reply(r, 421, "4.4.2", "trickled command line")
    check("command deadline exceeded" in r[1], "421 text: %r" % (r,))
    check(2.5 <= dt <= 5.5, "421 after %.1fs; command_deadline is 3s" % dt)
    check_closed(s, "command deadline")
    log = env.log()
    check("command line not complete within command_deadline (3s)" in log,
          "no command_deadline log line:\n%s" % env.log_tail())
    check("(deadline exceeded)" in log, "the disconnect line does not say "
          "deadline exceeded:\n%s" % env.log_tail())
    check_no_stress(env)


def test_auth_response_deadline(env):
    started(env, timeout="30s", command_deadline="3s")
    s = odmr_session(env)
    check_reply(s.cmd("AUTH CRAM-MD5"), 334, what="AUTH CRAM-MD5")
    r, dt = trickle(s, b"YWxpY2UgMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\r\n",
                    "SASL response at 1 byte/s")
    check(r is not None, "no 421 before the connection was closed")
    check_reply(r, 421, "4.4.2", "trickled AUTH response")
    check("command deadline exceeded" in r[1], "421 text: %r" % (r,))
    check(2.5 <= dt <= 5.5, "421 after %.1fs; command_deadline is 3s" % dt)
    check_closed(s, "AUTH response deadline")
    check("command line not complete within command_deadline" in env.log(),
          "no command_deadline log line:\n%s" % env.log_tail())


def test_data_trickle_cut_off(env):
    started(env, timeout="3s", data_min_rate="1000")
    s = in_data(env)
    body = to_crlf("Subject: slow\r\n\r\n" + "x" * 60 + "\r\n")
    r, dt = trickle(s, body, "DATA at 1 byte/s")
    check(r is not None, "no 421 before the connection was closed")
    check_reply(r, 421, "4.4.2", "trickled DATA")
    check("data rate too low" in r[1], "421 text: %r" % (r,))
    check(2.5 <= dt <= 5.5, "421 after %.1fs; timeout 3s at 1 byte/s" % dt)
    check_closed(s, "DATA rate")
    check(not env.queued(), "a cut-off message was queued: %r" % env.queued())
    check(re.search(r"\w+: lost connection with \S+ during DATA \(data rate "
                    r"below data_min_rate: \d+ bytes in \d+ s\)", env.log()),
          "no data rate log line:\n%s" % env.log_tail())


def test_data_rate_counts_bytes(env):
    """1 MB/s wanted, timeout 3s: 2 MB sent at full speed are queued; 2 MB
    at 300 KB/s are cut off at about 3 / (1 - 0.3) = 4.3 s, although no
    single read ever waits long."""
    started(env, timeout="3s", data_min_rate="1000000")
    body = to_crlf("Subject: big\r\n\r\n" + ("y" * 76 + "\r\n") * 26000)
    check(len(body) > 2000000, "test body too small")
    s = in_data(env)
    s.send_raw(body + b".\r\n")
    check_reply(s.reply(), 250, "2.0.0", "2 MB at full speed")
    s.quit()
    check(len(env.queued()) == 1, "spool: %r" % env.queued())
    s = in_data(env)
    r, dt = trickle(s, body, "2 MB at 300 KB/s", chunk=30000, interval=0.1,
                    give_up=12)
    if r is not None:
        check_reply(r, 421, "4.4.2", "DATA at 300 KB/s")
        check("data rate too low" in r[1], "421 text: %r" % (r,))
    check(3.5 <= dt <= 7, "cut off after %.1fs, expected about 4.3s" % dt)
    check(len(env.queued()) == 1, "a cut-off message was queued: %r"
          % env.queued())
    check("data rate below data_min_rate" in env.log(),
          "no data rate log line:\n%s" % env.log_tail())


def test_junk_commands(env):
    started(env)
    junk = ["NOOP", "RSET", "HELP", "VRFY alice"]
    s = smtp_session(env)   # its EHLO is the first
    s.send_raw("".join(junk[i % 4] + "\r\n" for i in range(99)))
    for i in range(99):
        r = s.reply()
        check(r[0] in (214, 250, 252), "junk command %d: %r" % (i + 2, r))
    check_reply(s.cmd("NOOP"), 421, "4.7.0", "101st junk command")
    check("Too many commands" in s.last_lines[0], "421 text: %r"
          % s.last_lines)
    check_closed(s, "junk commands")
    # a delivered message starts the count again (Postfix's rule)
    s = smtp_session(env)
    for _ in range(60):
        check_reply(s.cmd("NOOP"), 250, "2.0.0", "NOOP before mail")
    check_reply(s.cmd("MAIL FROM:<s@remote.test>"), 250, "2.1.0", "MAIL")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5", "RCPT")
    check_reply(s.data(b"Subject: x\r\n\r\nx\r\n"), 250, "2.0.0", "DATA")
    for _ in range(60):
        check_reply(s.cmd("RSET"), 250, "2.0.0", "RSET after mail")
    s.quit()
    # the ODMR port before the reversal
    s = odmr_session(env)
    s.send_raw("".join(junk[i % 3] + "\r\n" for i in range(99)))
    for i in range(99):
        r = s.reply()
        check(r[0] in (214, 250), "ODMR junk command %d: %r" % (i + 2, r))
    check_reply(s.cmd("HELP"), 421, "4.7.0", "ODMR: 101st junk command")
    check_closed(s, "ODMR junk commands")


def test_idle_timeout_and_deadline(env):
    """Before the first byte of a line the wait is `timeout` (4s), not
    `command_deadline` (2s); after it, command_deadline."""
    started(env, timeout="4s", command_deadline="2s")
    s = smtp_session(env)
    t0 = time.time()
    r = answer_within(s, 12)
    dt = time.time() - t0
    check(r is not None, "idle client: no 421 within 12s")
    check_reply(r, 421, "4.4.2", "idle client")
    check("timeout exceeded" in r[1], "idle client: %r" % (r,))
    check(3.5 <= dt <= 7, "idle 421 after %.1fs; timeout is 4s" % dt)
    check_closed(s, "idle timeout")
    s = smtp_session(env)
    s.send_raw(b"MAIL FROM:<half")
    t0 = time.time()
    r = answer_within(s, 12)
    dt = time.time() - t0
    check(r is not None, "half a line: no 421 within 12s")
    check_reply(r, 421, "4.4.2", "half a command line")
    check("command deadline exceeded" in r[1], "half a line: %r" % (r,))
    check(1.5 <= dt <= 3.5, "421 after %.1fs; command_deadline is 2s" % dt)
    check_no_stress(env)


def test_stress_mode_idle_timeout(env):
    """smtp_max_connections = 2: the second session starts above 80% of the
    budget and gets the 10 s idle timeout; the first keeps `timeout`."""
    started(env, timeout="30s", smtp_max_connections="2")
    a = smtp_session(env)
    b = env.smtp()
    check_reply(b.greeting, 220, what="second session")
    t0 = time.time()
    r = answer_within(b, 16)
    dt = time.time() - t0
    check(r is not None, "stressed session: no 421 within 16s")
    check_reply(r, 421, "4.4.2", "idle session under stress")
    check(8.5 <= dt <= 13, "421 after %.1fs; stress idle timeout is 10s" % dt)
    check_reply(a.cmd("NOOP"), 250, "2.0.0", "first session after 10s idle")
    a.quit()
    lines = [l for l in env.log().splitlines()
             if "stress mode: idle timeout 10s" in l]
    check(len(lines) == 1, "expected one stress mode line, got %r" % lines)


def session_with_recipients(env, n):
    """An SMTP session with MAIL and n accepted recipients."""
    s = smtp_session(env)
    check_reply(s.cmd("MAIL FROM:<s@remote.test>"), 250, "2.1.0", "MAIL")
    for i in range(n):
        check_reply(s.cmd("RCPT TO:<r%d@example.org>" % i), 250, "2.1.5")
    return s


def test_refusals_end_the_session(env):
    """Each refused command counts (Postfix's smtpd_hard_error_limit):
    20 refused RCPTs, and the next command gets 421 4.7.0; recipients
    past max_recipients are no error until as many again."""
    started(env, max_recipients="3")
    s = session_with_recipients(env, 3)
    for i in range(3):
        check_reply(s.cmd("RCPT TO:<over%d@example.org>" % i), 452, "4.5.3",
                    "RCPT past max_recipients %d" % (i + 1))
    check_reply(s.data(b"Subject: x\r\n\r\nx\r\n"), 250, "2.0.0",
                "DATA after 3 recipients too many")
    for i in range(20):
        check_reply(s.cmd("RCPT TO:<guess%d@example.org>" % i), 503, "5.5.1",
                    "RCPT without MAIL %d" % (i + 1))
    r = s.cmd("NOOP")
    check_reply(r, 421, "4.7.0", "the command after 20 refusals")
    check("Too many errors" in r[1], "421 text: %r" % (r,))
    check_closed(s, "refusals")
    check("20 commands refused: session ended" in env.log(),
          "no log line for the refusals:\n%s" % env.log_tail())
    # past max_recipients more, each one counts
    s = session_with_recipients(env, 3)
    for i in range(23):
        check_reply(s.cmd("RCPT TO:<over%d@example.org>" % i), 452, "4.5.3",
                    "RCPT past max_recipients %d" % (i + 1))
    check_reply(s.cmd("RCPT TO:<over@example.org>"), 421, "4.7.0",
                "the 21st RCPT past twice max_recipients")


def test_ehlo_is_a_junk_command(env):
    started(env)
    s = smtp_session(env)
    for i in range(99):
        check_reply(s.cmd("EHLO again%d.test" % i), 250, what="EHLO %d" % i)
    check_reply(s.cmd("HELO again.test"), 421, "4.7.0", "101st EHLO/HELO")
    check_closed(s, "EHLO junk")


def test_refused_data_earns_no_more_time(env):
    """A message refused while it still comes (a bare LF) is read to its
    end and answered, but only its first max_message_size bytes earn DATA
    time: a client streaming on well above data_min_rate is cut off at
    timeout 3s + 20000 bytes at 100000 bytes/s, where without the rule it
    would go on as long as it liked."""
    started(env, timeout="3s", data_min_rate="100000",
            max_message_size="20000")
    s = in_data(env)
    r, dt = trickle(s, b"Subject: bare\n\r\n" + b"y" * 78 + b"\r\n" +
                    (b"z" * 998 + b"\r\n") * 3000, "a refused message at "
                    "250 kB/s", chunk=5000, interval=0.02, give_up=9)
    check(r is not None, "no 421 before the connection was closed")
    check_reply(r, 421, "4.7.0", "a refused message still coming")
    check(2.5 <= dt <= 5.5, "cut off after %.1fs, expected about 3.2s" % dt)
    check_closed(s, "refused message")
    check(not env.queued(), "queued: %r" % env.queued())
    check("still coming at its deadline" in env.log(), "no log line:\n%s"
          % env.log_tail())
    # sent at once, a refused message is answered at its final dot
    s = in_data(env)
    s.send_raw(b"Subject: bare\n\r\n" + (b"y" * 998 + b"\r\n") * 30 +
               b".\r\n")
    check_reply(s.reply(), 554, what="a refused message of 30 kB")
    s.quit()


def test_errors_forgiven_after_a_message(env):
    """A message taken forgives the errors before it (Postfix's rule): 19
    refusals, a message, 19 more, and the session still works."""
    started(env)
    s = smtp_session(env)
    for _ in range(2):
        for i in range(19):
            check_reply(s.cmd("RCPT TO:<x%d@example.org>" % i), 503,
                        what="RCPT without MAIL")
        check_reply(s.cmd("MAIL FROM:<s@remote.test>"), 250, "2.1.0", "MAIL")
        check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
        check_reply(s.data(b"Subject: x\r\n\r\nx\r\n"), 250, "2.0.0")
    s.quit()


def tls_records(ctx, sock, data):
    """The TLS records that carry data, over an established session run in
    memory (ssl.SSLObject), so that a test can send them one byte at a
    time."""
    import ssl
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="mx.test")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(out.read())
            got = sock.recv(65536)
            if not got:
                fail("server closed during the TLS handshake")
            inc.write(got)
    sock.sendall(out.read())
    # the server's session tickets come after the handshake
    while select.select([sock], [], [], 0.5)[0]:
        got = sock.recv(65536)
        if not got:
            fail("server closed after the TLS handshake")
        inc.write(got)
    obj.write(data)
    return obj, out.read()


def test_tls_trickle_is_cut_off(env):
    """Under TLS the command deadline still holds: a ClientHello, or the
    record carrying a command, sent one byte per second is cut off."""
    import ssl
    env.make_cert("mx.test")
    started(env, timeout="30s", command_deadline="3s")
    s = smtp_session(env)
    check_reply(s.cmd("STARTTLS"), 220, what="STARTTLS")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="mx.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    t0 = time.time()
    closed = False
    for b in hello[:20]:
        try:
            s.sock.sendall(bytes([b]))
        except OSError:
            closed = True
            break
        ready, _, _ = select.select([s.sock], [], [], 1.0)
        if ready:
            closed = True   # odmrd never answers a partial ClientHello
            break
    dt = time.time() - t0
    check(closed, "a trickled ClientHello was still read after %.0fs" % dt)
    check(2.5 <= dt <= 6, "ClientHello cut off after %.1fs; "
          "command_deadline is 3s" % dt)
    # the record carrying a command
    s = smtp_session(env)
    check_reply(s.cmd("STARTTLS"), 220, what="STARTTLS")
    obj, rec = tls_records(ctx, s.sock, b"NOOP\r\n")
    t0 = time.time()
    answered = None
    for b in rec:
        try:
            s.sock.sendall(bytes([b]))
        except OSError:
            break
        ready, _, _ = select.select([s.sock], [], [], 1.0)
        if ready:
            answered = s.sock.recv(65536)
            break
        if time.time() - t0 > 12:
            break
    dt = time.time() - t0
    check(answered is not None, "a trickled TLS record was still read "
          "after %.0fs" % dt)
    check(2.5 <= dt <= 6, "TLS record cut off after %.1fs; "
          "command_deadline is 3s" % dt)


def test_odmr_refusals_end_the_session(env):
    """On the ODMR port too: 20 refused commands (ATRN before AUTH here)
    and the next one gets 421 4.7.0; so do 20 refused STARTTLS."""
    started(env)
    s = odmr_session(env)
    for i in range(20):
        check_reply(s.cmd("ATRN example.org"), 530, what="ATRN %d" % (i + 1))
    check_reply(s.cmd("ATRN example.org"), 421, "4.7.0", "the 21st ATRN")
    check_closed(s, "ODMR refusals")
    # a refused STARTTLS (no certificate here) counts as well
    s = smtp_session(env)
    for i in range(20):
        check_reply(s.cmd("STARTTLS"), 502, what="STARTTLS %d" % (i + 1))
    check_reply(s.cmd("NOOP"), 421, "4.7.0", "after 20 refused STARTTLS")
