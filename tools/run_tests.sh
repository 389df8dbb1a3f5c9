#!/usr/bin/env bash
# Lint, then the full test suite. "No tests ran" (pytest exit 5) is a failure, not a pass.
# Knobs: PYTHON (default python3), PYTEST_ARGS (extra arguments, e.g. "-k data"),
#        TEST_TIMEOUT (per-test seconds, default 900).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-900}"

echo "== ruff check ."
"$PYTHON" -m ruff check .

echo "== pytest (timeout ${TEST_TIMEOUT}s per test)"
rc=0
# shellcheck disable=SC2086  # PYTEST_ARGS is a word list on purpose
OMP_NUM_THREADS=1 "$PYTHON" -m pytest -q -ra --timeout="$TEST_TIMEOUT" ${PYTEST_ARGS:-} tests || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests.sh: FAIL: pytest collected no tests (exit 5)" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "run_tests.sh: FAIL: pytest exit status $rc" >&2
fi
exit "$rc"
