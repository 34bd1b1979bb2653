# Sourced by every launcher: picks the Python interpreter and builds LAUNCH (an array) from NPROC.
# The launcher then `exec`s "${LAUNCH[@]}" train.py ...: its PID becomes the Python (or torchrun) process, so
# signals sent to the launcher reach the training.
#   PYTHON        interpreter (default: the repository's .venv, else python3, which must have torch)
#   NPROC         processes on this node; > 1 -> python tools/torchrun.py --nproc_per_node NPROC (torchrun, with
#                 train.py's exit statuses: 2, 130/143, and no torchrun traceback or failure report)
#   TORCHRUN_ARGS extra torchrun flags, e.g. "--nnodes 2 --node_rank 0 --master_addr host0 --master_port 29500"
if [[ -n "${PYTHON:-}" ]]; then
  if ! command -v "$PYTHON" > /dev/null; then
    echo "error: PYTHON=$PYTHON: no such interpreter (unset it to use $REPO/.venv, made by" \
         "'bash scripts/setup_env.sh')" >&2
    exit 2
  fi
else
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
  # find_spec looks torch up without importing it (a few milliseconds)
  if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2> /dev/null; then
    echo "error: $PYTHON cannot import torch: run 'bash scripts/setup_env.sh' (creates $REPO/.venv, which the" \
         "launchers use), or set PYTHON= to an interpreter with requirements.txt installed" >&2
    exit 2
  fi
fi
if ! [[ "${NPROC:-1}" =~ ^[1-9][0-9]*$ ]]; then
  echo "NPROC must be a positive integer, got '${NPROC}'" >&2
  exit 2
fi
if (( ${NPROC:-1} > 1 )) || [[ -n "${TORCHRUN_ARGS:-}" ]]; then
  # "--" ends torchrun's own options: without it torchrun's parser also reads train.py's flags (and refuses
  # e.g. --r as an ambiguous abbreviation of its --rdzv-*/--role/--run-path/--redirects).
  # shellcheck disable=SC2206  # TORCHRUN_ARGS is split on purpose
  LAUNCH=("$PYTHON" "$REPO/tools/torchrun.py" --nproc_per_node "${NPROC:-1}" ${TORCHRUN_ARGS:-} --)
else
  LAUNCH=("$PYTHON")
fi
