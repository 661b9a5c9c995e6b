"""`loraland sweep`: the Ray driver that fans a sweep out over a cluster, exactly once per job.

Ray core tasks, not Tune: every job is one function call with its own resources (a GPU share from
`plan`), and the exactly-once state lives where it must survive a lost driver anyway: the job's MLflow
run (found by its job key) and its checkpoints on the storage path. Tune's experiment restore would be
a second, competing record of the same state.

Jobs go out base evaluations first (a fine-tune's lift needs its base score), then fine-tunes longest
first (plan's estimate; LPT keeps the longest job from starting last). The driver holds the queue and
keeps submitted to Ray what the cluster holds now plus `resources.queue_ahead` of it (re-read from
`ray.cluster_resources()` as jobs end, so concurrency follows the cluster as nodes join or go); Ray
starts each submitted job wherever its resources are free, and the few waiting in Ray start the moment
a slot frees. A resubmitted job goes to the front of the driver's queue, so a job interrupted by a lost
node restarts before the jobs that never started, not behind all of them (Ray core has no task
priorities). The autoscaler is asked for room for every unfinished job (`request_resources`), so it
scales for the whole sweep, not only for what is submitted.

Retries are the driver's, not Ray's (tasks run with `max_retries=0`), because Ray counts a lost node
and a crashing job against one budget. Here a job whose node died (`NodeDiedError`: preemption,
scale-down, a dead machine) is resubmitted without touching `retries.max_failures` (up to
`retries.max_node_losses`, unlimited by default); any other failure (the job raised, its worker process
crashed or ran out of memory) counts, and past `max_failures` retries the job ends failed with its
error and the sweep goes on. A resubmitted job reuses its MLflow run and resumes from its checkpoint.

With `resources.co_train`, a base model's unfinished fine-tunes go out in groups (`plan.co_train_groups`), each one Ray
task that trains its members together over one base (jobs/cotrain.py) with the group's memory as its GPU share; every
member keeps its own MLflow run, job key, adapter registration and champion update, and a member failing in the group
fails alone. A group is retried, or resubmitted after a node loss, as one job; it then skips finished members and
resumes the others from their checkpoints. The progress line counts a group's members as the jobs they are.

Run again after a crash, or submitted twice, the driver skips jobs whose run is FINISHED, closes
runs left RUNNING by killed workers, and resubmits the rest, which resume from their checkpoints. One
driver runs a sweep at a time (`tracking.store.sweep_lease` on the parent run): a second submission while
the first is alive stops in one line, before it touches a run.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from core.errors import ConfigError, Unreachable
from jobs.config import JobConfig
from jobs.storage import check_writable, first_line
from orchestrator.config import RetrySettings, SweepConfig, expand_jobs, storage_root
from orchestrator.plan import co_train_groups, job_gpu_hours, plan_group, plan_job, wall_hours
from orchestrator.signals import Terminated

console = Console(highlight=False)
PROGRESS_EVERY_S = 10.0
WAIT_S = 1.0  # how often the driver looks for results and for capacity that joined
RAY_CONNECT_TIMEOUT_S = 5.0  # how long `cluster_address` waits for RAY_ADDRESS's port to accept a connection
RAY_ADDRESS_FIX = ("start that cluster (`ray start --head`) and set RAY_ADDRESS to its GCS address (HEAD:6379) or Ray Client "
                   "address (ray://HEAD:10001), or unset RAY_ADDRESS to run on a local Ray")


@dataclass
class JobOutcome:
    """How a job ended in this driver run."""

    job: JobConfig
    state: str  # finished | skipped | failed
    score: float | None = None
    base_score: float | None = None
    error: str = ""
    node: str = ""  # Ray node id (hex) the finishing attempt ran on


def run_tracked_job(job: JobConfig, experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
    """What a worker runs: the job, logged to its MLflow run (reused on a retry); returns its score."""
    from jobs.run import run_job
    from tracking.tracker import JobTracker

    started = time.monotonic()
    with JobTracker.for_job(job, experiment_id, parent_run_id, uri) as tracker:
        result = run_job(job, on_step=tracker.on_step)
        tracker.finish(result)
    return {"score": result.score, "job_key": job.job_key, "node": this_node(), "wall_s": time.monotonic() - started}


def run_tracked_group(jobs: list[JobConfig], experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
    """What a worker runs for a co-training group: the members trained together (`jobs.cotrain.run_group`), each logged to
    its own MLflow run (reused on a retry) and ended FINISHED or, if it failed alone, FAILED with its error; returns each
    member's score or error by job key."""
    from jobs.cotrain import run_group
    from tracking.tracker import JobTracker

    started = time.monotonic()
    members: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        trackers = [stack.enter_context(JobTracker.for_job(job, experiment_id, parent_run_id, uri)) for job in jobs]
        for tracker, outcome in zip(trackers, run_group(jobs, on_step={i: t.on_step for i, t in enumerate(trackers)})):
            if outcome.job is not None:
                tracker.finish(outcome.job)
                members[outcome.config.job_key] = {"score": outcome.job.score}
            else:
                tracker.fail(outcome.error or "failed in its co-training group")
                members[outcome.config.job_key] = {"error": outcome.error or "failed in its co-training group"}
    return {"members": members, "node": this_node(), "wall_s": time.monotonic() - started}


