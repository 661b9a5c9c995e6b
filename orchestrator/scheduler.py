"""The scheduler: runs a sweep's work units on Ray and returns each job's outcome.

A unit (`orchestrator.units.WorkUnit`) is one Ray task (or actor call) standing for one or more jobs. The scheduler
needs of it a key, the jobs it stands for, its Ray demand, plan's seconds for it, a way to submit one attempt, how its
Ray result, or its failure, becomes one outcome per job, and the units that follow it. Units: `SingleJob` (one job, one
task), `CoTrainGroup` (a base model's fine-tunes trained together in one task), `EvaluationUnit` (one job's evaluation
through its base model's evaluator actor, orchestrator/evaluator.py) and the search's `SearchJob`.

Follow-ups: a unit that finished may hand on units (`follow_ups`): a fine-tune that only trained (its sweep evaluates
through evaluators) hands on its evaluation, and gives its job no outcome yet, so the job counts as finished only once
its evaluation is recorded. Follow-ups go to the front of the queue (an evaluation asks nothing of the cluster: its
evaluator holds the resources, so it goes out at once); their jobs count as running meanwhile.

Units go out in the order given. The scheduler holds the queue and keeps submitted to Ray what the cluster holds now
plus `queue_ahead` of it (re-read from `ray.cluster_resources()` as units end, so concurrency follows the cluster as
nodes join or go); Ray starts each submitted unit wherever its resources are free, and the few waiting in Ray start the
moment a slot frees. A resubmitted unit goes to the front of the queue, so one interrupted by a lost node restarts
before the units that never started, not behind all of them (Ray core has no task priorities). The autoscaler is asked
for room for every unfinished unit (`request_resources`), so it scales for the whole sweep, not only for what is
submitted.

Retries are the scheduler's, not Ray's (tasks run with `max_retries=0`), because Ray counts a lost node and a crashing
job against one budget. Here a unit whose node died (`NodeDiedError`: preemption, scale-down, a dead machine), or whose
evaluator actor died with its node or is unreachable for now (`ActorDiedError` whose GCS record says NODE_DIED,
`ActorUnavailableError`: `evaluator.actor_failure`), is resubmitted without touching `retries.max_failures` (up to
`retries.max_node_losses`, unlimited by default); any other failure (the task raised, its worker process crashed or ran
out of memory, an evaluator's process died or its constructor raised) counts, and past
`max_failures` retries the unit's jobs end failed with its error and the sweep goes on. The progress line counts jobs,
not units: a group of five running is five jobs running.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.cluster import request_capacity
from orchestrator.config import RetrySettings
from orchestrator.eta import eta_now, running_now, time_ratios
from orchestrator.evaluator import actor_failure
from orchestrator.notes import console, progress_line
from orchestrator.units import EVALUATION, JobOutcome, WorkUnit

PROGRESS_EVERY_S = 10.0
WAIT_S = 1.0  # how often the scheduler looks for results and for capacity that joined


@dataclass(frozen=True)
class SchedulerSettings:
    """How `run_units` runs: the retry rules, the sweep's job count and the outcomes it had before (both for the
    progress line), the queue-ahead fraction, and `on_result(unit, result)`, called with each finished unit's dict."""

    retries: RetrySettings
    total: int
    queue_ahead: float = 1.0
    earlier: Mapping[str, JobOutcome] = field(default_factory=dict)
    on_result: Callable[[WorkUnit, dict[str, Any]], None] | None = None
    lease_check: Callable[[], None] | None = None  # raises (one line) once this driver may no longer submit


def run_units(units: Sequence[WorkUnit], settings: SchedulerSettings) -> dict[str, JobOutcome]:
    """Run `units` in their order by the rules of the module doc, printing a line per unit that ends and the progress
    every PROGRESS_EVERY_S; returns the outcome of each of their jobs by job key."""
    run = SchedulerRun(units, settings)
    try:
        while run.queue or run.pending:
            run.step()
    finally:
        with contextlib.suppress(Exception):  # Ray itself may be what failed; never hide the error that ended the loop
            request_capacity([])
    return run.outcomes


