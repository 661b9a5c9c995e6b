"""Co-training throughput and memory: K fine-tunes of one base trained together (`jobs.cotrain.co_train`, one process,
one 4-bit base) against the same K jobs (`jobs.train.train`) run one after another, and K processes side by side.

CPU mode (default). Every measurement runs in its own process with one torch thread (as a Ray worker with num_cpus=1);
modes are interleaved over `--repeats` (co K, sequential K, side by side K, ...) and the median aggregate counts, the
largest peak. Members train the demo tasks in turn on tiny-llama at micro-batch 1, `--steps` optimizer steps of
`--accumulation` examples each, in one or both layouts (`--layouts`):

- `unpacked`: the study's micro-batch 1, one example per forward pass (the issue's goals are stated for it);
- `packed`: our jobs' default, micro-batch 1 as one packed row of up to `--max-seq-length` tokens per pass.

Aggregate tokens/s is the members' trained tokens over the wall time from the first member's start of training to the
last one's end (model loading not counted); one after another, it is the members' own training times summed. Peak
memory is each process's peak resident set (ru_maxrss, whole process): for K processes side by side, their sum.

GPU mode (`--gpu-shape mistral-7b`, needs CUDA): one process builds a random-initialised model of the real shape in
4-bit (as `train_throughput.py --gpu-shape` does), trains one job alone on it (`jobs.train.train`, packed), then
co-trains K = `--gpu-ks` members over the same base; per K: aggregate and per-member tokens/s against the lone job, and
peak GPU memory. `members_per_80gb_gpu` extrapolates from the largest K: (80 GB - base) / (its peak - base) * K.

    python -m benchmarks.co_train [--ks 1 4 8] [--steps 20] [--repeats 1] [--layouts unpacked packed] [--out FILE]
    python -m benchmarks.co_train --gpu-shape mistral-7b [--gpu-ks 1 4 8 16] [--steps 6] [--out FILE]

Writes JSON (default benchmarks/results/co_train.json; GPU: co_train_<shape>.json) with top-level `speedup_k8`
(co-trained K=8 aggregate tokens/s over the 8 jobs one after another, study micro-batch 1: `unpacked`),
`memory_ratio_k8` (its peak memory over one job's), the same for `packed` (`speedup_k8_packed`,
`memory_ratio_k8_packed`), `results`, `settings`, `machine` and `command`.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, collect, command, emit, machine, random_4bit_model, start_child, write_report

DEFAULT_OUT = RESULTS / "co_train.json"
TASKS = ("demo_sentiment", "demo_colors", "demo_similarity", "demo_arithmetic")
MODES = ("co", "sequential", "side_by_side")
LAYOUTS = ("unpacked", "packed")
GPU_SHAPES = ("mistral-7b",)
GPU_BYTES = 80 * 10**9  # "an 80 GB GPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Co-trained K fine-tunes vs K jobs one after another and side by side."
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8], help="group sizes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per member (default: %(default)s)")
    parser.add_argument(
        "--accumulation", type=int, default=16, help="examples per step at micro-batch 1 (default: %(default)s)"
    )
    parser.add_argument("--max-seq-length", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per (mode, K) (default: %(default)s)")
    parser.add_argument(
        "--base", default="tiny-llama", help="tiny base model, and the tokenizer in GPU mode (default: %(default)s)"
    )
    parser.add_argument(
        "--gpu-shape", choices=GPU_SHAPES, help="GPU mode: random weights of that model's real shape in 4-bit"
    )
    parser.add_argument(
        "--gpu-ks", type=int, nargs="+", default=[1, 4, 8, 16], help="GPU mode group sizes (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, help=f"JSON output (default: {DEFAULT_OUT}, GPU mode co_train_<shape>.json beside it)"
    )
    parser.add_argument("--child", nargs=4, metavar=("MODE", "K", "LAYOUT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (
            DEFAULT_OUT
            if not args.gpu_shape
            else DEFAULT_OUT.with_name(f"co_train_{args.gpu_shape.replace('-', '')}.json")
        )
    return args


def member_configs(args: argparse.Namespace, k: int, root: Path, layout: str, base: str | None = None,
                   device: str = "cpu") -> list[Any]:
    """K jobs: the demo tasks in turn, each its own seed and output folder, micro-batch 1 in `layout`."""
    from benchmarks.common import benchmark_job

    settings = dict(max_steps=args.steps, micro_batch_size=1, gradient_accumulation_steps=args.accumulation,
                    max_seq_length=args.max_seq_length, packing=layout == "packed", log_every=10_000)
    return [benchmark_job(base or args.base, TASKS[i % len(TASKS)], root / f"m{i}", device, evaluation={"limit": 1},
                          seed=i, **settings) for i in range(k)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def figures(summaries: list[dict[str, Any]]) -> dict[str, float]:
    """Trained tokens and the training window of the members' summaries (they all start at once)."""
    end = time.time()
    wall = max(s["train_wall_time_s"] for s in summaries)
    return {"start": end - wall, "end": end, "tokens": sum(s["trained_tokens"] for s in summaries)}


