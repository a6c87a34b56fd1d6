"""Inbound SMTP and LMTP (SPEC 3.4): real odmrd on loopback, temp spool.

Every test gets a fresh harness.Env (see harness.py).  Accounts used:
alice owns example.org and example.net, bob owns example.com."""

import os
import signal
import socket
import subprocess
import time

from harness import (SMTP, SMTPClosed, TestFailure, check, check_reply, fail,
                     need, queue_id_of, received_header, strip_received,
                     to_crlf, dot_stuff, wait_for, DSN_FAILURE, DSN_NEVER,
                     DSN_SUCCESS, DSN_DELAY)


def started(env, **conf):
    if conf:
        env.write_conf(**conf)
    env.setup_accounts()
    env.start()
    return env


def session(env, ehlo="client.test", **kw):
    s = env.smtp(**kw)
    check_reply(s.greeting, 220, what="greeting")
    check_reply(s.cmd("EHLO " + ehlo), 250, what="EHLO")
    return s


def only_message(env, domain):
    ids = env.queued_ids(domain)
    check(len(ids) == 1, "expected exactly one message queued for %s, "
          "spool has %r" % (domain, env.queued()))
    return ids[0]


def check_nothing_queued(env, what=""):
    q = env.queued()
    check(not q, "%snothing should be queued, spool has %r" % (
        (what + ": ") if what else "", q))


def swaks(env, *args, input=None, timeout=60):
    prog = need("swaks")
    return env.run([prog, "--server", "127.0.0.1:%d" % env.smtp_port,
                    "--timeout", "20", "--ehlo", "swaks.test"] + list(args),
                   input=input, timeout=timeout)


# --------------------------------------------------------------------------

def test_greeting_ehlo_quit(env):
    started(env, max_message_size="123456")
    s = env.smtp()
    code, text = s.greeting
    check(code == 220, "greeting: %r" % (s.greeting,))
    check(text.startswith("mx.test ESMTP"), "greeting text %r should start "
          "with 'mx.test ESMTP'" % text)
    code, kw = s.ehlo("client.test")
    check(code == 250, "EHLO: %d %r" % (code, s.last_lines))
    check(s.last_lines[0][4:].startswith("mx.test"),
          "first EHLO line should name mx.test: %r" % s.last_lines[0])
    for k in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN",
              "SMTPUTF8"):
        check(k in kw, "EHLO does not advertise %s: %r" % (k, s.last_lines))
    check(kw.get("SIZE") == "123456", "EHLO should advertise SIZE 123456: %r"
          % s.last_lines)
    check("STARTTLS" not in kw, "STARTTLS advertised without a certificate")
    for k in ("AUTH", "ATRN"):
        check(k not in kw, "%s advertised on the SMTP port" % k)
    check_reply(s.cmd("NOOP"), 250, "2.0.0", "NOOP")
    check_reply(s.cmd("QUIT"), 221, "2.0.0", "QUIT")
    check(s.expect_closed(), "connection not closed after QUIT")
    # HELO works too (no extensions)
    s = env.smtp()
    check_reply(s.cmd("HELO client.test"), 250, what="HELO")
    s.quit()


def test_swaks_hosted_domain(env):
    started(env)
    # Exact DATA: headers, 8-bit content, lines starting with '.', a lone '.'
    data = (b"From: Sender <sender@src.test>\n"
            b"To: alice@example.org\n"
            b"Subject: swaks test \xc3\xa9\n"
            b"Message-ID: <swaks-1@src.test>\n"
            b"\n"
            b"first line\n"
            b".leading dot\n"
            b"..two dots\n"
            b".\n"
            b"8-bit: caf\xc3\xa9 \xe2\x82\xac \xff\xfe raw\n"
            b"  indented line with trailing space \n"
            b"\n"
            b"last line")
    path = env.path("data.txt")
    with open(path, "wb") as f:
        f.write(data)
    # swaks 20201014 has no DSN options: the MAIL FROM parameters ride on the
    # address (swaks sends "MAIL FROM:<$from>", so ENVID gets the '>').
    r = swaks(env, "--from", "sender@src.test> RET=HDRS ENVID=QQ+2B1",
              "--to", "alice@example.org,carol@example.org",
              "--data", "@" + path)
    check(r.returncode == 0, "swaks exited %d:\n%s%s" % (r.returncode,
          r.stdout[-2000:], r.stderr[-500:]))
    check("250 2.0.0" in r.stdout and "queued as" in r.stdout,
          "swaks output lacks '250 2.0.0 ... queued as':\n" + r.stdout[-1500:])
    qid = queue_id_of(r.stdout[r.stdout.rfind("queued as") - 20:])
    ids = env.queued_ids("example.org")
    check(ids == [qid], "example.org queue %r, expected [%r]" % (ids, qid))
    check(env.queued() == [("example.org", qid)],
          "other queues touched: %r" % env.queued())
    e = env.envelope("example.org", qid)
    check(e["sender"] == "sender@src.test", "sender %r" % e["sender"])
    check([r["addr"] for r in e["rcpts"]] ==
          ["alice@example.org", "carol@example.org"],
          "recipients %r" % e["rcpts"])
    check(e["ret"] == "HDRS", "RET not stored: %r" % e)
    check(e["envid"] == "QQ+2B1>", "ENVID %r, expected the xtext "
          "'QQ+2B1>' as received" % e["envid"])
    check(e["domain"] == "example.org", "D %r" % e["domain"])
    check(e["helo"] == "swaks.test", "helo %r" % e["helo"])
    check("127.0.0.1" in e.get("client", ""), "client %r" % e.get("client"))
    check(abs(e["arrival"] - time.time()) < 120, "arrival %r" % e["arrival"])
    m = env.message("example.org", qid)
    check(e["size"] == len(m), "Z %d != data size %d" % (e["size"], len(m)))
    body = strip_received(m)
    check(body == to_crlf(data), "stored data differs from what was sent:\n"
          "sent   %r\nstored %r" % (to_crlf(data), body))


