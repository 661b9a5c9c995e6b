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
    # A local wheel mirror may carry the +cpu build; otherwise PyTorch's CPU index. Last, whatever the configured
    # index resolves `torch==VERSION` to, but only if that is a CPU build (a +cpu wheel, or macOS, whose wheels are
    # CPU-only): PyPI's Linux wheel is the CUDA one, with GBs of nvidia-* dependencies.
    "$PY" -m pip install "torch==$VERSION+cpu" 2>/dev/null \
        || "$PY" -m pip install "torch==$VERSION" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || {
            REPORT=$(mktemp)
            "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$REPORT" "torch==$VERSION" >/dev/null
            if "$PY" - "$REPORT" <<'PYCODE'
import json, platform, sys
install = json.load(open(sys.argv[1]))["install"]
torch = next(item["metadata"]["version"] for item in install if item["metadata"]["name"] == "torch")
cuda = [item["metadata"]["name"] for item in install if item["metadata"]["name"].startswith("nvidia-")]
sys.exit(0 if ("+cpu" in torch or platform.system() == "Darwin") and not cuda else 1)
PYCODE
            then
                "$PY" -m pip install "torch==$VERSION"
            else
                echo "install_torch.sh: no CPU build of torch==$VERSION found (only a CUDA one, several GB); point pip at" \
                     "PyTorch's CPU wheels (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) or a mirror of them" >&2
                exit 1
            fi
        }
fi
