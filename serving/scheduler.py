"""Which waiting requests join the running batch, and when.

Requests come in on any thread through a bounded queue (`max_queued_requests`, beyond it
`EngineOverloaded`). The decode thread admits them between forward passes: round-robin over adapters
with waiting requests, an adapter already holding `max_running_per_adapter` rows yields while others
wait, only adapters that have a free accelerator slot and are in host memory are admitted (loads
run off the decode loop), and one iteration prefills at most `PREFILL_TOKEN_BUDGET` prompt tokens.
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


class Scheduler:
    """Admission into the running batch (see the module docstring)."""

    def __init__(self, tiers: AdapterTiers, max_batch_size: int, max_running_per_adapter: int,
                 max_queued_requests: int) -> None:
        self.tiers = tiers
        self.max_batch_size = max_batch_size
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

    def admit(self, rows: list[Sequence]) -> list[Sequence]:
        """Round-robin over adapters with waiting requests until the batch or the prefill budget is full."""
        free = self.max_batch_size - len(rows)
        running: dict[str, int] = defaultdict(int)
        for seq in rows:
            running[seq.key] += 1
        admitted: list[Sequence] = []
        budget = PREFILL_TOKEN_BUDGET
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
