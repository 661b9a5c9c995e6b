"""Evaluation through a multi-LoRA engine (`evaluation.engine: evaluator`): many evaluations of one base model share
one engine holding that base once, their rows decoded in the same batches whatever their adapter.

For the driver (one engine per base model, e.g. in a Ray actor):

    engine = build_evaluation_engine(spec, job.quantization, job.device, fetch,
                                     evaluator_engine_config(job.evaluation))
    result = await evaluate_through(engine, job.task, job.evaluation, adapter)   # adapter None: the base
    ...
    engine.shutdown()

Any number of `evaluate_through` calls may run concurrently on one engine (one event loop or several); each submits
all its rows at once, so rows of every running evaluation fill the same continuous batches (a row that ends frees its
place). Everything but generation is `jobs.evaluate`'s (prompts, the text scored, scoring, the HumanEval sandbox,
the predictions table), and greedy decoding gives the same tokens as `jobs.evaluate.generate`, so a job's result does
not depend on the path (tests/test_evaluation_engine.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from core.schemas import BaseModelSpec, EvalSettings, QuantizationSettings, TaskSpec
from jobs.encoding import encode_prompts
from jobs.evaluate import EvalResult, Strip, completion_text, fits_context, prepare_evaluation, score_evaluation
from jobs.models import check_adapter_dir
from serving.config import BatchingEngineConfig, EngineConfig
from serving.engine import AdapterFetcher, AdapterLoadError, Engine, SamplingParams
from serving.engines import build_engine

__all__ = ["AdapterLoadError", "build_evaluation_engine", "evaluate_through", "evaluator_engine_config",
           "local_adapter"]


# EvaluatorSettings fields named otherwise in BatchingEngineConfig; every other field has the same name in both
ENGINE_FIELD_NAMES = {"max_queued_rows": "max_queued_requests"}


def evaluator_engine_config(settings: EvalSettings) -> BatchingEngineConfig:
    """The batching engine's config from a sweep's `evaluation.evaluator` settings, field by field (the engine's
    defaults for the rest)."""
    return BatchingEngineConfig(**{ENGINE_FIELD_NAMES.get(name, name): value
                                   for name, value in settings.evaluator.model_dump().items()})


def local_adapter(adapter: str) -> Path:
    """An `AdapterFetcher` for adapters named by their local folder (a job's `adapter/` on the storage path): the
    folder itself, or NotFound when it holds no adapter weights (the engine reports it as an AdapterLoadError)."""
    return check_adapter_dir(adapter)


def build_evaluation_engine(spec: BaseModelSpec, quantization: QuantizationSettings, device: str,
                            fetch: AdapterFetcher, config: EngineConfig) -> Engine:
    """A started engine over `spec` held exactly as a job with `quantization` holds it for evaluation (same weights,
    same compute dtype: the same greedy completions) on `device` ("auto", "cuda" or "cpu"); adapters come from
    `fetch` (adapter id -> local PEFT folder; `local_adapter` when ids are folders). The caller shuts it down."""
    return build_engine(spec, quantization, device, fetch, config)


async def evaluate_through(engine: Engine, task: TaskSpec, settings: EvalSettings, adapter: str | None) -> EvalResult:
    """Score `adapter` (an id `engine`'s fetcher resolves; None: the base) on `task` under `settings`, every row's
    prompt submitted to `engine` at once (greedy, the task's or settings' max_new_tokens), scored as
    `jobs.evaluate.evaluate_model` scores (same prompts, text, rules, sandbox, predictions table).

    Raises AdapterLoadError when the adapter cannot be fetched or loaded: this evaluation fails, the engine and the
    other evaluations on it go on. Any other engine error (the engine died, its queue is full) also fails only this
    call; its rows still queued are withdrawn. Blocking parts (reading the rows, the sandbox) run in threads."""
    request = await asyncio.to_thread(prepare_evaluation, task, settings)
    if adapter is not None:
        await engine.prefetch(adapter)  # a bad adapter fails here, before its rows take batch places
    params = SamplingParams(max_tokens=request.max_new_tokens, temperature=0.0, stream=False)
    encoded = await asyncio.to_thread(encode_prompts, engine.tokenizer, request.prompts)
    rows = [asyncio.ensure_future(_completion(engine, prompt_ids, adapter, params, request.strip))
            for prompt_ids in encoded]
    try:
        completions = await asyncio.gather(*rows)
    except BaseException:  # the first row's error fails the evaluation: withdraw its other rows from the engine
        for row in rows:
            row.cancel()
        raise
    return await asyncio.to_thread(score_evaluation, request, completions)


async def _completion(engine: Engine, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
                      strip: Strip) -> str | None:
    """One row's completion (its prompt's tokens) as `jobs.evaluate.generate` gives it; None when the prompt and the
    budget exceed the engine's context (a failed generation, as in jobs/evaluate.py)."""
    if not fits_context(prompt_ids, params.max_tokens, engine.max_context_tokens):
        return None
    tokens: list[int] = []
    async for delta in engine.generate(prompt_ids, adapter, params):
        tokens += delta.token_ids
    return completion_text(engine.tokenizer, tokens, strip)
