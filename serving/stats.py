"""Per-adapter counters of one engine, written from several threads and read as one consistent snapshot.

Client event loops count requests and host-memory hits, loader threads count adapter loads, and the
decode thread counts accelerator-slot hits and tokens; one lock guards them all.
"""

from __future__ import annotations

import threading
from collections import defaultdict

BASE = ""  # the key of requests without an adapter


class AdapterStats:
    """Counters per adapter id ("" for the base model): requests, prompt/completion tokens, loads, load_s, hits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, adapter: str, **amounts: float) -> None:
        """Add each of `amounts` to `adapter`'s counter of that name (one atomic update)."""
        with self._lock:
            counters = self._counters[adapter]
            for name, amount in amounts.items():
                counters[name] += amount

    def snapshot(self) -> dict[str, dict[str, float]]:
        """A copy of every counter, taken at one instant."""
        with self._lock:
            return {adapter: dict(counters) for adapter, counters in self._counters.items()}
