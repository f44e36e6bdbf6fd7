#!/usr/bin/env bash
# Runs every test of ngx_event_piper: the GoogleTest unit tests (build/unit_tests) and the
# integration tests (tests/integration/run.py: real PostgreSQL + real nginx with the module).
#
# usage: tests/run_all.sh [PATTERN ...]
#   PATTERNs (or EVENT_PIPER_TESTS="p1,p2") select integration tests by id substring or wildcard,
#   e.g. tests/run_all.sh test_live 'test_replay.*Slow*'. GTEST_FILTER selects unit tests.
#   UNIT=0 skips the unit tests, INTEGRATION=0 the integration tests.
# Environment passed through: EVENT_PIPER_MODULE (module to test), EVENT_PIPER_NGINX_PRELOAD,
#   EVENT_PIPER_TIME_SCALE (multiplies timeouts), EVENT_PIPER_KEEP_TMP.
# The last line is "N passed, N failed" (unit + integration); exit status 1 if anything failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

passed=0
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT

if [[ ${UNIT:-1} != 0 ]]; then
    echo "=== unit tests (build/unit_tests) ==="
    if [[ -x build/unit_tests ]]; then
        build/unit_tests 2>&1 | tee "$out"
        rc=${PIPESTATUS[0]}
        up=$(sed -n 's/^\[  PASSED  \] \([0-9][0-9]*\) test.*/\1/p' "$out" | tail -n1)
        uf=$(sed -n 's/^\[  FAILED  \] \([0-9][0-9]*\) test.*/\1/p' "$out" | tail -n1)
        up=${up:-0}
        uf=${uf:-0}
        if [[ $rc != 0 && $uf == 0 ]]; then
            echo "unit: build/unit_tests exited with status $rc without a failure count (crash?)"
            uf=1
        fi
        echo "unit: $up passed, $uf failed"
        passed=$((passed + up))
        failed=$((failed + uf))
    else
        echo "unit: build/unit_tests is missing (build it with: make unit-build); counted as a failure"
        failed=$((failed + 1))
    fi
fi

if [[ ${INTEGRATION:-1} != 0 ]]; then
    echo "=== integration tests (tests/integration/run.py) ==="
    python3 tests/integration/run.py "$@" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '^integration: [0-9]+ passed, [0-9]+ failed' "$out" | tail -n1)
    if [[ -n $line ]]; then
        ip=$(sed -E 's/^integration: ([0-9]+) passed.*/\1/' <<<"$line")
        if_=$(sed -E 's/^integration: [0-9]+ passed, ([0-9]+) failed.*/\1/' <<<"$line")
        if [[ $rc != 0 && $if_ == 0 ]]; then
            echo "integration: run.py exited with status $rc"
            if_=1
        fi
    else
        echo "integration: run.py ended without a summary (status $rc); counted as a failure"
        ip=0
        if_=1
    fi
    passed=$((passed + ip))
    failed=$((failed + if_))
fi

echo "$passed passed, $failed failed"
[[ $failed == 0 ]]
