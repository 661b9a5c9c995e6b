"""Co-training throughput and memory: K fine-tunes of one base trained together (`jobs.cotrain.co_train`, one process,
one 4-bit base) against the same K jobs (`jobs.train.train`) run one after another, and K processes side by side.

Every measurement runs in its own process with one torch thread (as a Ray worker with num_cpus=1); modes are
interleaved over `--repeats` (co K, sequential K, side by side K, ...) and the median aggregate counts, the largest peak.
Members train the demo tasks in turn on tiny-llama with the study's micro-batch 1 (packed steps of
`--accumulation` examples), `--steps` optimizer steps each. Aggregate tokens/s is the members' trained tokens over the
wall time from the first member's start of training to the last one's end (model loading not counted). Peak memory is
each process's peak resident set (ru_maxrss, whole process): for K processes side by side, their sum.

    python benchmarks/co_train.py [--ks 1 4 8] [--steps 8] [--repeats 1] [--out FILE]

Writes JSON (default benchmarks/results/co_train.json) with top-level `speedup_k8` (co-trained K=8 aggregate tokens/s
over the 8 jobs one after another), `memory_ratio_k8` (co-trained K=8 peak memory over one job's), `results`,
`settings`, `machine` and `command`. No GPU figure: `--gpu-shape` is not implemented (no GPU measured here).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "co_train.json"
MARK = "CO_TRAIN_RESULT "
TASKS = ("demo_sentiment", "demo_colors", "demo_similarity", "demo_arithmetic")
MODES = ("co", "sequential", "side_by_side")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Co-trained K fine-tunes vs K jobs one after another and side by side (CPU).")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8], help="group sizes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per member (default: %(default)s)")
    parser.add_argument("--accumulation", type=int, default=16, help="examples per step at micro-batch 1 (default: %(default)s)")
    parser.add_argument("--max-seq-length", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per (mode, K) (default: %(default)s)")
    parser.add_argument("--base", default="tiny-llama", help="tiny base model (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "K", "DIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def member_configs(args: argparse.Namespace, k: int, root: Path) -> list[Any]:
    """K jobs: the demo tasks in turn, each its own seed and output folder, study batching (micro-batch 1, packed)."""
    from jobs.catalog import load_catalog
    from jobs.config import EvalSettings, JobConfig, LoraSettings, TrainingSettings

    catalog = load_catalog()
    return [JobConfig(base_model=catalog.base_model(args.base), task=catalog.task(TASKS[i % len(TASKS)]), output_dir=str(root / f"m{i}"),
                      device="cpu", lora=LoraSettings(target_modules="all-linear"), evaluation=EvalSettings(limit=1),
                      training=TrainingSettings(max_steps=args.steps, micro_batch_size=1, gradient_accumulation_steps=args.accumulation,
                                                max_seq_length=args.max_seq_length, checkpoint_every=10_000, log_every=10_000, seed=i))
            for i in range(k)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args: argparse.Namespace) -> None:
    """One process: `co` trains all K members together; otherwise train member K-1 alone (index in K)."""
    import torch

    torch.set_num_threads(1)
    mode, k, folder = args.child[0], int(args.child[1]), Path(args.child[2])
    if mode == "co":
        from jobs.cotrain import co_train

        outcome, _ = co_train(member_configs(args, k, folder))
        summaries = [m.result.summary for m in outcome if m.result]
    else:
        from jobs.train import train

        result, _, _ = train(member_configs(args, k + 1, folder)[k])
        summaries = [result.summary]
    end = time.time()
    wall = max(s["train_wall_time_s"] for s in summaries)
    print(MARK + json.dumps({"start": end - wall, "end": end, "tokens": sum(s["trained_tokens"] for s in summaries), "peak_rss_mb": peak_rss_mb()}))


def spawn(args: argparse.Namespace, mode: str, k: int, folder: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", mode, str(k), str(folder), "--steps", str(args.steps), "--accumulation",
               str(args.accumulation), "--max-seq-length", str(args.max_seq_length), "--base", args.base]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **_env()})


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def collect(process: subprocess.Popen) -> dict[str, float]:
    out, err = process.communicate(timeout=1800)
    lines = [line for line in out.splitlines() if line.startswith(MARK)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark process failed ({process.returncode}): {err[-2000:]}")
    return json.loads(lines[-1][len(MARK):])


def measure(args: argparse.Namespace, mode: str, k: int) -> dict[str, float]:
    """Aggregate tokens/s and peak memory of K members in `mode`."""
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "co":
            runs = [collect(spawn(args, "co", k, Path(tmp)))]
        elif mode == "sequential":
            runs = [collect(spawn(args, "alone", i, Path(tmp))) for i in range(k)]
        else:
            runs = [collect(p) for p in [spawn(args, "alone", i, Path(tmp)) for i in range(k)]]
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["end"] - r["start"] for r in runs) if mode == "sequential" else max(r["end"] for r in runs) - min(r["start"] for r in runs)
    peak = max(r["peak_rss_mb"] for r in runs) if mode == "sequential" else sum(r["peak_rss_mb"] for r in runs)
    return {"tokens_per_second": tokens / wall, "peak_memory_mb": peak, "trained_tokens": tokens, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    samples: dict[str, list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for k in args.ks:
            for mode in MODES if repeat % 2 == 0 else tuple(reversed(MODES)):
                if k == 1 and mode != "co":
                    continue  # one job alone: sequential and side by side are the same run as co K=1's reference below
                samples.setdefault(f"{mode}_k{k}", []).append(measure(args, mode, k))
                print(f"{mode} K={k}: {samples[f'{mode}_k{k}'][-1]}", flush=True)
        samples.setdefault("alone", []).append(measure(args, "sequential", 1))
    results = {name: {"tokens_per_second": statistics.median(s["tokens_per_second"] for s in runs),
                      "peak_memory_mb": max(s["peak_memory_mb"] for s in runs), "runs": runs} for name, runs in samples.items()}
    report: dict[str, Any] = {"results": results}
    if 8 in args.ks:
        report["speedup_k8"] = results["co_k8"]["tokens_per_second"] / results["sequential_k8"]["tokens_per_second"]
        report["speedup_k8_vs_side_by_side"] = results["co_k8"]["tokens_per_second"] / results["side_by_side_k8"]["tokens_per_second"]
        report["memory_ratio_k8"] = results["co_k8"]["peak_memory_mb"] / results["alone"]["peak_memory_mb"]
    report |= {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")} | {"out": str(args.out)},
               "machine": {"python": platform.python_version(), "processor": platform.processor(), "cpus": _cpus()},
               "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, figures in results.items():
        print(f"{name:18s} {figures['tokens_per_second']:10.1f} tokens/s  peak {figures['peak_memory_mb']:8.1f} MB")
    print({key: report[key] for key in ("speedup_k8", "memory_ratio_k8") if key in report})
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
