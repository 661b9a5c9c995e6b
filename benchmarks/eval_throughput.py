"""Evaluation throughput: the sweep's evaluations through one multi-LoRA engine per base model (the evaluator,
`serving.evaluation.evaluate_through`) against per-job `generate` (`jobs.evaluate.evaluate_model`, today's path), side
by side in one run, with whether every completion is equal.

Two scenarios, each evaluated both ways with the demo sweep's quantization and evaluation settings
(configs/sweeps/demo.yaml: 4-bit nf4, 48 rows per evaluation, batches of 48):

- demo: the demo sweep's 16 evaluations: 8 adapters (tiny-llama and tiny-mistral x the 4 demo tasks) and the 8 base
  evaluations;
- many: `--adapters` (31) adapters on one tiny base (`--base`), the demo tasks cycled over them.

Adapters are random rank-8 LoRA on every linear layer (`serving.synthetic.random_adapter`, as the demo's `all-linear`).
Per-job `generate`: each evaluation alone, the base loaded for each job (as a job does today), the adapter loaded with
PEFT. The evaluator: one engine per base model (its build timed), every evaluation of that base submitted at once.
Generated tokens are the engine's completion tokens (EOS excluded); both sides generate the same ones where their
completions are equal, so tokens/s compares useful tokens, not padding.

    python -m benchmarks.eval_throughput [--out FILE] [--limit 48] [--adapters 31] [--base tiny-llama]
    python -m benchmarks.eval_throughput --gpu-shape mistral-7b [--generate-sample 3]   # 31 rank-8 adapters x 100
                                                                   # rows x 256 tokens on a GPU

With --gpu-shape the base is random-initialised at that model's real shape in 4-bit on the GPU (one build, shared by
both sides: building a 7B base per job would take the whole budget; a build's time is reported), and only the many
scenario runs; `--generate-sample N` times per-job generate on the first N evaluations only. Writes JSON (default
benchmarks/results/eval_throughput.json) with top-level `speedup` (the smallest scenario's evaluator tokens/s over
per-job generate's) and `equal` (every compared completion of every scenario equal).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from peft import PeftModel
from transformers import PreTrainedModel

from benchmarks.common import RESULTS, command, machine, random_4bit_model, write_report
from core.catalog import load_catalog
from core.parsing import read_yaml
from core.paths import PROJECT_ROOT
from core.schemas import BaseModelSpec, EvalSettings, QuantizationSettings, TaskSpec
from jobs.evaluate import EvalResult, evaluate_model
from jobs.models import CausalLM, load_adapter, load_base_model, load_tokenizer, resolve_device
from serving.batching import BatchingEngine
from serving.engine import Engine
from serving.evaluation import build_evaluation_engine, evaluate_through, evaluator_engine_config, local_adapter
from serving.synthetic import random_adapter

DEMO_SWEEP = PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"
DEMO_TASKS = ("demo_sentiment", "demo_colors", "demo_similarity", "demo_arithmetic")
GPU_SHAPES = ("mistral-7b", "llama-2-7b")


@dataclass
class Evaluation:
    """One job's evaluation: a task on a base, with an adapter folder or (None) the base alone."""

    base: BaseModelSpec
    task: TaskSpec
    adapter: Path | None


@dataclass
class Bench:
    """How a scenario's bases are held: the settings, the device, and what builds a base model (fresh per call)."""

    quant: QuantizationSettings
    settings: EvalSettings
    device: str
    build: Callable[[BaseModelSpec], CausalLM]
    engine_for: Callable[[BaseModelSpec], Engine]


def demo_settings() -> tuple[QuantizationSettings, EvalSettings]:
    """The demo sweep's quantization and evaluation settings."""
    sweep = read_yaml(DEMO_SWEEP)
    return QuantizationSettings.model_validate(sweep["quantization"]), EvalSettings.model_validate(sweep["evaluation"])


def with_adapters(bench: Bench, base: BaseModelSpec, tasks: list[TaskSpec], folder: Path,
                  base_evaluations: bool) -> list[Evaluation]:
    """An evaluation per task with its own random adapter (seeded by position), plus each task's base evaluation."""
    model = bench.build(base)
    adapters = [random_adapter(model, folder / f"{base.name}-{index}", 8, list(base.all_linear_modules), seed=index,
                               base_model_name=base.hf_id) for index in range(len(tasks))]
    del model
    runs = [Evaluation(base, task, adapter) for task, adapter in zip(tasks, adapters)]
    return runs + ([Evaluation(base, task, None) for task in tasks] if base_evaluations else [])


