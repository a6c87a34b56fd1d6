#!/usr/bin/env python3
"""tests/run.py - the `make check` entry point.

    python3 tests/run.py --build DIR [NAME-FILTER...]

Runs, one after the other:
  (a) every C unit test binary DIR/tests/test_*: each prints lines and
      finally "unit-result: <passed> <failed>"; its checks are added to the
      totals.  A binary without that line (crash, timeout) counts as one
      failure, and so does a non-zero exit with zero failed checks.
  (b) every function test_* of every module tests/integration/test_*.py,
      each called with a fresh harness.Env, under a per-test timeout.  After
      each test every process it started is killed by pid; a test that left
      one behind fails.

NAME-FILTERs (substrings) restrict the run to tests whose name
("unit/test_x" or "module.test_function") contains one of them.

Prints "PASS name" / "FAIL name: reason" per test and, as the very last
line, "N passed, N failed".  Exit status 1 when anything failed or nothing
ran.  Standard library only.
"""

import argparse
import importlib
import inspect
import os
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.join(HERE, "integration")

UNIT_TIMEOUT = 120
TEST_TIMEOUT = int(os.environ.get("ODMR_TEST_TIMEOUT", "120"))


class TestTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so `except Exception` in a test
    cannot swallow it."""


def out(line=""):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def indent(text, prefix="    "):
    return "\n".join(prefix + l for l in text.rstrip("\n").split("\n"))


def selected(name, filters):
    return not filters or any(f in name for f in filters)


def run_unit(path, name):
    """Returns (passed, failed, reason-or-None, output)."""
    try:
        p = subprocess.run([path], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=UNIT_TIMEOUT, start_new_session=True)
        output = p.stdout.decode("utf-8", "replace")
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode("utf-8", "replace")
        return 0, 1, "timed out after %ds" % UNIT_TIMEOUT, output
    except OSError as e:
        return 0, 1, "cannot run: %s" % e, ""
    result = None
    for line in output.splitlines():
        if line.startswith("unit-result:"):
            result = line
    if result is None:
        why = "no unit-result line (exit status %d)" % rc
        if rc < 0:
            why = "killed by signal %d, no unit-result line" % -rc
        return 0, 1, why, output
    try:
        passed, failed = (int(x) for x in result.split()[1:3])
    except ValueError:
        return 0, 1, "malformed %r" % result, output
    if rc != 0 and failed == 0:
        return passed, 1, "exit status %d with 0 failed checks" % rc, output
    if rc == 0 and failed:
        return passed, failed, "%d failed check(s) but exit status 0" % failed, output
    return passed, failed, ("%d failed check(s)" % failed) if failed else None, output


def unit_tests(build, filters, totals):
    d = os.path.join(build, "tests")
    if not os.path.isdir(d):
        return
    for fn in sorted(os.listdir(d)):
        path = os.path.join(d, fn)
        if not fn.startswith("test_") or "." in fn or not os.path.isfile(path) \
                or not os.access(path, os.X_OK):
            continue
        name = "unit/" + fn
        if not selected(name, filters):
            continue
        t0 = time.time()
        passed, failed, why, output = run_unit(path, name)
        totals[0] += passed
        totals[1] += failed
        totals[2] += 1
        dt = time.time() - t0
        if why is None:
            out("PASS %s (%d checks, %.1fs)" % (name, passed, dt))
        else:
            out("FAIL %s: %s (%d passed, %d failed)" % (name, why, passed, failed))
            lines = [l for l in output.splitlines()
                     if not l.startswith("unit-result:")]
            if lines:
                out(indent("\n".join(lines[-30:])))


def collect(filters):
    """[(name, function)] and import failures [(name, traceback)]."""
    tests, broken = [], []
    if not os.path.isdir(INTEGRATION):
        return tests, broken
    sys.path.insert(0, INTEGRATION)
    for fn in sorted(os.listdir(INTEGRATION)):
        if not (fn.startswith("test_") and fn.endswith(".py")):
            continue
        modname = fn[:-3]
        try:
            mod = importlib.import_module(modname)
        except Exception:
            if selected(modname, filters):
                broken.append((modname, traceback.format_exc()))
            continue
        funcs = []
        for attr, obj in vars(mod).items():
            if attr.startswith("test_") and inspect.isfunction(obj) \
                    and obj.__module__ == modname:
                funcs.append((obj.__code__.co_firstlineno, attr, obj))
        for _, attr, obj in sorted(funcs):
            name = "%s.%s" % (modname, attr)
            if selected(name, filters):
                tests.append((name, obj))
    return tests, broken


def on_alarm(signum, frame):
    raise TestTimeout("test timed out after %ds" % TEST_TIMEOUT)


def short_reason(exc):
    msg = str(exc).strip().split("\n")[0] if str(exc).strip() else ""
    return "%s%s" % (type(exc).__name__, (": " + msg) if msg else "")


def run_integration(build, filters, totals):
    import harness
    tests, broken = collect(filters)
    for name, tb in broken:
        totals[1] += 1
        totals[2] += 1
        out("FAIL %s: cannot import" % name)
        out(indent(tb))
    signal.signal(signal.SIGALRM, on_alarm)
    for name, func in tests:
        totals[2] += 1
        t0 = time.time()
        env = None
        failure = None
        details = ""
        try:
            signal.alarm(TEST_TIMEOUT)
            env = harness.Env(build, name=name.split(".")[-1][5:][:20] or "t")
            func(env)
        except (Exception, TestTimeout) as e:
            failure = short_reason(e)
            details = traceback.format_exc()
        finally:
            signal.alarm(0)
        problems = []
        log_tail = ""
        if env is not None and os.path.exists(env.log_path):
            log_tail = env.log_tail(25)
        if env is not None:
            # cleanup also gets a bounded time
            try:
                signal.alarm(60)
                problems = env.cleanup()
            except (Exception, TestTimeout) as e:
                problems = ["cleanup failed: %s" % short_reason(e)]
            finally:
                signal.alarm(0)
        dt = time.time() - t0
        if failure is None and problems:
            failure = "; ".join(problems)
        elif problems:
            details += "\n" + "\n".join(problems)
        if failure is None:
            totals[0] += 1
            out("PASS %s (%.1fs)" % (name, dt))
            for i in env.infos:
                out("    info: " + i)
        else:
            totals[1] += 1
            out("FAIL %s: %s" % (name, failure))
            if details:
                out(indent(details))
            if env is not None:
                for i in env.infos:
                    out("    info: " + i)
            if log_tail:
                out("    --- odmrd log (tail) ---")
                out(indent(log_tail))
            if env is not None and env.notes:
                out(indent("notes: " + "; ".join(env.notes)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True, help="build directory")
    ap.add_argument("--unit-only", action="store_true")
    ap.add_argument("--integration-only", action="store_true")
    ap.add_argument("filters", nargs="*", help="name substrings")
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    sys.path.insert(0, INTEGRATION)
    totals = [0, 0, 0]   # checks/tests passed, failed, test units run
    if not a.integration_only:
        unit_tests(build, a.filters, totals)
    if not a.unit_only:
        run_integration(build, a.filters, totals)
    if totals[2] == 0:
        out("no tests ran")
    out("%d passed, %d failed" % (totals[0], totals[1]))
    sys.exit(1 if totals[1] or totals[2] == 0 else 0)


if __name__ == "__main__":
    main()
