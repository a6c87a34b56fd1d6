"""Returning mail (SPEC 3.6): RFC 3464 DSNs for `odmrctl queue bounce` and
queue_lifetime expiry, handed to bounce_relay (a recording sink here),
queued locally for a hosted sender domain, or logged as undeliverable."""

import email
import email.policy
import fcntl
import os
import signal
import time

from harness import (check, check_reply, fail, free_port, to_crlf, wait_for,
                     queue_id_of)
from sink import Sink

EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL = 0, 64, 65, 75

BODY = ("From: Sender <s@remote.test>\r\n"
        "To: u1@example.org\r\n"
        "Subject: original message\r\n"
        "\r\n"
        ".a line that starts with a dot\r\n"
        "..and one with two\r\n"
        "BODY-MARKER\r\n")


def send(env, sender, rcpts, body=BODY, mail_params=""):
    """One SMTP transaction; rcpts are addresses or (address, params).
    Returns the queue id."""
    with env.smtp() as s:
        check_reply(s.greeting, 220, what="greeting")
        check_reply(s.cmd("EHLO client.test"), 250, what="EHLO")
        check_reply(s.cmd("MAIL FROM:<%s>%s" % (sender, mail_params)), 250,
                    "2.1.0", "MAIL")
        for r in rcpts:
            addr, params = (r, "") if isinstance(r, str) else r
            check_reply(s.cmd("RCPT TO:<%s>%s" % (addr, params)), 250,
                        "2.1.5", "RCPT %s" % addr)
        reply = check_reply(s.data(to_crlf(body)), 250, "2.0.0", "end of data")
        s.quit()
    return queue_id_of(reply[1])


def enqueue(env, sender, rcpts, body=BODY):
    """odmrctl enqueue (no daemon needed); returns the new queue id."""
    before = set(env.queued_ids())
    r = env.odmrctl("enqueue", "-f", sender, "--", *rcpts, input=body)
    check(r.returncode == 0, "enqueue exited %d: %s" % (r.returncode, r.stderr))
    new = set(env.queued_ids()) - before
    check(len(new) == 1, "enqueue: expected one new id, got %r" % new)
    return new.pop()


def bounce(env, *ids, code=EX_OK):
    r = env.odmrctl("queue", "bounce", *ids)
    if r.returncode != code:
        fail("odmrctl queue bounce %s: exit %d, expected %d; stderr %r stdout %r"
             % (" ".join(ids), r.returncode, code, r.stderr.strip(),
                r.stdout.strip()))
    return r


def closed_port():
    """A loopback port nothing listens on (connection refused)."""
    return free_port()


def parse_dsn(data):
    """Checks the RFC 3464 structure of a DSN; returns (message, parts,
    per-recipient field dicts, per-message fields)."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    check(msg.get_content_type() == "multipart/report",
          "DSN Content-Type is %r" % msg.get_content_type())
    check(msg.get_param("report-type") == "delivery-status",
          "report-type is %r" % msg.get_param("report-type"))
    check("MAILER-DAEMON@mx.test" in msg.get("From", ""),
          "DSN From: %r" % msg.get("From"))
    check(msg.get("Auto-Submitted") == "auto-replied",
          "Auto-Submitted: %r" % msg.get("Auto-Submitted"))
    check(msg.get("Message-ID", "").endswith("@mx.test>"),
          "Message-ID %r" % msg.get("Message-ID"))
    check(msg.get("Date") is not None, "DSN without Date:")
    parts = msg.get_payload()
    check(isinstance(parts, list) and len(parts) == 3,
          "DSN should have 3 parts, has %r" % (
              len(parts) if isinstance(parts, list) else parts))
    check(parts[0].get_content_type() == "text/plain",
          "part 1 is %r" % parts[0].get_content_type())
    check(parts[1].get_content_type() == "message/delivery-status",
          "part 2 is %r" % parts[1].get_content_type())
    blocks = parts[1].get_payload()
    check(isinstance(blocks, list) and len(blocks) >= 2,
          "delivery-status part has %r blocks" % blocks)
    per_message = dict(blocks[0].items())
    per_rcpt = [dict(b.items()) for b in blocks[1:]]
    check(per_message.get("Reporting-MTA") == "dns; mx.test",
          "Reporting-MTA: %r" % per_message.get("Reporting-MTA"))
    check("Arrival-Date" in per_message, "no Arrival-Date: %r" % per_message)
    for f in per_rcpt:
        check(f.get("Action") == "failed", "Action: %r" % f)
        check(f.get("Final-Recipient", "").startswith("rfc822; "),
              "Final-Recipient: %r" % f)
    check(b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b""),
          "DSN has bare LF line ends")
    return msg, parts, per_rcpt, per_message


def final_recipients(per_rcpt):
    return sorted(f["Final-Recipient"][len("rfc822; "):] for f in per_rcpt)


def attached_original(data, boundary_msg):
    """Bytes of the third part's body (the returned message)."""
    boundary = boundary_msg.get_boundary().encode()
    third = data.split(b"\r\n--" + boundary)[3]
    return third.split(b"\r\n\r\n", 1)[1]


