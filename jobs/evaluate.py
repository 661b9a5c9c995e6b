"""Evaluation as the study did it: greedy generation on the first `eval_limit` rows, scored by the task's metric.

Prompts are cut the same way for every model (`prompt_max_chars`, `prompt_cut`); base and fine-tuned models get
the same prompt. `scoring` picks the study's own rules (jobs/study_metrics.py) or our strict parsing
(jobs/metrics.py). HumanEval-style tasks run the generated code in the sandbox (jobs/sandbox.py).

Run alone: `python -m jobs evaluate --config job.yaml [--adapter DIR]` (see jobs/cli.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from core.prompts import CODE_METRIC, completion_for, evaluation_prompt
from core.schemas import EvalSettings, TaskSpec
from jobs.data import eval_rows
from jobs.encoding import encode_prompt
from jobs.metrics import parse_answer, score
from jobs.models import CausalLM
from jobs.sandbox import pass_at_1
from jobs.study_metrics import mean_of_answered, study_score


@dataclass
class EvalResult:
    """A task score and the per-example predictions behind it."""

    metric: str
    score: float
    examples: int  # examples scored (answered); failed ones are counted in `failed`
    predictions: list[dict[str, Any]]
    scoring: str = "strict"  # "study" (the task's study_metric) or "strict" (jobs/metrics.py)
    failed: int = 0  # generations that failed and were left out of the mean (study scoring)


@torch.no_grad()
def generate(model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
             batch_size: int, keep_indent: bool = False, keep_end: bool = False) -> list[str]:
    """Greedy completions of `prompts`, batched by similar length (left padding), in the input order.

    Completions are stripped; with `keep_indent` only trailing whitespace goes, so code that continues
    an indented function body (HumanEval) keeps its indentation; with `keep_end` only leading whitespace
    goes (the space our prompts leave before the answer), so the rest is scored as generated.
    """
    model.eval()
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
        # transformers 5's PreTrainedModel lacks `generate` (the causal-LM classes mix GenerationMixin in), and 5.19
        # types the mixin's `self` as a protocol of its own: the call is left untyped
        generated = cast(Any, model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                              do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for row, index in enumerate(chunk):
            text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence decodes to one string
            outputs[index] = text.rstrip() if keep_indent else text.lstrip() if keep_end else text.strip()
    return outputs


def evaluate_model(model: CausalLM, tokenizer: PreTrainedTokenizerBase, task: TaskSpec,
                   settings: EvalSettings) -> EvalResult:
    """Score `model` on `task`'s evaluation rows: by the study's rule (`task.study_metric`) under `scoring: study`
    when the task has one, else strictly by the task's metric."""
    rows = eval_rows(task, settings.limit or task.eval_limit)
    code = task.metric == CODE_METRIC
    study_rule = task.study_metric if settings.scoring == "study" else None
    prompts = [evaluation_prompt(task, row, settings) for row in rows]
    completions = generate(model, tokenizer, prompts, settings.max_new_tokens or task.max_new_tokens,
                           settings.batch_size, keep_indent=code, keep_end=study_rule is not None)
    scores: list[float | None]
    if code:
        answers = [parse_answer(task.answer, completion) for completion in completions]  # a fenced block's code
        programs = [answer if isinstance(answer, str) else completion  # else the completion as is
                    for answer, completion in zip(answers, completions)]
        results = pass_at_1(rows, programs, settings.code_timeout_s, settings.code_memory_mb)
        scores = [1.0 if r.passed else 0.0 for r in results]
        golds: list[str] = [r.status for r in results]
    else:
        golds = [completion_for(task, row) for row in rows]
        scores = score_all(task, completions, golds, study_rule)
    predictions = [
        {"index": i, "prompt": p, "prediction": c, "gold": g, "score": s}
        for i, (p, c, g, s) in enumerate(zip(prompts, completions, golds, scores))
    ]
    tally = mean_of_answered(scores)
    return EvalResult(task.metric, tally.mean, tally.answered, predictions, "study" if study_rule else "strict",
                      tally.failed)


def score_all(task: TaskSpec, predictions: Sequence[str | None], golds: Sequence[str],
              study_rule: str | None) -> list[float | None]:
    """Per-example scores: by the named study rule when given (None for a failed generation, left out of the mean),
    else strictly by the task's metric and answer parsing (a failed generation scores 0)."""
    if study_rule is not None:
        return [study_score(study_rule, pred, gold) for pred, gold in zip(predictions, golds)]
    return [score(task.metric, task.answer, pred or "", gold, task.labels) for pred, gold in zip(predictions, golds)]