def this_node() -> str:
    """The Ray node id of the calling task."""
    import ray

    return ray.get_runtime_context().get_node_id()


def cluster_address(timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> str | None:
    """The cluster `RAY_ADDRESS` names, checked: None when it is unset, empty or `local` (a local Ray); `auto` as is
    (Ray finds it); a `host:port` (GCS) or `ray://host:port` (Ray Client) only when that port accepts a TCP connection
    within `timeout_s`. Otherwise a one-line ConfigError (not a Ray address) or Unreachable (nothing answers)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address in ("", "local"):
        return None
    if address == "auto":
        return address
    scheme, _, host_port = address.rpartition("://")
    parts = urlsplit(f"//{host_port}")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if scheme not in ("", "ray") or not parts.hostname or port is None or parts.path:
        raise ConfigError("RAY_ADDRESS", [f"{address!r} is not a Ray address: use host:port (the GCS, e.g. HEAD:6379), "
                                          "ray://host:port (Ray Client), auto or local, or unset it for a local Ray"])
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise Unreachable(f"RAY_ADDRESS={address}: nothing accepts connections at {parts.hostname}:{port} "
                          f"({first_line(exc)}); {RAY_ADDRESS_FIX}") from None
    return address


def connect_ray() -> None:
    """Join the cluster this driver was submitted to (`RAY_ADDRESS`, see `cluster_address`), else start a local one on
    loopback. A cluster Ray cannot join is a one-line Unreachable, not Ray's exit or traceback."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address()
    if address is not None:
        try:
            ray.init(address=address, log_to_driver=False)
        except Terminated:
            raise
        except (SystemExit, ConnectionError) as exc:  # Ray exits (status 15) when its GCS client gives up
            cause = f"exit status {exc.code}" if isinstance(exc, SystemExit) else first_line(exc)
            raise Unreachable(f"RAY_ADDRESS={address}: Ray could not join a cluster there ({cause}); {RAY_ADDRESS_FIX}") from None
        return
    # The embedded default: a one-node Ray on loopback. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at 1 (Linux's default)
    # Ray swaps 127.0.0.1 for the address it would use to reach the internet and listens on every interface. Ray reads
    # the variable when it is imported, so the constant is set too (ray may have been imported before this call).
    from ray._private import ray_constants

    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR].lower() in ("1", "true")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)


def job_demand(job: JobConfig, sweep: SweepConfig) -> dict[str, float]:
    """The Ray resources of one job by Ray's names: CPUs, the sweep's custom resources, and `plan`'s GPU share from its
    memory estimate unless on the CPU."""
    return _demand(sweep, lambda: plan_job(job, sweep.resources).gpus)