def use_relay(env, sink):
    env.write_conf(bounce_relay=sink.address)


# --------------------------------------------------------------------------

def test_bounce_via_relay(env):
    env.setup_accounts()
    with Sink() as sink:
        use_relay(env, sink)
        env.start()
        qid = send(env, "s@remote.test",
                   [("u1@example.org", " ORCPT=rfc822;Orig+2BU1@example.org"),
                    ("u2@example.org", " NOTIFY=FAILURE,DELAY")],
                   mail_params=" RET=FULL ENVID=env+2Bid")
        stored = env.message("example.org", qid)
        r = bounce(env, qid)
        check(qid in r.stdout and "returned to <s@remote.test>" in r.stdout,
              "odmrctl output %r" % r.stdout)
        tx = sink.wait(1, what="the DSN")[0]
        check(tx.mail_from == "", "DSN MAIL FROM:<%s>, expected <>" % tx.mail_from)
        check(tx.rcpts == ["s@remote.test"], "DSN RCPT TO %r" % tx.rcpts)
        check(tx.helo and tx.helo[0] == "EHLO" and tx.helo[1] == "mx.test",
              "greeting %r" % (tx.helo,))
        msg, parts, per_rcpt, per_msg = parse_dsn(tx.data)
        check(msg["To"] == "<s@remote.test>", "To: %r" % msg["To"])
        check(final_recipients(per_rcpt) == ["u1@example.org", "u2@example.org"],
              "recipients %r" % per_rcpt)
        check(per_msg.get("Original-Envelope-Id") == "env+id",
              "Original-Envelope-Id %r" % per_msg.get("Original-Envelope-Id"))
        u1 = [f for f in per_rcpt if "u1@" in f["Final-Recipient"]][0]
        check(u1.get("Original-Recipient") == "rfc822; Orig+U1@example.org",
              "Original-Recipient %r" % u1)
        for f in per_rcpt:
            check(f.get("Status") == "5.0.0", "Status %r" % f)
            check("returned to sender by the administrator" in
                  f.get("Diagnostic-Code", ""), "Diagnostic-Code %r" % f)
        check(parts[2].get_content_type() == "message/rfc822",
              "part 3 is %r" % parts[2].get_content_type())
        check(attached_original(tx.data, msg) == stored,
              "the attached message differs from the queued one")
        # dot-stuffing was applied on the wire and undone by the sink
        check(b"\r\n..a line that starts" in tx.raw and
              b"\r\n...and one with two" in tx.raw,
              "DATA was not dot-stuffed: %r" % tx.raw[-300:])
        check(env.queued() == [], "still queued: %r" % env.queued())


def test_bounce_null_sender(env):
    env.setup_accounts()
    with Sink() as sink:
        use_relay(env, sink)
        qid = enqueue(env, "<>", ["u1@example.org"])
        r = bounce(env, qid)
        check("null sender" in r.stdout, "odmrctl output %r" % r.stdout)
        check(env.queued() == [], "still queued: %r" % env.queued())
        time.sleep(0.5)
        check(sink.transactions == [] and sink.connections == 0,
              "a DSN was sent for a null-sender message: %r" % sink.transactions)


