"""Where an engine's adapters live: accelerator slots, host memory, local disk.

- Accelerator slots (`LoraSlots`): the adapters the next forward pass can use; LRU over slots no
  running request holds, pinned adapters never leave. Touched by the decode thread only.
- Host memory: an LRU of adapters read and checked (`serving.lora.read_adapter`), pinned ones kept;
  loads run on loader threads, off the decode loop, and wake it when done.
- Local disk: whatever the replica's `AdapterFetcher` caches.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import OrderedDict

import torch
from transformers import PreTrainedModel

from serving.config import BatchingEngineConfig
from serving.engine import AdapterFetcher, AdapterLoadError, EngineError
from serving.lora import AdapterFormatError, AdapterWeights, LoraSlots, read_adapter
from serving.stats import AdapterStats

DEVICE_SLOT_MEMORY_FRACTION = 0.1  # of free accelerator memory, when device_adapter_slots is 0
CPU_DEFAULT_SLOTS = 64


def adapter_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype adapters are held in: the model's floating-point dtype, else float32 (e.g. under 4-bit weights)."""
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def slot_count(model: PreTrainedModel, targets: list[str], settings: BatchingEngineConfig, dtype: torch.dtype) -> int:
    """Accelerator slots: as configured, else a share of free GPU memory (at most the host tier), else a CPU default."""
    if settings.device_adapter_slots:
        return settings.device_adapter_slots
    if next(model.parameters()).is_cuda:
        free, _ = torch.cuda.mem_get_info()
        per_slot = LoraSlots.slot_bytes(model, targets, settings.max_lora_rank, dtype)
        return max(1, min(settings.host_adapter_slots, int(free * DEVICE_SLOT_MEMORY_FRACTION // max(per_slot, 1))))
    return min(settings.host_adapter_slots, CPU_DEFAULT_SLOTS)


class AdapterTiers:
    """Host-memory LRU of adapters with loads on a thread pool; accelerator slots LRU over idle slots."""

    def __init__(self, slots: LoraSlots, fetch: AdapterFetcher, settings: BatchingEngineConfig, dtype: torch.dtype,
                 wake: threading.Event, stats: AdapterStats) -> None:
        self.lora = slots
        self.fetch = fetch
        self.host_capacity = settings.host_adapter_slots
        self.pinned = set(settings.pinned_adapters)
        self.dtype = dtype
        self.wake = wake  # set when a load ends, so the decode loop admits (or fails) the requests waiting for it
        self.stats = stats
        self.layer_shapes = {name: (layer.in_features, layer.out_features) for name, layer in slots.layers.items()}
        self.pin = next(iter(slots.layers.values())).lora_a.is_cuda  # page-locked host copies for async copies to a GPU
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.loader_threads, thread_name_prefix="adapter-loader")
        self.lock = threading.Lock()  # guards the host tier (host, loading, failed)
        self.host: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.loading: dict[str, concurrent.futures.Future[float]] = {}
        self.failed: dict[str, str] = {}
        self.slot_of: dict[str, int] = {}
        self.owner: list[str | None] = [None] * (slots.slots + 1)
        self.refs = [0] * (slots.slots + 1)
        self.slot_lru: OrderedDict[int, None] = OrderedDict()

    @classmethod
    def for_model(cls, model: PreTrainedModel, targets: list[str], fetch: AdapterFetcher,
                  settings: BatchingEngineConfig,
                  wake: threading.Event, stats: AdapterStats) -> AdapterTiers:
        """Wrap `targets` of `model` with adapter slots (sized by `slot_count`) and build the tiers over them."""
        dtype = adapter_dtype(model)
        slots = LoraSlots(model, targets, slot_count(model, targets, settings, dtype), settings.max_lora_rank, dtype)
        return cls(slots, fetch, settings, dtype, wake, stats)

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
        future.add_done_callback(lambda done: self._loaded(adapter, done))
        return future

    def _load(self, adapter: str) -> float:
        started = time.perf_counter()
        weights = self._read(adapter)
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
        self.stats.add(adapter, loads=1, load_s=seconds)
        return seconds

    def _read(self, adapter: str) -> AdapterWeights:
        """Fetch and read an adapter; every failure as an AdapterLoadError naming it."""
        try:
            return read_adapter(self.fetch(adapter), self.layer_shapes, self.lora.max_rank, self.dtype)
        except AdapterFormatError as error:
            raise AdapterLoadError(f"adapter {adapter!r} is not servable: {error}") from error
        except EngineError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            raise AdapterLoadError(f"adapter {adapter!r} could not be fetched: {reason}") from error

    def _loaded(self, adapter: str, future: concurrent.futures.Future[float]) -> None:
        with self.lock:
            self.loading.pop(adapter, None)
            error = future.exception()
            if error is not None:
                self.failed[adapter] = str(error)
        self.wake.set()

    def take_failures(self) -> dict[str, str]:
        """Adapters whose load failed since the last call, with the reason."""
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
            self.stats.add(adapter, device_hits=1)
        else:
            weights = self._host_weights(adapter)
            slot = self._free_slot() if weights is not None else None
            if weights is None or slot is None:
                return None
            self.lora.load(slot, weights)
            self.slot_of[adapter] = slot
            self.owner[slot] = adapter
        self.refs[slot] += 1
        self.slot_lru[slot] = None
        self.slot_lru.move_to_end(slot)
        return slot

    def _host_weights(self, adapter: str) -> AdapterWeights | None:
        with self.lock:
            return self.host.get(adapter)

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used slot no request holds and no pinned adapter owns (evicted)."""
        for slot in range(1, len(self.owner)):
            if self.owner[slot] is None:
                return slot
        for slot in self.slot_lru:  # least recently used first
            owner = self.owner[slot]
            if owner is not None and self.refs[slot] == 0 and owner not in self.pinned:
                del self.slot_of[owner]
                self.owner[slot] = None
                return slot
        return None

    def release(self, slot: int) -> None:
        """A request holding `slot` has ended (slot 0, the base model, is never counted)."""
        if slot:
            self.refs[slot] -= 1

    def slots_held(self) -> int:
        """Accelerator slots that running requests hold now (0 once none runs)."""
        return sum(self.refs)

    def held_on_device(self) -> list[str]:
        """Adapters in accelerator slots now."""
        return [owner for owner in self.owner if owner is not None]

    def residency(self) -> dict[str, str]:
        """Every adapter this engine holds, with its fastest tier: "device" (an accelerator slot) or "host"."""
        with self.lock:
            where = {adapter: "host" for adapter in self.host}
        return where | {adapter: "device" for adapter in self.held_on_device()}

    def measure_slot_copy(self, adapter: str) -> float:
        """Seconds one host -> slot copy of `adapter` (in host memory) takes, synchronised on a GPU.

        For benchmarks: the copy goes into a slot that stays free afterwards (evicting the least recently
        used idle adapter if none is empty), so admission sees the tiers as before. Call it from the decode
        thread or while the engine is idle."""
        weights = self._host_weights(adapter)
        if weights is None:
            raise ValueError(f"adapter {adapter!r} is not in host memory; prefetch it first")
        slot = self._free_slot()
        if slot is None:
            raise RuntimeError("every accelerator slot is held by a running request")
        started = time.perf_counter()
        self.lora.load(slot, weights)
        if self.pin:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def shutdown(self) -> None:
        """Stop the loader threads (queued loads are cancelled)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