def ray_options(demand: dict[str, float]) -> dict[str, Any]:
    """A demand as `.options()` keywords."""
    custom = {name: amount for name, amount in demand.items() if name not in ("CPU", "GPU")}
    return {"num_cpus": demand.get("CPU", 0.0), "num_gpus": demand.get("GPU", 0.0)} | ({"resources": custom} if custom else {})


def job_task(function: Callable[..., dict[str, Any]], sweep: SweepConfig, reuse_workers: bool = False) -> Any:
    """`function` as a Ray task of this sweep. A GPU job gets a fresh worker process (`max_calls=1`, Ray's own default
    for GPU tasks, which `.options(num_gpus=...)` alone does not apply), so the CUDA memory it cached goes back to the
    GPU's other jobs when it ends; CPU jobs (and `reuse_workers`, for stand-ins that touch no GPU) reuse their workers."""
    import ray

    return ray.remote(max_calls=0 if reuse_workers or sweep.resources.device == "cpu" else 1)(function)


def submit_job(task: Any, job: JobConfig, sweep: SweepConfig, *args: Any, demand: dict[str, float] | None = None) -> Any:
    """Submit one attempt of `job`: named by its job key (`ray list tasks`, the dashboard, the worker's process title),
    with its resources (`demand`, default `job_demand`), no Ray-side retries (see the module doc)."""
    resources = ray_options(demand if demand is not None else job_demand(job, sweep))
    return task.options(name=job.job_key, max_retries=0, retry_exceptions=False, **resources).remote(*args)


def group_demand(members: list[JobConfig], sweep: SweepConfig) -> dict[str, float]:
    """A co-training group's Ray resources: a job's CPUs and custom resources, and `plan`'s GPU share of the group."""
    return _demand(sweep, lambda: plan_group(members, sweep.resources).gpus)


def _demand(sweep: SweepConfig, gpus: Callable[[], float]) -> dict[str, float]:
    """CPUs per job and the sweep's custom resources, plus `gpus()` unless the sweep runs on CPUs."""
    demand = {"CPU": sweep.resources.cpus_per_job, **sweep.resources.custom}
    if sweep.resources.device != "cpu":
        demand["GPU"] = gpus()
    return demand


@dataclass
class Units:
    """What the driver submits with co-training on: single jobs, and co-training groups each stood for by a lead (its
    first member with the job key `<first key>+<other members>`)."""

    jobs: list[JobConfig]
    groups: dict[str, list[JobConfig]]  # lead job key -> members

    @classmethod
    def of(cls, todo: list[JobConfig], sweep: SweepConfig) -> Units:
        """`todo` as units: base evaluations alone, fine-tunes in `co_train_groups` (a group of one alone); base
        evaluations first, then longest first by plan's estimate."""
        groups = {f"{g[0].job_key}+{len(g) - 1}": g for g in co_train_groups(todo, sweep.resources) if len(g) > 1}
        grouped = {job.job_key for members in groups.values() for job in members}
        leads = [members[0].model_copy(update={"job_key": key}) for key, members in groups.items()]
        units = cls([job for job in todo if job.job_key not in grouped] + leads, groups)
        units.jobs.sort(key=lambda unit: (unit.kind != "evaluate_base", -units.planned_s(unit, sweep)))
        return units

    def planned_s(self, unit: JobConfig, sweep: SweepConfig) -> float:
        """Plan's seconds for a unit: a job's, or its group's (the members' compute on the group's share)."""
        members = self.groups.get(unit.job_key)
        if members is None:
            return planned_seconds(unit, sweep)
        hours = sum(job_gpu_hours(m, sweep.resources) for m in members)
        return wall_hours(hours, group_demand(members, sweep).get("GPU", 0.0)) * 3600

    def demand(self, unit: JobConfig, sweep: SweepConfig) -> dict[str, float]:
        members = self.groups.get(unit.job_key)
        return group_demand(members, sweep) if members else job_demand(unit, sweep)

    def record(self, unit: JobConfig, result: dict[str, Any], outcomes: dict[str, JobOutcome]) -> None:
        """A finished group's members into `outcomes`: finished with their score, or failed alone with their error."""
        for job in self.groups.get(unit.job_key, []):
            member = result["members"].get(job.job_key, {"error": "no result from its group"})
            state = "finished" if "score" in member else "failed"
            outcomes[job.job_key] = JobOutcome(job, state, member.get("score"), error=member.get("error", ""), node=result.get("node", ""))

    def label(self, unit: JobConfig) -> str:
        """How the progress log names a unit: a job as `kind base x task`, a group by its size and base."""
        members = self.groups.get(unit.job_key)
        if members is None:
            return job_label(unit)
        return f"{'group of ' + str(len(members)):13s} {unit.base_model.name} co-trained"

    def size(self, unit: JobConfig) -> int:
        """How many jobs a unit stands for: a group's members, else 1."""
        return len(self.groups.get(unit.job_key, [unit]))

    def job_outcomes(self, unit_outcomes: Mapping[str, JobOutcome], outcomes: Mapping[str, JobOutcome]) -> dict[str, JobOutcome]:
        """Per job, the units that ended so far (`unit_outcomes`): a single job's own outcome; a group's members as `record`
        put them in `outcomes`, or, for a group that failed as a whole, each failed with its error."""
        jobs: dict[str, JobOutcome] = {}
        for key, unit in unit_outcomes.items():
            for job in self.groups.get(key, []):
                jobs[job.job_key] = outcomes.get(job.job_key) or JobOutcome(job, "failed", error=unit.error or "its group did not run")
            if key not in self.groups:
                jobs[key] = unit
        return jobs


