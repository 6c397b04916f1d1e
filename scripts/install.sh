#!/usr/bin/env bash
# Set up cryotorch in ./.venv (or the active virtual environment): the CUDA build of PyTorch
# where an NVIDIA GPU is visible, the CPU build otherwise (no multi-GB CUDA download), then
# cryotorch itself, editable, with the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if python -c "import torch" 2>/dev/null; then
    echo "using the installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install torch
elif [ "$(uname -s)" = Linux ]; then
    # the CPU build, pinned by its +cpu label so that no resolver can swap in a CUDA wheel;
    # few retries: where the PyTorch index is unreachable pip falls back to local wheels quickly
    python -m pip install "torch==${TORCH_VERSION:-2.13.0}+cpu" --index-url https://download.pytorch.org/whl/cpu --retries 1
else
    python -m pip install torch  # macOS wheels are CPU builds
fi
python -m pip install -e ".[dev]"
