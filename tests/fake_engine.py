"""A fake engine for the API's tests: the whole `serving.engine.Engine` protocol with no model, and adapters to serve
with it, registered on a real `mlflow server` without training.

`FakeEngine` answers every request with the adapter that answered stamped into the text (`[<adapter id>@<digest of
its weights file>]`, `[base]` without one) and then filler words, one token per delta, at `TOKEN_DELAY_S` a token, so
streams, stop strings, cancellation and timeouts behave as with a real engine. It fetches adapters through the replica's
real `AdapterFetcher` (the disk cache and MLflow download) and opens their safetensors header, so a corrupt file fails
as a real engine fails; it holds `max_batch_size` requests running and `max_queued_requests` waiting, then refuses
(EngineOverloaded). A prompt containing one of `FAULTS`' markers fails that request with that error.

Serve imports `build_fake_engine` by module path inside each replica (Ray pickles a function by reference): workers
of a local `ray.init` get the driver's `sys.path`, so `tests.fake_engine` imports there as in the test process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from core.schemas import BaseModelSpec
from serving.config import BatchingEngineConfig, EngineConfig
from serving.detok import CompletionText, Detokenizer
from serving.engine import (
    AdapterFetcher,
    AdapterLoadError,
    ContextTooLong,
    Delta,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    SamplingParams,
)

TOKEN_DELAY_S = 0.01  # per generated token: a 48-token answer holds its batch slot for about half a second
FILLER = " the quick brown fox jumps over the lazy dog"
FAULTS: dict[str, type[EngineError]] = {  # a marker in the prompt -> the error that request gets
    "[fake:overloaded]": EngineOverloaded,
    "[fake:context_too_long]": ContextTooLong,
    "[fake:adapter_load_error]": AdapterLoadError,
}


def stamp(adapter: str | None, digest: str = "") -> str:
    """How an answer names who answered: `[<adapter id>@<weights digest>]`, or `[base]`."""
    return f"[{adapter}@{digest}]" if adapter else "[base]"


def weights_digest(folder: Path) -> str:
    """The first 12 hex digits of the sha256 of an adapter folder's weights file: which weights were served."""
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]


@dataclass
class Capacity:
    """Requests running (at most `running_max`) and waiting for a slot (at most `waiting_max`)."""

    running_max: int
    waiting_max: int
    running: int = 0
    waiting: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> bool:
        """Take a running slot (True), or a waiting place (False); EngineOverloaded when both are full."""
        with self.lock:
            if self.running < self.running_max:
                self.running += 1
                return True
            if self.waiting >= self.waiting_max:
                raise EngineOverloaded(f"{self.running} requests running and {self.waiting} queued (the fake's bounds)")
            self.waiting += 1
            return False

    def promote(self) -> bool:
        """A waiting request takes a running slot if one is free."""
        with self.lock:
            if self.running >= self.running_max:
                return False
            self.waiting, self.running = self.waiting - 1, self.running + 1
            return True

    def leave(self, running: bool) -> None:
        with self.lock:
            if running:
                self.running -= 1
            else:
                self.waiting -= 1


