"""Prompt encoding: many prompts in one tokenizer call give each prompt's own tokens (BOS + text)."""

from __future__ import annotations

import pytest

from core.catalog import load_catalog
from jobs.encoding import encode_prompt, encode_prompts
from jobs.models import load_tokenizer

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("base", ["tiny-llama", "tiny-mistral"])
def test_a_batch_of_prompts_encodes_as_each_prompt_alone(base: str) -> None:
    tokenizer = load_tokenizer(load_catalog().base_model(base))
    prompts = ["Review: good\nSentiment:", "", " two  spaces\n\nand lines ", "ünïcödé 7+8="]
    encoded = encode_prompts(tokenizer, prompts)
    alone = [[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    assert encoded == alone == [encode_prompt(tokenizer, prompt) for prompt in prompts]
    assert all(ids[0] == tokenizer.bos_token_id for ids in encoded) and len(encoded[1]) == 1
    assert len(encoded[0]) > 3 and encoded[0] != encoded[2]
    assert encode_prompts(tokenizer, []) == []