def test_bounce_relay_down_hosted_sender(env):
    """The relay refuses connections; the sender's domain is hosted: the
    DSN is queued for that domain."""
    env.setup_accounts()
    env.write_conf(bounce_relay="127.0.0.1:%d" % closed_port())
    qid = enqueue(env, "x@Example.COM", ["u1@example.org"])
    r = bounce(env, qid)
    check("queued for example.com" in r.stdout, "odmrctl output %r" % r.stdout)
    check(env.queued_ids("example.org") == [], "original still queued")
    ids = env.queued_ids("example.com")
    check(len(ids) == 1, "queue of example.com: %r" % ids)
    e = env.envelope("example.com", ids[0])
    check(e["sender"] == "", "DSN sender %r" % e["sender"])
    check([rc["addr"] for rc in e["rcpts"]] == ["x@Example.COM"],
          "DSN recipients %r" % e["rcpts"])
    data = env.message("example.com", ids[0])
    _, _, per_rcpt, _ = parse_dsn(data)
    check(final_recipients(per_rcpt) == ["u1@example.org"], "%r" % per_rcpt)
    check(b"BODY-MARKER" in data, "original not attached")
    check(env.spool_problems() == [], "spool: %r" % env.spool_problems())


def test_bounce_relay_refuses_hosted_sender(env):
    """The relay answers 550 to RCPT: same fallback as a dead relay."""
    env.setup_accounts()
    with Sink(rcpt_replies={"x@example.com": "550 5.7.1 not here"}) as sink:
        use_relay(env, sink)
        qid = enqueue(env, "x@example.com", ["u1@example.org"])
        r = bounce(env, qid)
        check("queued for example.com" in r.stdout, "odmrctl output %r" % r.stdout)
        check(len(env.queued_ids("example.com")) == 1, "DSN not queued locally")
        check(env.queued_ids("example.org") == [], "original still queued")
        check(sink.transactions == [], "the sink accepted something")
        check(any(l.upper() == "QUIT" for l in sink.lines),
              "no QUIT after the refusal: %r" % sink.lines)


def test_bounce_undeliverable(env):
    """No relay, or a relay that refuses for good (5xx), and a foreign
    sender: removed and logged."""
    env.setup_accounts()
    with Sink(rcpt_replies={"someone@elsewhere.test":
                            "550 5.1.1 no such user"}) as sink:
        for relay in (None, sink.address):
            env.write_conf(bounce_relay=relay)
            qid = enqueue(env, "someone@elsewhere.test", ["u1@example.org"])
            r = bounce(env, qid)
            check("could not be delivered" in r.stdout,
                  "relay %s: odmrctl output %r" % (relay, r.stdout))
            check(env.queued() == [], "still queued: %r" % env.queued())


def test_bounce_relay_failing_for_now_keeps_the_message(env):
    """A relay that is down or answers 4xx fails for now only: the
    message stays queued (odmrctl exits 75) so that the bounce is tried
    again, until the message has been queued for twice queue_lifetime;
    then the bounce is logged as undeliverable."""
    env.setup_accounts()
    with Sink(rcpt_replies={"someone@elsewhere.test":
                            "451 4.3.0 try later"}) as sink:
        for relay in ("127.0.0.1:%d" % closed_port(), sink.address):
            env.write_conf(bounce_relay=relay)
            qid = enqueue(env, "someone@elsewhere.test", ["u1@example.org"])
            r = bounce(env, qid, code=EX_TEMPFAIL)
            check("stays queued" in r.stderr, "relay %s: odmrctl said %r"
                  % (relay, r.stderr))
            check(env.queued_ids("example.org") == [qid],
                  "relay %s: queue %r" % (relay, env.queued()))
            bounce(env, qid, code=EX_TEMPFAIL)
            env.write_conf(bounce_relay=relay, queue_lifetime="1s")
            time.sleep(2.2)
            r = bounce(env, qid)
            check("could not be delivered" in r.stdout,
                  "relay %s after 2 x queue_lifetime: %r" % (relay, r.stdout))
            check(env.queued() == [], "still queued: %r" % env.queued())
            env.write_conf(queue_lifetime="5d")
        check(sink.transactions == [], "the sink accepted %r"
              % sink.transactions)


