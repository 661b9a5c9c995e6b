"""Prompt encoding shared by training, evaluation and serving: the tokens a model sees for a prompt, and a
training example's tokens with the prompt masked out of the loss."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE = -100  # the label of a token the loss skips (PyTorch's cross-entropy `ignore_index`)


@dataclass
class Example:
    """One tokenized example: labels are IGNORE on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt tokens exactly as evaluation sees them: BOS (if the model has one) + prompt."""
    return encode_prompts(tokenizer, [prompt])[0]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """`encode_prompt` of every prompt, in one tokenizer call (a fast tokenizer encodes the batch outside Python)."""
    if not prompts:
        return []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_len: int) -> Example:
    """Prompt + " " + completion + EOS, cut to `max_len` by dropping the prompt's start."""
    answer: list[int] = tokenizer(" " + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer = answer[: max_len - 1]
    prompt_ids = encode_prompt(tokenizer, prompt)[-(max_len - len(answer)) :]
    return Example(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)