def run_child(args: argparse.Namespace) -> None:
    """One CPU process: `co` trains all K members together; `alone` trains member K alone (index K among K + 1)."""
    import torch

    torch.set_num_threads(1)
    mode, k, layout, folder = args.child[0], int(args.child[1]), args.child[2], Path(args.child[3])
    if mode == "co":
        from jobs.cotrain import co_train

        outcome, _ = co_train(member_configs(args, k, folder, layout))
        summaries = [m.result.summary for m in outcome if m.result]
    else:
        from jobs.train import train

        result, _, _ = train(member_configs(args, k + 1, folder, layout)[k])
        summaries = [result.summary]
    emit(figures(summaries) | {"peak_rss_mb": peak_rss_mb()})


def start(args: argparse.Namespace, mode: str, k: int, layout: str, folder: Path) -> subprocess.Popen[str]:
    """A child process measuring `mode` (`co` or `alone`) for K, one torch thread."""
    arguments = [
        "--child",
        mode,
        str(k),
        layout,
        str(folder),
        "--steps",
        str(args.steps),
        "--accumulation",
        str(args.accumulation),
        "--max-seq-length",
        str(args.max_seq_length),
        "--base",
        args.base,
    ]
    return start_child("co_train", arguments, threads=1)


def result(process: subprocess.Popen[str]) -> dict[str, float]:
    return collect(process, "co_train: a measuring process", timeout_s=1800)


def measure(args: argparse.Namespace, mode: str, k: int, layout: str) -> dict[str, float]:
    """Aggregate tokens/s and peak memory of K members in `mode`."""
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "co":
            runs = [result(start(args, "co", k, layout, Path(tmp)))]
        elif mode == "sequential":
            runs = [result(start(args, "alone", i, layout, Path(tmp))) for i in range(k)]
        else:
            runs = [result(p) for p in [start(args, "alone", i, layout, Path(tmp)) for i in range(k)]]
    tokens = sum(r["tokens"] for r in runs)
    wall = (
        sum(r["end"] - r["start"] for r in runs)
        if mode == "sequential"
        else max(r["end"] for r in runs) - min(r["start"] for r in runs)
    )
    peak = max(r["peak_rss_mb"] for r in runs) if mode == "sequential" else sum(r["peak_rss_mb"] for r in runs)
    return {"tokens_per_second": tokens / wall, "peak_memory_mb": peak, "trained_tokens": tokens, "wall_s": wall}


