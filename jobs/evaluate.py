"""Evaluation as the study did it: greedy generation on the first `eval_limit` rows, scored by the task's metric.

Prompts are cut the same way for every model (`prompt_max_chars`); base and fine-tuned models get
the same prompt. HumanEval-style tasks run the generated code in the sandbox (jobs/sandbox.py).

Run alone: `python -m jobs.evaluate --config job.yaml [--adapter DIR]` (see jobs/cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import GenerationMixin, PreTrainedTokenizerBase

from jobs.config import EvalSettings, TaskSpec
from jobs.data import eval_rows
from jobs.encoding import encode_prompt
from jobs.metrics import parse_answer, score
from jobs.models import CausalLM
from jobs.prompts import completion_for, prompt_for
from jobs.sandbox import pass_at_1


@dataclass
class EvalResult:
    """A task score and the per-example predictions behind it."""

    metric: str
    score: float
    examples: int
    predictions: list[dict[str, Any]]


@torch.no_grad()
def generate(model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, batch_size: int,
             keep_indent: bool = False) -> list[str]:
    """Greedy completions of `prompts`, batched by similar length (left padding), in the input order.

    Completions are stripped; with `keep_indent` only trailing whitespace goes, so code that continues
    an indented function body (HumanEval) keeps its indentation.
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
        # transformers 5's PreTrainedModel lacks `generate`: the causal-LM classes mix GenerationMixin in
        generated = cast(GenerationMixin, model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for row, index in enumerate(chunk):
            text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence decodes to one string
            outputs[index] = text.rstrip() if keep_indent else text.strip()
    return outputs


def evaluate_model(model: CausalLM, tokenizer: PreTrainedTokenizerBase, task: TaskSpec, settings: EvalSettings) -> EvalResult:
    """Score `model` on `task`'s evaluation rows with the task's metric."""
    rows = eval_rows(task, settings.limit or task.eval_limit)
    code = task.metric == "humaneval"  # a code prompt is a program's head: never cut, the model must see it whole
    prompts = [prompt_for(task, row, None if code else settings.prompt_max_chars, evaluation=True) for row in rows]
    completions = generate(model, tokenizer, prompts, settings.max_new_tokens or task.max_new_tokens, settings.batch_size, keep_indent=code)
    if code:
        answers = [parse_answer(task.answer, completion) for completion in completions]  # a fenced block's code, else as is
        programs = [answer if isinstance(answer, str) else completion for answer, completion in zip(answers, completions)]
        results = pass_at_1(rows, programs, settings.code_timeout_s, settings.code_memory_mb)
        scores = [1.0 if r.passed else 0.0 for r in results]
        golds: list[str] = [r.status for r in results]
    else:
        golds = [completion_for(task, row) for row in rows]
        scores = [score(task.metric, task.answer, pred, gold, task.labels) for pred, gold in zip(completions, golds)]
    predictions = [
        {"index": i, "prompt": p, "prediction": c, "gold": g, "score": s}
        for i, (p, c, g, s) in enumerate(zip(prompts, completions, golds, scores))
    ]
    return EvalResult(task.metric, sum(scores) / max(len(scores), 1), len(scores), predictions)


if __name__ == "__main__":  # `python -m jobs.evaluate`: the job command line (jobs/cli.py) scores a base or an adapter
    from jobs.cli import main

    raise SystemExit(main("evaluate"))
