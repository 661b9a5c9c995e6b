#!/usr/bin/env bash
# Every GPU figure the project has, in one run of at most ~8 minutes of device time; JSON (and logs) under $OUT.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh        # from the repository root, on a machine with a CUDA GPU
#
# 1. training: python -m benchmarks.train_throughput --gpu-shape mistral-7b (ours vs transformers.Trainer, 4-bit 7B
#    shape);
# 2. co-training: python -m benchmarks.co_train --gpu-shape mistral-7b (a lone job, then groups of 1, 4 and 8 members);
# 3. serving: python -m benchmarks.serve_adapters --gpu-shape mistral-7b (engine at 1 and 32 adapters, the PEFT
#    baselines at 32, cold loads; rank-8 adapters on every linear layer of a random 7B-shaped 4-bit model). 128 adapters
#    are left out to fit (writing 7B adapters takes ~0.5 s each); each baseline stops at its window's end (a hard
#    deadline).
# 4. vLLM (only where `import vllm` works; otherwise the step says why and is recorded as skipped):
#    python -m benchmarks.serve_adapters --gpu-shape mistral-7b --engine both: vLLM on the 4-bit base (bitsandbytes)
#    and on a bf16 copy, each at 1, 32 and 128 adapters and with the base alone, beside our engine at the same counts
#    and the PEFT baselines at 32. Its limit (VLLM_LIMIT_S) comes on top of the ~8 minutes above.
# Each step has its own time limit (STEP_LIMIT_S, seconds each) so one slow step cannot eat the others' time; a step
# that fails or runs out of time is recorded in $OUT/gpu_check.json and the next one still runs.
# PYTHON defaults to the project's .venv, else python3.
set -u -o pipefail

OUT="${OUT:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The limits add up to 470 s (training took 154 s on an H200; co-training ~60 s and serving ~150 s are expected with
# the settings below: estimates, not yet run on a GPU).
TRAIN_LIMIT_S="${TRAIN_LIMIT_S:-200}"
COTRAIN_LIMIT_S="${COTRAIN_LIMIT_S:-90}"
SERVE_LIMIT_S="${SERVE_LIMIT_S:-180}"
VLLM_LIMIT_S="${VLLM_LIMIT_S:-600}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA GPU visible to $PYTHON; nothing measured" >&2
  exit 2
fi
nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1 || true

statuses=()
step() {  # step NAME LIMIT_S COMMAND...: run it under a time limit, log to $OUT/NAME.log, remember its exit status
  local name="$1" limit="$2"
  shift 2
  local started=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  echo "   exit $status after $((SECONDS - started))s"
  tail -n 25 "$OUT/$name.log"
  statuses+=("\"$name\": {\"exit\": $status, \"seconds\": $((SECONDS - started))}")
}

step train_throughput "$TRAIN_LIMIT_S" "$PYTHON" -m benchmarks.train_throughput --gpu-shape mistral-7b --steps 8 \
  --learning-rate 2e-4 --out "$OUT/train_throughput_mistral7b.json"

step co_train "$COTRAIN_LIMIT_S" "$PYTHON" -m benchmarks.co_train --gpu-shape mistral-7b --steps 4 --gpu-ks 1 4 8 \
  --out "$OUT/co_train_mistral7b.json"

step serve_adapters "$SERVE_LIMIT_S" "$PYTHON" -m benchmarks.serve_adapters --gpu-shape mistral-7b \
  --parts engine,peft,cold --adapter-counts 1,32 --repeats 1 --seconds 10 --baseline-seconds 10 --warmup-s 3 \
  --device-slots 0 --max-rank 8 --out "$OUT/serve_adapters_mistral7b.json"

if vllm_error=$("$PYTHON" -c 'import vllm' 2>&1); then
  step serve_vllm "$VLLM_LIMIT_S" "$PYTHON" -m benchmarks.serve_adapters --gpu-shape mistral-7b \
    --parts engine,peft --engine both --vllm-precisions 4bit,bf16 --adapter-counts 1,32,128 --repeats 1 --seconds 10 \
    --baseline-seconds 10 --warmup-s 3 --device-slots 0 --max-rank 8 --out "$OUT/serve_vllm_mistral7b.json"
else
  echo "== serve_vllm skipped: import vllm failed with $PYTHON: $(echo "$vllm_error" | tail -n 1)"
  echo "   (make setup installs vllm on a machine with an NVIDIA GPU; a lent machine without a registry cannot)"
  statuses+=("\"serve_vllm\": {\"skipped\": \"import vllm failed\"}")
fi

joined=$(IFS=,; echo "${statuses[*]}")
echo "{${joined}}" >"$OUT/gpu_check.json"
echo "wrote $OUT/gpu_check.json"