def job_label(job: JobConfig) -> str:
    """How the progress log names a job."""
    return f"{job.kind:13s} {job.base_model.name} x {job.task.name}"


def submission_order(jobs: list[JobConfig], sweep: SweepConfig) -> list[JobConfig]:
    """Base evaluations first, then fine-tunes longest first by plan's estimate (ties keep catalogue order)."""
    return sorted(jobs, key=lambda job: (job.kind != "evaluate_base", -plan_job(job, sweep.resources).hours))


def run_sweep(sweep: SweepConfig, tracking_uri: str | None = None, config_file: str | Path | None = None) -> list[JobOutcome]:
    """Run every unfinished job of the sweep on Ray, base evaluations first; returns each job's outcome. The experiment
    and the parent run are described (MLflow's note) with the sweep, its `config_file`, its job counts, and at the end
    a summary of the results."""
    cluster_address()  # a RAY_ADDRESS no cluster answers at fails here, before storage, MLflow or Ray are touched
    from tracking import preflight, store

    check_writable(storage_root(sweep))  # a wrong bucket, credential or mount fails here, before MLflow or Ray

    uri = store.check_reachable(tracking_uri or sweep.tracking.uri)  # a wrong or dead server: one line, before Ray
    preflight.check_server(uri)  # a server whose database or bucket would fail the workers: one line, before Ray
    experiment_id = store.ensure_experiment(sweep.tracking.experiment or sweep.name, uri)
    parent_run_id = store.start_sweep_run(experiment_id, sweep.name, sweep.model_dump(mode="json"), uri=uri)
    catalogue_order = expand_jobs(sweep)
    jobs = submission_order(catalogue_order, sweep)
    outcomes: dict[str, JobOutcome] = {}
    todo = []
    for job in jobs:
        run = store.find_job_run(experiment_id, job.job_key, uri)
        if run is not None and run.info.status == "FINISHED":
            outcomes[job.job_key] = JobOutcome(job, "skipped", run.data.metrics.get("score"), run.data.metrics.get("base_score"))
        else:
            todo.append(job)
    # One driver per sweep: a second one stops here in one line, before it closes a run or submits a job (with nothing
    # left to run there is nothing to guard).
    with store.sweep_lease(parent_run_id, sweep.name, uri) if todo else contextlib.nullcontext():
        run_unfinished(sweep, jobs, todo, outcomes, experiment_id, parent_run_id, uri, config_file)
    return [outcomes[job.job_key] for job in catalogue_order]