def cpu_report(args: argparse.Namespace) -> dict[str, Any]:
    """Every (layout, mode, K) of the CPU mode, interleaved over the repeats; the top-level ratios."""
    samples: dict[str, list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for layout in args.layouts:
            for k in args.ks:
                for mode in MODES if repeat % 2 == 0 else tuple(reversed(MODES)):
                    if k == 1 and mode != "co":
                        continue  # one job alone: its reference is the `alone` run below
                    name = f"{layout}_{mode}_k{k}"
                    samples.setdefault(name, []).append(measure(args, mode, k, layout))
                    print(f"{name}: {samples[name][-1]}", flush=True)
            samples.setdefault(f"{layout}_alone", []).append(measure(args, "sequential", 1, layout))
    results = {
        name: {
            "tokens_per_second": statistics.median(s["tokens_per_second"] for s in runs),
            "peak_memory_mb": max(s["peak_memory_mb"] for s in runs),
            "runs": runs,
        }
        for name, runs in samples.items()
    }
    report: dict[str, Any] = {"results": results}
    if 8 in args.ks:
        for layout in args.layouts:
            suffix = "" if layout == "unpacked" else f"_{layout}"
            co, alone = results[f"{layout}_co_k8"], results[f"{layout}_alone"]
            report[f"speedup_k8{suffix}"] = (
                co["tokens_per_second"] / results[f"{layout}_sequential_k8"]["tokens_per_second"]
            )
            report[f"speedup_k8_vs_side_by_side{suffix}"] = (
                co["tokens_per_second"] / results[f"{layout}_side_by_side_k8"]["tokens_per_second"]
            )
            report[f"memory_ratio_k8{suffix}"] = co["peak_memory_mb"] / alone["peak_memory_mb"]
    for name, numbers in results.items():
        print(f"{name:28s} {numbers['tokens_per_second']:10.1f} tokens/s  peak {numbers['peak_memory_mb']:8.1f} MB")
    return report


def gpu_report(args: argparse.Namespace, device: str = "cuda", shape: str | None = None) -> dict[str, Any]:
    """GPU mode, in this process (see the module doc). `shape` None builds the `--gpu-shape` model; tests pass a
    catalogue base (e.g. a tiny one on the CPU) to run the same path at a small size."""
    import torch

    from core.catalog import load_catalog
    from jobs.cotrain import co_train
    from jobs.models import attach_lora, load_tokenizer
    from jobs.peak_memory import reset_peak_memory
    from jobs.train import train

    spec_name = shape or args.gpu_shape
    tokenizer = load_tokenizer(load_catalog().base_model(args.base))
    with tempfile.TemporaryDirectory() as tmp:
        configs = member_configs(args, max(args.gpu_ks), Path(tmp), "packed", base=spec_name, device=device)
        base = random_4bit_model(configs[0].base_model, configs[0].quantization, device)
        rows: dict[str, dict[str, float]] = {}
        reset_peak_memory(device)
        result, model, _ = train(
            configs[0],
            model=attach_lora(base, configs[0].lora, configs[0].training.gradient_checkpointing),
            tokenizer=tokenizer,
        )
        rows["alone"] = _gpu_row(figures([result.summary]), 1, device)
        base = model.unload()
        del model, result
        gc.collect()
        base_bytes = _allocated(device)  # the base as training holds it (prepared: norms and head in float32)
        for k in args.gpu_ks:
            members = member_configs(args, k, Path(tmp) / f"k{k}", "packed", base=spec_name, device=device)
            reset_peak_memory(device)
            outcome, group = co_train(members, tokenizer=tokenizer, base=base)
            rows[f"co_k{k}"] = _gpu_row(figures([m.result.summary for m in outcome if m.result]), k, device)
            base = group.release()
            del group, outcome
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"co K={k}: {rows[f'co_k{k}']}", flush=True)
    alone = rows["alone"]["tokens_per_second"]
    for row in rows.values():
        row["per_member_vs_alone"] = row["tokens_per_second"] / row["members"] / alone
    largest = rows[f"co_k{max(args.gpu_ks)}"]
    per_member = (largest["peak_memory_mb"] * 2**20 - base_bytes) / largest["members"]
    report: dict[str, Any] = {
        "results": rows,
        "base_memory_mb": base_bytes / 2**20,
        "members_per_80gb_gpu": int((GPU_BYTES - base_bytes) // per_member) if per_member > 0 else None,
    }
    for name, row in rows.items():
        print(
            f"{name:10s} {row['tokens_per_second']:10.1f} tokens/s  {row['per_member_vs_alone']:5.2f}x per member vs "
            "alone  "
            f"peak {row['peak_memory_mb']:9.1f} MB"
        )
    print(f"members per 80 GB GPU (extrapolated from K={max(args.gpu_ks)}): {report['members_per_80gb_gpu']}")
    return report


def _allocated(device: str) -> float:
    """Bytes held now: the CUDA allocator's on a GPU, the resident set on a CPU."""
    import torch

    from jobs.peak_memory import current_rss_mb

    if device == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.memory_allocated())
    return current_rss_mb() * 2**20


def _gpu_row(window: dict[str, float], members: int, device: str) -> dict[str, float]:
    from jobs.peak_memory import peak_memory_mb

    return {
        "members": members,
        "tokens": window["tokens"],
        "tokens_per_second": window["tokens"] / (window["end"] - window["start"]),
        "peak_memory_mb": peak_memory_mb(device),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    machine_info = machine("torch")
    if args.gpu_shape:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                "co_train: --gpu-shape needs a CUDA GPU; none is visible (run it through benchmarks/gpu_check.sh)"
            )
        report = gpu_report(args)
    else:
        report = cpu_report(args)
        print({key: round(report[key], 3) for key in report if key.startswith(("speedup", "memory_ratio"))})
    report |= {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")} | {"out": str(args.out)},
               "machine": machine_info, "command": command("co_train", argv)}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
