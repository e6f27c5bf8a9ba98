#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a machine with an NVIDIA GPU: a virtual
# environment of its own (.venv-gpu) with onnxruntime-gpu in place of onnxruntime
# (both provide the same module) and the CPU build of torch for the exporter.
# Where there is no NVIDIA GPU it stops with a clear message and exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU on this machine (nvidia-smi finds none); run it where there is one" >&2
    exit 2
fi
nvidia-smi -L
PY=${PYTHON:-python3}
[ -x .venv-gpu/bin/python ] || "$PY" -m venv .venv-gpu
.venv-gpu/bin/python -m pip install -q --upgrade pip
.venv-gpu/bin/python -m pip install -q torch==2.13.0 -e '.[train]'
# onnxruntime-gpu replaces onnxruntime (one module, two distributions): remove both, install one.
.venv-gpu/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu
.venv-gpu/bin/python -m pip install -q onnxruntime-gpu
exec .venv-gpu/bin/python bench/gpu.py "$@"
