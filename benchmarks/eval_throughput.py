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

    python -m benchmarks.eval_throughput [--out FILE] [--scenario both|demo|many] [--limit 48] [--adapters 31]
                                         [--base tiny-llama] [--batch 256]
    python -m benchmarks.eval_throughput --gpu-shape mistral-7b [--generate-sample 3]   # 31 rank-8 adapters x 100
                                                                   # rows x 256 tokens on a GPU

With --gpu-shape the base is random-initialised at that model's real shape in 4-bit on the GPU (one build, shared by
both sides: building a 7B base per job would take the whole budget; a build's time is reported), and only the many
scenario runs; `--generate-sample N` times per-job generate on the first N evaluations only. Writes JSON (default
benchmarks/results/eval_throughput.json) with top-level `speedup` (the smallest scenario's evaluator tokens/s over
per-job generate's) and `equal` (every compared completion of every scenario equal, strictly).

Why completions can differ, and how the JSON tells a rounding flip from a real difference: both paths decode
greedily, but a row's fp32 sums round differently with the batch's shape (rows decoded together, padding and KV
columns, which LoRA products), and bitsandbytes' CPU 4-bit kernel rounds each layer's input to bf16, which turns that
rounding into logit changes of about 1e-3. For each differing completion the benchmark runs that evaluation's per-job
`generate` again exactly as before with a hook on the model's forward passes (the same batches: its tokens are the
reference's), takes the evaluator's token ids (recorded per request by `RecordingEngine`, one list append a delta), and
reports the first generated token where they part, the reference's top-2 logit margin there, and `choice_gap`: how far
the evaluator's token lies below the reference's in the reference's logits. `near_ties` counts the differences whose
gap is below NEAR_TIE (0.01, ten times the rounding noise), `real_differences` the others. The random tiny models'
logits are flat (a near-tie in about 1 row in 100); trained adapters would have decisive ones (not measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.common import RESULTS, command, machine, random_4bit_model, write_report
from core.catalog import load_catalog
from core.parsing import read_yaml
from core.paths import PROJECT_ROOT
from core.schemas import BaseModelSpec, EvalSettings, QuantizationSettings, TaskSpec
from jobs.encoding import encode_prompt
from jobs.evaluate import EvalResult, completion_text, evaluate_model, prepare_evaluation
from jobs.models import CausalLM, load_adapter, load_base_model, load_tokenizer, resolve_device
from serving.batching import BatchingEngine
from serving.engine import Delta, Engine, SamplingParams
from serving.evaluation import build_evaluation_engine, evaluate_through, evaluator_engine_config, local_adapter
from serving.synthetic import random_adapter

DEMO_SWEEP = PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"
DEMO_TASKS = ("demo_sentiment", "demo_colors", "demo_similarity", "demo_arithmetic")
GPU_SHAPES = ("mistral-7b", "llama-2-7b")
NEAR_TIE = 0.01  # a gap between the two paths' choices below this is within their rounding noise (module docstring)


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


class RecordingEngine:
    """An engine passed through, keeping each request's generated token ids by (adapter, prompt ids) for the near-tie
    analysis (the evaluator's text alone cannot say which token was chosen where; one dict update a delta)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_context_tokens = engine.max_context_tokens
        self.tokens: dict[tuple[str | None, tuple[int, ...]], list[list[int]]] = {}

    async def generate(self, prompt_ids: list[int], adapter: str | None,
                       params: SamplingParams) -> AsyncIterator[Delta]:
        generated: list[int] = []
        self.tokens.setdefault((adapter, tuple(prompt_ids)), []).append(generated)
        async for delta in self.engine.generate(prompt_ids, adapter, params):
            generated += delta.token_ids
            yield delta

    async def prefetch(self, adapter: str) -> float:
        return await self.engine.prefetch(adapter)


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


Recorded = dict[str, RecordingEngine]  # base name -> its engine's recorded token ids


def through_evaluator(bench: Bench, runs: list[Evaluation]) -> tuple[float, list[EvalResult], dict[str, int], Recorded]:
    """One engine per base model, every evaluation of that base submitted at once; generated tokens counted per base
    and adapter ("<base>/" + the adapter's folder, or nothing for the base alone)."""
    started = time.perf_counter()
    results: dict[int, EvalResult] = {}
    tokens: dict[str, int] = {}
    recorded: Recorded = {}
    for base in {run.base.name: run.base for run in runs}.values():
        engine = bench.engine_for(base)
        recorder = recorded[base.name] = RecordingEngine(engine)
        mine = [index for index, run in enumerate(runs) if run.base.name == base.name]

        async def evaluate_all(engine: Engine = cast(Engine, recorder), mine: list[int] = mine) -> list[EvalResult]:
            adapters = [str(runs[i].adapter) if runs[i].adapter else None for i in mine]
            return await asyncio.gather(*(evaluate_through(engine, runs[i].task, bench.settings, adapter)
                                          for i, adapter in zip(mine, adapters)))

        results |= dict(zip(mine, asyncio.run(evaluate_all())))
        tokens |= {f"{base.name}/{key}": int(counts.get("completion_tokens", 0))
                   for key, counts in engine.stats().items()}
        engine.shutdown()
    return time.perf_counter() - started, [results[i] for i in range(len(runs))], tokens, recorded


def scenario(bench: Bench, runs: list[Evaluation], sample: int = 0, repeats: int = 1) -> dict[str, Any]:
    """Both paths over `runs`, `repeats` times each, interleaved: the median wall time, generated tokens/s, and how many
    completions differ (those of the last run of each side; every run decodes the same). Per-job generate runs in
    a worker thread as the engine's decode loop does: on a CPU, OpenMP's team in the main thread of a loaded machine
    can be ten times slower than in a worker thread, which would flatter the engine. With `sample`, per-job generate
    runs only the first `sample` evaluations (each with its own adapter), its tokens/s measured on them and the
    completions compared on them."""
    sampled = runs[:sample] if sample else runs
    if sample and len({run.adapter for run in sampled}) < len(sampled):
        raise ValueError("a sample of evaluations needs an adapter each (its tokens are counted by adapter)")
    generate_times, evaluator_times = [], []
    for repeat in range(repeats):  # interleaved (generate first, then the evaluator first, ...): drift hits both sides
        for side in ("generate", "evaluator") if repeat % 2 == 0 else ("evaluator", "generate"):
            if side == "generate":
                with ThreadPoolExecutor(1) as worker:
                    generate_s, expected = worker.submit(per_job_generate, bench, sampled).result()
                generate_times.append(generate_s)
            else:
                evaluator_s, got, by_key, recorded = through_evaluator(bench, runs)
                evaluator_times.append(evaluator_s)
    generate_s, evaluator_s = statistics.median(generate_times), statistics.median(evaluator_times)
    tokens = sum(by_key.values())
    sampled_tokens = sum(by_key[f"{run.base.name}/{run.adapter}"] for run in sampled) if sample else tokens
    differing = len(differing_rows(expected, got))
    speedup = (tokens / evaluator_s) / (sampled_tokens / generate_s)
    return {"evaluations": len(runs), "adapters": sum(run.adapter is not None for run in runs),
            "rows": sum(len(result.predictions) for result in got), "generated_tokens": tokens,
            "generate": {"evaluations": len(sampled), "generated_tokens": sampled_tokens,
                         "wall_s": round(generate_s, 2), "tokens_per_s": round(sampled_tokens / generate_s, 1),
                         "runs_s": [round(t, 2) for t in generate_times]},
            "evaluator": {"wall_s": round(evaluator_s, 2), "tokens_per_s": round(tokens / evaluator_s, 1),
                          "runs_s": [round(t, 2) for t in evaluator_times]},
            "speedup": round(speedup, 2), "compared_completions": sum(len(r.predictions) for r in expected),
            "differing_completions": differing, "equal": differing == 0,
            "scores_equal": [r.score for r in expected] == [r.score for r in got[:len(expected)]],
            "max_score_difference": round(max(abs(a.score - b.score) for a, b in zip(expected, got)), 4),
            **(near_ties(bench, sampled, expected, got, recorded) if differing
               else {"near_tie_threshold": NEAR_TIE, "near_ties": 0, "real_differences": 0, "differences": []})}


def differing_rows(expected: list[EvalResult], got: list[EvalResult]) -> list[tuple[int, int]]:
    """(evaluation, row) of every completion the two paths give differently."""
    return [(run, row) for run, (want, have) in enumerate(zip(expected, got))
            for row, (a, b) in enumerate(zip(want.predictions, have.predictions)) if a["prediction"] != b["prediction"]]


def reference_steps(model: CausalLM, tokenizer: PreTrainedTokenizerBase, run: Evaluation, settings: EvalSettings,
                    rows: list[int]) -> dict[int, torch.Tensor]:
    """Per-job generate's last-position logits [steps, vocab] for each of `rows`, from running that evaluation again
    exactly as before (`evaluate_model`: the same batches, order and padding) with a hook on the model's forward
    passes. A row is found in its batch's prefill by its left-padded prompt; its decode steps follow that prefill."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    hook = inner.register_forward_hook(lambda _m, _a, kwargs, out: calls.append(
        (kwargs["input_ids"].cpu(), out.logits[:, -1].float().cpu())), with_kwargs=True)
    try:
        evaluate_model(model, tokenizer, run.task, settings)
    finally:
        hook.remove()
    prompts = prepare_evaluation(run.task, settings).prompts
    steps: dict[int, torch.Tensor] = {}
    for row in rows:
        prompt = torch.tensor(encode_prompt(tokenizer, prompts[row]))
        for start, (ids, _) in enumerate(calls):
            width = ids.shape[1]
            found = [i for i in range(ids.shape[0]) if width > 1 and width >= len(prompt)
                     and torch.equal(ids[i, width - len(prompt):], prompt)
                     and (width == len(prompt) or ids[i, width - len(prompt) - 1] == tokenizer.pad_token_id)]
            if found:
                end = start + 1
                while end < len(calls) and calls[end][0].shape[1] == 1:
                    end += 1
                steps[row] = torch.stack([calls[k][1][found[0]] for k in range(start, end)])
                break
    return steps


def first_divergence(logits: torch.Tensor, chosen: list[int], eos: int) -> tuple[int, float, float]:
    """The first step where the evaluator's tokens `chosen` (its EOS included) leave the reference's greedy ones
    (argmax of its logits [steps, vocab]); there, the reference's top-2 logit margin and how far below the reference's
    token the evaluator's lies in the reference's logits."""
    reference = logits.argmax(dim=-1).tolist()
    step = next((k for k, (a, b) in enumerate(zip(reference, chosen)) if a != b), min(len(reference), len(chosen)) - 1)
    top2 = logits[step].topk(2).values
    other = chosen[step] if step < len(chosen) else eos
    return step, float(top2[0] - top2[1]), float(logits[step, reference[step]] - logits[step, other])


def near_ties(bench: Bench, runs: list[Evaluation], expected: list[EvalResult], got: list[EvalResult],
              recorded: Recorded) -> dict[str, Any]:
    """For each differing completion: the first generated token where the evaluator's choice leaves per-job
    generate's, per-job generate's top-2 logit margin there and the gap between the two choices in its logits; how many
    differences are near-ties (that gap below NEAR_TIE: within the paths' rounding noise) and how many are not."""
    details = []
    differing = differing_rows(expected, got)
    for index in sorted({run for run, _ in differing}):
        run = runs[index]
        model = bench.build(run.base)
        evaluated = model if run.adapter is None else load_adapter(cast(PreTrainedModel, model), run.adapter)
        tokenizer = load_tokenizer(run.base)
        request = prepare_evaluation(run.task, bench.settings)
        rows = [row for r, row in differing if r == index]
        steps = reference_steps(evaluated, tokenizer, run, bench.settings, rows)
        for row in rows:
            evaluator = got[index].predictions[row]["prediction"]
            key = (str(run.adapter) if run.adapter else None, tuple(encode_prompt(tokenizer, request.prompts[row])))
            chosen = next(ids for ids in recorded[run.base.name].tokens[key]
                          if completion_text(tokenizer, ids, request.strip) == evaluator)
            ended = len(chosen) < request.max_new_tokens  # by EOS, the only stop rule of an evaluation
            step, margin, gap = first_divergence(steps[row], chosen + [tokenizer.eos_token_id] * ended,
                                                 tokenizer.eos_token_id)
            details.append({"evaluation": index, "task": run.task.name, "row": row, "first_divergent_token": step,
                            "reference_top2_margin": round(margin, 6), "choice_gap": round(gap, 6),
                            "reference": expected[index].predictions[row]["prediction"], "evaluator": evaluator})
        if run.adapter is not None:
            cast(PeftModel, evaluated).unload()
        del model, evaluated
    ties = sum(d["choice_gap"] < NEAR_TIE for d in details)
    return {"near_tie_threshold": NEAR_TIE, "near_ties": ties, "real_differences": len(details) - ties,
            "differences": details}


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
    parser.add_argument("--scenario", choices=("both", "demo", "many"), default="both", help="which scenarios run "
                        "(the JSON's speedup and equal are over those run)")
    parser.add_argument("--gpu-shape", choices=GPU_SHAPES, help="random 4-bit base of that real shape, on a GPU")
    parser.add_argument("--repeats", type=int, default=0, help="runs of each side per scenario, interleaved, the "
                        "median reported (0: 3 on the CPU, 1 with --gpu-shape)")
    parser.add_argument("--generate-sample", type=int, default=0, help="per-job generate runs only this many of the "
                        "many scenario's evaluations (0: all), its tokens/s measured on them: a 7B budget")
    args = parser.parse_args(argv)
    if args.repeats < 0:
        parser.error(f"--repeats {args.repeats}: give a count of runs (>= 1), or 0 for the default")
    return args


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
    repeats = args.repeats or (1 if args.gpu_shape else 3)
    scenarios: dict[str, Any] = {}
    build_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="eval-throughput-") as tmp:
        if args.gpu_shape:
            bench, base = gpu_bench(args.gpu_shape, args.base, quant, settings, build_times)
        else:
            bench, base = cpu_bench(quant, settings), catalog.base_model(args.base)
        if not args.gpu_shape and args.scenario in ("both", "demo"):
            demo = [run for name in ("tiny-llama", "tiny-mistral")
                    for run in with_adapters(bench, catalog.base_model(name), tasks, Path(tmp) / "demo", True)]
            scenarios["demo"] = scenario(bench, demo, repeats=repeats)
            print("demo", scenarios["demo"], flush=True)
        if args.gpu_shape or args.scenario in ("both", "many"):
            many = with_adapters(bench, base, many_tasks, Path(tmp) / "many", False)
            scenarios["many"] = scenario(bench, many, args.generate_sample, repeats)
            print("many", scenarios["many"], flush=True)
    report = {"speedup": min(s["speedup"] for s in scenarios.values()),
              "equal": all(s["equal"] for s in scenarios.values()), "scenarios": scenarios,
              "settings": {"quantization": quant.model_dump(), "evaluation": settings.model_dump(),
                           "gpu_shape": args.gpu_shape, "repeats": repeats,
                           "base_build_s": [round(s, 1) for s in build_times]},
              "machine": machine("torch", "transformers", "peft", "bitsandbytes"),
              "command": command("eval_throughput")}
    print(f"speedup {report['speedup']}x, every completion equal: {report['equal']}")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