def test_expiry_keeps_the_message_while_the_relay_defers(env):
    """At expiry a relay that answers 4xx keeps the expired message
    queued (the maintenance pass tries its bounce again)."""
    env.setup_accounts()
    with Sink(rcpt_replies={"s@remote.test": "451 4.3.0 try later"}) as sink:
        use_relay(env, sink)
        env.write_conf(queue_lifetime="3s")
        env.start()
        qid = send(env, "s@remote.test", ["u1@example.org"])
        # whole seconds: aged 4 or 5, past 3 s and short of twice that
        time.sleep(4.5)
        mark = len(env.log())
        os.kill(env.daemon.pid, signal.SIGUSR1)
        wait_for(lambda: "%s: bounce to <s@remote.test> deferred" % qid
                 in env.log()[mark:], timeout=20, what="the deferred bounce")
        wait_for(lambda: "kept until its bounce" in env.log()[mark:],
                 timeout=10, what="the expiry line")
        check(env.queued_ids("example.org") == [qid],
              "queue after a deferred bounce: %r" % env.queued())


def test_bounce_ids_and_usage(env):
    env.setup_accounts()
    r = env.odmrctl("queue", "bounce")
    check(r.returncode == EX_USAGE, "queue bounce without id: %d" % r.returncode)
    env.write_conf(bounce_relay=None)
    r = env.odmrctl("queue", "bounce", "0123456789ABCDEF")
    check(r.returncode == EX_DATAERR, "unknown id: exit %d" % r.returncode)
    check(len(r.stderr.strip().splitlines()) == 1, "stderr %r" % r.stderr)
    qid = enqueue(env, "someone@elsewhere.test", ["u1@example.org"])
    r = env.odmrctl("queue", "bounce", "NOSUCHID", qid, "../etc")
    check(r.returncode == EX_DATAERR, "mixed ids: exit %d: %s"
          % (r.returncode, r.stderr.strip()))
    check(env.queued() == [], "the known id was not bounced: %r" % env.queued())


def test_bounce_notify(env):
    env.setup_accounts()
    with Sink() as sink:
        use_relay(env, sink)
        env.start()
        # nobody wants a failure notice: no DSN at all
        qid = send(env, "s@remote.test",
                   [("u1@example.org", " NOTIFY=NEVER"),
                    ("u2@example.org", " NOTIFY=SUCCESS")])
        r = bounce(env, qid)
        check("no recipient asked" in r.stdout, "odmrctl output %r" % r.stdout)
        check(env.queued() == [], "still queued")
        # mixed: only the recipient that did not say NEVER is reported
        qid = send(env, "s@remote.test",
                   [("u1@example.org", " NOTIFY=NEVER"), "u2@example.org"])
        bounce(env, qid)
        tx = sink.wait(1)[0]
        _, _, per_rcpt, _ = parse_dsn(tx.data)
        check(final_recipients(per_rcpt) == ["u2@example.org"],
              "NOTIFY=NEVER recipient reported: %r" % per_rcpt)
        check(len(sink.transactions) == 1, "more than one DSN")


def test_bounce_ret_hdrs(env):
    env.setup_accounts()
    with Sink() as sink:
        use_relay(env, sink)
        env.start()
        qid = send(env, "s@remote.test", ["u1@example.org"],
                   mail_params=" RET=HDRS")
        bounce(env, qid)
        tx = sink.wait(1)[0]
        msg = email.message_from_bytes(tx.data, policy=email.policy.compat32)
        parts = msg.get_payload()
        check(parts[2].get_content_type() == "text/rfc822-headers",
              "part 3 is %r" % parts[2].get_content_type())
        check(b"Subject: original message" in tx.data, "headers missing")
        check(b"BODY-MARKER" not in tx.data, "RET=HDRS returned the body")