def test_dsn_parameters_stored(env):
    started(env)
    s = session(env, "dsn.client.test")
    check_reply(s.cmd("MAIL FROM:<bounce@src.test> RET=FULL ENVID=abc+2Bdef "
                      "BODY=8BITMIME SIZE=300"), 250, "2.1.0", "MAIL")
    check_reply(s.cmd("RCPT TO:<alice@example.org> NOTIFY=SUCCESS,FAILURE "
                      "ORCPT=rfc822;Alice+2Bx@example.org"), 250, "2.1.5")
    check_reply(s.cmd("RCPT TO:<dave@example.org> NOTIFY=NEVER"), 250, "2.1.5")
    check_reply(s.cmd("RCPT TO:<erin@example.org> NOTIFY=DELAY "
                      "ORCPT=rfc822;erin@example.org"), 250, "2.1.5")
    check_reply(s.cmd("RCPT TO:<frank@example.org>"), 250, "2.1.5")
    qid = queue_id_of(check_reply(s.data(to_crlf("Subject: dsn\n\nhi\n")),
                                  250, "2.0.0")[1])
    s.quit()
    e = env.envelope("example.org", qid)
    check(e["sender"] == "bounce@src.test", "sender %r" % e["sender"])
    check(e["ret"] == "FULL", "RET %r" % e["ret"])
    check(e["envid"] == "abc+2Bdef", "ENVID %r" % e["envid"])
    check(e["body"] == "8BITMIME", "BODY %r" % e["body"])
    check(not e["smtputf8"], "U set without SMTPUTF8")
    check(e["helo"] == "dsn.client.test", "helo %r" % e["helo"])
    r = e["rcpts"]
    check([x["addr"] for x in r] == ["alice@example.org", "dave@example.org",
                                     "erin@example.org", "frank@example.org"],
          "recipients %r" % r)
    check(r[0]["notify"] == DSN_SUCCESS | DSN_FAILURE,
          "alice notify %r" % r[0]["notify"])
    check(r[0]["orcpt"] == "rfc822;Alice+2Bx@example.org",
          "alice orcpt %r" % r[0]["orcpt"])
    check(r[1]["notify"] == DSN_NEVER and r[1]["orcpt"] is None,
          "dave %r" % r[1])
    check(r[2]["notify"] == DSN_DELAY and r[2]["orcpt"] ==
          "rfc822;erin@example.org", "erin %r" % r[2])
    check(r[3]["notify"] == 0 and r[3]["orcpt"] is None, "frank %r" % r[3])


def test_relay_denied(env):
    started(env)
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<spammer@src.test>"), 250, "2.1.0")
    for rcpt in ("victim@elsewhere.test", "victim@EXAMPLE.INVALID",
                 "postmaster@[127.0.0.1]", "x@[IPv6:::1]",
                 "x@sub.example.org", "x@example.org.evil.test",
                 "x@example", "@example.org:victim@elsewhere.test"):
        check_reply(s.cmd("RCPT TO:<%s>" % rcpt), 550, "5.7.1",
                    "RCPT TO:<%s>" % rcpt)
    check_reply(s.cmd("DATA"), 503, "5.5.1", "DATA without recipients")
    check_reply(s.cmd("RSET"), 250, what="RSET")
    s.quit()
    check_nothing_queued(env)


def test_domain_case_insensitive(env):
    started(env)
    qid = env.send_mail("s@src.test", ["Alice@EXAMPLE.ORG", "bob@Example.Com"],
                        "Subject: case\n\nx\n")
    check(env.queued() == [("example.com", qid), ("example.org", qid)],
          "expected lower-case queues example.com and example.org with %s: %r"
          % (qid, env.queued()))
    e = env.envelope("example.org", qid)
    check([r["addr"] for r in e["rcpts"]] == ["Alice@EXAMPLE.ORG"],
          "recipient should be kept as written: %r" % e["rcpts"])


