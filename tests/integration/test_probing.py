"""test_probing.py - no account probing (issue 10): for every mechanism,
odmrd answers an unknown name exactly as it answers a known name with a
wrong password - the same replies at every step, the same SCRAM
server-first structure (nonce, salt length, iteration count, a salt that
is stable per name as a real account's is), the same 535 5.7.8 - and
fails in the same time.  The log still tells the two apart.

Black-box against the real odmrd.  Every connection comes from a fresh
loopback address (127.0.0.0/8 is all loopback) and no name fails more
than four times per daemon, so odmrd's authentication throttle (per
address and per account) never refuses an attempt; the delay it puts
before every 535 is the same for both kinds, so it stays in the
measurement.
"""

import base64
import hashlib
import hmac
import os
import random
import re
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from harness import SMTP, check, check_reply, fail

ALICE_PW = "alice-pw"
UNKNOWN = "nosuchuser"
FAILED = (535, "5.7.8 Authentication credentials invalid")
HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}
PAIRS = 30          # timed attempts per kind
NAMES = 8           # names per kind for the timed attempts (<= 4 uses each)


# --------------------------------------------------------------------------
# connections

_next_source = [random.randrange(0, 1 << 16)]


def source_address():
    """A loopback address not used before in this run."""
    _next_source[0] += 1
    n = _next_source[0]
    return "127.%d.%d.%d" % (100 + (n // 62500) % 150, (n // 250) % 250 + 1,
                             n % 250 + 1)


class Client(SMTP):
    """harness.SMTP, connected to the ODMR listener from a fresh loopback
    address; greeting and EHLO done."""

    def __init__(self, env):
        self.sock = socket.create_connection(
            ("127.0.0.1", env.odmr_port), timeout=30,
            source_address=(source_address(), 0))
        self.buf = b""
        self.last_lines = []
        self.transcript = []
        self.greeting = self.reply()
        check_reply(self.greeting, 220, what="ODMR greeting")
        self.ehlo_ok()

    def ehlo_ok(self):
        code, kw = self.ehlo("customer.test")
        check(code == 250, "EHLO: %r" % (self.last_lines,))
        return kw

    def timed(self, line):
        """(reply, seconds from sending the line to the whole reply)."""
        t0 = time.perf_counter()
        r = self.cmd(line)
        return r, time.perf_counter() - t0


def b64(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text.strip(), validate=True)


# --------------------------------------------------------------------------
# one failing attempt per mechanism: what the server said at each step and
# how long it took (only the server's turns are timed)

def scram_attempt(s, user, password, mech):
    hname = HASHES[mech]
    hf = getattr(hashlib, hname)
    cnonce = b64(os.urandom(18))
    first_bare = "n=%s,r=%s" % (user.replace("=", "=3D").replace(",", "=2C"),
                                cnonce)
    r, took = s.timed("AUTH %s %s" % (mech, b64("n,," + first_bare)))
    out = {"steps": [r[0]], "cnonce": cnonce, "server_first": None,
           "final": r, "time": took}
    if r[0] != 334:
        return out
    server_first = unb64(r[1]).decode()
    out["server_first"] = server_first
    m = re.fullmatch(r"r=([^,]+),s=([A-Za-z0-9+/=]+),i=(\d+)", server_first)
    if not m:
        fail("%s server-first %r is not r=,s=,i=" % (mech, server_first))
    nonce, salt, iters = m.group(1), base64.b64decode(m.group(2)), int(m.group(3))
    salted = hashlib.pbkdf2_hmac(hname, password.encode(), salt, iters)
    client_key = hmac.new(salted, b"Client Key", hf).digest()
    final_wo_proof = "c=%s,r=%s" % (b64("n,,"), nonce)
    auth_message = ",".join((first_bare, server_first, final_wo_proof))
    sig = hmac.new(hf(client_key).digest(), auth_message.encode(), hf).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, sig))
    r, took = s.timed(b64("%s,p=%s" % (final_wo_proof, b64(proof))))
    out.update(steps=out["steps"] + [r[0]], final=r, time=out["time"] + took,
               nonce=nonce, salt=salt, iters=iters)
    return out