def run_unfinished(sweep: SweepConfig, jobs: list[JobConfig], todo: list[JobConfig], outcomes: dict[str, JobOutcome],
                   experiment_id: str, parent_run_id: str, uri: str, config_file: str | Path | None = None) -> None:
    """Describe the sweep on its experiment and parent run, close the runs of `todo` left RUNNING by lost workers, run
    `todo` (outcomes into `outcomes`), settle the champions, add the results to the description and end the parent run."""
    from tracking import store
    from tracking.registry import update_champion

    about = sweep_description(sweep, config_file, jobs, len(todo))
    store.describe(experiment_id, parent_run_id, about, uri)
    closed = store.close_stale_runs(experiment_id, [job.job_key for job in todo], uri=uri)
    console.print(f"sweep {sweep.name}: {len(jobs)} jobs, {len(outcomes)} already finished, {len(todo)} to run"
                  + (f"; closed {len(closed)} runs left RUNNING by lost workers" if closed else ""))
    if todo:
        connect_ray()
        remote = job_task(run_tracked_job, sweep)
        if sweep.resources.co_train != "off":
            run_units(sweep, Units.of(todo, sweep), outcomes, len(jobs), remote, job_task(run_tracked_group, sweep),
                      (experiment_id, parent_run_id, uri))
        else:
            run_jobs(todo, lambda job: submit_job(remote, job, sweep, job, experiment_id, parent_run_id, uri), lambda job: job_demand(job, sweep),
                     sweep.retries, outcomes, len(jobs), sweep.resources.queue_ahead, planned_s=lambda job: planned_seconds(job, sweep))
    for task in sweep.tasks:  # settles a race between two workers finishing one task at the same instant
        update_champion(task, uri)
    store.describe(experiment_id, parent_run_id, f"{about}\n\n{results_description([outcomes[job.job_key] for job in jobs])}", uri)
    store.finish_sweep_run(parent_run_id, "FAILED" if any(o.state == "failed" for o in outcomes.values()) else "FINISHED", uri)


def run_units(sweep: SweepConfig, units: Units, outcomes: dict[str, JobOutcome], total: int, job_remote: Any, group_remote: Any,
              tracking: tuple[str, str, str], on_result: Callable[[JobConfig, dict[str, Any]], None] | None = None) -> None:
    """`run_jobs` over co-training units: each group one Ray task, its members' outcomes into `outcomes` as it ends. The
    progress counts jobs, not units: a group of five running is five jobs running, and ended, its members count as
    finished or failed one by one. `on_result(unit, result)` sees each finished unit's dict (a group's by its lead)."""
    unit_outcomes = dict(outcomes)

    def finished(unit: JobConfig, result: dict[str, Any]) -> None:
        units.record(unit, result, outcomes)
        for job in units.groups.get(unit.job_key, []):  # a line per member, as a single job gets one
            outcome = outcomes[job.job_key]
            console.print(f"  {outcome.state:8s} {job_label(job)} (co-trained)" + (f": {outcome.error[:300]}" if outcome.error else ""),
                          soft_wrap=True)
        if on_result:
            on_result(unit, result)

    def submit(unit: JobConfig) -> Any:
        members = units.groups.get(unit.job_key)
        if members is None:
            return submit_job(job_remote, unit, sweep, unit, *tracking)
        return submit_job(group_remote, unit, sweep, members, *tracking, demand=units.demand(unit, sweep))

    run_jobs(units.jobs, submit, lambda unit: units.demand(unit, sweep), sweep.retries, unit_outcomes, total, sweep.resources.queue_ahead,
             on_result=finished, planned_s=lambda unit: units.planned_s(unit, sweep), size=units.size, label_of=units.label,
             job_outcomes=lambda: units.job_outcomes(unit_outcomes, outcomes))
    outcomes.update(units.job_outcomes(unit_outcomes, outcomes))