class FakeEngine:
    """Implements serving.engine.Engine without a model (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, fetch: AdapterFetcher, config: EngineConfig,
                 max_context_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_context_tokens = max_context_tokens
        self.fetch = fetch
        running, waiting = ((config.max_batch_size, config.max_queued_requests)
                            if isinstance(config, BatchingEngineConfig) else (config.max_num_seqs, config.max_num_seqs))
        self.capacity = Capacity(running, waiting)
        self.digests: dict[str, str] = {}  # adapter id -> digest of the weights loaded ("host" memory)
        self.loading: dict[str, asyncio.Task[float]] = {}
        self.counters: dict[str, dict[str, float]] = {}
        self.stopped = False

    async def generate(self, prompt_ids: list[int], adapter: str | None,
                       params: SamplingParams) -> AsyncIterator[Delta]:
        self._check(prompt_ids, params)
        if adapter is not None:
            await self.prefetch(adapter)
        running = self.capacity.enter()
        try:
            while not running:
                await asyncio.sleep(TOKEN_DELAY_S)
                running = self.capacity.promote()
            self._count(adapter or "", requests=1)
            async for delta in self._answer(prompt_ids, adapter, params):
                yield delta
        finally:
            self.capacity.leave(running)

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The real engine's request checks, and a fault named in the prompt."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        prompt = self.tokenizer.decode(prompt_ids)
        for marker, error in FAULTS.items():
            if marker in prompt:
                raise error(f"{marker} in the prompt")
        if len(prompt_ids) + params.max_tokens > self.max_context_tokens:
            raise ContextTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"model's context of {self.max_context_tokens} tokens")

    async def _answer(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> AsyncIterator[Delta]:
        """The stamp, then filler words, a token at a time, cut by the stop strings and max_tokens."""
        head = self.tokenizer.encode(stamp(adapter, self.digests.get(adapter or "", "")), add_special_tokens=False)
        filler = self.tokenizer.encode(FILLER, add_special_tokens=False)
        detok, output, out_ids, sent = Detokenizer(self.tokenizer), CompletionText(params.stop), [], 0
        while True:
            await asyncio.sleep(TOKEN_DELAY_S)
            position = len(out_ids)
            out_ids.append(head[position] if position < len(head) else filler[(position - len(head)) % len(filler)])
            output.extend(detok.step(out_ids[-1]))
            finish = "stop" if output.cut_at_stop() else "length" if len(out_ids) >= params.max_tokens else None
            text = output.take_rest() if finish else output.take_ready()
            if finish or text:
                yield Delta(text=text, token_ids=out_ids[sent:], finish_reason=finish, prompt_tokens=len(prompt_ids),
                            completion_tokens=len(out_ids))
                sent = len(out_ids)
            if finish:
                self._count(adapter or "", prompt_tokens=len(prompt_ids), completion_tokens=len(out_ids))
                return

    async def prefetch(self, adapter: str) -> float:
        if adapter in self.digests:
            self._count(adapter, host_hits=1)
            return 0.0
        if adapter not in self.loading:
            self.loading[adapter] = asyncio.ensure_future(asyncio.to_thread(self._load, adapter))
            self.loading[adapter].add_done_callback(lambda _: self.loading.pop(adapter, None))
        return await asyncio.shield(self.loading[adapter])

    def _load(self, adapter: str) -> float:
        """Fetch the adapter and open its weights' safetensors header, as a real engine reads them."""
        from safetensors import safe_open

        started = time.perf_counter()
        try:
            folder = self.fetch(adapter)
        except EngineError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            raise AdapterLoadError(f"adapter {adapter!r} could not be fetched: {reason}") from error
        try:
            with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as weights:
                list(weights.keys())
        except Exception as error:
            raise AdapterLoadError(f"adapter {adapter!r} is not servable: unreadable adapter weights "
                                   f"(safetensors: {error})") from error
        self.digests[adapter] = weights_digest(folder)
        seconds = time.perf_counter() - started
        self._count(adapter, loads=1, load_s=seconds)
        return seconds

    def _count(self, key: str, **amounts: float) -> None:
        counters = self.counters.setdefault(key, {})
        for name, amount in amounts.items():
            counters[name] = counters.get(name, 0.0) + amount

    def stats(self) -> dict[str, dict[str, float]]:
        return {key: dict(values) for key, values in list(self.counters.items())}

    def residency(self) -> dict[str, str]:
        return dict.fromkeys(list(self.digests), "host")

    def held_resources(self) -> dict[str, float]:
        """Rows and pending are the fake's running and waiting requests; it holds no slots and no KV cache."""
        return {"rows": float(self.capacity.running), "pending": float(self.capacity.waiting), "slots_held": 0.0,
                "kv_bytes": 0.0}

    def check_health(self) -> None:
        if self.stopped:
            raise RuntimeError("decode loop is dead: the fake engine was shut down")

    def shutdown(self) -> None:
        self.stopped = True


def build_fake_engine(spec: BaseModelSpec, precision: str, device: str, fetch: AdapterFetcher, config: EngineConfig,
                      max_context_tokens: int | None = None) -> FakeEngine:
    """A `serving.engines.EngineFactory`: the base's tiny tokenizer (built locally), no model."""
    from jobs.models import load_tokenizer

    context = max_context_tokens or spec.architecture.max_position_embeddings
    return FakeEngine(load_tokenizer(spec), fetch, config, context)


# --------------------------------------------------------------------------- adapters without training


def fake_adapter_folder(folder: Path, base_hf_id: str, seed: int) -> Path:
    """A PEFT-shaped adapter folder (config naming its base, a readable safetensors file whose bytes depend on
    `seed`), never loaded as a model."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                            "base_model_name_or_path": base_hf_id}))
    weights = np.random.default_rng(seed).standard_normal((8, 16)).astype(np.float32)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": weights},
              str(folder / "adapter_model.safetensors"))
    return folder


def publish_fake_adapter(uri: str, folder: Path, task: str, base: str, score: float) -> str:
    """Log `folder` as a finished run's `adapter/` artifact and register it as a version of `task`'s model trained on
    `base`; returns the version."""
    from tracking import registry, store

    client = store.client(uri)
    run_id = client.create_run(store.ensure_experiment("fake-adapters", uri), run_name=f"{base}/{task}").info.run_id
    client.log_artifacts(run_id, str(folder), "adapter")
    client.set_terminated(run_id)
    version = str(registry.register_adapter(run_id, task, base, score, uri=uri))
    registry.update_champion(task, uri)  # as the job tracker does after each registration
    return version


def publish_fake_adapters(uri: str, root: Path, models: list[str], score: float = 0.5) -> dict[str, tuple[str, Path]]:
    """A fake adapter for each "<base>:<task>" of `models` (weights of its own), published with `score`:
    "<base>:<task>" -> (registry version, folder)."""
    from core.catalog import load_catalog

    published = {}
    for model in models:
        base, task = model.split(":")
        seed = int(hashlib.sha256(model.encode()).hexdigest()[:8], 16)
        folder = fake_adapter_folder(root / base / task, load_catalog().base_model(base).hf_id, seed)
        published[model] = (publish_fake_adapter(uri, folder, task, base, score), folder)
    return published


@contextmanager
def own_mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` of the caller's own (its registry holds only the fakes it registers); yields its URI."""
    from core.ports import free_port
    from tests.conftest import MLFLOW_START_TIMEOUT_S
    from tracking.server import server_command, start_server, stop_server, wait_healthy

    root.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{free_port()}"
    command = server_command(f"sqlite:///{root / 'mlflow.db'}", "127.0.0.1", int(uri.rsplit(":", 1)[1]), workers=2,
                             artifacts_destination=root / "artifacts")
    process = start_server(command, uri, log_file=root / "server.log", wait=False)
    try:
        wait_healthy(uri, MLFLOW_START_TIMEOUT_S, process)
        yield uri
    finally:
        stop_server(process)
