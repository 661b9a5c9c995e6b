"""The engine we ship: mixed-adapter continuous batching over one base model (serving.engine.Engine).

One decode thread owns the model. Each iteration it

1. admits waiting requests into the running batch (`serving.scheduler`: round-robin over adapters,
   a per-adapter cap while others wait, only adapters already in host memory; loading happens on
   loader threads of `serving.tiers`, off this loop);
2. prefills the admitted requests together (right-padded, so no query row is fully masked) and
   merges their KV caches into the running batch's cache;
3. decodes one token for every running request in one forward pass, whatever its adapter
   (`serving.lora`: each row's own LoRA delta, side by side or gathered), samples per request (`serving.sampling`),
   turns the token into text and applies the stop rules (`serving.detok`), and streams the new text;
   finished requests leave the batch before the next step.

The batch's KV cache (`BatchCache`) is a plain transformers DynamicCache whose rows may hold masked
holes (the prefill padding of one row, columns from rows that left); every row carries its own
position ids, so a row computes exactly what it would alone. Columns no row uses any more are dropped.

Threads: client event loops call `generate`/`prefetch`/`stats`; loader threads read adapters; the
decode thread does everything else. What they share is locked: the scheduler's queue count, the
host tier, and the per-adapter counters (`serving.stats.AdapterStats`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from core.schemas import BaseModelSpec, QuantizationSettings
from jobs.models import load_base_model, load_tokenizer, resolve_device
from serving.config import BatchingEngineConfig
from serving.detok import CompletionText, Detokenizer
from serving.engine import (
    AdapterFetcher,
    ContextTooLong,
    Delta,
    DeltaStream,
    EngineError,
    InvalidRequest,
    SamplingParams,
)
from serving.sampling import next_tokens, request_generator
from serving.scheduler import Scheduler, Sequence
from serving.stats import AdapterStats
from serving.tiers import AdapterTiers

log = logging.getLogger(__name__)

UNUSED_COLUMNS_KEPT_UNDER = 4  # unused cache columns are dropped once they are 1/4 of the columns (BatchCache.keep)
Outbox = dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Delta | BaseException]]]


class BatchCache:
    """The running batch's KV cache and its mask [rows, columns]: 1 where the column is a real token of that row."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask
        _layers(cache)  # refuse cache layers this class cannot merge, before the first merge

    def merge(self, other: BatchCache) -> None:
        """Append `other`'s rows after these, padding the narrower cache with masked columns on the right."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache)):
            (keys, values), (new_keys, new_values) = _kv(mine), _kv(theirs)
            mine.keys = torch.cat([_pad_columns(keys, width), _pad_columns(new_keys, width)])
            mine.values = torch.cat([_pad_columns(values, width), _pad_columns(new_values, width)])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)])

    def add_column(self) -> torch.Tensor:
        """Unmask one new column in every row (the token each row decodes now); returns the attention mask."""
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); drop the columns none of them uses once they are a quarter of the cache
        (masked columns cost attention a little, copying the cache to drop them costs as much as keeping the rows)."""
        index = torch.tensor(rows, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0)
        unused = int(used.numel() - used.sum())
        columns = used.nonzero().squeeze(1) if unused * UNUSED_COLUMNS_KEPT_UNDER >= used.numel() else None
        for layer in _layers(self.cache):
            keys, values = _kv(layer)
            keys, values = keys.index_select(0, index), values.index_select(0, index)
            if columns is not None:
                keys, values = keys.index_select(2, columns), values.index_select(2, columns)
            layer.keys, layer.values = keys, values
        if columns is not None:
            self.mask = self.mask.index_select(1, columns)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, which must hold plain attention keys and values."""
    layers = [layer for layer in cache.layers if isinstance(layer, DynamicLayer)]
    if len(layers) != len(cache.layers):
        raise TypeError("the batching engine merges attention KV caches (DynamicLayer) only; this model's cache has "
                        f"{sorted({type(layer).__name__ for layer in cache.layers})}")
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "a prefilled cache layer holds keys and values"
    return layer.keys, layer.values


def _pad_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, columns, dim] padded with zero columns on the right to `width`."""
    missing = width - tensor.shape[2]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, 0, missing))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (0, missing))


