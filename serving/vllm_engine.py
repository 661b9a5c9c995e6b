"""vLLM behind `serving.engine.Engine`: its scheduler, paged KV cache and multi-LoRA kernels inside a Serve replica.

vLLM 0.32's `AsyncLLM` always runs its engine core in a child process (spawned inside a Ray actor), so this engine
drives vLLM's in-process `LLMEngine` (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni": no child process, no Ray
cluster of its own) from one step thread, as `serving.batching` drives its decode loop. Every call into vLLM
(adding requests and adapters, aborting, stepping) runs on that thread, so vLLM is never entered twice at once; client
event loops hand it commands and get deltas back through `call_soon_threadsafe`.

An adapter id becomes a `LoRARequest(adapter id, a stable integer id, the folder the replica's AdapterFetcher gives)`.
It is loaded with `add_lora` before its first request, so a broken adapter fails only its own requests
(`AdapterLoadError`); vLLM keeps `max_cpu_loras` adapters in host memory and `max_loras` in one batch, reloading an
evicted one from its folder when a request needs it again.

On a CPU, vLLM 0.32's LoRA ops index the adapter slots with -1 for a request without an adapter, which in torch picks
the last slot: a base request decoded beside adapter requests gets an adapter's weights. So there a base request runs
with a rank-1 adapter whose B is zero (`zero_adapter`): it adds exactly nothing, and no row of a batch is ever -1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from core.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from core.schemas import BaseModelSpec
from jobs.models import load_tokenizer, model_source, resolve_device
from serving.config import VLLM_PRECISIONS, VllmEngineConfig
from serving.engine import (
    AdapterFetcher,
    AdapterLoadError,
    ContextTooLong,
    Delta,
    DeltaStream,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    SamplingParams,
)
from serving.stats import BASE, AdapterStats

log = logging.getLogger(__name__)

GIB = 1 << 30
# vLLM's engine core in the replica's own process; its torch.distributed setup (one rank) on loopback
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1"}
T = TypeVar("T")


def engine_args(config: VllmEngineConfig, model: str, precision: str, device: str,
                max_model_len: int) -> dict[str, Any]:
    """vLLM's `EngineArgs` keyword arguments for a base at `model` held in `precision` on `device` ("cpu" or "cuda"):
    a 4-bit base is loaded with vLLM's bitsandbytes quantization on a GPU; the KV cache is `cpu_kv_cache_gb` on a CPU
    and what `gpu_memory_utilization` leaves on a GPU."""
    if precision not in VLLM_PRECISIONS:
        raise ValueError(f"precision {precision!r}: vLLM serves {', '.join(VLLM_PRECISIONS)}")
    if precision == "4bit" and device != "cuda":
        raise ValueError("precision 4bit: vLLM's bitsandbytes quantization needs a GPU; use fp32 or bf16 on a CPU")
    args: dict[str, Any] = {
        "model": model, "tokenizer": model, "dtype": "bfloat16" if precision == "4bit" else VLLM_PRECISIONS[precision],
        "max_model_len": max_model_len, "seed": 0,
        "enable_lora": True, "max_loras": config.max_loras, "max_cpu_loras": config.max_cpu_loras,
        "max_lora_rank": config.max_lora_rank, "max_num_seqs": config.max_num_seqs,
        "enforce_eager": config.enforce_eager, "distributed_executor_backend": "uni", "disable_log_stats": True,
    }
    if precision == "4bit":
        args["quantization"] = "bitsandbytes"
    if device == "cuda":
        args["gpu_memory_utilization"] = config.gpu_memory_utilization
    else:
        args["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_gb * GIB)
    return args


@dataclass
class _Request:
    """One request's state between the client's event loop and the step thread."""

    adapter: str | None
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    stream: DeltaStream = field(default_factory=DeltaStream)
    running: bool = False  # handed to vLLM (else waiting for its adapter or for the step thread)
    text: str = ""  # text not yet sent (vLLM's deltas may be empty: an unfinished multi-byte character)
    token_ids: list[int] = field(default_factory=list)  # tokens not yet sent
    completion_tokens: int = 0


class VllmEngine:
    """vLLM's multi-LoRA engine; implements serving.engine.Engine."""

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, fetch: AdapterFetcher, config: VllmEngineConfig,
                 max_context_tokens: int, base_adapter: Path | None = None) -> None:
        """`base_adapter`: a folder that base requests run with (`zero_adapter`, on a CPU); None: no adapter."""
        self.llm = llm
        self.tokenizer = tokenizer
        self.fetch = fetch
        self.config = config
        self.max_context_tokens = max_context_tokens
        self.counters = AdapterStats()
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.lock = threading.Lock()  # guards the maps below (client loops and the step thread)
        self.requests: dict[str, _Request] = {}
        self.adapter_ids: dict[str, int] = {}  # adapter id -> vLLM's lora_int_id, stable for the engine's life
        self.folders: dict[str, Path] = {}
        self.base_adapter = base_adapter
        if base_adapter is not None:
            self.folders[BASE], self.adapter_ids[BASE] = base_adapter, 1
        self.in_host: set[str] = set()  # adapters vLLM holds in host memory (refreshed by the step thread)
        self.next_request = itertools.count(1)
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="vllm-step-loop", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public API (any thread)
    async def generate(self, prompt_ids: list[int], adapter: str | None,
                       params: SamplingParams) -> AsyncGenerator[Delta, None]:
        self._validate(prompt_ids, params)
        request_id, request = self._accept(adapter, len(prompt_ids))
        try:
            lora = await self._lora(adapter or BASE) if adapter or self.base_adapter else None
            sampling = self._sampling(params)
            await self._call(lambda: self._start(request_id, request, prompt_ids, sampling, lora))
            self.counters.add(adapter or BASE, requests=1)
            async for delta in request.stream.deltas():
                yield delta
        finally:
            with self.lock:
                self.requests.pop(request_id, None)
                running = request.running
            if not request.stream.ended and running:  # the client went away: vLLM frees its KV blocks at the next step
                self.commands.put(lambda: self.llm.abort_request([request_id]))
                self.wake.set()

    async def prefetch(self, adapter: str) -> float:
        return await self._load(adapter)

    def stats(self) -> dict[str, dict[str, float]]:
        return self.counters.snapshot()

    def residency(self) -> dict[str, str]:
        with self.lock:
            running = {request.adapter for request in self.requests.values() if request.running and request.adapter}
            return {adapter: "device" if adapter in running else "host" for adapter in self.in_host | running
                    if adapter != BASE}

    def held_resources(self) -> dict[str, float]:
        """vLLM's KV cache is one pool allocated at start, so no request holds KV bytes of its own: kv_bytes is 0."""
        with self.lock:
            running = [request for request in self.requests.values() if request.running]
            return {"rows": float(len(running)), "pending": float(len(self.requests) - len(running)),
                    "slots_held": float(len({request.adapter for request in running if request.adapter})),
                    "kv_bytes": 0.0}

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError(f"vLLM step loop is dead: {self.error!r}")

    def shutdown(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)
        core = getattr(self.llm, "engine_core", None)
        if core is not None:
            core.shutdown()
        if self.base_adapter is not None:
            shutil.rmtree(self.base_adapter, ignore_errors=True)

    # ------------------------------------------------------------------ requests and adapters (client loops)
    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        if len(prompt_ids) + params.max_tokens > self.max_context_tokens:
            raise ContextTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"model's context of {self.max_context_tokens} tokens")

    def _accept(self, adapter: str | None, prompt_tokens: int) -> tuple[str, _Request]:
        """Register a request, or refuse it when the replica already holds all it accepts (vLLM's own queue has no
        bound)."""
        self.check_health()
        with self.lock:
            if len(self.requests) >= self.config.replica_capacity:
                raise EngineOverloaded(f"the engine holds {len(self.requests)} requests, its limit (2 x max_num_seqs)",
                                       retry_after_s=1.0)
            request_id = f"r{next(self.next_request)}"
            request = _Request(adapter=adapter, prompt_tokens=prompt_tokens, loop=asyncio.get_running_loop())
            self.requests[request_id] = request
        return request_id, request

    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        return VllmSampling(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                            stop=list(params.stop) or None, seed=params.seed, output_kind=RequestOutputKind.DELTA)

    async def _lora(self, adapter: str) -> Any:
        """The adapter's LoRARequest, loaded into vLLM's host memory first (raises AdapterLoadError)."""
        await self._load(adapter)
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter, self.adapter_ids[adapter], str(self.folders[adapter]))

    async def _load(self, adapter: str) -> float:
        """Fetch the adapter's folder (once) and load it into vLLM unless it holds it; seconds spent (0 when held)."""
        started = time.perf_counter()
        if adapter not in self.folders:
            try:
                folder = await asyncio.get_running_loop().run_in_executor(None, self.fetch, adapter)
            except Exception as error:
                raise AdapterLoadError(f"adapter {adapter}: {type(error).__name__}: {error}") from None
            self._check_rank(adapter, folder)
            with self.lock:
                self.folders[adapter] = folder
                self.adapter_ids.setdefault(adapter, len(self.adapter_ids) + 1)
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(adapter, self.adapter_ids[adapter], str(self.folders[adapter]))
        try:
            loaded = await self._call(lambda: self._add_lora(lora))
        except Exception as error:
            raise AdapterLoadError(f"adapter {adapter}: {type(error).__name__}: {error}") from None
        if not loaded:
            self.counters.add(adapter, host_hits=1)
            return 0.0
        seconds = time.perf_counter() - started
        self.counters.add(adapter, loads=1, load_s=seconds)
        return seconds

    def _check_rank(self, adapter: str, folder: Path) -> None:
        try:
            rank = int(json.loads((folder / ADAPTER_CONFIG).read_text())["r"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise AdapterLoadError(f"adapter {adapter}: no readable adapter_config.json ({error})") from None
        if rank > self.config.max_lora_rank:
            raise AdapterLoadError(f"adapter {adapter}: rank {rank} exceeds this replica's max_lora_rank "
                                   f"({self.config.max_lora_rank})")

    def _call(self, command: Callable[[], T]) -> asyncio.Future[T]:
        """Run `command` on the step thread; its result (or exception) comes back to the calling event loop."""
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():  # its caller went away: nothing to do
                return
            try:
                future.set_result(command())
            except Exception as error:
                future.set_exception(error)

        self.check_health()
        self.commands.put(run)
        self.wake.set()
        return asyncio.wrap_future(future)

    # ------------------------------------------------------------------ the step thread
    def _add_lora(self, lora: Any) -> bool:
        """Load `lora` into vLLM unless it holds it; True when it loaded now."""
        if lora.lora_int_id in self.llm.list_loras():
            return False
        if not self.llm.add_lora(lora):
            raise RuntimeError("vLLM did not load it")
        self._refresh_residency()
        return True

    def _start(self, request_id: str, request: _Request, prompt_ids: list[int], sampling: Any, lora: Any) -> None:
        with self.lock:
            if request_id not in self.requests:  # the client left while waiting
                return
        self.llm.add_request(request_id, {"prompt_token_ids": prompt_ids}, sampling, lora_request=lora)
        with self.lock:
            request.running = True
            gone = request_id not in self.requests
        if gone:
            self.llm.abort_request([request_id])

    def _loop(self) -> None:
        try:
            while not self.stopping:
                while not self.commands.empty():
                    self.commands.get()()
                if self.llm.has_unfinished_requests():
                    for output in self.llm.step():
                        self._emit(output)
                    self._refresh_residency()
                else:
                    self.wake.wait(timeout=0.05)
                    self.wake.clear()
        except BaseException as error:
            self.error = error
            log.exception("vLLM step loop died")
            with self.lock:
                failed = list(self.requests.values())
            for request in failed:
                self._send(request, EngineError(f"engine failure: {error}"))
            raise

    def _refresh_residency(self) -> None:
        held = self.llm.list_loras()
        with self.lock:
            self.in_host = {adapter for adapter, number in self.adapter_ids.items() if number in held}

    def _emit(self, output: Any) -> None:
        with self.lock:
            request = self.requests.get(output.request_id)
        if request is None:  # its client went away
            return
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        eos_stop = output.finished and completion.finish_reason == "stop" and completion.stop_reason is None
        if eos_stop and tokens and tokens[-1] in self.eos_ids:  # as our engine does: EOS ends, it is not a token sent
            tokens.pop()
        request.text += completion.text
        request.token_ids += tokens
        request.completion_tokens += len(tokens)
        if output.finished and completion.finish_reason not in ("stop", "length"):
            self._send(request, EngineError(f"vLLM ended the request: {completion.finish_reason}"))
        elif output.finished:
            reason = completion.finish_reason
            self.counters.add(request.adapter or BASE, prompt_tokens=request.prompt_tokens,
                              completion_tokens=request.completion_tokens)
            self._flush(request, reason)
        elif request.text:
            self._flush(request, None)

    def _flush(self, request: _Request, reason: str | None) -> None:
        delta = Delta(text=request.text, token_ids=request.token_ids, finish_reason=reason,
                      prompt_tokens=request.prompt_tokens, completion_tokens=request.completion_tokens)
        request.text, request.token_ids = "", []
        self._send(request, delta)

    def _send(self, request: _Request, item: Delta | BaseException) -> None:
        try:
            request.loop.call_soon_threadsafe(request.stream.queue.put_nowait, item)
        except RuntimeError:  # "Event loop is closed": nobody is listening any more
            pass


def build_engine(spec: BaseModelSpec, precision: str, device: str, fetch: AdapterFetcher, config: VllmEngineConfig,
                 max_context_tokens: int | None = None) -> VllmEngine:
    """Start vLLM over `spec` (a tiny base: its cached fp32 safetensors folder) in `precision` on `device`, in this
    process."""
    source = model_source(spec)
    context = config.max_model_len or max_context_tokens or _model_context(source)
    return start_engine(source, load_tokenizer(spec), precision, resolve_device(device), fetch, config, context)


def start_engine(source: str, tokenizer: PreTrainedTokenizerBase, precision: str, device: str, fetch: AdapterFetcher,
                 config: VllmEngineConfig, context: int) -> VllmEngine:
    """Start vLLM over the model folder (or Hub id) `source` on `device` ("cpu" or "cuda"), in this process."""
    os.environ.update(IN_PROCESS_ENV)  # read when vLLM builds its engine core client, so set before it does
    from vllm import EngineArgs, LLMEngine

    with flask_proxies_bound():
        llm = LLMEngine.from_engine_args(EngineArgs(**engine_args(config, source, precision, device, context)))
    base_adapter = None
    if device == "cpu":
        base_adapter = zero_adapter(source, Path(tempfile.mkdtemp(prefix="loraland-zero-lora-")))
    return VllmEngine(llm, tokenizer, fetch, config, context, base_adapter)


@contextlib.contextmanager
def flask_proxies_bound() -> Iterator[None]:
    """While vLLM starts, bind flask's context proxies (`request`, `current_app`, ...) if flask is imported.

    vLLM 0.32 registers its CPU kernels by scanning every module's globals with `hasattr(value, "__dict__")`
    (`vllm.triton_utils.dispatcher._rebind_kernels`); an unbound werkzeug `LocalProxy` raises RuntimeError there, not
    AttributeError, so the engine fails to start in any process that imported flask (mlflow's server, moto). Inside a
    throw-away request context every flask proxy resolves, and the scan passes."""
    flask = sys.modules.get("flask")
    if flask is None:
        yield
        return
    with flask.Flask("loraland-vllm-start").test_request_context():
        yield


def zero_adapter(source: str, folder: Path) -> Path:
    """A rank-1 LoRA adapter on every q_proj of the model at `source` whose B is zero, in PEFT's format in `folder`: it
    changes no output (what base requests run with on a CPU, see the module's docstring)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tensors = {}
    for layer in range(config.num_hidden_layers):
        name = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{name}.lora_A.weight"] = torch.zeros(1, config.hidden_size)
        tensors[f"{name}.lora_B.weight"] = torch.zeros(config.num_attention_heads * head_dim, 1)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1,
                                                     "lora_alpha": 1, "target_modules": ["q_proj"], "bias": "none"}))
    return folder


def _model_context(source: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", 2048))