def test_split_two_accounts(env):
    started(env)
    body = "Subject: split\n\nfor two accounts\n"
    rcpts = ["a1@example.org", "b1@example.com", "a2@example.org",
             "a3@example.net"]
    qid = env.send_mail("s@src.test", rcpts, body)
    q = env.queued()
    check(sorted(q) == [("example.com", qid), ("example.net", qid),
                        ("example.org", qid)],
          "expected %s in example.com, example.net and example.org: %r"
          % (qid, q))
    want = {"example.org": ["a1@example.org", "a2@example.org"],
            "example.com": ["b1@example.com"],
            "example.net": ["a3@example.net"]}
    for d, addrs in want.items():
        e = env.envelope(d, qid)
        got = [r["addr"] for r in e["rcpts"]]
        check(got == addrs, "%s recipients %r, expected %r" % (d, got, addrs))
        check(e["domain"] == d, "%s envelope says D %r" % (d, e["domain"]))
        check(strip_received(env.message(d, qid)) == to_crlf(body),
              "%s data differs" % d)
    check(not env.spool_problems(), "spool: %r" % env.spool_problems())


def test_pipelining_burst(env):
    started(env)
    s = session(env)
    s.send_raw(b"MAIL FROM:<p@src.test>\r\n"
               b"RCPT TO:<p1@example.org>\r\n"
               b"RCPT TO:<p2@nowhere.test>\r\n"
               b"RCPT TO:<p3@example.com>\r\n"
               b"DATA\r\n")
    check_reply(s.reply(), 250, "2.1.0", "MAIL")
    check_reply(s.reply(), 250, "2.1.5", "RCPT 1")
    check_reply(s.reply(), 550, "5.7.1", "RCPT 2 (relay)")
    check_reply(s.reply(), 250, "2.1.5", "RCPT 3")
    check_reply(s.reply(), 354, what="DATA")
    s.send_raw(b"Subject: burst\r\n\r\nbody\r\n.\r\n"
               b"MAIL FROM:<q@src.test>\r\nRCPT TO:<q1@example.org>\r\n"
               b"DATA\r\n")
    qid1 = queue_id_of(check_reply(s.reply(), 250, "2.0.0", "end of data")[1])
    check_reply(s.reply(), 250, "2.1.0", "2nd MAIL")
    check_reply(s.reply(), 250, "2.1.5", "2nd RCPT")
    check_reply(s.reply(), 354, what="2nd DATA")
    s.send_raw(b"Subject: burst 2\r\n\r\nbody 2\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    qid2 = queue_id_of(check_reply(s.reply(), 250, "2.0.0", "2nd end")[1])
    check_reply(s.reply(), 250, what="RSET")
    check_reply(s.reply(), 250, what="NOOP")
    check_reply(s.reply(), 221, "2.0.0", "QUIT")
    check(qid1 != qid2, "two messages got the same id %s" % qid1)
    check(sorted(env.queued()) == sorted([("example.org", qid1),
                                          ("example.com", qid1),
                                          ("example.org", qid2)]),
          "spool %r" % env.queued())
    check([r["addr"] for r in env.envelope("example.org", qid1)["rcpts"]] ==
          ["p1@example.org"], "recipients of the first message")


def test_size_declared_too_big(env):
    started(env, max_message_size="10000")
    s = env.smtp()
    code, kw = s.ehlo()
    check(kw.get("SIZE") == "10000", "SIZE %r" % kw.get("SIZE"))
    check_reply(s.cmd("MAIL FROM:<s@src.test> SIZE=10001"), 552, "5.3.4",
                "MAIL SIZE=10001")
    check_reply(s.cmd("MAIL FROM:<s@src.test> SIZE=99999999999999999999"),
                552, "5.3.4", "MAIL SIZE=huge")
    check_reply(s.cmd("MAIL FROM:<s@src.test> SIZE=5000"), 250, "2.1.0",
                "MAIL SIZE=5000")
    s.quit()


def test_size_data_too_big(env):
    started(env, max_message_size="10000")
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<big@example.org>"), 250, "2.1.5")
    big = b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 300  # 30 kB
    check_reply(s.data(big), 552, "5.3.4", "end of oversized data")
    check_nothing_queued(env, "after 552")
    tmp = os.path.join(env.spool, "tmp")
    if os.path.isdir(tmp):
        check(not os.listdir(tmp), "left in tmp/: %r" % os.listdir(tmp))
    # the session is still in sync and usable
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0", "MAIL after 552")
    check_reply(s.cmd("RCPT TO:<small@example.org>"), 250, "2.1.5")
    check_reply(s.data(b"Subject: small\r\n\r\nok\r\n"), 250, "2.0.0")
    s.quit()
    check(len(env.queued()) == 1, "spool %r" % env.queued())


def test_too_many_recipients(env):
    started(env, max_recipients="3")
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    for i in range(3):
        check_reply(s.cmd("RCPT TO:<r%d@example.org>" % i), 250, "2.1.5")
    check_reply(s.cmd("RCPT TO:<r3@example.org>"), 452, "4.5.3", "4th RCPT")
    check_reply(s.cmd("RCPT TO:<r4@example.com>"), 452, "4.5.3", "5th RCPT")
    qid = queue_id_of(check_reply(s.data(b"Subject: many\r\n\r\nx\r\n"),
                                  250, "2.0.0")[1])
    s.quit()
    check(env.queued() == [("example.org", qid)], "spool %r" % env.queued())
    got = [r["addr"] for r in env.envelope("example.org", qid)["rcpts"]]
    check(got == ["r0@example.org", "r1@example.org", "r2@example.org"],
          "recipients %r" % got)


def test_domain_quota(env):
    started(env, domain_quota="2000")
    body = "Subject: quota\n\n" + ("y" * 70 + "\n") * 20    # ~1.5 kB
    env.send_mail("s@src.test", ["q@example.org"], body)
    # example.org holds ~1.5 kB of its 2000.  The next message may be taken
    # (the check is made at RCPT time) or refused with 452 4.2.2 at RCPT or
    # after the data; once the domain is over its quota RCPT must say
    # 452 4.2.2.
    seen_452 = []
    for attempt in range(3):
        s = session(env)
        check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
        over = sum(env.envelope(d, i)["size"]
                   for d, i in env.queued("example.org")) >= 2000
        r = s.cmd("RCPT TO:<q@example.org>")
        if over or r[0] == 452:
            check_reply(r, 452, "4.2.2", "RCPT for a domain over its quota")
            seen_452.append("RCPT")
            check_reply(s.cmd("RCPT TO:<b@example.com>"), 250, "2.1.5",
                        "RCPT to another domain")
            s.quit()
            break
        check_reply(r, 250, "2.1.5", "RCPT below quota")
        r = s.data(to_crlf(body))
        if r[0] == 452:
            check_reply(r, 452, "4.2.2", "end of data over quota")
            seen_452.append("DATA")
        else:
            check_reply(r, 250, "2.0.0", "end of data")
        s.quit()
    check(seen_452, "never refused with 452 4.2.2; queued: %r" % env.queued())
    check(len(env.queued_ids("example.org")) <= 2,
          "more than one message past the quota: %r" % env.queued())
    # the check reads a per-domain counter kept by commits and removals;
    # it must agree with the files, also after odmrctl removes mail
    check_usage_counter(env, "example.org")
    for qid in env.queued_ids("example.org")[:1]:
        env.odmrctl_ok("queue", "delete", qid)
    check_usage_counter(env, "example.org")
    # a counter skewed (by a crash) is recounted by the maintenance pass
    with open(os.path.join(env.queue_dir("example.org"), ".usage"), "w") as f:
        f.write("999999 99\n")
    os.kill(env.daemon.pid, signal.SIGUSR1)
    wait_for(lambda: usage_counter_ok(env, "example.org"), timeout=10,
             what="the maintenance pass to recount .usage")


def usage_counter_ok(env, domain):
    try:
        check_usage_counter(env, domain)
        return True
    except TestFailure:
        return False


def check_usage_counter(env, domain):
    ids = env.queued_ids(domain)
    d = env.queue_dir(domain)
    size = sum(len(env.message(domain, i)) for i in ids)
    with open(os.path.join(d, ".usage")) as f:
        got = f.read()
    check(got == "%d %d\n" % (size, len(ids)),
          "usage counter %r, the queue holds %d bytes in %d messages"
          % (got, size, len(ids)))


def smuggle(env, payload, what):
    """Sends a DATA section that contains payload (with a bare-CR/LF end of
    data lookalike and a smuggled transaction) and checks the contract:
    554 5.5.2 after the real end, nothing queued, session in sync."""
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("DATA"), 354, what="DATA")
    s.send_raw(b"From: s@src.test\r\nSubject: smuggle\r\n\r\nhello\r\n"
               + payload +
               b"MAIL FROM:<evil@src.test>\r\n"
               b"RCPT TO:<victim@example.org>\r\n"
               b"DATA\r\n"
               b"Subject: smuggled\r\n\r\nsmuggled body\r\n"
               b".\r\n")
    check_reply(s.reply(), 554, "5.5.2", "%s: reply after the real end of "
                "data" % what)
    # nothing else must be pending: the next reply answers our NOOP
    check_reply(s.cmd("NOOP"), 250, what="%s: NOOP after the message" % what)
    s.quit()
    check_nothing_queued(env, what)


