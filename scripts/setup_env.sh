#!/usr/bin/env bash
# Create .venv/ at the repository root when it is missing and install the requirements; reuse it otherwise.
# Usage: bash scripts/setup_env.sh [requirements file]   (default: requirements-dev.txt)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-requirements-dev.txt}"
venv="$root/.venv"
stamp="$venv/.installed-$(sha1sum "$root/requirements.txt" "$root/$req" | sha1sum | cut -c1-12)"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
if [[ ! -f "$stamp" ]]; then
  echo "[setup] installing $req into $venv (first time: a few minutes)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/$req"
  touch "$stamp"
fi
