#!/usr/bin/env python3
"""Runs the integration tests (tests/integration/test_*.py) with one line per test and its time.

usage: python3 tests/integration/run.py [-l|--list] [-x|--failfast] [PATTERN ...]

A PATTERN selects tests whose id (module.Class.test_name) contains it, or matches it as a
shell-style wildcard (e.g. 'test_live.*', '*Heartbeat*', 'test_replay.BigHistory'). Patterns can
also come from the environment: EVENT_PIPER_TESTS="pattern1,pattern2". No pattern: every test.
The last line is "integration: N passed, N failed[, N skipped]"; the exit status is 1 if any
test failed or errored.
"""

import argparse
import fnmatch
import os
import signal
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree


def iter_tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from iter_tests(t)
        else:
            yield t


def selected(test_id, patterns):
    if not patterns:
        return True
    for p in patterns:
        if any(ch in p for ch in "*?[") and fnmatch.fnmatchcase(test_id, p):
            return True
        if p in test_id:
            return True
    return False


class LineResult(unittest.TestResult):
    """Prints one line per test: PASS/FAIL/ERROR/SKIP, its id and its duration."""

    def __init__(self, stream):
        super().__init__()
        self.out = stream
        self.passed = 0
        self.failed_ids = []
        self.skipped_n = 0
        self._t0 = None
        self._problems = []

    def startTest(self, test):
        super().startTest(test)
        self._t0 = time.monotonic()
        self._problems = []
        self.out.write("RUN   %s\n" % test.id())
        self.out.flush()

    def _add_problem(self, kind, test, err):
        self._problems.append((kind, self._exc_info_to_string(err, test)))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._add_problem("FAIL", test, err)

    def addError(self, test, err):
        super().addError(test, err)
        self._add_problem("ERROR", test, err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "FAIL" if issubclass(err[0], test.failureException) else "ERROR"
            self._problems.append((kind, "%s\n%s" % (subtest.id(),
                                                      self._exc_info_to_string(err, test))))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._problems.append(("SKIP", reason))

    def stopTest(self, test):
        super().stopTest(test)
        dt = time.monotonic() - self._t0
        kinds = [k for k, _ in self._problems]
        if "ERROR" in kinds:
            verdict = "ERROR"
        elif "FAIL" in kinds:
            verdict = "FAIL"
        elif kinds == ["SKIP"]:
            verdict = "SKIP"
        else:
            verdict = "PASS"
        if verdict == "PASS":
            self.passed += 1
        elif verdict == "SKIP":
            self.skipped_n += 1
        else:
            self.failed_ids.append(test.id())
        self.out.write("%-5s %s (%.2fs)\n" % (verdict, test.id(), dt))
        for kind, text in self._problems:
            if kind == "SKIP":
                self.out.write("      skipped: %s\n" % text)
            else:
                self.out.write("".join("      | %s\n" % l for l in text.rstrip().splitlines()))
        self.out.flush()


def _terminate(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main():
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the harness's exit handlers stop
    # nginx and PostgreSQL.
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("patterns", nargs="*")
    ap.add_argument("-l", "--list", action="store_true", help="list the selected tests")
    ap.add_argument("-x", "--failfast", action="store_true", help="stop at the first failure")
    args = ap.parse_args()
    patterns = list(args.patterns)
    env = os.environ.get("EVENT_PIPER_TESTS", "").strip()
    if env:
        patterns += [p.strip() for p in env.split(",") if p.strip()]

    loader = unittest.TestLoader()
    suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    tests = [t for t in iter_tests(suite) if selected(t.id(), patterns)]
    # Import errors show up as _FailedTest: always run them so they are reported.
    tests += [t for t in iter_tests(suite)
              if type(t).__name__ == "_FailedTest" and t not in tests]
    if args.list:
        for t in tests:
            print(t.id())
        return 0
    if not tests:
        print("no integration test matches %r" % patterns)
        print("integration: 0 passed, 1 failed")
        return 1

    out = sys.stdout
    result = LineResult(out)
    result.failfast = args.failfast
    t0 = time.monotonic()
    out.write("integration: %d tests\n" % len(tests))
    out.flush()
    unittest.TestSuite(tests).run(result)
    dt = time.monotonic() - t0
    # Class/module fixtures that failed (setUpClass etc.) are errors without a test line.
    fixture_failures = [e for e in result.errors if type(e[0]).__name__ == "_ErrorHolder"]
    for holder, text in fixture_failures:
        out.write("ERROR %s\n%s" % (holder.id(), "".join("      | %s\n" % l
                                                           for l in text.splitlines())))
    failed = len(result.failed_ids) + len(fixture_failures)
    if result.failed_ids:
        out.write("\nfailed:\n" + "".join("  %s\n" % i for i in result.failed_ids))
    out.write("integration time: %.1fs\n" % dt)
    summary = "integration: %d passed, %d failed" % (result.passed, failed)
    if result.skipped_n:
        summary += ", %d skipped" % result.skipped_n
    out.write(summary + "\n")
    out.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
