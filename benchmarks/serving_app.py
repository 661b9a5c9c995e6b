"""What the serving benchmarks share: synthetic adapters, the real Ray Serve app on loopback, and HTTP users.

- `random_adapters`: rank-cycled random LoRA adapters of a base model in PEFT's format (`serving.synthetic`).
- `publish_adapters`: N adapters as N registered models (`loraland-<prefix>_<i>`, version 1) in an MLflow store, each
  with its own random weights placed in the replicas' adapter cache, so replicas read them from local disk (one run's
  artifact backs every version: the registry only has to resolve the ids).
- `local_serve`: Ray on 127.0.0.1, the application (`serving.app.deploy`) up; yields the OpenAI base URL.
- `http_users`: closed-loop users streaming `/v1/completions` (`stream_options.include_usage`), each recording TTFT
  (request sent to first text chunk), latency, completion tokens and errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from core.schemas import BaseModelSpec
from serving.config import ServeConfig
from serving.synthetic import random_adapter

RANKS = (8, 16, 4, 8)  # mixed ranks, cycled over the adapters
def random_adapters(model: nn.Module, spec: BaseModelSpec, folders: list[Path], ranks: tuple[int, ...] = RANKS) -> None:
    """Write one random all-linear adapter of `spec` into each folder (ranks cycled, seeded by position)."""
    for index, folder in enumerate(folders):
        random_adapter(model, folder, ranks[index % len(ranks)], list(spec.all_linear_modules), seed=index,
                       base_model_name=spec.hf_id)


def publish_adapters(uri: str, cache_dir: Path, model: nn.Module, spec: BaseModelSpec, count: int,
                     prefix: str = "bench") -> list[str]:
    """Register `count` tasks `<prefix>_<i>` with one version each on `spec`, their distinct weights in `cache_dir`;
    returns the model ids (`<base>:<task>`)."""
    from serving.adapters import ADAPTER_CONFIG
    from tracking import registry, store

    client = store.client(uri)
    run_id = client.create_run(store.ensure_experiment("serving-benchmark", uri), run_name="synthetic-adapters").info.run_id
    tasks = [f"{prefix}_{index:04d}" for index in range(count)]
    folders = [cache_dir / registry.model_name(task) / "1" for task in tasks]
    random_adapters(model, spec, folders)
    client.log_artifact(run_id, str(folders[0] / ADAPTER_CONFIG), store.ADAPTER_ARTIFACT)
    client.set_terminated(run_id)
    for task, folder in zip(tasks, folders):
        version = registry.register_adapter(run_id, task, spec.name, 0.5, uri=uri)
        if str(version) != "1":  # a store reused from another run: place the weights where the replicas look
            folder.rename(folder.parent / str(version))
    return [f"{spec.name}:{task}" for task in tasks]


@contextmanager
def local_serve(config: ServeConfig, num_cpus: int, metrics_port: int | None = None) -> Iterator[str]:
    """Ray on 127.0.0.1 with `num_cpus` (its Prometheus metrics on `metrics_port` if given), the application deployed;
    yields its OpenAI base URL; shuts both down."""
    import ray
    from ray import serve

    from serving.app import deploy

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the local Ray (and every replica) on loopback
    ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    try:
        yield deploy(config)
    finally:
        serve.shutdown()
        ray.shutdown()


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


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values` by nearest rank; NaN when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarise_load(load: Load, users: int, seconds: float, only: Callable[[Request], bool] = lambda r: True) -> dict[str, Any]:
    """Aggregate and per-user tokens/s (tokens of requests submitted in the window over its length), TTFT and
    latency p50/p99 in ms, requests and errors, over the requests `only` keeps."""
    measured = [r for r in load.measured() if only(r)]
    served = [r for r in measured if r.error is None]
    tokens = sum(r.tokens for r in served)
    ttft = [1000 * r.ttft_s for r in served if r.ttft_s is not None]
    latency = [1000 * r.latency_s for r in served if r.latency_s is not None]
    return {"tokens_per_s": tokens / seconds, "tokens_per_s_per_user": tokens / seconds / max(1, users),
            "ttft_p50_ms": statistics.median(ttft) if ttft else float("nan"), "ttft_p99_ms": percentile(ttft, 0.99),
            "latency_p50_ms": statistics.median(latency) if latency else float("nan"),
            "latency_p99_ms": percentile(latency, 0.99), "requests": len(measured),
            "errors": len(measured) - len(served)}
