#!/usr/bin/env bash
# Every GPU figure the project has, in one run of at most ~8 minutes of device time; JSON (and logs) under $OUT.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh        # from the repository root, on a machine with a CUDA GPU
#
# 1. training: benchmarks/train_throughput.py --gpu-shape mistral-7b (ours vs transformers.Trainer, 4-bit 7B shape);
# 2. co-training, when the project has a benchmark for it (benchmarks/cotrain_throughput.py);
# 3. serving: benchmarks/serve_adapters.py --gpu-shape mistral-7b (engine at 1/32/128 adapters, the PEFT baselines,
#    cold loads; rank-8 adapters on every linear layer of a random 7B-shaped 4-bit model).
# Each step has its own time limit (STEP_LIMIT_S, seconds each) so one slow step cannot eat the others' time; a step
# that fails or runs out of time is recorded in $OUT/gpu_check.json and the next one still runs.
# PYTHON defaults to the project's .venv, else python3.
set -u -o pipefail

OUT="${OUT:-benchmarks/results/gpu}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TRAIN_LIMIT_S="${TRAIN_LIMIT_S:-240}"
COTRAIN_LIMIT_S="${COTRAIN_LIMIT_S:-40}"
SERVE_LIMIT_S="${SERVE_LIMIT_S:-200}"
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

step train_throughput "$TRAIN_LIMIT_S" "$PYTHON" benchmarks/train_throughput.py --gpu-shape mistral-7b --steps 8 \
  --out "$OUT/train_throughput_mistral7b.json"

if [ -f benchmarks/cotrain_throughput.py ]; then
  step cotrain_throughput "$COTRAIN_LIMIT_S" "$PYTHON" benchmarks/cotrain_throughput.py --gpu-shape mistral-7b \
    --out "$OUT/cotrain_throughput_mistral7b.json"
fi

step serve_adapters "$SERVE_LIMIT_S" "$PYTHON" benchmarks/serve_adapters.py --gpu-shape mistral-7b \
  --parts engine,peft,cold --adapter-counts 1,32,128 --repeats 1 --seconds 15 --baseline-seconds 15 --warmup-s 5 --device-slots 0 \
  --max-rank 8 --out "$OUT/serve_adapters_mistral7b.json"

joined=$(IFS=,; echo "${statuses[*]}")
echo "{${joined}}" >"$OUT/gpu_check.json"
echo "wrote $OUT/gpu_check.json"
