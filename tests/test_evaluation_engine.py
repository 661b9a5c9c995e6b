"""Evaluation through the multi-LoRA engine (serving/evaluation.py) against today's path (jobs/evaluate.py).

Real tiny 4-bit bases (both architectures, held as the demo sweep holds them), random non-zero rank-8 LoRA adapters on
every linear layer saved as PEFT folders (serving.synthetic), the real batching engine, the real HumanEval sandbox.
Greedy completions must be equal token for token, so a job's score does not depend on the path.

Equality is exact, near-ties included: the 4-bit layers compute in fp32 on both paths
(`jobs.models.keep_compute_dtype_kernel`). With bitsandbytes' AVX512-BF16 CPU kernel, which rounds each layer's input
to bf16, the last-bit differences between two batchings of a row became logit differences of about 1e-3, and about 1
row in 100 of the random tiny models' 16-token garbage met such a near-tie (docs/evaluation.md); the benchmark counts
every differing completion over 2,256 rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from core.catalog import load_catalog
from core.schemas import BaseModelSpec, EvalSettings, QuantizationSettings, TaskSpec
from jobs.evaluate import EvalResult, completion_text, evaluate_model
from jobs.models import load_adapter, load_base_model, load_tokenizer
from serving.engine import AdapterLoadError, Engine
from serving.evaluation import build_evaluation_engine, evaluate_through, evaluator_engine_config, local_adapter
from serving.synthetic import random_adapter
from tests.test_evaluate import PROBLEMS, local_humaneval, write_problems

pytestmark = pytest.mark.integration

CATALOG = load_catalog()
DEMO_TASKS = [CATALOG.task(name) for name in ("demo_sentiment", "demo_colors", "demo_similarity", "demo_arithmetic")]
QUANT = QuantizationSettings(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="auto")  # demo's
SETTINGS = EvalSettings(limit=4, batch_size=4)  # small: the equality is per row, the budget is a minute


@dataclass
class Bench:
    """One tiny base: its spec and tokenizer, two saved adapters, and one evaluation engine over the base."""

    spec: BaseModelSpec
    tokenizer: PreTrainedTokenizerBase
    adapters: list[Path]
    engine: Engine


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-mistral"])
def bench(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    spec = CATALOG.base_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    shapes = load_base_model(spec, QUANT, "cpu")  # rank-8 LoRA on every linear layer, random non-zero A and B
    adapters = [random_adapter(shapes, folder / f"adapter{seed}", 8, list(spec.all_linear_modules), seed, spec.hf_id)
                for seed in (1, 2)]
    engine = build_evaluation_engine(spec, QUANT, "cpu", local_adapter, evaluator_engine_config(SETTINGS))
    yield Bench(spec, load_tokenizer(spec), adapters, engine)
    engine.shutdown()


def through_generate(bench: Bench, tasks: list[TaskSpec], adapter: Path | None,
                     settings: EvalSettings = SETTINGS) -> list[EvalResult]:
    """Today's path: the base loaded for the job, the adapter loaded onto it with PEFT, transformers' generate; in a
    worker thread, as the engine's decode loop runs (OpenMP's team in the main thread of a loaded machine is several
    times slower)."""
    model = load_base_model(bench.spec, QUANT, "cpu")
    evaluated = model if adapter is None else load_adapter(model, adapter)
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(lambda: [evaluate_model(evaluated, bench.tokenizer, task, settings)
                                      for task in tasks]).result()


def through_engine(bench: Bench, runs: list[tuple[TaskSpec, Path | None]],
                   settings: EvalSettings = SETTINGS) -> list[EvalResult | BaseException]:
    """The evaluations `runs` (task, adapter folder or None for the base) concurrently on the bench's one engine."""
    async def evaluate_all() -> list[EvalResult | BaseException]:
        return await asyncio.gather(*(evaluate_through(bench.engine, task, settings, str(adapter) if adapter else None)
                                      for task, adapter in runs), return_exceptions=True)
    return asyncio.run(evaluate_all())