def per_job_generate(bench: Bench, runs: list[Evaluation]) -> tuple[float, list[EvalResult]]:
    """Today's path: each evaluation alone, its base built for it, its adapter loaded with PEFT."""
    started = time.perf_counter()
    results = []
    for run in runs:
        model = bench.build(run.base)
        evaluated = model if run.adapter is None else load_adapter(cast(PreTrainedModel, model), run.adapter)
        results.append(evaluate_model(evaluated, load_tokenizer(run.base), run.task, bench.settings))
        if run.adapter is not None:  # a shared base (--gpu-shape) goes back to the base alone
            cast(PeftModel, evaluated).unload()
        del model, evaluated
    return time.perf_counter() - started, results


def through_evaluator(bench: Bench, runs: list[Evaluation]) -> tuple[float, list[EvalResult], dict[str, int]]:
    """One engine per base model, every evaluation of that base submitted at once; generated tokens counted per base
    and adapter ("<base>/" + the adapter's folder, or nothing for the base alone)."""
    started = time.perf_counter()
    results: dict[int, EvalResult] = {}
    tokens: dict[str, int] = {}
    for base in {run.base.name: run.base for run in runs}.values():
        engine = bench.engine_for(base)
        mine = [index for index, run in enumerate(runs) if run.base.name == base.name]

        async def evaluate_all(engine: Engine = engine, mine: list[int] = mine) -> list[EvalResult]:
            adapters = [str(runs[i].adapter) if runs[i].adapter else None for i in mine]
            return await asyncio.gather(*(evaluate_through(engine, runs[i].task, bench.settings, adapter)
                                          for i, adapter in zip(mine, adapters)))

        results |= dict(zip(mine, asyncio.run(evaluate_all())))
        tokens |= {f"{base.name}/{key}": int(counts.get("completion_tokens", 0))
                   for key, counts in engine.stats().items()}
        engine.shutdown()
    return time.perf_counter() - started, [results[i] for i in range(len(runs))], tokens


def scenario(bench: Bench, runs: list[Evaluation], sample: int = 0) -> dict[str, Any]:
    """Both paths over `runs`: wall time, generated tokens/s, and how many completions differ. Per-job generate runs in
    a worker thread as the engine's decode loop does: on a CPU, OpenMP's team in the main thread of a loaded machine
    can be ten times slower than in a worker thread, which would flatter the engine. With `sample`, per-job generate
    runs only the first `sample` evaluations (each with its own adapter), its tokens/s measured on them and the
    completions compared on them."""
    sampled = runs[:sample] if sample else runs
    if sample and len({run.adapter for run in sampled}) < len(sampled):
        raise ValueError("a sample of evaluations needs an adapter each (its tokens are counted by adapter)")
    with ThreadPoolExecutor(1) as worker:
        generate_s, expected = worker.submit(per_job_generate, bench, sampled).result()
    evaluator_s, got, by_key = through_evaluator(bench, runs)
    tokens = sum(by_key.values())
    sampled_tokens = sum(by_key[f"{run.base.name}/{run.adapter}"] for run in sampled) if sample else tokens
    differing = sum(a["prediction"] != b["prediction"] for want, have in zip(expected, got)
                    for a, b in zip(want.predictions, have.predictions))
    speedup = (tokens / evaluator_s) / (sampled_tokens / generate_s)
    return {"evaluations": len(runs), "adapters": sum(run.adapter is not None for run in runs),
            "rows": sum(len(result.predictions) for result in got), "generated_tokens": tokens,
            "generate": {"evaluations": len(sampled), "generated_tokens": sampled_tokens,
                         "wall_s": round(generate_s, 2), "tokens_per_s": round(sampled_tokens / generate_s, 1)},
            "evaluator": {"wall_s": round(evaluator_s, 2), "tokens_per_s": round(tokens / evaluator_s, 1)},
            "speedup": round(speedup, 2), "compared_completions": sum(len(r.predictions) for r in expected),
            "differing_completions": differing, "equal": differing == 0,
            "scores_equal": [r.score for r in expected] == [r.score for r in got[:len(expected)]],
            "max_score_difference": round(max(abs(a.score - b.score) for a, b in zip(expected, got)), 4)}


