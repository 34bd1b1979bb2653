#!/usr/bin/env bash
# Set up .venv/ (when missing) and run the whole test suite, then list its 25 slowest tests.
#   bash run_tests.sh            every tier (what CI runs)
#   bash run_tests.sh --quick    the quick selection: every test not marked slow (tiers: tests/conftest.py)
# Other arguments go to pytest (-m unit, -k NAME, a test file, ...).
# The tests run in TEST_WORKERS parallel processes (pytest-xdist; default: one per CPU core, at most 4), each with
# its share of the cores as torch threads, at most 2 (OMP_NUM_THREADS, unless set).
# TEST_WORKERS=1 runs them in this process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup_env.sh requirements-dev.txt
cores="$(nproc 2>/dev/null || echo 1)"
workers="${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
if ! [[ "$workers" =~ ^[0-9]+$ ]] || (( workers < 1 )); then
  echo "run_tests.sh: TEST_WORKERS=$workers: expected a whole number of processes, 1 or more" >&2
  exit 2
fi
parallel=()
if (( workers > 1 )); then
  share=$(( cores / workers )); share=$(( share < 1 ? 1 : (share > 2 ? 2 : share) ))  # tiny models: <= 2 threads
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$share}"
  # worksteal: an idle worker takes queued tests from a busy one (the suite's test times range from ms to a minute)
  parallel=(-n "$workers" --dist worksteal)
fi
exec .venv/bin/python -m pytest -q --durations=25 "${parallel[@]}" "$@"
