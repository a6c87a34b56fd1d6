"""How the reversed ODMR session logs a customer that stops answering or
drops the connection (issue 9 part 5), with the real odmrd.

Postfix style: "QID: timeout after RCPT TO to customer 127.0.0.1" and
"QID: lost connection after RCPT TO with customer 127.0.0.1", with the
queue id while a message is in flight, for every reply odmrd waits for
(the greeting after ATRN, EHLO, MAIL, RCPT, DATA, end of data, QUIT).
odmrd runs with a short `timeout`; the customer is scripted (the
Customer class of test_conversion.py).  The message stays queued,
unchanged.  Python 3 standard library only.
"""

import os
import time

from harness import check
from test_conversion import (log_line_with, reverse, setup, smtp_in,
                             text_message, wait_session_end)

TIMEOUT = 2          # odmrd's timeout (seconds) in these tests
PEER = "127.0.0.1"
NO_PIPELINING = ("ENHANCEDSTATUSCODES",)


def queue_files(env, qid):
    """[envelope in force, data] of the message."""
    return [env.envelope_text("example.org", qid),
            env.message("example.org", qid)]


def one_message(env):
    """Starts odmrd with the short timeout and queues one message."""
    setup(env, timeout="%ds" % TIMEOUT)
    qid = smtp_in(env, ["c@example.org"], text_message(b"log", b"hello\r\n"),
                  mail_params="")
    return qid, queue_files(env, qid)


def stalled_session(env, qid, files, stop_at, stop="silent",
                    extensions=NO_PIPELINING):
    """One reversed session whose customer stops at stop_at; returns the
    log after it.  The message must still be queued as it was."""
    mark = len(env.log())
    t0 = time.time()
    c = reverse(env, stop_at=stop_at, stop=stop, extensions=extensions,
                timeout=TIMEOUT * 10).run()
    summary = wait_session_end(env, mark)
    if stop == "silent":
        check(time.time() - t0 >= TIMEOUT - 0.5,
              "odmrd gave up after %.1fs, timeout is %ds"
              % (time.time() - t0, TIMEOUT))
    if stop_at != "QUIT":
        check("connection lost" in summary, "summary %r" % summary)
        check(c.transactions == [] or stop_at == ".",
              "customer got %r" % c.transactions)
    check(env.queued_ids("example.org") == [qid] and
          queue_files(env, qid) == files,
          "the queued message changed after the customer stopped at %s"
          % stop_at)
    return mark


def test_timeout_after_rcpt_logged(env):
    """The issue's example: a customer that stops answering after RCPT."""
    qid, files = one_message(env)
    mark = stalled_session(env, qid, files, "RCPT")
    line = log_line_with(env, mark, "timeout after RCPT TO to customer " + PEER)
    check(line.split("]: ", 1)[-1].startswith(qid + ": "),
          "no queue id first in %r" % line)
    # with PIPELINING the reply to RCPT is still the one missing
    mark = stalled_session(env, qid, files, "RCPT",
                           extensions=("PIPELINING", "ENHANCEDSTATUSCODES"))
    log_line_with(env, mark, qid, "timeout after RCPT TO to customer " + PEER)


def test_timeout_in_every_phase(env):
    """Greeting, EHLO, MAIL, DATA, end of data and QUIT: each names its
    phase; the queue id is there while the message is in flight."""
    qid, files = one_message(env)
    phases = [("greeting", "ATRN", False), ("EHLO", "EHLO", False),
              ("MAIL", "MAIL FROM", True), ("DATA", "DATA", True),
              (".", "END-OF-MESSAGE", True)]
    for stop_at, phase, in_flight in phases:
        mark = stalled_session(env, qid, files, stop_at)
        line = log_line_with(env, mark, "timeout after %s to customer %s"
                             % (phase, PEER))
        check((qid + ": ") in line if in_flight else qid not in line,
              "queue id in %r (in flight: %s)" % (line, in_flight))
    # QUIT: the message was delivered, the session still names the wait
    mark = len(env.log())
    reverse(env, stop_at="QUIT", extensions=NO_PIPELINING,
            timeout=TIMEOUT * 10).run()
    wait_session_end(env, mark)
    log_line_with(env, mark, "timeout after QUIT to customer " + PEER)
    log_line_with(env, mark, qid, "status=sent")
    check(env.queued() == [], "queue: %r" % env.queued())


def test_lost_connection_names_phase(env):
    """A customer that closes the connection instead of answering."""
    qid, files = one_message(env)
    for stop_at, phase in (("RCPT", "RCPT TO"), ("DATA", "DATA"),
                           ("greeting", "ATRN")):
        mark = stalled_session(env, qid, files, stop_at, stop="close")
        line = log_line_with(env, mark, "lost connection after %s with "
                             "customer %s" % (phase, PEER))
        check((qid + ": ") in line or stop_at == "greeting",
              "no queue id in %r" % line)
