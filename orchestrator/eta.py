"""The sweep's ETA (pure functions): plan's time for each unfinished unit, scaled by how long finished ones took against
their plan, scheduled on the slots the cluster has."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

ALL_KINDS = "*"  # the key of `time_ratios`' ratio pooled over every kind


class HasKind(Protocol):
    """What the ETA needs to know of a job or unit besides its planned time: its kind (train, evaluate_base, ...)."""

    @property
    def kind(self) -> str: ...


Unit = TypeVar("Unit", bound=HasKind)
Demanding = TypeVar("Demanding")


@dataclass(frozen=True)
class JobTiming:
    """An unfinished job as the ETA sees it: its kind, plan's time for it, and how long it has run (0 when queued)."""

    kind: str
    planned_s: float
    elapsed_s: float = 0.0


def eta_now(submitted: Sequence[tuple[Unit, float]], queued: Sequence[Unit], plan: Callable[[Unit], float],
            ratios: Mapping[str, float], slots: int) -> float | None:
    """`estimate_eta_s` of the driver's state: `submitted` units (oldest first, with seconds since submission) of which
    the first `slots` run while the rest wait in Ray like the `queued` ones; `plan` gives a unit's planned seconds."""
    running = [JobTiming(unit.kind, plan(unit), elapsed) for unit, elapsed in submitted[:slots]]
    waiting = [JobTiming(unit.kind, plan(unit)) for unit in (*(unit for unit, _ in submitted[slots:]), *queued)]
    return estimate_eta_s(running, waiting, ratios, slots)


def time_ratios(finished: Iterable[tuple[str, float, float]]) -> dict[str, float]:
    """Observed actual / planned time per job kind over finished jobs given as (kind, planned s, actual s), and under
    ALL_KINDS the same pooled over every kind; kinds with no planned time are left out ({} when nothing finished)."""
    planned: dict[str, float] = {}
    actual: dict[str, float] = {}
    for kind, plan_s, actual_s in finished:
        for key in (kind, ALL_KINDS):
            planned[key] = planned.get(key, 0.0) + plan_s
            actual[key] = actual.get(key, 0.0) + actual_s
    return {key: actual[key] / planned[key] for key in planned if planned[key] > 0}


def estimate_eta_s(running: Sequence[JobTiming], queued: Sequence[JobTiming], ratios: Mapping[str, float],
                   slots: int) -> float | None:
    """Seconds until the last of `running` and `queued` ends. Each job takes plan's time times the observed ratio of its
    kind (`time_ratios`; the pooled one for a kind none of which finished yet), less what it already ran; `slots` jobs
    run at once: `running` first, then `queued` in order, each on the slot that frees first. None before any job
    finished (no ratio to correct plan by)."""
    if ALL_KINDS not in ratios:
        return None
    free_at = [0.0] * max(slots, 1, len(running))
    for job in (*running, *queued):
        left = max(job.planned_s * ratios.get(job.kind, ratios[ALL_KINDS]) - job.elapsed_s, 0.0)
        heapq.heapreplace(free_at, free_at[0] + left)
    return max(free_at)


def running_now(submitted: Sequence[Demanding], demand: Callable[[Demanding], Mapping[str, float]],
                capacity: Mapping[str, float]) -> int:
    """How many of the `submitted` units (oldest first) the cluster runs at once: the longest prefix whose demands fit
    in `capacity` (at least one while any is submitted)."""
    used: Counter[str] = Counter()
    for count, unit in enumerate(submitted):
        used.update(demand(unit))
        if any(amount > capacity.get(name, 0.0) + 1e-9 for name, amount in used.items() if amount > 0):
            return max(count, 1)
    return len(submitted)
