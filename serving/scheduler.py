"""Which waiting requests join the running batch, and when.

Requests come in on any thread through a bounded queue (`max_queued_requests`, beyond it
`EngineOverloaded`). The decode thread admits them between forward passes: round-robin over adapters
with waiting requests, an adapter already holding `max_running_per_adapter` rows yields while others
wait, only adapters that have a free accelerator slot and are in host memory are admitted (loads
run off the decode loop), one iteration prefills at most `PREFILL_TOKEN_BUDGET` prompt tokens, and the batch's
padded KV cache stays within `max_batch_tokens`: the batching engine pads every row's cache to the widest (a merge pads
the narrower cache, each decode step adds a column to every row), so a request is admitted only while rows x the widest
the cache can grow to (its width once the request joins, plus the most tokens any row may still generate) fits: one
long request cannot multiply KV memory by the batch's rows. An empty batch takes any request that fits the context;
a request that does not fit holds back the others until rows leave, so it never starves.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field

import torch

from serving.detok import CompletionText, Detokenizer
from serving.engine import AdapterLoadError, Delta, EngineOverloaded, SamplingParams
from serving.stats import BASE
from serving.tiers import AdapterTiers

PREFILL_TOKEN_BUDGET = 8192  # prompt tokens prefilled in one iteration, so decoding rows are not stalled long


@dataclass(eq=False)
class Sequence:
    """One request inside the engine, from submission until its last delta."""

    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop  # the client's event loop and stream
    stream: asyncio.Queue[Delta | BaseException]
    detok: Detokenizer
    output: CompletionText
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    slot: int = 0
    tokens_sent: int = 0  # tokens of `out_ids` already streamed
    cancelled: bool = False
    finished: bool = False

    @property
    def position(self) -> int:
        """Position id of the token fed to the model next (the newest output token)."""
        return len(self.prompt_ids) + len(self.out_ids) - 1

    @property
    def key(self) -> str:
        """The adapter id, "" for the base model (the stats key)."""
        return self.adapter or BASE


def remaining(seq: Sequence) -> int:
    """Tokens the request may still generate (each one a new cache column for every row)."""
    return seq.params.max_tokens - len(seq.out_ids)


class Scheduler:
    """Admission into the running batch (see the module docstring)."""

    def __init__(self, tiers: AdapterTiers, max_batch_size: int, max_running_per_adapter: int,
                 max_queued_requests: int, max_batch_tokens: int) -> None:
        self.tiers = tiers
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_running_per_adapter = max_running_per_adapter
        self.max_queued_requests = max_queued_requests
        self.inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # per adapter key, decode thread only
        self._pending = 0  # submitted but not yet admitted
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Requests submitted but not yet admitted (or failed)."""
        with self._lock:
            return self._pending

    # ---- any thread
    def submit(self, seq: Sequence) -> None:
        """Queue `seq` for admission; EngineOverloaded when `max_queued_requests` are waiting already."""
        with self._lock:
            if self._pending >= self.max_queued_requests:
                raise EngineOverloaded(f"{self._pending} requests are already waiting (max_queued_requests)",
                                       retry_after_s=1.0)
            self._pending += 1
        self.inbox.put(seq)

    # ---- decode thread
    def drain(self) -> None:
        """Move newly submitted requests to their adapter's waiting queue."""
        while True:
            try:
                seq = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.waiting.setdefault(seq.key, deque()).append(seq)

    def unloadable(self) -> list[tuple[Sequence, AdapterLoadError]]:
        """The waiting requests whose adapter failed to load (now dequeued), each with its error."""
        failed: list[tuple[Sequence, AdapterLoadError]] = []
        for adapter, message in self.tiers.take_failures().items():
            for seq in self.waiting.pop(adapter, deque()):
                self._dequeued()
                failed.append((seq, AdapterLoadError(message)))
        return failed

    def queued(self) -> list[Sequence]:
        """Every request waiting for admission."""
        return [seq for waiting in self.waiting.values() for seq in waiting]

    def admit(self, rows: list[Sequence], width: int = 0) -> list[Sequence]:
        """Round-robin over adapters with waiting requests until the batch, the prefill budget or the KV budget is
        full (`width`: the running batch's cache columns now)."""
        free = self.max_batch_size - len(rows)
        running: dict[str, int] = defaultdict(int)
        for seq in rows:
            running[seq.key] += 1
        admitted: list[Sequence] = []
        budget = PREFILL_TOKEN_BUDGET
        most_remaining = max((remaining(seq) for seq in rows), default=0)
        progress = True
        while free > 0 and budget > 0 and progress:
            progress = False
            for key in list(self.waiting):
                waiting = self._live_queue(key)
                if not waiting:
                    continue
                others_wait = len(self.waiting) > 1
                if free == 0 or budget <= 0 or (others_wait and running[key] >= self.max_running_per_adapter):
                    continue
                seq = waiting[0]
                count = len(rows) + len(admitted)
                joined, most = max(width, len(seq.prompt_ids)), max(most_remaining, seq.params.max_tokens)
                if count > 0 and (count + 1) * (joined + most) > self.max_batch_tokens:
                    return admitted  # nothing more joins until rows leave and it fits: a long request never starves
                slot = self.tiers.acquire(seq.adapter)
                if slot is None:  # loading off this loop (again, if host memory evicted it), or every slot is busy
                    if seq.adapter is not None:
                        self.tiers.request(seq.adapter)
                    continue
                waiting.popleft()
                self._dequeued()
                seq.slot = slot
                admitted.append(seq)
                running[key] += 1
                free -= 1
                budget -= len(seq.prompt_ids)
                width, most_remaining = joined, most
                progress = True
                self.waiting.move_to_end(key)  # the next round starts with the adapters that waited longest
        return admitted

    def _live_queue(self, key: str) -> deque[Sequence]:
        """`key`'s waiting queue without the cancelled requests at its head; dropped when empty."""
        waiting = self.waiting[key]
        while waiting and waiting[0].cancelled:
            waiting.popleft()
            self._dequeued()
        if not waiting:
            del self.waiting[key]
        return waiting

    def _dequeued(self) -> None:
        with self._lock:
            self._pending -= 1