def test_bounce_multi_domain(env):
    """A message for two hosted domains has a copy in each; both copies
    are returned in one report, as the sender sent one message."""
    env.setup_accounts()
    with Sink() as sink:
        use_relay(env, sink)
        qid = enqueue(env, "s@remote.test",
                      ["a@example.org", "b@example.com", "c@example.org"])
        check(len(env.queued()) == 2, "expected two copies: %r" % env.queued())
        r = bounce(env, qid)
        check(r.stdout.count("returned to <s@remote.test>") == 1,
              "odmrctl output %r" % r.stdout)
        txs = sink.wait(1)
        sink.wait_idle()
        check(len(sink.transactions) == 1,
              "%d reports for one message" % len(sink.transactions))
        got = final_recipients(parse_dsn(txs[0].data)[2])
        check(got == ["a@example.org", "b@example.com", "c@example.org"],
              "reported %r" % got)
        check(env.queued() == [], "still queued: %r" % env.queued())


def test_bounce_helo_fallback_and_8bit(env):
    """A relay that refuses EHLO gets HELO; an 8BITMIME message is still
    returned intact."""
    env.setup_accounts()
    with Sink(ehlo_reply="502 5.5.1 EHLO not implemented") as sink:
        use_relay(env, sink)
        env.start()
        body = BODY.replace("BODY-MARKER", "na\u00efve caf\u00e9")
        qid = send(env, "s@remote.test", ["u1@example.org"], body=body,
                   mail_params=" BODY=8BITMIME")
        stored = env.message("example.org", qid)
        bounce(env, qid)
        tx = sink.wait(1)[0]
        check(tx.helo and tx.helo[0] == "HELO", "greeting %r" % (tx.helo,))
        check("BODY=8BITMIME" not in tx.mail_params,
              "BODY=8BITMIME sent to a HELO server: %r" % tx.mail_params)
        msg, _, _, _ = parse_dsn(tx.data)
        check(attached_original(tx.data, msg) == stored, "original differs")


def test_bounce_large_message(env):
    """A few MB pass through the DSN unchanged (streamed, not buffered)."""
    env.setup_accounts()
    line = "x" * 76 + "\r\n"
    body = BODY + line * 40000 + ".\r\n" * 3 + "END\r\n"
    with Sink() as sink:
        use_relay(env, sink)
        qid = enqueue(env, "s@remote.test", ["u1@example.org"], body=body)
        stored = env.message("example.org", qid)
        bounce(env, qid)
        tx = sink.wait(1, timeout=30)[0]
        msg, _, _, _ = parse_dsn(tx.data)
        check(attached_original(tx.data, msg) == stored,
              "the attached message differs (%d vs %d bytes)" % (
                  len(attached_original(tx.data, msg)), len(stored)))


