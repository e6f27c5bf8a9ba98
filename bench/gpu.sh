#!/usr/bin/env bash
# The GPU benchmark in one run of a few minutes (bench/gpu.py): model images/s at
# batch 1, 8 and 64 on ONNX Runtime's CUDA provider against the CPU; the full
# pipeline's images/s with a CUDA worker against a CPU one; one training epoch on
# CUDA against the CPU. Prints the card it ran on first.
#
#   bench/gpu.sh [bench/gpu.py options]        PYTHON=... to use another environment
#
# It installs and downloads nothing: it runs in $PYTHON (default .venv/bin/python,
# made by scripts/setup.sh). For the CUDA parts that environment needs
# onnxruntime-gpu in place of onnxruntime (one module, two distributions) and, for
# the training epoch, a torch build with CUDA; prepare one where packages can be
# fetched, e.g.
#   python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -e '.[train]' \
#       && .venv-gpu/bin/pip uninstall -y onnxruntime && .venv-gpu/bin/pip install onnxruntime-gpu
#   PYTHON=.venv-gpu/bin/python bench/gpu.sh
# Without a GPU (or without those builds) every part still runs its CPU side, says
# "skipped" for its CUDA side, and the script exits with status 2: never mistaken
# for a GPU run. It stops after GPU_BENCH_TIMEOUT_S seconds (default 540).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "bench/gpu.sh: no Python environment at $PY: run scripts/setup.sh, or set PYTHON" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi finds none): the CUDA parts will be skipped" >&2
fi
exec timeout --kill-after=10 "${GPU_BENCH_TIMEOUT_S:-540}" "$PY" bench/gpu.py "$@"