def cram_attempt(s, user, password):
    r, took = s.timed("AUTH CRAM-MD5")
    out = {"steps": [r[0]], "final": r, "time": took, "challenge": None}
    if r[0] != 334:
        return out
    chal = unb64(r[1])
    out["challenge"] = chal.decode("ascii", "replace")
    digest = hmac.new(password.encode(), chal, hashlib.md5).hexdigest()
    r, t2 = s.timed(b64("%s %s" % (user, digest)))
    out.update(steps=out["steps"] + [r[0]], final=r, time=took + t2)
    return out


def plain_attempt(s, user, password):
    r, took = s.timed("AUTH PLAIN " + b64("\0%s\0%s" % (user, password)))
    return {"steps": [r[0]], "final": r, "time": took}


def login_attempt(s, user, password):
    steps, total = [], 0.0
    for line in ("AUTH LOGIN", b64(user), b64(password)):
        r, took = s.timed(line)
        steps.append((r[0], unb64(r[1]) if r[0] == 334 else r[1]))
        total += took
        if r[0] != 334:
            break
    return {"steps": steps, "final": r, "time": total}


def attempt(env, kind, user, password, tls=False):
    s = Client(env)
    try:
        if tls:
            check_reply(s.starttls(), 220, what="STARTTLS")
            s.ehlo_ok()
        if kind in HASHES:
            return scram_attempt(s, user, password, kind)
        return {"CRAM-MD5": cram_attempt, "PLAIN": plain_attempt,
                "LOGIN": login_attempt}[kind](s, user, password)
    finally:
        s.close()


# --------------------------------------------------------------------------
# checks

def check_failed_alike(what, known, unknown):
    check(unknown["steps"] == known["steps"],
          "%s: the steps differ: unknown name %r, wrong password %r"
          % (what, unknown["steps"], known["steps"]))
    check(unknown["final"] == FAILED and known["final"] == FAILED,
          "%s: final replies: unknown name %r, wrong password %r (want %r)"
          % (what, unknown["final"], known["final"], FAILED))


def check_log(env, mech, *pairs):
    """pairs: (text in parentheses, name) that must be logged."""
    log = env.log()
    for text, name in pairs:
        line = 'authentication failed, mechanism %s (%s "%s")' % (mech, text,
                                                                   name)
        check(line in log, "log has no %r; last lines:\n%s"
              % (line, env.log_tail(12)))


def setup(env, tls=False):
    if tls:
        env.make_cert()
    env.add_user("alice", ALICE_PW)
    for i in range(NAMES):
        env.add_user("known%02d" % i, "pw-%02d" % i)
    env.start()


def iqr(xs):
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def measure(env, kind, tls=False):
    """PAIRS alternating failures each for known names with a wrong
    password and for unknown names; reports the medians, asserts they
    differ by little next to the spread.  When every failure waits (the
    throttle's delay before 535), attempts run four at a time: sleeping
    sessions do not compete for the CPU."""
    def one(i):
        n = (i // 2) % NAMES
        if i % 2:
            return "u", attempt(env, kind, "unknown%02d" % n, "pw-x", tls)
        return "k", attempt(env, kind, "known%02d" % n, "wrong-pw", tls)

    # warm-up (not measured): both paths once, and the delay per failure
    warm = [attempt(env, kind, name, "x", tls) for name in ("alice", "nobody")]
    parallel = 4 if min(w["time"] for w in warm) > 0.2 else 1
    order = list(range(2 * PAIRS))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(one, order))
    times = {"u": [], "k": []}
    for who, res in results:
        check(res["final"] == FAILED, "%s timed attempt: %r" % (kind,
                                                              res["final"]))
        times[who].append(res["time"] * 1000)
    mu, mk = statistics.median(times["u"]), statistics.median(times["k"])
    iu, ik = iqr(times["u"]), iqr(times["k"])
    allowed = max(1.5 * (iu + ik) / 2, 2.5)
    env.info("%s failure time: unknown name median %.2f ms (IQR %.2f), "
             "wrong password median %.2f ms (IQR %.2f); difference %.2f ms, "
             "allowed %.2f ms; n=%d each, %d at a time"
             % (kind, mu, iu, mk, ik, abs(mu - mk), allowed, PAIRS, parallel))
    check(abs(mu - mk) <= allowed,
          "%s: failure time tells an unknown name (median %.2f ms) from a "
          "wrong password (median %.2f ms); spread (IQR) %.2f / %.2f ms"
          % (kind, mu, mk, iu, ik))