def test_smuggling_bare_lf(env):
    started(env)
    for payload in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"bare\nlf\r\n"):
        smuggle(env, payload, "bare LF %r" % payload)


def test_smuggling_bare_cr(env):
    started(env)
    for payload in (b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"bare\rcr\r\n"):
        smuggle(env, payload, "bare CR %r" % payload)


def test_received_loop(env):
    started(env)
    def hops(n):
        h = b"".join(b"Received: from h%d.test by h%d.test; "
                     b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i + 1)
                     for i in range(n))
        return h + b"Subject: loop\r\n\r\nbody\r\n"
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<loop@example.org>"), 250, "2.1.5")
    check_reply(s.data(hops(51)), 554, "5.4.6", "51 Received: headers")
    check_nothing_queued(env, "mail loop")
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<loop@example.org>"), 250, "2.1.5")
    qid = queue_id_of(check_reply(s.data(hops(49)), 250, "2.0.0",
                                  "49 Received: headers")[1])
    s.quit()
    check(strip_received(env.message("example.org", qid)) == hops(49),
          "stored data differs")


def test_received_header(env):
    started(env)
    qid = env.send_mail("s@src.test", ["alice@example.org"],
                        "Subject: rcvd\n\nx\n", ehlo="helo.name.test")
    m = env.message("example.org", qid)
    h = received_header(m)
    check(h.startswith("Received: "), "first header %r" % h)
    for want in ("helo.name.test", "127.0.0.1", "mx.test"):
        check(want in h, "Received: header lacks %r: %r" % (want, h))
    check(b"\n" not in m.replace(b"\r\n", b""), "bare LF in stored data")


