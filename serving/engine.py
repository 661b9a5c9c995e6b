"""The contract between a Serve replica and the engine that generates inside it.

A replica holds one base model and multiplexes many LoRA adapters of it. It hands every request to
an `Engine`: token ids in, an async stream of `Delta`s out. The engine owns batching, KV caches,
sampling, stop rules and the adapter tiers; the replica owns the API, model-id resolution and where
adapter files come from (`AdapterFetcher`). `serving.batching.BatchingEngine` is the engine we ship
(mixed-adapter continuous batching); another one (vLLM: `serving.vllm_engine`) replaces it by implementing this
protocol. A replica never reads an engine's internals: what it and the fault and soak hooks need is a method here.
`serving.engines` builds the engine a deployment's config names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedTokenizerBase

# Turns an adapter id (for example "loraland-demo_sentiment/3") into a local PEFT adapter folder
# (adapter_config.json + adapter_model.safetensors). Blocking; the engine calls it off its decode loop.
AdapterFetcher = Callable[[str], Path]


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and stops. temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = True  # False: the whole completion comes in the last delta (batch work: one wake-up a request)


@dataclass
class Delta:
    """A piece of one request's output. The last delta of a stream has `finish_reason` set."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class DeltaStream:
    """One request's deltas on their way from an engine's loop thread to the client's event loop: the loop puts each
    `Delta` (or the exception that ends the request) on `queue` through the client loop's `call_soon_threadsafe`, and
    `generate` reads them with `deltas()`. `ended` tells `generate`'s `finally` whether the request ended on its own (a
    finishing delta or an error), or its client went away mid-stream and the engine must free what it holds."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.ended = False

    async def deltas(self) -> AsyncIterator[Delta]:
        """The deltas until the one with a `finish_reason`; an exception put on the queue is raised here."""
        while not self.ended:
            item = await self.queue.get()
            self.ended = isinstance(item, BaseException) or item.finish_reason is not None
            if isinstance(item, BaseException):
                raise item
            yield item


class EngineError(Exception):
    """Base of the errors an engine raises for one request (never for the whole replica)."""


class EngineOverloaded(EngineError):
    """The bounded queue is full: the caller answers 429/503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdapterLoadError(EngineError):
    """The adapter could not be fetched or is not a usable LoRA adapter of this base model."""


class ContextTooLong(EngineError):
    """prompt tokens + max_tokens exceed the engine's context."""


class InvalidRequest(EngineError):
    """Something else about the request cannot be served (an empty prompt, max_tokens < 1); a 400."""


class Engine(Protocol):
    """What a replica needs from an engine."""

    tokenizer: PreTrainedTokenizerBase
    max_context_tokens: int

    def generate(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream the completion of `prompt_ids` with `adapter` (None: the base model).

        Raises (from the iterator) EngineOverloaded, AdapterLoadError or ContextTooLong for this request only.
        """
        ...

    async def prefetch(self, adapter: str) -> float:
        """Bring `adapter` into host memory now (fetching it if needed); returns seconds spent loading (0 if cached).

        Raises AdapterLoadError."""
        ...

    def stats(self) -> dict[str, dict[str, float]]:
        """Per adapter id ("" for the base): requests, prompt/completion tokens, loads, load_s, cache hits; a copy
        taken at one instant (any thread may call it)."""
        ...

    def residency(self) -> dict[str, str]:
        """Adapter id -> the fastest tier holding it now: "device" (usable by the next forward pass) or "host"
        (in host memory, one copy away). Adapters only on disk are absent. Any thread may call it."""
        ...

    def held_resources(self) -> dict[str, float]:
        """What the engine holds for requests now, for leak checks: "rows" (requests generating), "pending" (requests
        accepted, not yet generating), "slots_held" (adapter slots that running requests hold), "kv_bytes" (KV cache
        bytes of running requests). Every key is present (0 where the engine has no such thing); all four are 0 once
        no request is running or waiting, unless the engine leaks. Any thread may call it."""
        ...

    def check_health(self) -> None:
        """Raise RuntimeError if the engine can no longer generate (its decode loop died); Serve's health check calls
        this and replaces the replica."""
        ...

    def shutdown(self) -> None:
        """Stop the decode loop and loader threads; after it `check_health` raises."""
        ...