class SchedulerRun:
    """The state of one `run_units`: the queue, the attempts in Ray, the retry counts and the outcomes so far."""

    def __init__(self, units: Sequence[WorkUnit], settings: SchedulerSettings) -> None:
        self.settings = settings
        self.queue: deque[WorkUnit] = deque(units)
        self.pending: dict[Any, WorkUnit] = {}  # ObjectRef -> unit
        self.submitted_at: dict[Any, float] = {}
        self.timings: list[tuple[str, float, float]] = []  # (kind, planned s, actual s) of each unit finished here
        self.failures: Counter[str] = Counter()
        self.node_losses: Counter[str] = Counter()
        self.outcomes: dict[str, JobOutcome] = {}
        self.last_print = 0.0

    def step(self) -> None:
        """Fill the window, wait up to WAIT_S for a result and take what came, print the progress when it is due."""
        import ray

        if self.settings.lease_check:  # every step, also with nothing left to submit: a fenced driver stops
            self.settings.lease_check()
        submit_window(self.queue, self.pending, self.settings.queue_ahead, ray.cluster_resources(),
                      self.settings.lease_check)
        now = time.monotonic()
        self.submitted_at.update({ref: now for ref in self.pending if ref not in self.submitted_at})
        if now - self.last_print >= PROGRESS_EVERY_S:
            request_capacity([unit.demand for unit in (*self.pending.values(), *self.queue)])
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=WAIT_S)
        for ref in ready:
            self.collect(ref)
        now = time.monotonic()
        if now - self.last_print >= PROGRESS_EVERY_S or not (self.pending or self.queue):
            self.last_print = now
            console.print(self.progress(now, ray.cluster_resources()), soft_wrap=True)

    def collect(self, ref: Any) -> None:
        """The ended attempt `ref`: its unit finished, failed, or back at the front of the queue for another attempt."""
        import ray
        from ray.exceptions import NodeDiedError, RayActorError

        unit = self.pending.pop(ref)
        ran_s = time.monotonic() - self.submitted_at.pop(ref)
        try:
            try:
                result = ray.get(ref)
            except RayActorError as error:  # an evaluator lost with its node is a lost node; else a failure
                raise actor_failure(error) from error
        except NodeDiedError:
            self.node_losses[unit.key] += 1
            limit = self.settings.retries.max_node_losses
            if limit < 0 or self.node_losses[unit.key] <= limit:
                self.resubmit(unit, f"node lost {unit.label}: resubmitted (does not count toward max_failures)")
            else:
                self.end(unit, "failed", unit.failed(f"its node was lost {self.node_losses[unit.key]} times"))
        except Exception as error:  # the task raised, or its worker crashed: counts toward max_failures
            self.failures[unit.key] += 1
            message = last_line(error)
            if self.failures[unit.key] <= self.settings.retries.max_failures:
                retry = f"{self.failures[unit.key]}/{self.settings.retries.max_failures}"
                self.resubmit(unit, f"retry {retry} {unit.label}: {message}")
            else:
                self.end(unit, "failed", unit.failed(message))
        else:
            outcomes, follow_ups = unit.finished(result), unit.follow_ups(result)
            self.timings.append((unit.kind, unit.planned_s, float(result.get("wall_s", ran_s))))
            for line in unit.ended_lines(outcomes, result):
                console.print(line, soft_wrap=True)
            if self.settings.on_result:
                self.settings.on_result(unit, result)
            self.queue.extendleft(reversed(follow_ups))
            state = "trained" if follow_ups and not outcomes else "finished"
            if len(unit.jobs) == 1 and outcomes and outcomes[0].state == "failed":  # e.g. its adapter did not load
                state = "failed"
            self.end(unit, state, outcomes, result.get("node", ""))

    def resubmit(self, unit: WorkUnit, line: str) -> None:
        """`unit` back at the front of the queue (before the units that never started), saying why in `line`."""
        console.print(f"  {line}", soft_wrap=True)
        self.queue.appendleft(unit)

    def end(self, unit: WorkUnit, state: str, outcomes: list[JobOutcome], node: str = "") -> None:
        """Record the outcomes of an ended unit's jobs and print its line."""
        self.outcomes.update({outcome.job.job_key: outcome for outcome in outcomes})
        console.print(f"  {state:8s} {unit.label}" + (f" on node {node[:8]}" if node else ""), soft_wrap=True)

    def progress(self, now: float, capacity: Mapping[str, float]) -> str:
        """The progress line: jobs done and failed (earlier ones included), jobs submitted and queued, the ETA."""
        submitted = [(self.pending[ref], now - self.submitted_at[ref])
                     for ref in sorted(self.pending, key=self.submitted_at.__getitem__)]
        slots = running_now([unit for unit, _ in submitted], lambda unit: unit.demand, capacity)
        eta = eta_now(submitted, list(self.queue), lambda unit: unit.planned_s, time_ratios(self.timings), slots)
        evaluations = (jobs_in([u for u in self.pending.values() if u.kind == EVALUATION]),
                       jobs_in([u for u in self.queue if u.kind == EVALUATION]))
        return progress_line({**self.settings.earlier, **self.outcomes}, jobs_in(self.pending.values()),
                             jobs_in(self.queue), self.settings.total, eta, evaluations)


def submit_window(queue: deque[WorkUnit], pending: dict[Any, WorkUnit], queue_ahead: float,
                  capacity: Mapping[str, float], lease_check: Callable[[], None] | None = None) -> None:
    """Submit from the front of `queue` while, for each resource the next unit needs, the submitted units ask for less
    than (1 + queue_ahead) x the cluster's total of it (`capacity`); with nothing submitted, the next unit goes
    regardless (a cluster scaled to zero GPU nodes grows on demand). `lease_check` runs before each submission."""
    in_flight: Counter[str] = Counter()
    for unit in pending.values():
        in_flight.update(unit.demand)
    while queue:
        need = queue[0].demand
        limit = {name: (1 + queue_ahead) * capacity.get(name, 0.0) for name in need if need[name] > 0}
        if pending and any(in_flight[name] >= amount for name, amount in limit.items()):
            return
        if lease_check:
            lease_check()
        unit = queue.popleft()
        pending[unit.submit()] = unit
        in_flight.update(need)


def jobs_in(units: Collection[WorkUnit]) -> int:
    """How many jobs `units` stand for."""
    return sum(len(unit.jobs) for unit in units)


def last_line(error: BaseException) -> str:
    """An attempt's error in one line: the last line of its message (Ray's carries the worker's traceback), cut at 300
    characters; its type's name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[-1][:300] if lines else type(error).__name__