def test_dot_stuffing_exact(env):
    started(env)
    data = (b"Subject: dots\r\n\r\n"
            b".\r\n..\r\n...\r\n.x\r\n..x\r\n x\r\n\r\n"
            b"." + b"L" * 5000 + b"\r\n"          # long line: no line limit
            b"tab\tand trailing  \r\n"
            b"ctl\x01\x7f\r\n"                  # NUL is refused: test_field
            b"end.\r\n")
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("DATA"), 354)
    s.send_raw(dot_stuff(data) + b".\r\n")
    qid = queue_id_of(check_reply(s.reply(), 250, "2.0.0")[1])
    # an empty message: DATA, then the final dot at once
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("DATA"), 354)
    s.send_raw(b".\r\n")
    qid2 = queue_id_of(check_reply(s.reply(), 250, "2.0.0", "empty")[1])
    s.quit()
    got = strip_received(env.message("example.org", qid))
    check(got == data, "stored data differs:\nsent   %r\nstored %r"
          % (data[:300], got[:300]))
    got2 = strip_received(env.message("example.org", qid2))
    check(got2 == b"", "empty message stored as %r" % got2)


def test_null_sender_and_transactions(env):
    started(env)
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<>"), 250, "2.1.0", "null sender")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
    q1 = queue_id_of(check_reply(s.data(b"Subject: 1\r\n\r\n1\r\n"), 250,
                                 "2.0.0")[1])
    check_reply(s.cmd("MAIL FROM:<x@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<bob@example.com>"), 250, "2.1.5")
    check_reply(s.cmd("RSET"), 250, what="RSET")
    check_reply(s.cmd("DATA"), 503, "5.5.1", "DATA after RSET")
    check_reply(s.cmd("MAIL FROM:<y@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
    q2 = queue_id_of(check_reply(s.data(b"Subject: 2\r\n\r\n2\r\n"), 250,
                                 "2.0.0")[1])
    s.quit()
    check(q1 != q2, "same id twice")
    check(env.envelope("example.org", q1)["sender"] == "", "null sender")
    check(env.envelope("example.org", q2)["sender"] == "y@src.test", "sender")
    check(env.queued_ids("example.com") == [], "RSET message was queued")


def test_command_sequence_errors(env):
    started(env)
    s = env.smtp()
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 503, "5.5.1",
                "MAIL before EHLO")
    check_reply(s.cmd("EHLO client.test"), 250)
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 503, "5.5.1",
                "RCPT before MAIL")
    check_reply(s.cmd("DATA"), 503, "5.5.1", "DATA before MAIL")
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 503, "5.5.1", "nested MAIL")
    check_reply(s.cmd("DATA"), 503, "5.5.1", "DATA without recipients")
    check_reply(s.cmd("FOOBAR baz"), 500, "5.5.2", "unknown command")
    for c in ("ATRN example.org", "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
              "ETRN example.org", "TURN"):
        check_reply(s.cmd(c), 502, "5.5.1", c)
    check_reply(s.cmd("NOOP"), 250, what="NOOP")
    check_reply(s.cmd("RSET"), 250, what="RSET")
    check_reply(s.cmd("QUIT"), 221, "2.0.0", "QUIT")
    check_nothing_queued(env)