def test_bounce_waits_for_delivery_lock(env):
    """A domain being delivered (its lock held) is not touched: exit 75
    after the wait, the message stays."""
    env.setup_accounts()
    env.write_conf(bounce_relay=None)
    qid = enqueue(env, "someone@elsewhere.test", ["u1@example.org"])
    lock = os.path.join(env.queue_dir("example.org"), ".lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        t0 = time.time()
        bounce(env, qid, code=EX_TEMPFAIL)
        check(time.time() - t0 >= 4, "did not wait for the lock")
        check(env.queued_ids() == [qid], "the message was touched")
    bounce(env, qid)
    check(env.queued() == [], "not bounced after the lock was released")


def test_expiry(env):
    """queue_lifetime: after it, odmrd's maintenance (at start-up, every 5
    minutes, and on SIGUSR1) returns the message with 4.4.7: one report
    for the copies in two domains."""
    env.setup_accounts()
    with Sink() as sink:
        use_relay(env, sink)
        env.write_conf(queue_lifetime="2s")
        env.start()
        qid = send(env, "s@remote.test",
                   ["u1@example.org", "u3@example.com", "u2@example.org"])
        nqid = send(env, "", ["u1@example.net"])
        time.sleep(3)
        os.kill(env.daemon.pid, signal.SIGUSR1)
        tx = sink.wait(1, timeout=20, what="the expiry DSN")[0]
        check(tx.mail_from == "" and tx.rcpts == ["s@remote.test"],
              "DSN envelope %r %r" % (tx.mail_from, tx.rcpts))
        _, _, per_rcpt, _ = parse_dsn(tx.data)
        check(final_recipients(per_rcpt) ==
              ["u1@example.org", "u2@example.org", "u3@example.com"],
              "recipients %r" % per_rcpt)
        for f in per_rcpt:
            check(f.get("Status") == "4.4.7", "Status %r" % f)
            check("delivery time expired" in f.get("Diagnostic-Code", ""),
                  "Diagnostic-Code %r" % f)
        wait_for(lambda: env.queued() == [], timeout=10,
                 what="the expired messages to leave the queue")
        log = env.log()
        wait_for(lambda: "%s: no bounce for null sender" % nqid in env.log(),
                 timeout=5, what="the null-sender log line")
        log = env.log()
        check("%s: sender non-delivery notification" % qid in log,
              "no non-delivery notification line for %s in the log" % qid)
        check("%s: expired" % qid in log, "no expiry line for %s" % qid)
        check(len(sink.transactions) == 1, "DSNs: %r" % sink.transactions)


def test_expiry_moves_damaged_envelope(env):
    """An envelope that cannot be read would never be delivered nor
    expire: when its message would have expired, the maintenance pass
    moves it to spool/corrupt/ (kept for the administrator, logged)."""
    env.setup_accounts()
    with Sink() as sink:
        use_relay(env, sink)
        env.write_conf(queue_lifetime="2s")
        env.start()
        qid = send(env, "s@remote.test", ["u1@example.org"])
        files = env.message_files("example.org", qid)   # [<id>.q]
        env.rewrite_envelope("example.org", qid,
                             lambda t: b"this is not an envelope\n")
        path = os.path.join(env.queue_dir("example.org"), files[0])
        time.sleep(3)
        mark = len(env.log())
        os.kill(env.daemon.pid, signal.SIGUSR1)
        corrupt = os.path.join(env.spool, "corrupt", "example.org")
        wait_for(lambda: not os.path.exists(path), timeout=10,
                 what="the damaged envelope to leave the queue")
        for name in files:
            f = os.path.join(corrupt, name)
            check(os.path.exists(f), "%s not in %s: %r" % (
                f, corrupt, os.listdir(corrupt)))
        wait_for(lambda: "damaged envelope in the queue of example.org"
                 in env.log()[mark:], timeout=5, what="the log line")
        check(env.queued() == [], "queue: %r" % env.queued())
        check(sink.transactions == [], "a report for a damaged envelope")


def test_maintenance_passes_do_not_pile_up(env):
    """A maintenance pass held up by a silent bounce relay (it accepts the
    connection and never greets) is not joined by a second one on
    SIGUSR1: one pass at a time."""
    import socket
    import threading
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    def accept_and_hold():
        silent.settimeout(0.2)
        while silent.fileno() >= 0:
            try:
                held.append(silent.accept()[0])
            except socket.timeout:
                continue
            except OSError:
                return
    t = threading.Thread(target=accept_and_hold, daemon=True)
    t.start()
    try:
        env.setup_accounts()
        env.write_conf(bounce_relay="127.0.0.1:%d" % silent.getsockname()[1],
                       queue_lifetime="1s", timeout="10s")
        env.start()
        send(env, "s@remote.test", ["u1@example.org"])
        time.sleep(2.5)
        mark = len(env.log())
        os.kill(env.daemon.pid, signal.SIGUSR1)
        wait_for(lambda: held, timeout=10, what="the pass to reach the relay")
        os.kill(env.daemon.pid, signal.SIGUSR1)
        wait_for(lambda: "still running; skipping" in env.log()[mark:],
                 timeout=5, what="the second pass to be skipped")
        wait_for(lambda: "bounce to <s@remote.test>" in env.log()[mark:],
                 timeout=30, what="the first pass's bounce")
        check(env.log()[mark:].count("maintenance: the previous pass") == 1,
              "passes:\n%s" % env.log_tail())
    finally:
        silent.close()
        t.join(2)
        for c in held:
            c.close()
