"""The engine we ship: mixed-adapter continuous batching over one base model (serving.engine.Engine).

One decode thread owns the model. Each iteration it

1. admits waiting requests into the running batch: round-robin over adapters, an adapter holding
   `max_running_per_adapter` rows yields to the others (bounded waiting), only adapters already
   in host memory (loading happens on loader threads, off this loop);
2. prefills the admitted requests together (right-padded, so no query row is fully masked) and
   merges their KV caches into the running batch's cache;
3. decodes one token for every running request in one forward pass, whatever its adapter
   (`serving.lora`: gathered LoRA, one slot index per row), samples per request, applies its stop
   rules and streams the new text; finished requests leave the batch before the next step.

The batch's KV cache is a plain transformers DynamicCache whose rows may hold masked holes (the
prefill padding of one row, columns from rows that left); every row carries its own position ids,
so a row computes exactly what it would alone. Columns no row uses any more are dropped.

Adapter tiers: accelerator slots (`LoraSlots`, LRU over idle, unpinned slots), host memory (LRU),
and local disk (whatever the replica's `AdapterFetcher` caches).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from jobs.config import BaseModelSpec, QuantizationSettings
from jobs.models import load_base_model, load_tokenizer, resolve_device
from serving.config import EngineSettings
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
from serving.lora import AdapterFormatError, AdapterWeights, LoraSlots, read_adapter

log = logging.getLogger(__name__)

BASE = ""  # stats key and adapter key of requests without an adapter
PREFILL_TOKEN_BUDGET = 8192  # prompt tokens prefilled in one iteration, so decoding rows are not stalled long
DEVICE_SLOT_MEMORY_FRACTION = 0.1  # of free accelerator memory, when device_adapter_slots is 0
CPU_DEFAULT_SLOTS = 64



@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop  # the client's event loop and stream
    stream: asyncio.Queue[Delta | BaseException]
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    slot: int = 0
    text: str = ""  # decoded completion so far
    sent: int = 0  # characters of `text` already streamed
    tokens_sent: int = 0  # tokens of `out_ids` already streamed
    prefix_offset: int = 0  # incremental detokenisation window over out_ids
    read_offset: int = 0
    cancelled: bool = False
    finished: bool = False

    @property
    def position(self) -> int:
        """Position id of the token fed to the model next (the newest output token)."""
        return len(self.prompt_ids) + len(self.out_ids) - 1

    @property
    def key(self) -> str:
        return self.adapter or BASE


class AdapterTiers:
    """Host-memory LRU of adapters with loads on a thread pool; accelerator slots LRU over idle slots."""

    def __init__(self, slots: LoraSlots, fetch: AdapterFetcher, settings: EngineSettings, dtype: torch.dtype,
                 wake: threading.Event, stats: dict[str, dict[str, float]]) -> None:
        self.lora = slots
        self.fetch = fetch
        self.host_capacity = settings.host_adapter_slots
        self.pinned = set(settings.pinned_adapters)
        self.dtype = dtype
        self.wake = wake
        self.stats = stats
        self.layer_shapes = {name: (layer.in_features, layer.out_features) for name, layer in slots.layers.items()}
        self.pin = next(iter(slots.layers.values())).lora_a.is_cuda  # page-locked host copies for async copies to a GPU
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.loader_threads, thread_name_prefix="adapter-loader")
        self.lock = threading.Lock()
        self.host: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.loading: dict[str, concurrent.futures.Future[float]] = {}
        self.failed: dict[str, str] = {}
        self.slot_of: dict[str, int] = {}
        self.owner: list[str | None] = [None] * (slots.slots + 1)
        self.refs = [0] * (slots.slots + 1)
        self.slot_lru: OrderedDict[int, None] = OrderedDict()

    # ---- host tier (any thread)
    def request(self, adapter: str) -> concurrent.futures.Future[float] | None:
        """Start loading `adapter` into host memory unless it is there; the future gives the load seconds."""
        with self.lock:
            if adapter in self.host:
                self.host.move_to_end(adapter)
                return None
            if adapter in self.loading:
                return self.loading[adapter]
            future = self.loading[adapter] = self.pool.submit(self._load, adapter)
        # Outside the lock: a load that already failed runs the callback right here, and it takes the lock.
        future.add_done_callback(lambda f, a=adapter: self._loaded(a, f))
        return future

    def _load(self, adapter: str) -> float:
        started = time.perf_counter()
        try:
            path = self.fetch(adapter)
            weights = read_adapter(path, self.layer_shapes, self.lora.max_rank, self.dtype)
        except AdapterFormatError as error:
            raise AdapterLoadError(f"adapter {adapter!r} is not servable: {error}") from error
        except EngineError:
            raise
        except Exception as error:
            raise AdapterLoadError(f"adapter {adapter!r} could not be fetched: {type(error).__name__}: {error}") from error
        if self.pin:
            weights.modules = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.modules.items()}
        seconds = time.perf_counter() - started
        with self.lock:
            self.host[adapter] = weights
            while len(self.host) > self.host_capacity:
                victim = next((k for k in self.host if k not in self.pinned and k != adapter), None)
                if victim is None:
                    break
                del self.host[victim]
        entry = self.stats[adapter]
        entry["loads"] += 1
        entry["load_s"] += seconds
        return seconds

    def _loaded(self, adapter: str, future: concurrent.futures.Future[float]) -> None:
        with self.lock:
            self.loading.pop(adapter, None)
            error = future.exception()
            if error is not None:
                self.failed[adapter] = str(error)
        self.wake.set()

    def take_failures(self) -> dict[str, str]:
        with self.lock:
            failed, self.failed = self.failed, {}
        return failed

    # ---- accelerator tier (decode thread only)
    def acquire(self, adapter: str | None) -> int | None:
        """The slot holding `adapter` (copied in from host memory if needed), or None if no slot is free now."""
        if adapter is None:
            return 0
        slot = self.slot_of.get(adapter)
        if slot is not None:
            self.stats[adapter]["device_hits"] += 1
        else:
            with self.lock:
                weights = self.host.get(adapter)
            if weights is None:
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            self.lora.load(slot, weights)
            self.slot_of[adapter] = slot
            self.owner[slot] = adapter
        self.refs[slot] += 1
        self.slot_lru[slot] = None
        self.slot_lru.move_to_end(slot)
        return slot

    def _free_slot(self) -> int | None:
        for slot in range(1, len(self.owner)):
            if self.owner[slot] is None:
                return slot
        for slot in self.slot_lru:  # least recently used first
            owner = self.owner[slot]
            if self.refs[slot] == 0 and owner not in self.pinned:
                del self.slot_of[owner]  # type: ignore[arg-type]
                self.owner[slot] = None
                return slot
        return None

    def release(self, slot: int) -> None:
        if slot:
            self.refs[slot] -= 1

    def held_on_device(self) -> list[str]:
        return [owner for owner in self.owner if owner is not None]

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class BatchingEngine:
    """Mixed-adapter continuous batching; implements serving.engine.Engine."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fetch: AdapterFetcher,
                 settings: EngineSettings, max_context_tokens: int, target_modules: list[str]) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_context_tokens = max_context_tokens
        self.device = next(model.parameters()).device
        dtype = self._lora_dtype(model)
        targets = settings.target_modules or target_modules
        self.counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.wake = threading.Event()
        slots = self._slot_count(model, targets, settings, dtype)
        self.tiers = AdapterTiers(LoraSlots(model, targets, slots, settings.max_lora_rank, dtype), fetch, settings, dtype,
                                  self.wake, self.counters)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_running_per_adapter = settings.max_running_per_adapter or max(1, settings.max_batch_size // 2)
        self.inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()
        self.pending = 0  # requests submitted but not yet admitted (bounded by max_queued_requests)
        self.pending_lock = threading.Lock()
        self.rows: list[Sequence] = []
        self.outbox: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Delta | BaseException]]] = defaultdict(list)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns] 1 where the cache column is a real token of that row
        self.steps = 0  # decode forward passes
        self.peak_rows = 0  # most rows decoded in one forward pass
        self.peak_adapters = 0  # most distinct adapters (base included) decoded in one forward pass
        self.stopping = False
        self.error: BaseException | None = None
        for adapter in settings.pinned_adapters:
            self.tiers.request(adapter)
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public API (any thread)
    async def generate(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> AsyncIterator[Delta]:
        self._validate(prompt_ids, params)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        seq = Sequence(adapter=adapter, prompt_ids=list(prompt_ids), params=params, loop=loop, stream=stream)
        self._submit(seq)
        done = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            if not done:  # the client went away: free its batch row at the next step
                seq.cancelled = True
                self.wake.set()

    async def prefetch(self, adapter: str) -> float:
        future = self.tiers.request(adapter)
        if future is None:
            self.counters[adapter]["host_hits"] += 1
            return 0.0
        return await asyncio.wrap_future(future)

    def stats(self) -> dict[str, dict[str, float]]:
        return {key: dict(values) for key, values in list(self.counters.items())}

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError(f"decode loop is dead: {self.error!r}")

    def shutdown(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)
        self.tiers.shutdown()

    def held_adapters(self) -> list[str]:
        """Adapters in accelerator slots now (for benchmarks and the replica's metrics)."""
        return self.tiers.held_on_device()

    # ------------------------------------------------------------------ submission
    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        if len(prompt_ids) + params.max_tokens > self.max_context_tokens:
            raise ContextTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"model's context of {self.max_context_tokens} tokens")

    def _submit(self, seq: Sequence) -> None:
        self.check_health()
        with self.pending_lock:
            if self.pending >= self.settings.max_queued_requests:
                raise EngineOverloaded(f"{self.pending} requests are already waiting (max_queued_requests)",
                                       retry_after_s=1.0)
            self.pending += 1
        if seq.params.temperature > 0:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else torch.seed())
        self.counters[seq.key]["requests"] += 1
        if seq.adapter is not None and self.tiers.request(seq.adapter) is None:  # loading starts now, off the loop
            self.counters[seq.adapter]["host_hits"] += 1
        self.inbox.put(seq)
        self.wake.set()

    # ------------------------------------------------------------------ decode loop
    def _loop(self) -> None:
        try:
            while not self.stopping:
                self._drain_inbox()
                self._fail_unloadable()
                admitted = self._admit()
                if admitted:
                    self._guarded(self._prefill, admitted, victims=admitted)
                if self.rows:
                    self._guarded(self._decode, victims=self.rows)
                elif not admitted:
                    self.wake.wait(timeout=0.05)
                    self.wake.clear()
                self._flush()
        except BaseException as error:
            self.error = error
            log.exception("decode loop died")
            for seq in self.rows + [s for q in self.waiting.values() for s in q]:
                self._send(seq, EngineError(f"engine failure: {error}"))
            self._flush()
            raise

    def _send(self, seq: Sequence, item: Delta | BaseException) -> None:
        self.outbox[seq.loop].append((seq, item))

    def _flush(self) -> None:
        """Deliver this iteration's deltas: one wake-up per client event loop, not one per token."""
        outbox, self.outbox = self.outbox, defaultdict(list)
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # "Event loop is closed": nobody is listening any more
                for seq, _ in items:
                    seq.cancelled = True

    def _guarded(self, step: Callable[..., None], *args: object, victims: list[Sequence]) -> None:
        """Run one step; if it raises, fail its requests (not the replica's others, not the replica)."""
        try:
            with torch.inference_mode():
                step(*args)
        except Exception as error:
            log.exception("engine step failed")
            failed = {id(seq) for seq in victims}
            for seq in list(victims):
                if not seq.finished:
                    self._finish(seq, None, error=EngineError(f"generation failed: {type(error).__name__}: {error}"))
            if any(id(seq) in failed for seq in self.rows):  # the running batch's cache may be half-updated
                for seq in self.rows:
                    if not seq.finished:
                        self._finish(seq, None, error=EngineError(f"generation failed: {type(error).__name__}: {error}"))
                self.rows, self.cache, self.mask = [], None, None

    def _drain_inbox(self) -> None:
        while True:
            try:
                seq = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.waiting.setdefault(seq.key, deque()).append(seq)

    def _fail_unloadable(self) -> None:
        for adapter, message in self.tiers.take_failures().items():
            for seq in self.waiting.pop(adapter, deque()):
                self._unqueue(seq)
                self._send(seq, AdapterLoadError(message))

    def _unqueue(self, seq: Sequence) -> None:
        with self.pending_lock:
            self.pending -= 1

    def _admit(self) -> list[Sequence]:
        """Round-robin over adapters with waiting requests until the batch or the prefill budget is full."""
        free = self.settings.max_batch_size - len(self.rows)
        running: dict[str, int] = defaultdict(int)
        for seq in self.rows:
            running[seq.key] += 1
        admitted: list[Sequence] = []
        budget = PREFILL_TOKEN_BUDGET
        progress = True
        while free > 0 and budget > 0 and progress:
            progress = False
            for key in list(self.waiting):
                queue_ = self.waiting[key]
                while queue_ and queue_[0].cancelled:
                    self._unqueue(queue_.popleft())
                if not queue_:
                    del self.waiting[key]
                    continue
                others_wait = len(self.waiting) > 1
                if free == 0 or budget <= 0 or (others_wait and running[key] >= self.max_running_per_adapter):
                    continue
                seq = queue_[0]
                slot = self.tiers.acquire(seq.adapter)
                if slot is None:  # loading off this loop (again, if host memory evicted it), or every slot is busy
                    self.tiers.request(seq.adapter)  # type: ignore[arg-type]
                    continue
                queue_.popleft()
                self._unqueue(seq)
                seq.slot = slot
                admitted.append(seq)
                running[key] += 1
                free -= 1
                budget -= len(seq.prompt_ids)
                progress = True
                self.waiting.move_to_end(key)  # the next round starts with the adapters that waited longest
        return admitted

    def _prefill(self, new: list[Sequence]) -> None:
        lengths = [len(seq.prompt_ids) for seq in new]
        width = max(lengths)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for row, seq in enumerate(new):
            ids[row, : lengths[row]] = torch.tensor(seq.prompt_ids)
            mask[row, : lengths[row]] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = torch.arange(width, device=self.device).expand(len(new), width)
        last = sorted(set(length - 1 for length in lengths))
        self.tiers.lora.set_batch([seq.slot for seq in new])
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=torch.tensor(last, device=self.device))
        column = {position: index for index, position in enumerate(last)}
        logits = out.logits[torch.arange(len(new), device=self.device), torch.tensor([column[n - 1] for n in lengths], device=self.device)]
        self._merge(new, out.past_key_values, mask)
        self._sample_and_emit(new, logits)

    def _merge(self, new: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the new rows' caches to the running batch's cache, padding the shorter one with masked columns."""
        if self.cache is None or self.mask is None or not self.rows:
            self.rows, self.cache, self.mask = list(new), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            old_layer.keys = torch.cat([_pad_columns(old_layer.keys, width), _pad_columns(new_layer.keys, width)])
            old_layer.values = torch.cat([_pad_columns(old_layer.values, width), _pad_columns(new_layer.values, width)])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)])
        self.rows.extend(new)

    def _decode(self) -> None:
        self._drop_finished()  # clients that went away since the last step
        if not self.rows:
            return
        assert self.cache is not None and self.mask is not None
        ids = torch.tensor([[seq.out_ids[-1]] for seq in self.rows], device=self.device)
        positions = torch.tensor([[seq.position] for seq in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)], dim=1)
        self.tiers.lora.set_batch([seq.slot for seq in self.rows])
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True)
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        self.peak_adapters = max(self.peak_adapters, len({seq.key for seq in self.rows}))
        self._sample_and_emit(self.rows, out.logits[:, -1])
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [row for row, seq in enumerate(self.rows) if not seq.finished and not seq.cancelled]
        for row, seq in enumerate(self.rows):
            if seq.cancelled and not seq.finished:
                seq.finished = True
                self.tiers.release(seq.slot)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[row] for row in keep]
        self.mask = self.mask[index]
        used = self.mask.any(dim=0)
        columns = used.nonzero().squeeze(1) if not bool(used.all()) else None
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
            if columns is not None:
                layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]
        if columns is not None:
            self.mask = self.mask[:, columns]

    # ------------------------------------------------------------------ sampling and stopping
    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                tokens[row] = _sample(logits[row].float(), seq.params, seq.generator)
        for seq, token in zip(seqs, tokens):
            if seq.cancelled:
                continue
            seq.out_ids.append(token)
            self._advance(seq, token)

    def _advance(self, seq: Sequence, token: int) -> None:
        if token in self.eos_ids:
            self._finish(seq, "stop", drop_last=True)
            return
        new_text = self._detokenize(seq)
        seq.text += new_text
        stops = seq.params.stop
        if stops:
            start = max(0, seq.sent - max(len(s) for s in stops))
            hits = [index for index in (seq.text.find(s, start) for s in stops) if index >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                self._finish(seq, "stop")
                return
        if len(seq.out_ids) >= seq.params.max_tokens:
            self._finish(seq, "length")
            return
        hold = _stop_prefix_len(seq.text, stops)
        upto = len(seq.text) - hold
        if upto > seq.sent:
            self._send(seq, Delta(text=seq.text[seq.sent:upto], token_ids=seq.out_ids[seq.tokens_sent:],
                           prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.out_ids)))
            seq.sent, seq.tokens_sent = upto, len(seq.out_ids)

    def _window(self, seq: Sequence, ids: list[int]) -> tuple[str, str]:
        """Text of `ids` from the decoder's prefix offset: up to its read offset, and to the end."""
        prefix = self.tokenizer.decode(ids[seq.prefix_offset: seq.read_offset], skip_special_tokens=True)
        return prefix, self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)

    def _detokenize(self, seq: Sequence) -> str:
        """The text the newest token adds (vLLM/TGI-style incremental decoding: stable across merges)."""
        prefix, full = self._window(seq, seq.out_ids)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.out_ids)
            return full[len(prefix):]
        return ""

    def _finish(self, seq: Sequence, reason: str | None, drop_last: bool = False,
                error: BaseException | None = None) -> None:
        seq.finished = True
        self.tiers.release(seq.slot)
        seq.slot = 0
        if error is not None:
            self._send(seq, error)
            return
        if drop_last:
            seq.text += self._decoder_tail(seq)
        completion = len(seq.out_ids) - (1 if drop_last else 0)
        entry = self.counters[seq.key]
        entry["prompt_tokens"] += len(seq.prompt_ids)
        entry["completion_tokens"] += completion
        self._send(seq, Delta(text=seq.text[seq.sent:], token_ids=seq.out_ids[seq.tokens_sent: completion], finish_reason=reason,
                       prompt_tokens=len(seq.prompt_ids), completion_tokens=completion))
        seq.sent, seq.tokens_sent = len(seq.text), completion

    def _decoder_tail(self, seq: Sequence) -> str:
        """Text still held in the incremental decoder (an unfinished multi-byte character) at EOS."""
        prefix, full = self._window(seq, seq.out_ids[:-1])
        return full[len(prefix):]

    # ------------------------------------------------------------------ sizing
    @staticmethod
    def _lora_dtype(model: PreTrainedModel) -> torch.dtype:
        dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32

    @staticmethod
    def _slot_count(model: PreTrainedModel, targets: list[str], settings: EngineSettings, dtype: torch.dtype) -> int:
        if settings.device_adapter_slots:
            return settings.device_adapter_slots
        if next(model.parameters()).is_cuda:
            free, _ = torch.cuda.mem_get_info()
            per_slot = LoraSlots.slot_bytes(model, targets, settings.max_lora_rank, dtype)
            return max(1, min(settings.host_adapter_slots, int(free * DEVICE_SLOT_MEMORY_FRACTION // max(per_slot, 1))))
        return min(settings.host_adapter_slots, CPU_DEFAULT_SLOTS)


def _deliver(items: list[tuple[Sequence, Delta | BaseException]]) -> None:
    for seq, item in items:
        seq.stream.put_nowait(item)


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, columns, dim] padded with zero columns on the right to `width`."""
    missing = width - tensor.shape[2]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, 0, missing))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (0, missing))


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string (held back from the stream)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


def build_engine(spec: BaseModelSpec, precision: str, device: str, fetch: AdapterFetcher, settings: EngineSettings,
                 max_context_tokens: int | None = None) -> BatchingEngine:
    """Load `spec` (4-bit nf4, bf16 or fp32) on `device` and start an engine over it."""
    resolved = resolve_device(device)
    if precision == "4bit":
        quant = QuantizationSettings()
    else:
        quant = QuantizationSettings(load_in_4bit=False, compute_dtype="bfloat16" if precision == "bf16" else "float32")
    model = load_base_model(spec, quant, resolved)
    tokenizer = load_tokenizer(spec)
    context = max_context_tokens or int(getattr(model.config, "max_position_embeddings", 2048))
    return BatchingEngine(model, tokenizer, fetch, settings, context, list(spec.all_linear_modules))