def test_syntax_errors(env):
    started(env)
    s = session(env)
    for bad in ("MAIL FROM:<a b@src.test>", "MAIL FROM:<s@src..test>",
                "MAIL FROM:<s@src.test@>", "MAIL FROM:<s@src.test",
                "MAIL FROM:<@src.test>"):
        check_reply(s.cmd(bad), 501, "5.1.7", bad)
    for bad, code, enh in (
            ("MAIL FROM:<s@src.test> SIZE=abc", 501, "5.5.4"),
            ("MAIL FROM:<s@src.test> BODY=9BIT", 501, "5.5.4"),
            ("MAIL FROM:<s@src.test> RET=SOME", 501, "5.5.4"),
            ("MAIL FROM:<s@src.test> BODY=8BITMIME BODY=7BIT", 501, "5.5.4"),
            ("MAIL FROM:<s@src.test> FOO=bar", 555, "5.5.4")):
        check_reply(s.cmd(bad), code, enh, bad)
    # a new session: 20 refusals would end this one (test_trickle)
    s.quit()
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    for bad in ("RCPT TO:<a b@example.org>", "RCPT TO:<@example.org>",
                "RCPT TO:<alice@>", "RCPT TO:<>", "RCPT TO:<alice@example..org>",
                "RCPT TO:<alice@example.org"):
        check_reply(s.cmd(bad), 501, "5.1.3", bad)
    for bad, code, enh in (
            ("RCPT TO:<alice@example.org> NOTIFY=SOMETIMES", 501, "5.5.4"),
            ("RCPT TO:<alice@example.org> NOTIFY=NEVER,SUCCESS", 501, "5.5.4"),
            ("RCPT TO:<alice@example.org> NOTIFY=NEVER NOTIFY=NEVER",
             501, "5.5.4"),
            ("RCPT TO:<alice@example.org> FOO=bar", 555, "5.5.4")):
        check_reply(s.cmd(bad), code, enh, bad)
    check_reply(s.cmd("DATA"), 503, "5.5.1", "DATA with no valid recipient")
    s.quit()
    check_nothing_queued(env)


def test_overlong_command(env):
    started(env)
    s = session(env)
    check_reply(s.cmd("NOOP " + "x" * 600), 500, "5.5.6", "600-octet NOOP")
    check_reply(s.cmd("NOOP"), 250, what="NOOP after overlong line")
    check_reply(s.cmd("HELO " + "h" * 5000), 500, "5.5.6", "5000-octet HELO")
    check_reply(s.cmd("NOOP"), 250, what="NOOP after very long line")
    # MAIL and RCPT may be longer than 512 (up to 2048): a legal RCPT with a
    # long local part and ORCPT of about 580 octets
    local = "l" * 240
    check_reply(s.cmd("MAIL FROM:<%s@src.test> ENVID=%s" % (local, "e" * 90)),
                250, "2.1.0", "long MAIL")
    line = ("RCPT TO:<%s@example.org> NOTIFY=SUCCESS,FAILURE,DELAY "
            "ORCPT=rfc822;%s@example.org" % (local, local))
    check(512 < len(line) + 2 <= 2048, "test line length %d" % len(line))
    check_reply(s.cmd(line), 250, "2.1.5", "RCPT of %d octets" % (len(line) + 2))
    check_reply(s.cmd("RCPT TO:<x@example.org> ORCPT=rfc822;" + "o" * 2100),
                500, "5.5.6", "RCPT longer than 2048")
    check_reply(s.cmd("NOOP"), 250, what="NOOP after overlong RCPT")
    qid = queue_id_of(check_reply(s.data(b"Subject: long\r\n\r\nx\r\n"), 250,
                                  "2.0.0")[1])
    s.quit()
    e = env.envelope("example.org", qid)
    check([r["addr"] for r in e["rcpts"]] == [local + "@example.org"],
          "recipients %r" % e["rcpts"])
    check(e["rcpts"][0]["orcpt"] == "rfc822;%s@example.org" % local, "orcpt")
    check(e["envid"] == "e" * 90, "envid")


def test_bad_lines_end_the_session(env):
    """Over-long lines count as bad commands like unknown ones: after 20
    the session ends with 421, so endless junk cannot hold a process."""
    started(env)
    s = session(env)
    for i in range(19):
        check_reply(s.cmd("NOOP " + "x" * 600), 500, "5.5.6", "long line %d" % i)
    check_reply(s.cmd("NOOP " + "x" * 600), 500, "5.5.6", "20th long line")
    check_reply(s.reply(), 421, "4.7.0", "after 20 bad lines")


