"""Evaluation as the study did it: greedy generation on the first `eval_limit` rows, scored by the task's metric.

Prompts are cut the same way for every model (`prompt_max_chars`, `prompt_cut`); base and fine-tuned models get
the same prompt, with the task's worked examples (its first training rows, `jobs.data.example_rows`) as training's.
`scoring` picks the study's own rules (jobs/study_metrics.py) or our strict parsing (jobs/metrics.py). HumanEval-style
tasks run the generated code in the sandbox (jobs/sandbox.py).

Two paths generate the completions and share everything else (`prepare_evaluation` -> completions ->
`score_evaluation`, with `completion_text` turning a completion's tokens into the text scored):
`evaluate_model` here (`evaluation.engine: generate`: transformers' static `generate`, one job alone) and
`serving.evaluation.evaluate_through` (`evaluation.engine: evaluator`: a multi-LoRA engine shared by many
evaluations). Greedy decoding gives both the same tokens, so the same scores.

A failed generation (None: left out of the mean under study scoring and counted, 0 under strict scoring) is a row
whose generation could not run: its prompt and `max_new_tokens` exceed the model's context. The study's harness
likewise skipped requests that failed and returned no generated text; an empty completion is an answer.

Run alone: `python -m jobs evaluate --config job.yaml [--adapter DIR]` (see jobs/cli.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from transformers import PreTrainedTokenizerBase

from core.prompts import CODE_METRIC, completion_for, evaluation_prompt
from core.schemas import EvalSettings, TaskSpec
from jobs.data import Row, eval_rows, example_rows
from jobs.encoding import encode_prompts
from jobs.metrics import parse_answer, score
from jobs.models import CausalLM
from jobs.sandbox import pass_at_1
from jobs.study_metrics import mean_of_answered, study_score

# What is cut from a completion's ends before scoring: "both" (strict scoring), "right" (code: the indentation of a
# continued function body stays), "none" (study scoring: the study scored the text exactly as returned).
Strip = Literal["both", "right", "none"]


@dataclass
class EvalResult:
    """A task score and the per-example predictions behind it."""

    metric: str
    score: float
    examples: int  # examples in the mean (study scoring leaves failed generations out; strict scores them 0)
    predictions: list[dict[str, Any]]
    scoring: str = "strict"  # "study" (the task's study_metric) or "strict" (jobs/metrics.py)
    failed: int = 0  # failed generations (module docstring): left out of the mean under study scoring, 0 under strict
    worked_examples: list[Row] = field(default_factory=list)  # the rows the prompts showed as worked examples


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation before generation: its rows, their prompts, the generation budget and how completions are cut
    and scored. Both paths build it with `prepare_evaluation` and finish with `score_evaluation`."""

    task: TaskSpec
    settings: EvalSettings
    rows: list[Row]
    prompts: list[str]
    max_new_tokens: int
    study_rule: str | None  # the task's study metric under `scoring: study`, else None (strict)
    examples: list[Row] = field(default_factory=list)  # the task's worked examples (`jobs.data.example_rows`)

    @property
    def code(self) -> bool:
        return self.task.metric == CODE_METRIC

    @property
    def strip(self) -> Strip:
        return "right" if self.code else "none" if self.study_rule is not None else "both"


def prepare_evaluation(task: TaskSpec, settings: EvalSettings) -> EvalRequest:
    """`task`'s evaluation rows and prompts under `settings` (reads the data: blocking)."""
    return evaluation_request(task, settings, eval_rows(task, settings.limit or task.eval_limit))


def evaluation_request(task: TaskSpec, settings: EvalSettings, rows: list[Row],
                       examples: list[Row] | None = None) -> EvalRequest:
    """The evaluation of `rows` under `settings`: their prompts, with the task's worked examples (`examples`, or read
    from its training split when None: blocking), the generation budget and the scoring rule."""
    examples = example_rows(task) if examples is None else examples
    return EvalRequest(task, settings, rows, [evaluation_prompt(task, row, settings, examples) for row in rows],
                       settings.max_new_tokens or task.max_new_tokens,
                       task.study_metric if settings.scoring == "study" else None, examples)


