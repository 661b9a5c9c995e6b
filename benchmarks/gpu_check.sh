#!/usr/bin/env bash
# Every GPU figure the project has, in one run of at most ~8 minutes of device time; JSON (and logs) under $OUT.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh        # from the repository root, on a machine with a CUDA GPU
#
# 1. training: python -m benchmarks.train_throughput --gpu-shape mistral-7b (ours vs transformers.Trainer, 4-bit 7B
#    shape) at the study's 2e-4, then at 1e-2 (last round's rate), and loss_check.json: both sides' loss at every step
#    of both runs, and whether they part (a bug at 2e-4, instability at 1e-2 only);
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
# The limits add up to 670 s (training took 154 s on an H200, twice here; co-training ~60 s and serving ~150 s are
# expected with the settings below: estimates, not yet run on a GPU).
TRAIN_LIMIT_S="${TRAIN_LIMIT_S:-200}"
COTRAIN_LIMIT_S="${COTRAIN_LIMIT_S:-90}"
SERVE_LIMIT_S="${SERVE_LIMIT_S:-180}"
EVAL_LIMIT_S="${EVAL_LIMIT_S:-240}"  # 5. evaluation, on top of the 670 s (an estimate: not yet run on a GPU)
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

# 1b. The loss question (issue 24): last round's 7B-shape run at lr 1e-2 ended at 20.3 (ours) against 5.7 (the
# transformers.Trainer baseline). The same run again at 1e-2, then both runs' per-step losses (each JSON's `losses`,
# every optimizer step of each side) side by side in $OUT/loss_check.json: agreeing at the study's 2e-4 but not at 1e-2
# reads as instability at a 50x rate; disagreeing at 2e-4 as a bug (the first step that differs says where to look).
step train_lr_1e-2 "$TRAIN_LIMIT_S" "$PYTHON" -m benchmarks.train_throughput --gpu-shape mistral-7b --steps 8 \
  --learning-rate 1e-2 --out "$OUT/train_throughput_mistral7b_lr1e-2.json"
loss_verdict=$("$PYTHON" - "$OUT" <<'PY' 2>&1
import json, sys
from pathlib import Path

out, tolerance = Path(sys.argv[1]), 0.02  # relative; the CPU runs agree within ~1% at every step
runs = {}
for rate, name in (("2e-4", "train_throughput_mistral7b.json"), ("1e-2", "train_throughput_mistral7b_lr1e-2.json")):
    if not (out / name).is_file():
        runs[rate] = {"missing": name}
        continue
    result = json.loads((out / name).read_text())
    ours, baseline = result["ours"]["losses"], result["baseline"]["losses"]
    gaps = [abs(a - b) / max(abs(b), 1e-9) for a, b in zip(ours, baseline)]
    first = next((i + 1 for i, gap in enumerate(gaps) if gap > tolerance), None)
    runs[rate] = {"ours": ours, "baseline": baseline, "relative_gap": [round(g, 4) for g in gaps],
                  "first_step_apart": first}
agree = {rate: run.get("first_step_apart", 0) is None for rate, run in runs.items()}
if "missing" in runs["2e-4"]:
    verdict = "undecided: the 2e-4 run left no JSON"
elif not agree["2e-4"]:
    verdict = f"bug: the sides differ at the study's 2e-4 from step {runs['2e-4']['first_step_apart']}"
elif "missing" in runs["1e-2"]:
    verdict = "no bug seen: the sides agree at 2e-4; the 1e-2 run left no JSON"
elif agree["1e-2"]:
    verdict = "no difference: both rates agree step by step (last round's 20.3 did not recur)"
else:
    verdict = "instability: the sides agree at 2e-4 and part only at 1e-2 (step %s)" % runs["1e-2"].get("first_step_apart")
(out / "loss_check.json").write_text(json.dumps({"tolerance": tolerance, "verdict": verdict, "runs": runs}, indent=1))
print(verdict)
PY
)
echo "== loss_check: $loss_verdict"
statuses+=("\"loss_check\": {\"verdict\": \"$(echo "$loss_verdict" | tail -n 1 | tr -d '"\\')\"}")

step co_train "$COTRAIN_LIMIT_S" "$PYTHON" -m benchmarks.co_train --gpu-shape mistral-7b --steps 4 --gpu-ks 1 4 8 \
  --out "$OUT/co_train_mistral7b.json"

step serve_adapters "$SERVE_LIMIT_S" "$PYTHON" -m benchmarks.serve_adapters --gpu-shape mistral-7b \
  --parts engine,peft,cold --adapter-counts 1,32 --repeats 1 --seconds 10 --baseline-seconds 10 --warmup-s 3 \
  --device-slots 0 --max-rank 8 --out "$OUT/serve_adapters_mistral7b.json"

# 5. evaluation (issue 26): the 7B shape's 31 rank-8 adapters x 100 rows x 256 new tokens through our engine (one
# engine, every evaluation at once) against per-job generate, timed on 3 of the 31 evaluations to fit (goal: 3x).
# vLLM as the evaluator's engine is not measured yet.
step eval_throughput "$EVAL_LIMIT_S" "$PYTHON" -m benchmarks.eval_throughput --gpu-shape mistral-7b --adapters 31 \
  --generate-sample 3 --out "$OUT/eval_throughput_mistral7b.json"

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
