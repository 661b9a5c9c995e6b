"""Hot adapters across replicas: how many replicas of a base serve an adapter, and which one a request goes to.

Ray Serve's multiplexed routing sends a model id to the replicas that already hold it (falling back to the replica
with the fewest models only after a 1-2 s wait), so an adapter's requests stick to the replica that loaded it first:
a hot adapter pins one replica while the others idle. The ingress therefore routes by a *routing id* rather than the
adapter id:

- an adapter's share of its base's recent requests (`RequestRates`, exponentially decayed) decides its copies,
  `copies_for(share, replicas, bounds, replica_share)`: `ceil(share * replicas / replica_share)`, within the
  adapter's (or its task's) configured floor and ceiling, at most the replica count. The long tail gets 1;
- 1 copy: the routing id is the adapter id (Serve's stickiness, as before);
- k copies, fewer than the replicas: `<adapter>#<i>` for i in 0..k-1, in turn: each suffixed id is a model id of its
  own, which Serve places on the replica with the fewest models when it is new, so the copies land on different
  replicas while replicas have room;
- as many copies as replicas: no routing id at all (""), so Serve balances the requests over every replica by queue
  length (power of two choices), as it does for the base model. The replica reads the adapter from the call's
  argument (`BaseModelServer.generate`) and loads it where it lands.

A replica maps a routing id back to the adapter with `adapter_of`; `#` never occurs in adapter ids
(`loraland-<task>/<version>`, task names are `[A-Za-z0-9_.-]`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from serving.adapters import ADAPTER_ID
from serving.config import HotAdapterSettings, ReplicaBounds

COPY_SEPARATOR = "#"
ANY_REPLICA = ""  # no multiplexed model id: Serve balances over every replica
DEFAULT_BOUNDS = ReplicaBounds()
MIN_EVIDENCE = 20.0  # recent requests a share is taken over at least: the first requests after a start are not "hot"


def copies_for(share: float, replicas: int, bounds: ReplicaBounds, replica_share: float) -> int:
    """Replicas that should serve an adapter taking `share` (0..1) of its base's requests, out of `replicas`:
    one per `replica_share` of a replica's even share (1 / replicas), within `bounds`, at least 1, at most
    `replicas`."""
    wanted = math.ceil(share * replicas / replica_share - 1e-9)
    floor = min(bounds.min_replicas, replicas)
    ceiling = min(bounds.max_replicas or replicas, replicas)
    return max(1, floor, min(ceiling, wanted))


def routing_id(adapter: str, copy: int) -> str:
    """The multiplexed model id of copy `copy` (0-based) of `adapter`: the adapter id itself for copy 0."""
    return adapter if copy == 0 else f"{adapter}{COPY_SEPARATOR}{copy}"


def adapter_of(routing: str) -> str:
    """The adapter id a routing id names ("" stays "")."""
    return routing.split(COPY_SEPARATOR, 1)[0]


def task_of(adapter: str) -> str:
    """The task of an adapter id `loraland-<task>/<version>` ("" when it is not one)."""
    match = ADAPTER_ID.match(adapter)
    return match["task"] if match else ""


class RequestRates:
    """Exponentially decayed request counts per key (half-life `half_life_s`), and each key's share of them all."""

    def __init__(self, half_life_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.decay_per_s = math.log(2) / half_life_s
        self.clock = clock
        self.counts: dict[str, float] = {}
        self.total = 0.0
        self.updated = clock()

    def _decay(self, now: float) -> None:
        factor = math.exp(-self.decay_per_s * max(0.0, now - self.updated))
        self.updated = now
        if factor < 1.0:
            self.total *= factor
            for key in list(self.counts):
                self.counts[key] *= factor
                if self.counts[key] < 1e-3:  # forgotten: keeps the map as small as the recent traffic
                    del self.counts[key]

    def record(self, key: str) -> float:
        """Count one request for `key`; returns its share of all recent requests (this one included), taken over at
        least MIN_EVIDENCE requests."""
        self._decay(self.clock())
        self.counts[key] = self.counts.get(key, 0.0) + 1.0
        self.total += 1.0
        return self.counts[key] / max(self.total, MIN_EVIDENCE)


class HotAdapterRouter:
    """One base model's routing: the routing id of each request (see the module docstring). Thread-safe."""

    def __init__(self, settings: HotAdapterSettings, replicas: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.replicas = replicas
        self.rates = RequestRates(settings.half_life_s, clock)
        self.turn: dict[str, int] = {}
        self.copies: dict[str, int] = {}  # the last decision per adapter (for the metrics)
        self.lock = threading.Lock()

    def bounds(self, adapter: str) -> ReplicaBounds:
        """The adapter's own bounds, else its task's, else 1..all."""
        configured = self.settings.adapters
        return configured.get(adapter) or configured.get(task_of(adapter)) or DEFAULT_BOUNDS

    def route(self, adapter: str | None) -> str:
        """The routing id of one request for `adapter` (None: the base model, any replica)."""
        with self.lock:
            share = self.rates.record(adapter or "")
            if adapter is None:
                return ANY_REPLICA
            copies = copies_for(share, self.replicas, self.bounds(adapter), self.settings.replica_share)
            self.copies[adapter] = copies
            if copies >= self.replicas and self.replicas > 1:
                return ANY_REPLICA
            turn = self.turn.get(adapter, -1) + 1
            self.turn[adapter] = turn
            return routing_id(adapter, turn % copies)