def fits_context(prompt_ids: Sequence[int], max_new_tokens: int, context: int) -> bool:
    """Whether a prompt and its generation budget fit the model's context (else its generation fails)."""
    return len(prompt_ids) + max_new_tokens <= context


def completion_text(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], strip: Strip) -> str:
    """The text scored for a completion's generated tokens (EOS and padding included or not: special tokens are
    skipped), cut at its ends as `strip` says."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence decodes to one string
    return text.strip() if strip == "both" else text.rstrip() if strip == "right" else text


def model_context(model: CausalLM) -> int:
    """The longest sequence the model takes (its position embeddings)."""
    return int(getattr(model.config, "max_position_embeddings", 2048))


def evaluate_model(model: CausalLM, tokenizer: PreTrainedTokenizerBase, task: TaskSpec,
                   settings: EvalSettings) -> EvalResult:
    """Score `model` on `task`'s evaluation rows: by the study's rule (`task.study_metric`) under `scoring: study`
    when the task has one, else strictly by the task's metric. Generation: transformers' `generate` (this job alone)."""
    request = prepare_evaluation(task, settings)
    context = model_context(model)
    fits = [i for i, prompt_ids in enumerate(encode_prompts(tokenizer, request.prompts))
            if fits_context(prompt_ids, request.max_new_tokens, context)]
    generated = generate(model, tokenizer, [request.prompts[i] for i in fits], request.max_new_tokens,
                         settings.batch_size, request.strip)
    completions: list[str | None] = [None] * len(request.prompts)
    for index, completion in zip(fits, generated):
        completions[index] = completion
    return score_evaluation(request, completions)


@torch.no_grad()
def generate(model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
             batch_size: int, strip: Strip = "both") -> list[str]:
    """Greedy completions of `prompts`, batched by similar length (left padding), in the input order, as
    `completion_text` turns them into text (`strip`: both ends by default)."""
    model.eval()
    encoded = encode_prompts(tokenizer, prompts)
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
            outputs[index] = completion_text(tokenizer, generated[row, width:].tolist(), strip)
    return outputs


def score_evaluation(request: EvalRequest, completions: Sequence[str | None]) -> EvalResult:
    """Score an evaluation's completions (None: a failed generation), in its rows' order; code runs in the sandbox
    (blocking). The predictions table has a row per example."""
    task, settings, rows = request.task, request.settings, request.rows
    scores: list[float | None]
    if request.code:
        answers = [parse_answer(task.answer, completion or "") for completion in completions]  # a fenced block's code
        programs = [answer if isinstance(answer, str) else completion or ""  # else the completion as is
                    for answer, completion in zip(answers, completions)]
        results = pass_at_1(rows, programs, settings.code_timeout_s, settings.code_memory_mb,
                            unconfined=settings.unconfined_code)
        scores = [1.0 if r.passed else 0.0 for r in results]
        golds: list[str] = [r.status for r in results]
    else:
        golds = [completion_for(task, row) for row in rows]
        scores = score_all(task, completions, golds, request.study_rule)
    predictions = [
        {"index": i, "prompt": p, "prediction": c, "gold": g, "score": s}
        for i, (p, c, g, s) in enumerate(zip(request.prompts, completions, golds, scores))
    ]
    tally = mean_of_answered(scores)
    return EvalResult(task.metric, tally.mean, tally.answered, predictions,
                      "study" if request.study_rule else "strict", sum(c is None for c in completions),
                      request.examples)


def score_all(task: TaskSpec, predictions: Sequence[str | None], golds: Sequence[str],
              study_rule: str | None) -> list[float | None]:
    """Per-example scores: by the named study rule when given (None for a failed generation, left out of the mean),
    else strictly by the task's metric and answer parsing (a failed generation scores 0)."""
    if study_rule is not None:
        return [study_score(study_rule, pred, gold) for pred, gold in zip(predictions, golds)]
    return [score(task.metric, task.answer, pred or "", gold, task.labels) for pred, gold in zip(predictions, golds)]