def test_idle_timeout(env):
    started(env, timeout="2s")
    t0 = time.time()
    s = env.smtp(timeout=15)
    check_reply(s.greeting, 220)
    try:
        r = s.reply()
    except SMTPClosed:
        fail("idle client: the server closed the connection without a "
             "421 4.4.2 reply")
    check_reply(r, 421, "4.4.2", "idle client")
    dt = time.time() - t0
    check(1.5 <= dt <= 8, "421 after %.1fs, timeout is 2s" % dt)
    check(s.expect_closed(), "connection not closed after 421")
    # also while in the middle of DATA
    s = session(env)
    check_reply(s.cmd("MAIL FROM:<s@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("DATA"), 354)
    s.send_raw(b"Subject: stalled\r\n\r\npartial")
    try:
        r = s.reply()
    except SMTPClosed:
        fail("client idle in DATA: the server closed the connection without "
             "a 421 4.4.2 reply")
    check_reply(r, 421, "4.4.2", "client idle in DATA")
    check(s.expect_closed(), "connection not closed after 421")
    check_nothing_queued(env, "stalled DATA")


def connect_limit_reply(env, port=None):
    s = SMTP(port=port or env.smtp_port, greeting=False)
    return s, s.reply()


def test_max_connections_per_ip(env):
    started(env, max_connections_per_ip="2")
    a = env.smtp()
    b = env.smtp()
    check_reply(a.greeting, 220, what="1st connection")
    check_reply(b.greeting, 220, what="2nd connection")
    c, r = connect_limit_reply(env)
    check_reply(r, 421, "4.7.0", "3rd connection from 127.0.0.1")
    check(c.expect_closed(), "3rd connection not closed after 421")
    a.quit()
    b.quit()
    # a slot frees up once a session has ended
    def ok():
        s, r = connect_limit_reply(env)
        s.close()
        return r[0] == 220
    wait_for(ok, 5, 0.2, "a new connection to be accepted")


def test_max_connections(env):
    started(env, max_connections="2", max_connections_per_ip="20")
    a = env.smtp()
    b = env.lmtp()
    check_reply(a.greeting, 220, what="1st connection")
    check_reply(b.greeting, 220, what="2nd connection")
    c, r = connect_limit_reply(env)
    check_reply(r, 421, "4.7.0", "3rd connection (max_connections 2)")
    check(c.expect_closed(), "3rd connection not closed after 421")
    a.quit()
    b.quit()


def lmtp_transaction(s):
    code, kw = s.ehlo("lmtp.client.test", verb="LHLO")
    check(code == 250, "LHLO: %r" % s.last_lines)
    check("PIPELINING" in kw and "ENHANCEDSTATUSCODES" in kw,
          "LHLO reply %r" % s.last_lines)
    check_reply(s.cmd("MAIL FROM:<l@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<l1@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("RCPT TO:<l2@relay.test>"), 550, "5.7.1")
    check_reply(s.cmd("RCPT TO:<l3@example.com>"), 250, "2.1.5")
    check_reply(s.cmd("RCPT TO:<l4@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("DATA"), 354)
    s.send_raw(b"Subject: lmtp\r\n\r\nhello\r\n.\r\nNOOP\r\n")
    replies = [s.reply() for _ in range(3)]
    for i, r in enumerate(replies):
        check_reply(r, 250, "2.0.0", "LMTP reply %d of 3" % (i + 1))
    check_reply(s.reply(), 250, what="NOOP after the 3 LMTP replies")
    s.quit()


def check_lmtp_queue(env):
    q = env.queued()
    check(len(q) == 2 and sorted(d for d, _ in q) == ["example.com",
                                                      "example.org"],
          "spool %r" % q)
    org = [d for d in q if d[0] == "example.org"][0]
    got = [r["addr"] for r in env.envelope(*org)["rcpts"]]
    check(got == ["l1@example.org", "l4@example.org"], "recipients %r" % got)


def test_lmtp_tcp(env):
    started(env)
    s = env.lmtp()
    check_reply(s.greeting, 220, what="LMTP greeting")
    lmtp_transaction(s)
    check_lmtp_queue(env)


def test_lmtp_unix(env):
    sock = env.path("lmtp.sock")
    started(env, lmtp_listen="unix:" + sock)
    s = SMTP(unix=sock)
    check_reply(s.greeting, 220, what="LMTP greeting (unix socket)")
    lmtp_transaction(s)
    check_lmtp_queue(env)


def test_restart_keeps_queue(env):
    started(env)
    ids = [env.send_mail("s@src.test", ["r@example.org", "r@example.com"],
                         "Subject: %d\n\nbody %d\n" % (i, i)) for i in range(3)]
    before = {k: (env.envelope(*k), env.message(*k)) for k in env.queued()}
    check(len(before) == 6, "spool %r" % env.queued())
    rc = env.stop()
    check(rc == 0, "odmrd exited %r on SIGTERM (expected 0)" % rc)
    env.start()
    after = {k: (env.envelope(*k), env.message(*k)) for k in env.queued()}
    check(before == after, "queue changed across a restart:\nbefore %r\n"
          "after %r" % (sorted(before), sorted(after)))
    r = env.odmrctl_ok("queue")
    for i in ids:
        check(i in r.stdout, "odmrctl queue lacks %s:\n%s" % (i, r.stdout))
    # and it still takes mail
    env.send_mail("s@src.test", ["r@example.org"], "Subject: after\n\nx\n")
    check(len(env.queued()) == 7, "spool %r" % env.queued())


def test_swaks_8bitmime_smtputf8(env):
    started(env)
    data = ("From: Jörg <jörg@src.test>\n"
            "To: üser@example.org\n"
            "Subject: Grüße €\n"
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n"
            "\n"
            "Grüße aus Köln — 8 bit body ✓").encode("utf-8")
    # (swaks adds the final CRLF itself)
    path = env.path("utf8.txt")
    with open(path, "wb") as f:
        f.write(data)
    # swaks 20201014 cannot add MAIL parameters: they ride on the address
    # (swaks appends '>', which ends up in the ENVID xtext).
    r = swaks(env, "--from", "jörg@src.test> BODY=8BITMIME SMTPUTF8 ENVID=u8",
              "--to", "üser@example.org", "--data", "@" + path)
    check(r.returncode == 0, "swaks exited %d:\n%s%s" % (r.returncode,
          r.stdout[-2000:], r.stderr[-500:]))
    qid = only_message(env, "example.org")
    e = env.envelope("example.org", qid)
    check(e["sender"] == "jörg@src.test", "sender %r" % e["sender"])
    check([x["addr"] for x in e["rcpts"]] == ["üser@example.org"],
          "recipients %r" % e["rcpts"])
    check(e["body"] == "8BITMIME", "BODY not stored: %r" % e["body"])
    check(e["smtputf8"], "SMTPUTF8 not stored (no U record)")
    check(strip_received(env.message("example.org", qid)) == to_crlf(data),
          "8-bit data differs")


def test_smtputf8_raw(env):
    started(env)
    s = session(env)
    # a UTF-8 address without SMTPUTF8 is refused
    r = s.cmd("MAIL FROM:<jörg@src.test>")
    check(500 <= r[0] < 600, "UTF-8 sender without SMTPUTF8 accepted: %r"
          % (r,))
    check_reply(s.cmd("MAIL FROM:<jörg@src.test> SMTPUTF8"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<δοκιμή@example.org>"), 250, "2.1.5")
    check_reply(s.cmd("RCPT TO:<x@bücher.test>"), 550, "5.7.1",
                "unhosted IDN domain")
    qid = queue_id_of(check_reply(s.data("Subject: ü\r\n\r\nü\r\n".encode()),
                                  250, "2.0.0")[1])
    s.quit()
    e = env.envelope("example.org", qid)
    check(e["smtputf8"], "no U record")
    check(e["rcpts"][0]["addr"] == "δοκιμή@example.org", "rcpt %r" % e["rcpts"])


def test_starttls(env):
    cert = env.make_cert("mx.test")
    started(env)
    s = env.smtp()
    code, kw = s.ehlo()
    check("STARTTLS" in kw, "STARTTLS not advertised with a certificate: %r"
          % s.last_lines)
    check_reply(s.starttls(cafile=cert), 220, what="STARTTLS")
    code, kw = s.ehlo("tls.client.test")
    check(code == 250, "EHLO after STARTTLS: %r" % s.last_lines)
    check("STARTTLS" not in kw, "STARTTLS advertised again inside TLS")
    check_reply(s.cmd("MAIL FROM:<t@src.test>"), 250, "2.1.0")
    check_reply(s.cmd("RCPT TO:<alice@example.org>"), 250, "2.1.5")
    qid = queue_id_of(check_reply(s.data(b"Subject: tls\r\n\r\nx\r\n"),
                                  250, "2.0.0")[1])
    s.quit()
    h = received_header(env.message("example.org", qid))
    check("TLS" in h, "Received: header lacks TLS details: %r" % h)
    # STARTTLS command injection: text pipelined after STARTTLS is either
    # refused with STARTTLS itself or discarded, never run inside TLS
    s = env.smtp()
    s.ehlo()
    s.send_raw(b"STARTTLS\r\nRSET\r\n")
    r = s.reply()
    if r[0] != 220:
        check(500 <= r[0] < 600, "STARTTLS + pipelined RSET: %r" % (r,))
        s.quit()
        return
    import ssl
    ctx = ssl.create_default_context(cafile=cert)
    s.sock = ctx.wrap_socket(s.sock, server_hostname="mx.test")
    s.buf = b""
    check_reply(s.cmd("EHLO x.test"), 250, what="EHLO (the injected RSET "
                "must not be answered inside TLS)")
    s.quit()