class BatchingEngine:
    """Mixed-adapter continuous batching; implements serving.engine.Engine."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fetch: AdapterFetcher,
                 settings: BatchingEngineConfig, max_context_tokens: int, target_modules: list[str]) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_context_tokens = max_context_tokens
        self.device = next(model.parameters()).device
        self.counters = AdapterStats()
        self.wake = threading.Event()
        self.tiers = AdapterTiers.for_model(model, settings.target_modules or target_modules, fetch, settings,
                                            self.wake, self.counters)
        self.scheduler = Scheduler(self.tiers, settings.max_batch_size,
                                   settings.max_running_per_adapter or max(1, settings.max_batch_size // 2),
                                   settings.max_queued_requests, settings.max_batch_tokens)
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows: list[Sequence] = []  # the running batch, in the order of the cache's rows
        self.batch: BatchCache | None = None
        self.outbox: Outbox = defaultdict(list)
        self.steps = 0  # decode forward passes (written by the decode thread only, like the two below)
        self.peak_rows = 0  # most rows decoded in one forward pass
        self.peak_adapters = 0  # most distinct adapters (base included) decoded in one forward pass
        self.stopping = False
        self.error: BaseException | None = None
        for adapter in settings.pinned_adapters:
            self.tiers.request(adapter)
        self.thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public API (any thread)
    async def generate(self, prompt_ids: list[int], adapter: str | None,
                       params: SamplingParams) -> AsyncGenerator[Delta, None]:
        self._validate(prompt_ids, params)
        stream = DeltaStream()
        seq = Sequence(adapter=adapter, prompt_ids=list(prompt_ids), params=params, loop=asyncio.get_running_loop(),
                       stream=stream.queue, detok=Detokenizer(self.tokenizer), output=CompletionText(params.stop),
                       generator=request_generator(params, self.device))
        self._submit(seq)
        try:
            async for delta in stream.deltas():
                yield delta
        finally:
            if not stream.ended:  # the client went away: free its batch row at the next step
                seq.cancelled = True
                self.wake.set()

    async def prefetch(self, adapter: str) -> float:
        future = self.tiers.request(adapter)
        if future is None:
            self.counters.add(adapter, host_hits=1)
            return 0.0
        return await asyncio.wrap_future(future)

    def stats(self) -> dict[str, dict[str, float]]:
        return self.counters.snapshot()

    @property
    def pending(self) -> int:
        """Requests submitted but not yet admitted into the batch."""
        return self.scheduler.pending

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

    def residency(self) -> dict[str, str]:
        """Adapter id -> "device" or "host": where this engine holds each adapter now (the replica's metrics)."""
        return self.tiers.residency()

    def held_resources(self) -> dict[str, float]:
        """Running rows, queued requests, adapter slots held by requests, KV cache bytes of the running batch."""
        batch = self.batch  # read once: the decode thread may replace it meanwhile
        layers = _layers(batch.cache) if batch is not None else []
        kv_bytes = sum(tensor.numel() * tensor.element_size() for layer in layers
                       for tensor in (layer.keys, layer.values) if tensor is not None)
        return {"rows": float(len(self.rows)), "pending": float(self.pending),
                "slots_held": float(self.tiers.slots_held()), "kv_bytes": float(kv_bytes)}

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
        self.scheduler.submit(seq)
        self.counters.add(seq.key, requests=1)
        if seq.adapter is not None and self.tiers.request(seq.adapter) is None:  # loading starts now, off the loop
            self.counters.add(seq.adapter, host_hits=1)
        self.wake.set()

    # ------------------------------------------------------------------ decode loop
    def _loop(self) -> None:
        try:
            while not self.stopping:
                self.scheduler.drain()
                for seq, error in self.scheduler.unloadable():
                    self._send(seq, error)
                width = self.batch.mask.shape[1] if self.batch is not None and self.rows else 0
                admitted = self.scheduler.admit(self.rows, width)
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
            for seq in self.rows + self.scheduler.queued():
                self._send(seq, EngineError(f"engine failure: {error}"))
            self._flush()
            raise

    def _guarded(self, step: Callable[..., None], *args: object, victims: list[Sequence]) -> None:
        """Run one step; if it raises, fail its requests (not the replica's others, not the replica)."""
        try:
            with torch.inference_mode():
                step(*args)
        except Exception as error:
            log.exception("engine step failed")
            failure = f"generation failed: {type(error).__name__}: {error}"
            failed = {id(seq) for seq in victims}
            for seq in list(victims):
                if not seq.finished:
                    self._finish(seq, None, error=EngineError(failure))
            if any(id(seq) in failed for seq in self.rows):  # the running batch's cache may be half-updated
                for seq in self.rows:
                    if not seq.finished:
                        self._finish(seq, None, error=EngineError(failure))
                self.rows, self.batch = [], None

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
        self.tiers.lora.set_batch([seq.slot for seq in new], tokens_per_row=width)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache(),
                         use_cache=True, logits_to_keep=torch.tensor(last, device=self.device))
        column = {position: index for index, position in enumerate(last)}
        last_columns = torch.tensor([column[n - 1] for n in lengths], device=self.device)
        logits = out.logits[torch.arange(len(new), device=self.device), last_columns]
        self._join(new, BatchCache(out.past_key_values, mask))
        self._sample_and_emit(new, logits)

    def _join(self, new: list[Sequence], cache: BatchCache) -> None:
        """The prefilled rows join the running batch."""
        if self.batch is None or not self.rows:
            self.rows, self.batch = list(new), cache
            return
        self.batch.merge(cache)
        self.rows.extend(new)

    def _decode(self) -> None:
        self._drop_finished()  # clients that went away since the last step
        if not self.rows:
            return
        assert self.batch is not None
        ids = torch.tensor([[seq.out_ids[-1]] for seq in self.rows], device=self.device)
        positions = torch.tensor([[seq.position] for seq in self.rows], device=self.device)
        mask = self.batch.add_column()
        self.tiers.lora.set_batch([seq.slot for seq in self.rows])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.batch.cache,
                         use_cache=True)
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        self.peak_adapters = max(self.peak_adapters, len({seq.key for seq in self.rows}))
        self._sample_and_emit(self.rows, out.logits[:, -1])
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [row for row, seq in enumerate(self.rows) if not seq.finished and not seq.cancelled]
        for seq in self.rows:
            if seq.cancelled and not seq.finished:
                seq.finished = True
                self.tiers.release(seq.slot)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.batch = [], None
            return
        assert self.batch is not None
        self.batch.keep(keep)
        self.rows = [self.rows[row] for row in keep]

    # ------------------------------------------------------------------ tokens to text, stop rules, delivery
    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = next_tokens(logits, [(seq.params, seq.generator) for seq in seqs])
        for seq, token in zip(seqs, tokens):
            if seq.cancelled:
                continue
            seq.out_ids.append(token)
            self._advance(seq, token)

    def _advance(self, seq: Sequence, token: int) -> None:
        if token in self.eos_ids:
            self._finish(seq, "stop", drop_last=True)
            return
        seq.output.extend(seq.detok.step(token))
        if seq.output.cut_at_stop():
            self._finish(seq, "stop")
            return
        if len(seq.out_ids) >= seq.params.max_tokens:
            self._finish(seq, "length")
            return
        ready = seq.output.take_ready() if seq.params.stream else ""
        if ready:
            self._send(seq, Delta(text=ready, token_ids=seq.out_ids[seq.tokens_sent:],
                                  prompt_tokens=len(seq.prompt_ids),
                                  completion_tokens=len(seq.out_ids)))
            seq.tokens_sent = len(seq.out_ids)

    def _finish(self, seq: Sequence, reason: str | None, drop_last: bool = False,
                error: BaseException | None = None) -> None:
        seq.finished = True
        self.tiers.release(seq.slot)
        seq.slot = 0
        if error is not None:
            self._send(seq, error)
            return
        if drop_last:  # EOS: what the decoder still holds (an unfinished multi-byte character) ends the text
            seq.output.extend(seq.detok.held())
        completion = len(seq.out_ids) - (1 if drop_last else 0)
        self.counters.add(seq.key, prompt_tokens=len(seq.prompt_ids), completion_tokens=completion)
        self._send(seq, Delta(text=seq.output.take_rest(), token_ids=seq.out_ids[seq.tokens_sent: completion],
                              finish_reason=reason, prompt_tokens=len(seq.prompt_ids), completion_tokens=completion))
        seq.tokens_sent = completion

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


def _deliver(items: list[tuple[Sequence, Delta | BaseException]]) -> None:
    for seq, item in items:
        seq.stream.put_nowait(item)


def build_engine(spec: BaseModelSpec, precision: str | QuantizationSettings, device: str, fetch: AdapterFetcher,
                 settings: BatchingEngineConfig, max_context_tokens: int | None = None) -> BatchingEngine:
    """Load `spec` (4-bit nf4, bf16 or fp32; or exactly as a job's QuantizationSettings hold it, as evaluation does)
    on `device` and start an engine over it."""
    resolved = resolve_device(device)
    if isinstance(precision, QuantizationSettings):
        quant = precision
    elif precision == "4bit":
        quant = QuantizationSettings()
    else:
        quant = QuantizationSettings(load_in_4bit=False, compute_dtype="bfloat16" if precision == "bf16" else "float32")
    model = load_base_model(spec, quant, resolved)
    tokenizer = load_tokenizer(spec)
    context = max_context_tokens or int(getattr(model.config, "max_position_embeddings", 2048))
    return BatchingEngine(model, tokenizer, fetch, settings, context, list(spec.all_linear_modules))
