"""Choosing each row's next token: greedy for temperature 0, else temperature and nucleus (top-p) sampling
from the request's own seeded generator, so a seeded request samples the same tokens in any batch."""

from __future__ import annotations

import torch

from serving.engine import SamplingParams


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The random generator of one sampled request (seeded by `params.seed`, else randomly); None when greedy."""
    if params.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    return generator


def next_tokens(logits: torch.Tensor, requests: list[tuple[SamplingParams, torch.Generator | None]]) -> list[int]:
    """The next token of each row of `logits` [rows, vocab], sampled as its request's params say."""
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    for row, (params, generator) in enumerate(requests):
        if params.temperature > 0:
            tokens[row] = sample(logits[row].float(), params, generator)
    return tokens


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from `logits` [vocab] at `params.temperature`, keeping the smallest set of tokens reaching `top_p`."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
