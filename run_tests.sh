#!/usr/bin/env bash
# Set up .venv/ (when missing) and run the whole test suite, then list its 25 slowest tests.
#   bash run_tests.sh            every tier (what CI runs)
#   bash run_tests.sh --quick    the quick selection: every test not marked slow (tiers: tests/conftest.py)
# Other arguments go to pytest (-m unit, -k NAME, a test file, ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup_env.sh requirements-dev.txt
exec .venv/bin/python -m pytest -q --durations=25 "$@"