def test_completions_and_results_equal_generates_with_the_base_and_adapters_concurrently(bench: Bench) -> None:
    adapter = bench.adapters[0]
    expected = through_generate(bench, DEMO_TASKS, None) + through_generate(bench, DEMO_TASKS, adapter)
    got = through_engine(bench, [(task, None) for task in DEMO_TASKS] + [(task, adapter) for task in DEMO_TASKS])
    assert [asdict(result) if isinstance(result, EvalResult) else result for result in got] == \
        [asdict(result) for result in expected]  # every completion, score, gold and count
    base_texts = [p["prediction"] for result in expected[:4] for p in result.predictions]
    adapter_texts = [p["prediction"] for result in expected[4:] for p in result.predictions]
    assert base_texts != adapter_texts  # the adapter is live: equality is not the base's twice
    assert bench.engine.held_resources() == {"rows": 0, "pending": 0, "slots_held": 0, "kv_bytes": 0}


def test_evaluations_of_several_adapters_together_equal_each_alone(bench: Bench) -> None:
    task = DEMO_TASKS[2]  # every row of the three runs is submitted at once: they share the batches
    runs: list[tuple[TaskSpec, Path | None]] = [(task, bench.adapters[0]), (task, bench.adapters[1]), (task, None)]
    together = through_engine(bench, runs)
    alone = [through_engine(bench, [run])[0] for run in runs]
    assert together == alone
    assert len({str(result) for result in together}) == 3  # three different models, three different tables


def test_an_adapter_that_fails_to_load_fails_only_its_own_evaluation(bench: Bench, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    task = DEMO_TASKS[0]
    runs: list[tuple[TaskSpec, Path | None]] = [(task, bench.adapters[0]), (task, broken), (task, tmp_path / "gone")]
    good, bad, missing = through_engine(bench, runs)
    assert isinstance(bad, AdapterLoadError) and str(broken) in str(bad)
    assert isinstance(missing, AdapterLoadError) and "gone" in str(missing)
    assert good == through_engine(bench, [runs[0]])[0]  # the good one ran as it runs alone
    bench.engine.check_health()  # the engine goes on


def test_a_generation_that_cannot_fit_the_context_fails_on_both_paths(bench: Bench) -> None:
    context = int(load_base_model(bench.spec, QUANT, "cpu").config.max_position_embeddings)
    settings = SETTINGS.model_copy(update={"max_new_tokens": context})  # prompt + budget exceed the context
    expected = through_generate(bench, DEMO_TASKS[:1], None, settings)[0]
    got = through_engine(bench, [(DEMO_TASKS[0], None)], settings)[0]
    assert got == expected
    assert expected.failed == SETTINGS.limit and all(p["prediction"] is None for p in expected.predictions)


def test_a_code_task_runs_its_completions_in_the_sandbox_on_both_paths(bench: Bench, tmp_path: Path) -> None:
    task = local_humaneval(write_problems(tmp_path / "HumanEval.jsonl.gz", PROBLEMS))
    settings = EvalSettings(max_new_tokens=8, batch_size=3, code_timeout_s=5)
    expected = through_generate(bench, [task], bench.adapters[0], settings)[0]
    got = through_engine(bench, [(task, bench.adapters[0])], settings)[0]
    assert got == expected
    # the sandbox ran every program (random weights write no working code): a status per row, not a string match
    assert isinstance(got, EvalResult) and [p["gold"] for p in got.predictions] != [""] * len(PROBLEMS)
    assert all(p["gold"] in ("failed", "timeout", "killed") for p in got.predictions)


@pytest.mark.parametrize(("strip", "expected"), [("both", "0"), ("right", " 0"), ("none", " 0\n")])
def test_the_text_scored_is_cut_as_the_scoring_says(strip: str, expected: str) -> None:
    tokenizer = load_tokenizer(CATALOG.base_model("tiny-llama"))
    ids = tokenizer(" 0\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert completion_text(tokenizer, ids, strip) == expected  # type: ignore[arg-type]
