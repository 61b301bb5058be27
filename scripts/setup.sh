#!/usr/bin/env bash
# Sets up .venv/ with everything batchnorm needs: the pinned CPU build of PyTorch (installed first,
# because an unpinned `torch` requirement would pull several GB of CUDA packages), then this package
# in editable mode with its test extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