def cpu_bench(quant: QuantizationSettings, settings: EvalSettings) -> Bench:
    device = resolve_device("cpu")
    return Bench(quant, settings, device, lambda spec: load_base_model(spec, quant, device),
                 lambda spec: build_evaluation_engine(spec, quant, device, local_adapter,
                                                      evaluator_engine_config(settings)))


def gpu_bench(shape: str, tokenizer_base: str, quant: QuantizationSettings, settings: EvalSettings,
              build_times: list[float]) -> tuple[Bench, BaseModelSpec]:
    """A random `shape` base in 4-bit on the GPU, built once and shared by both sides (tokens of `tokenizer_base`)."""
    spec = load_catalog().base_model(shape)
    tokenizer_spec = load_catalog().base_model(tokenizer_base)
    started = time.perf_counter()
    model = random_4bit_model(spec, quant, "cuda")
    build_times.append(time.perf_counter() - started)
    tokenizer = load_tokenizer(tokenizer_spec)

    def engine_for(_: BaseModelSpec) -> Engine:
        context = int(model.config.max_position_embeddings)
        return BatchingEngine(model, tokenizer, local_adapter, evaluator_engine_config(settings), context,
                              list(spec.all_linear_modules))

    # evaluate_model loads the tokenizer of the run's base: the runs name the tokenizer's base, the model is the shape
    return Bench(quant, settings, "cuda", lambda _: model, engine_for), tokenizer_spec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_throughput.json", help="JSON result file")
    parser.add_argument("--limit", type=int, default=0, help="rows per evaluation (0: the demo sweep's 48; 100 with "
                        "--gpu-shape)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="tokens per row (0: each task's; 256 with "
                        "--gpu-shape)")
    parser.add_argument("--adapters", type=int, default=31, help="adapters of the many scenario")
    parser.add_argument("--base", default="tiny-llama", help="the many scenario's tiny base (its tokenizer with "
                        "--gpu-shape)")
    parser.add_argument("--batch", type=int, default=0, help="the evaluator's max_batch_size (0: the settings')")
    parser.add_argument("--gpu-shape", choices=GPU_SHAPES, help="random 4-bit base of that real shape, on a GPU")
    parser.add_argument("--generate-sample", type=int, default=0, help="per-job generate runs only this many of the "
                        "many scenario's evaluations (0: all), its tokens/s measured on them: a 7B budget")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quant, settings = demo_settings()
    update: dict[str, Any] = {"limit": args.limit or (100 if args.gpu_shape else settings.limit)}
    if args.max_new_tokens or args.gpu_shape:
        update["max_new_tokens"] = args.max_new_tokens or 256
    if args.batch:
        update["evaluator"] = settings.evaluator.model_copy(update={"max_batch_size": args.batch})
    settings = settings.model_copy(update=update)
    catalog = load_catalog()
    tasks = [catalog.task(name) for name in DEMO_TASKS]
    many_tasks = [tasks[index % len(tasks)] for index in range(args.adapters)]
    scenarios: dict[str, Any] = {}
    build_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="eval-throughput-") as tmp:
        if args.gpu_shape:
            bench, base = gpu_bench(args.gpu_shape, args.base, quant, settings, build_times)
        else:
            bench, base = cpu_bench(quant, settings), catalog.base_model(args.base)
            demo = [run for name in ("tiny-llama", "tiny-mistral")
                    for run in with_adapters(bench, catalog.base_model(name), tasks, Path(tmp) / "demo", True)]
            scenarios["demo"] = scenario(bench, demo)
            print("demo", scenarios["demo"], flush=True)
        many = with_adapters(bench, base, many_tasks, Path(tmp) / "many", False)
        scenarios["many"] = scenario(bench, many, args.generate_sample)
        print("many", scenarios["many"], flush=True)
    report = {"speedup": min(s["speedup"] for s in scenarios.values()),
              "equal": all(s["equal"] for s in scenarios.values()), "scenarios": scenarios,
              "settings": {"quantization": quant.model_dump(), "evaluation": settings.model_dump(),
                           "gpu_shape": args.gpu_shape, "base_build_s": [round(s, 1) for s in build_times]},
              "machine": machine("torch", "transformers", "peft", "bitsandbytes"),
              "command": command("eval_throughput")}
    print(f"speedup {report['speedup']}x, every completion equal: {report['equal']}")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
