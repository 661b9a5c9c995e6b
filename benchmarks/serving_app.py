"""What the serving benchmarks share besides `serving.synthetic` (random adapters, registered) and
`tests.helpers.local_serve` (the real Ray Serve app on loopback): HTTP users.

`http_users`: closed-loop users streaming `/v1/completions` (`stream_options.include_usage`), each recording TTFT
(request sent to first text chunk), latency, completion tokens and errors; `summarise_load` their figures.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import percentiles_ms


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Whole words (3+ letters) that `tokenizer` has as one token with a leading space: a prompt of N of them
    encodes to about N tokens, whatever the base model."""
    words = {tokenizer.convert_tokens_to_string([token]) for token in tokenizer.get_vocab()}
    return sorted(w.strip() for w in words if w.startswith(" ") and w.strip().isalpha() and len(w.strip()) >= 3)


def random_prompt(rng: random.Random, words: list[str], low: int, high: int) -> str:
    """`low`..`high` words drawn from `words`."""
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


@dataclass
class Shape:
    """One user's loop: prompt words, new tokens, the pause after each answer."""

    words: tuple[int, int] = (90, 110)
    new_tokens: tuple[int, int] = (90, 110)
    pause_s: float = 1.0
    exponential_pause: bool = False  # a random think time of mean `pause_s` instead of a fixed pause


@dataclass
class Request:
    """One streamed request as a user saw it."""

    model: str
    submitted: float
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Load:
    """Every request of a run, and the measured window."""

    start: float
    end: float
    requests: list[Request] = field(default_factory=list)

    def measured(self) -> list[Request]:
        """Requests submitted inside the window."""
        return [r for r in self.requests if self.start <= r.submitted <= self.end]


async def stream_completion(client: Any, url: str, model: str, prompt: str, max_tokens: int, request: Request) -> None:
    """One streamed completion; fills `request` (TTFT at the first text chunk, tokens from the usage chunk)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/completions", json=body) as response:
            if response.status_code != 200:
                request.error = f"HTTP {response.status_code}"
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    request.error = str(event["error"].get("code"))
                elif event.get("usage"):
                    request.tokens = int(event["usage"]["completion_tokens"])
                elif request.ttft_s is None and any(choice.get("text") for choice in event.get("choices", [])):
                    request.ttft_s = time.perf_counter() - request.submitted
        request.latency_s = time.perf_counter() - request.submitted
    except Exception as error:  # a client-side failure counts as an error of this request
        request.error = f"{type(error).__name__}: {error}"


async def http_users(url: str, users: int, pick_model: Callable[[random.Random], str], words: list[str], shape: Shape,
                     warmup_s: float, seconds: float, ramp_s: float = 1.0, seed: int = 0) -> Load:
    """`users` closed-loop users (started evenly over `ramp_s`) for `warmup_s` + `seconds`; the window is the last
    `seconds`. Requests still running at the end finish (their TTFT counts if they were submitted inside)."""
    import httpx

    started = time.perf_counter()
    load = Load(start=started + warmup_s, end=started + warmup_s + seconds)
    limits = httpx.Limits(max_connections=users + 4, max_keepalive_connections=users + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        async def user(index: int) -> None:
            rng = random.Random(seed * 100_003 + index)
            await asyncio.sleep(ramp_s * index / max(1, users))
            while time.perf_counter() < load.end:
                request = Request(model=pick_model(rng), submitted=time.perf_counter())
                load.requests.append(request)
                await stream_completion(client, url, request.model, random_prompt(rng, words, *shape.words),
                                        rng.randint(*shape.new_tokens), request)
                await asyncio.sleep(rng.expovariate(1 / shape.pause_s) if shape.exponential_pause else shape.pause_s)

        await asyncio.gather(*(user(index) for index in range(users)))
    return load


async def prime(url: str, models: list[str], words: list[str], users: int = 16) -> list[Request]:
    """One short request per model id (`users` at a time), so every adapter is in its replica before a measurement."""
    import httpx

    todo, done = list(models), []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        async def user(index: int) -> None:
            rng = random.Random(index)
            while todo:
                request = Request(model=todo.pop(), submitted=time.perf_counter())
                await stream_completion(client, url, request.model, random_prompt(rng, words, 8, 8), 1, request)
                done.append(request)

        await asyncio.gather(*(user(index) for index in range(users)))
    return done


def summarise_load(load: Load, users: int, seconds: float,
                   only: Callable[[Request], bool] = lambda r: True) -> dict[str, Any]:
    """Aggregate and per-user tokens/s (tokens of requests submitted in the window over its length), TTFT and
    latency p50/p99 in ms, requests and errors, over the requests `only` keeps."""
    measured = [r for r in load.measured() if only(r)]
    served = [r for r in measured if r.error is None]
    tokens = sum(r.tokens for r in served)
    return {"tokens_per_s": tokens / seconds, "tokens_per_s_per_user": tokens / seconds / max(1, users),
            **percentiles_ms("ttft", [r.ttft_s for r in served if r.ttft_s is not None]),
            **percentiles_ms("latency", [r.latency_s for r in served if r.latency_s is not None]),
            "requests": len(measured), "errors": len(measured) - len(served)}