def run_jobs(jobs: list[JobConfig], submit: Callable[[JobConfig], Any], demand: Callable[[JobConfig], dict[str, float]],
             retries: RetrySettings, outcomes: dict[str, JobOutcome], total: int, queue_ahead: float = 1.0,
             on_result: Callable[[JobConfig, dict[str, Any]], None] | None = None,
             planned_s: Callable[[JobConfig], float] | None = None, size: Callable[[JobConfig], int] | None = None,
             job_outcomes: Callable[[], Mapping[str, JobOutcome]] | None = None, label_of: Callable[[JobConfig], str] | None = None) -> None:
    """Run `jobs` in their order: keep submitted (`submit` returns the attempt's ObjectRef) what the cluster holds plus
    `queue_ahead` of it by each job's `demand`, collect results as they come, put failures back at the front of the queue
    by the retry rules of the module doc, keep the autoscaler's request at the unfinished jobs, print progress (done /
    failed / submitted / queued of `total`, ETA by `estimate_eta_s` from each job's `planned_s`, 1 s each when not given)
    every PROGRESS_EVERY_S. `on_result(job, result)` sees each finished job's dict. When an entry of `jobs` stands for
    several jobs (a co-training group), `size` says how many and `job_outcomes` gives the outcomes per job the progress
    counts (default: `outcomes`), and `label_of` names it in the log (default: `job_label`)."""
    import ray
    from ray.exceptions import NodeDiedError

    planned = {job.job_key: planned_s(job) if planned_s else 1.0 for job in jobs}
    plan: Callable[[JobConfig], float] = lambda job: planned[job.job_key]  # noqa: E731
    jobs_in: Callable[[JobConfig], int] = size or (lambda job: 1)
    queue = deque(jobs)
    pending: dict[Any, JobConfig] = {}
    submitted_at: dict[Any, float] = {}
    timings: list[tuple[str, float, float]] = []  # (kind, planned s, actual s) of each job finished here
    failures: Counter[str] = Counter()
    node_losses: Counter[str] = Counter()
    last_print = 0.0
    try:
        while queue or pending:
            submit_window(queue, pending, submit, demand, queue_ahead)
            now = time.monotonic()
            submitted_at.update({ref: now for ref in pending if ref not in submitted_at})
            if now - last_print >= PROGRESS_EVERY_S:
                request_capacity([demand(job) for job in (*pending.values(), *queue)])
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                job = pending.pop(ref)
                ran_s = time.monotonic() - submitted_at.pop(ref)
                label = (label_of or job_label)(job)
                try:
                    result = ray.get(ref)
                except NodeDiedError:
                    node_losses[job.job_key] += 1
                    if retries.max_node_losses < 0 or node_losses[job.job_key] <= retries.max_node_losses:
                        console.print(f"  node lost {label}: resubmitted (does not count toward max_failures)", soft_wrap=True)
                        queue.appendleft(job)
                        continue
                    outcomes[job.job_key] = JobOutcome(job, "failed", error=f"its node was lost {node_losses[job.job_key]} times")
                except Exception as error:  # the job raised, or its worker crashed: counts toward max_failures
                    failures[job.job_key] += 1
                    message = str(error).strip().splitlines()[-1][:300]
                    if failures[job.job_key] <= retries.max_failures:
                        console.print(f"  retry {failures[job.job_key]}/{retries.max_failures} {label}: {message}", soft_wrap=True)
                        queue.appendleft(job)
                        continue
                    outcomes[job.job_key] = JobOutcome(job, "failed", error=message)
                else:
                    outcomes[job.job_key] = JobOutcome(job, "finished", result.get("score"), node=result.get("node", ""))
                    timings.append((job.kind, plan(job), float(result.get("wall_s", ran_s))))
                    if on_result:
                        on_result(job, result)
                outcome = outcomes[job.job_key]
                console.print(f"  {outcome.state:8s} {label}" + (f" on node {outcome.node[:8]}" if outcome.node else ""), soft_wrap=True)
            now = time.monotonic()
            if now - last_print >= PROGRESS_EVERY_S or not (pending or queue):
                last_print = now
                submitted = [(pending[ref], now - submitted_at[ref]) for ref in sorted(pending, key=submitted_at.__getitem__)]
                eta = eta_now(submitted, list(queue), plan, time_ratios(timings), running_now([job for job, _ in submitted], demand, ray.cluster_resources()))
                console.print(progress_line(job_outcomes() if job_outcomes else outcomes, sum(map(jobs_in, pending.values())),
                                            sum(map(jobs_in, queue)), total, eta), soft_wrap=True)
    finally:
        with contextlib.suppress(Exception):  # Ray itself may be what failed; never hide the error that ended the loop
            request_capacity([])