def check_scram(env, mech):
    setup(env)
    size = hashlib.new(HASHES[mech]).digest_size
    got = {}
    for rnd in range(2):
        for name in ("alice", UNKNOWN, "nosuchuser2"):
            got[name, rnd] = attempt(env, mech, name, "wrong-pw")
    known = got["alice", 0]
    check(known["server_first"] is not None,
          "%s: no server-first message for alice: %r" % (mech, known["final"]))
    for key, res in got.items():
        what = "%s for %r (attempt %d)" % (mech, key[0], key[1] + 1)
        check(res["server_first"] is not None,
              "%s: %r instead of a server-first message (the name shows it "
              "does not exist)" % (what, res["final"]))
        check_failed_alike(what, known, res)
        check(res["nonce"].startswith(res["cnonce"]) and
              len(res["nonce"]) - len(res["cnonce"]) ==
              len(known["nonce"]) - len(known["cnonce"]),
              "%s: server nonce %r (ours %r)" % (what, res["nonce"],
                                                res["cnonce"]))
        check(len(res["salt"]) == len(known["salt"]) == size,
              "%s: salt of %d bytes, alice's %d" % (what, len(res["salt"]),
                                                   len(known["salt"])))
        check(res["iters"] == known["iters"] and res["iters"] >= 4096,
              "%s: i=%d, alice's i=%d" % (what, res["iters"], known["iters"]))
    # Cyrus derives a real account's salt from the name and a key of this
    # daemon start: stable.  An unknown name's must be as well, and its own.
    for name in ("alice", UNKNOWN, "nosuchuser2"):
        check(got[name, 0]["salt"] == got[name, 1]["salt"],
              "%s: the salt of %r changes between exchanges" % (mech, name))
    salts = {got[n, 0]["salt"] for n in ("alice", UNKNOWN, "nosuchuser2")}
    check(len(salts) == 3, "%s: two names share a salt" % mech)
    check_log(env, mech, ("unknown account", UNKNOWN),
              ("wrong password for", "alice"))
    # the right password still works
    s = Client(env)
    r = scram_attempt(s, "alice", ALICE_PW, mech)
    check(r["final"][0] in (334, 235), "%s with the right password: %r"
          % (mech, r["final"]))
    if r["final"][0] == 334:
        check_reply(s.cmd(""), 235, "2.7.0", "%s final" % mech)
    s.quit()
    measure(env, mech)


# --------------------------------------------------------------------------
# tests

def test_scram_sha256_unknown_name_like_wrong_password(env):
    check_scram(env, "SCRAM-SHA-256")


def test_scram_sha1_unknown_name_like_wrong_password(env):
    check_scram(env, "SCRAM-SHA-1")


def test_cram_md5_unknown_name_like_wrong_password(env):
    setup(env)
    known = attempt(env, "CRAM-MD5", "alice", "wrong-pw")
    unknown = attempt(env, "CRAM-MD5", UNKNOWN, "wrong-pw")
    check_failed_alike("CRAM-MD5", known, unknown)
    shape = [re.sub(r"\d+", "N", r["challenge"]) for r in (known, unknown)]
    check(shape[0] == shape[1] == "<N.N@mx.test>",
          "CRAM-MD5 challenges: %r / %r" % (known["challenge"],
                                            unknown["challenge"]))
    check_log(env, "CRAM-MD5", ("unknown account", UNKNOWN),
              ("wrong password for", "alice"))
    measure(env, "CRAM-MD5")


def test_plain_login_over_tls_unknown_name_like_wrong_password(env):
    setup(env, tls=True)
    for mech in ("PLAIN", "LOGIN"):
        known = attempt(env, mech, "alice", "wrong-pw", tls=True)
        unknown = attempt(env, mech, UNKNOWN, "wrong-pw", tls=True)
        check_failed_alike(mech, known, unknown)
        check_log(env, mech, ("unknown account", UNKNOWN),
                  ("wrong password for", "alice"))
    measure(env, "PLAIN", tls=True)
