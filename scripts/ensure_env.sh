#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from the fully pinned lock file.
# `--no-deps` makes the install resolve nothing: what is in requirements.lock is exactly what you get.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
  echo "[ensure_env] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[ensure_env] installing requirements.lock (pinned, no resolution)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -m pip check
touch "$VENV/.installed"
echo "[ensure_env] ready: $VENV"