def progress_line(outcomes: Mapping[str, JobOutcome], submitted: int, queued: int, total: int, eta_s: float | None) -> str:
    """The driver's progress line: done (finished or skipped), failed, submitted, queued, and the ETA when there is one."""
    done = sum(o.state in ("finished", "skipped") for o in outcomes.values())
    failed = sum(o.state == "failed" for o in outcomes.values())
    eta = f", ETA {eta_s:.0f} s" if eta_s is not None and (submitted or queued) else ""
    return f"progress: {done} done, {failed} failed, {submitted} running or starting, {queued} queued of {total}{eta}"


# --------------------------------------------------------------------------- the ETA (pure functions)

ALL_KINDS = "*"  # the key of `time_ratios`' ratio pooled over every kind


@dataclass(frozen=True)
class JobTiming:
    """An unfinished job as the ETA sees it: its kind, plan's time for it, and how long it has run (0 when queued)."""

    kind: str
    planned_s: float
    elapsed_s: float = 0.0


def eta_now(submitted: list[tuple[JobConfig, float]], queued: list[JobConfig], plan: Callable[[JobConfig], float],
            ratios: Mapping[str, float], slots: int) -> float | None:
    """`estimate_eta_s` of the driver's state: `submitted` jobs (oldest first, with seconds since submission) of which the
    first `slots` run while the rest wait in Ray like the `queued` ones."""
    running = [JobTiming(job.kind, plan(job), elapsed) for job, elapsed in submitted[:slots]]
    waiting = [JobTiming(job.kind, plan(job)) for job in (*(job for job, _ in submitted[slots:]), *queued)]
    return estimate_eta_s(running, waiting, ratios, slots)


def planned_seconds(job: JobConfig, sweep: SweepConfig) -> float:
    """Plan's time for one job in seconds (`plan_job`'s hours, not rounded: a tiny job's would round to 0)."""
    return wall_hours(job_gpu_hours(job, sweep.resources), plan_job(job, sweep.resources).gpus) * 3600


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


def running_now(submitted: list[JobConfig], demand: Callable[[JobConfig], dict[str, float]], capacity: Mapping[str, float]) -> int:
    """How many of the `submitted` jobs (oldest first) the cluster runs at once: the longest prefix whose demands fit in
    `capacity` (at least one while any is submitted)."""
    used: Counter[str] = Counter()
    for count, job in enumerate(submitted):
        used.update(demand(job))
        if any(amount > capacity.get(name, 0.0) + 1e-9 for name, amount in used.items() if amount > 0):
            return max(count, 1)
    return len(submitted)


def submit_window(queue: deque[JobConfig], pending: dict[Any, JobConfig], submit: Callable[[JobConfig], Any],
                  demand: Callable[[JobConfig], dict[str, float]], queue_ahead: float) -> None:
    """Submit from the front of `queue` while, for each resource the next job needs, the submitted jobs ask for less than
    (1 + queue_ahead) x the cluster's total of it; with nothing submitted, the next job goes regardless (a cluster scaled
    to zero GPU nodes grows on demand)."""
    import ray

    capacity = ray.cluster_resources()
    in_flight: Counter[str] = Counter()
    for job in pending.values():
        in_flight.update(demand(job))
    while queue:
        need = demand(queue[0])
        if pending and any(in_flight[name] >= (1 + queue_ahead) * capacity.get(name, 0.0) for name in need if need[name] > 0):
            return
        job = queue.popleft()
        pending[submit(job)] = job
        in_flight.update(need)


