#!/usr/bin/env bash
# Install PyTorch into the given interpreter's environment before anything else asks for it.
# Without an NVIDIA GPU we take the CPU build (hundreds of MB), never the default multi-GB CUDA one.
set -euo pipefail
PY=${1:?usage: install_torch.sh PYTHON}
VERSION=${TORCH_VERSION:-2.13.0}
if "$PY" -c "import torch" 2>/dev/null; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install "torch==$VERSION"
else
    # A local wheel mirror may carry the +cpu build; otherwise use PyTorch's CPU index.
    "$PY" -m pip install "torch==$VERSION+cpu" 2>/dev/null \
        || "$PY" -m pip install "torch==$VERSION" --index-url https://download.pytorch.org/whl/cpu \
        || "$PY" -m pip install "torch==$VERSION"
fi
