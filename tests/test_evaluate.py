"""Evaluation of a code task end to end: HumanEval problems from a local jsonl, a real tiny model, the sandbox."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.catalog import load_catalog
from core.prompts import prompt_for
from core.schemas import EvalSettings, QuantizationSettings, TaskSpec
from jobs.evaluate import evaluate_model
from jobs.models import load_base_model, load_tokenizer
from jobs.sandbox import load_problems

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "humaneval_mini.jsonl"
PROBLEMS = load_problems(FIXTURE)
ADD, PALINDROME, RUNNING_MAX = PROBLEMS


def local_humaneval(path: Path) -> TaskSpec:
    """The catalogue's magicoder task, evaluated on the HumanEval problems in `path` instead of the Hub's."""
    data = load_catalog().task("magicoder").model_dump()
    source = data["eval"]["dataset"]
    assert source["kind"] == "hf" and source["id"] == "openai/openai_humaneval"  # the cluster's default stays the Hub
    source.update(kind="local", data_files={source["eval_split"]: str(path)})
    return TaskSpec.model_validate(data)


def write_problems(path: Path, problems: list[dict[str, Any]]) -> Path:
    """The standard HumanEval layout: one JSON object a line, gzipped like HumanEval.jsonl.gz."""
    path.write_bytes(gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode()))
    return path


@pytest.fixture(scope="module")
def tiny() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    spec = load_catalog().base_model("tiny-llama")
    return load_base_model(spec, QuantizationSettings(), "cpu"), load_tokenizer(spec)


def test_code_task_evaluates_local_problems_with_a_real_tiny_model(tmp_path: Path, tiny: Any) -> None:
    model, tokenizer = tiny
    task = local_humaneval(write_problems(tmp_path / "HumanEval.jsonl.gz", PROBLEMS))
    result = evaluate_model(model, tokenizer, task, EvalSettings(max_new_tokens=12, batch_size=2, code_timeout_s=5))
    assert result.metric == "humaneval" and result.examples == 3
    # the study's wrapper around HumanEval's prompt (tasks.yaml); the sandbox runs HumanEval's own prompt + the code
    assert [p["prompt"] for p in result.predictions] == [prompt_for(task, p, evaluation=True) for p in PROBLEMS]
    # A random-weight model writes no working code: every program runs in the sandbox and fails.
    assert all(p["score"] == 0.0 and p["gold"] in ("failed", "timeout", "killed") for p in result.predictions)
    assert result.score == 0.0


def force_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, answers: dict[str, str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `model.generate` append the token ids of `answers[prompt]` (the only stand-in: a tiny model
    cannot write correct code); encoding, batching, decoding and scoring stay the evaluator's own."""

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, eos_token_id: int,
                 **_: Any) -> torch.Tensor:
        new = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            assert isinstance(prompt, str)
            new.append(tokenizer(answers[prompt], add_special_tokens=False)["input_ids"] + [eos_token_id])
        width = max(len(ids) for ids in new)
        return torch.cat([input_ids, torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids in new])], dim=1)

    monkeypatch.setattr(model, "generate", generate)


def test_right_and_wrong_completions_score_1_and_0_through_the_evaluator(tmp_path: Path, tiny: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny
    looping = dict(ADD, task_id="Mini/3", prompt="# the same, again\n" + ADD["prompt"])
    answers = {
        # fenced, after prose and a non-Python block: the ```python block's full function is run
        ADD["prompt"]: "Install nothing:\n```bash\necho ok\n```\nThen:\n```python\n" + ADD["prompt"]
                       + ADD["canonical_solution"] + "```\nThis adds the numbers.",
        PALINDROME["prompt"]: PALINDROME["canonical_solution"],  # the raw body, indentation and all
        RUNNING_MAX["prompt"]: "```\n    return numbers\n```",  # untagged fence, wrong answer
        looping["prompt"]: "    while True:\n        pass\n",  # stopped by the sandbox's time limit
    }
    task = local_humaneval(write_problems(tmp_path / "problems.jsonl.gz", [*PROBLEMS, looping]))
    wrapped = {prompt_for(task, p, evaluation=True): answers[p["prompt"]] for p in [*PROBLEMS, looping]}
    force_completions(model, tokenizer, wrapped, monkeypatch)
    result = evaluate_model(model, tokenizer, task, EvalSettings(batch_size=3, code_timeout_s=2))
    expected = [answers[p["prompt"]].rstrip() for p in [*PROBLEMS, looping]]
    assert [p["prediction"] for p in result.predictions] == expected
    assert [p["score"] for p in result.predictions] == [1.0, 1.0, 0.0, 0.0]
    assert [p["gold"] for p in result.predictions] == ["passed", "passed", "failed", "timeout"]
    assert result.score == 0.5 and result.examples == 4
