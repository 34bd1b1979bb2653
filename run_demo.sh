#!/usr/bin/env bash
# The embedded demo (CPU, about two minutes after setup): generate a small VTAB-layout dataset, pre-train a small
# ViT on one task, save it as a Google-layout .npz, transfer it to another task with DTL, DTL+ and a linear probe
# through train_scripts/vit/vtab/<task>/ launchers, and print tools/aggregate.py's table.
# Sets up .venv/ first when it is missing (scripts/setup_env.sh). Extra arguments go to demo/run_demo.py
# (e.g. --workdir DIR; default demo_output/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
for arg in "$@"; do  # help first, before installing anything (demo/run_demo.py --help needs only the stdlib)
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    if [[ -x .venv/bin/python ]]; then exec .venv/bin/python demo/run_demo.py --help; fi
    exec python3 demo/run_demo.py --help
  fi
done
bash scripts/setup_env.sh requirements.txt
exec .venv/bin/python demo/run_demo.py "$@"