def request_capacity(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for room for `bundles` at once (its standing request, replaced by every call; nothing happens on a
    cluster without an autoscaler). [] withdraws it, so the cluster can scale down once the sweep ends."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{name: amount for name, amount in bundle.items() if amount > 0} for bundle in bundles])


def lifts(outcomes: list[JobOutcome]) -> list[tuple[JobOutcome, float | None, float | None]]:
    """Each fine-tune's outcome with its base score (the base evaluation's of the same base model and task, else the one
    its run logged) and its lift (None when either score is missing)."""
    base = {(o.job.base_model.name, o.job.task.name): o.score for o in outcomes if o.job.kind == "evaluate_base"}
    rows = []
    for o in outcomes:
        if o.job.kind != "train":
            continue
        before = base.get((o.job.base_model.name, o.job.task.name), o.base_score)
        rows.append((o, before, None if o.score is None or before is None else o.score - before))
    return rows


def summary_table(outcomes: list[JobOutcome]) -> Table:
    """Each fine-tune's state, score, base score and lift."""
    table = Table(title="Sweep summary")
    for column in ("base model", "task", "state", "metric", "base", "fine-tuned", "lift"):
        table.add_column(column)
    for o, before, lift in lifts(outcomes):
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(o.job.base_model.name, o.job.task.name, o.state if not o.error else f"failed: {o.error}",
                      o.job.task.metric, fmt(before), fmt(o.score), "" if lift is None else f"{lift:+.3f}")
    return table


# --------------------------------------------------------------------------- the description in MLflow


def sweep_description(sweep: SweepConfig, config_file: str | Path | None, jobs: list[JobConfig], to_run: int) -> str:
    """What the sweep is (Markdown, no links): its name, config file, its own `description`, base models x tasks and the
    job counts at the start."""
    fine_tunes = sum(job.kind == "train" for job in jobs)
    source = f" from `{config_file}`" if config_file else ""
    purpose = f"\n\n{sweep.description.strip()}" if sweep.description.strip() else ""
    return (f"**LoRA Land sweep `{sweep.name}`**{source}: {len(sweep.base_models)} base models x {len(sweep.tasks)} tasks, "
            f"{len(jobs)} jobs ({fine_tunes} fine-tunes, {len(jobs) - fine_tunes} base evaluations); at the start "
            f"{len(jobs) - to_run} already finished, {to_run} to run.{purpose}")


def results_description(outcomes: list[JobOutcome]) -> str:
    """The results (Markdown, no links): jobs finished (here or before) and failed, the best lift of each task with its
    base model, and the mean fine-tuned score and lift."""
    finished = sum(o.state == "finished" for o in outcomes)
    skipped = sum(o.state == "skipped" for o in outcomes)
    failed = sum(o.state == "failed" for o in outcomes)
    lines = [f"**Results**: {finished + skipped} of {len(outcomes)} jobs done ({skipped} in an earlier run), {failed} failed."]
    best: dict[str, tuple[float, str]] = {}
    for o, _, lift in lifts(outcomes):
        if lift is not None and (o.job.task.name not in best or lift > best[o.job.task.name][0]):
            best[o.job.task.name] = (lift, o.job.base_model.name)
    if best:
        lines.append("Best lift per task: " + ", ".join(f"{task} {lift:+.3f} ({base})" for task, (lift, base) in sorted(best.items())) + ".")
    scored = [(o.score, lift) for o, _, lift in lifts(outcomes) if o.score is not None]
    if scored:
        known = [lift for _, lift in scored if lift is not None]
        lines.append(f"Mean fine-tuned score {sum(score for score, _ in scored) / len(scored):.3f}"
                     + (f", mean lift {sum(known) / len(known):+.3f}." if known else "."))
    return "\n".join(lines)
