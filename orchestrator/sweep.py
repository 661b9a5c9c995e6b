"""`loraland sweep`: the Ray driver that fans a sweep out over a cluster, exactly once per job.

Ray core tasks, not Tune: every job is one function call with its own resources (a GPU share from
`plan`), Ray retries it on failure (`max_retries` = the sweep's budget, application errors included),
and the exactly-once state lives where it must survive a lost driver anyway: the job's MLflow run
(found by its job key) and its checkpoints on the storage path. Tune's experiment restore would be a
second, competing record of the same state.

Run again after a crash, or submitted twice, the driver skips jobs whose run is FINISHED, closes
runs left RUNNING by killed workers, and resubmits the rest, which resume from their checkpoints.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from jobs.config import JobConfig
from orchestrator.config import SweepConfig, expand_jobs
from orchestrator.plan import gpu_share
from jobs.memory import estimate_memory_gb

console = Console(highlight=False)
PROGRESS_EVERY_S = 10.0


@dataclass
class JobOutcome:
    """How a job ended in this driver run."""

    job: JobConfig
    state: str  # finished | skipped | failed
    score: float | None = None
    base_score: float | None = None
    error: str = ""


def run_tracked_job(job: JobConfig, experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
    """What a worker runs: the job, logged to its MLflow run (reused on a retry); returns its score."""
    from jobs.run import run_job
    from tracking.tracker import JobTracker

    with JobTracker.for_job(job, experiment_id, parent_run_id, uri) as tracker:
        result = run_job(job, on_step=tracker.on_step)
        tracker.finish(result)
    return {"score": result.score, "job_key": job.job_key}


def connect_ray() -> None:
    """Join the cluster this driver was submitted to (`RAY_ADDRESS`), else start a local one on loopback."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:  # the embedded default: a one-node Ray on loopback (without the variable Ray swaps 127.0.0.1 for eth0's address)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)


def job_resources(job: JobConfig, sweep: SweepConfig) -> dict[str, float]:
    """The Ray resources of one job: CPUs, and a GPU share from its memory estimate unless on the CPU."""
    resources: dict[str, Any] = {"num_cpus": sweep.resources.cpus_per_job}
    if sweep.resources.custom:
        resources["resources"] = dict(sweep.resources.custom)
    if sweep.resources.device != "cpu":
        memory = estimate_memory_gb(job.base_model, job.lora, job.quantization, job.training)
        resources["num_gpus"] = gpu_share(memory, sweep.resources)[0]
    return resources


def run_sweep(sweep: SweepConfig, tracking_uri: str | None = None) -> list[JobOutcome]:
    """Run every unfinished job of the sweep on Ray, base evaluations first; returns each job's outcome."""
    import ray

    from tracking import store

    uri = store.resolve_tracking_uri(tracking_uri or sweep.tracking.uri)
    experiment_id = store.ensure_experiment(sweep.tracking.experiment or sweep.name, uri)
    parent_run_id = store.start_sweep_run(experiment_id, sweep.name, sweep.model_dump(mode="json"), uri=uri)
    jobs = sorted(expand_jobs(sweep), key=lambda job: job.kind != "evaluate_base")
    outcomes: dict[str, JobOutcome] = {}
    todo = []
    for job in jobs:
        run = store.find_job_run(experiment_id, job.job_key, uri)
        if run is not None and run.info.status == "FINISHED":
            outcomes[job.job_key] = JobOutcome(job, "skipped", run.data.metrics.get("score"), run.data.metrics.get("base_score"))
        else:
            todo.append(job)
    closed = store.close_stale_runs(experiment_id, [job.job_key for job in todo], uri=uri)
    console.print(f"sweep {sweep.name}: {len(jobs)} jobs, {len(outcomes)} already finished, {len(todo)} to run"
                  + (f"; closed {len(closed)} runs left RUNNING by lost workers" if closed else ""))
    if todo:
        connect_ray()
    remote = ray.remote(run_tracked_job)
    pending = {
        remote.options(max_retries=sweep.retries.max_failures, retry_exceptions=True, **job_resources(job, sweep))
        .remote(job, experiment_id, parent_run_id, uri): job
        for job in todo
    }
    _wait_all(pending, outcomes, len(jobs))
    from tracking.registry import update_champion

    for task in sweep.tasks:  # settles a race between two workers finishing one task at the same instant
        update_champion(task, uri)
    store.finish_sweep_run(parent_run_id, "FAILED" if any(o.state == "failed" for o in outcomes.values()) else "FINISHED", uri)
    return [outcomes[job.job_key] for job in jobs]


def _wait_all(pending: dict[Any, JobConfig], outcomes: dict[str, JobOutcome], total: int) -> None:
    """Collect results as they come, printing progress (done / running / failed / queued, ETA)."""
    import ray

    started, last_print, finished_here = time.monotonic(), 0.0, 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY_S)
        for ref in ready:
            job = pending.pop(ref)
            try:
                outcomes[job.job_key] = JobOutcome(job, "finished", ray.get(ref)["score"])
                finished_here += 1
            except Exception as error:  # the job failed past its retry budget: record it, go on
                outcomes[job.job_key] = JobOutcome(job, "failed", error=str(error).strip().splitlines()[-1][:300])
            console.print(f"  {outcomes[job.job_key].state:8s} {job.kind:13s} {job.base_model.name} x {job.task.name}")
        now = time.monotonic()
        if now - last_print >= PROGRESS_EVERY_S or not pending:
            last_print = now
            done = sum(o.state in ("finished", "skipped") for o in outcomes.values())
            failed = sum(o.state == "failed" for o in outcomes.values())
            eta = (now - started) / finished_here * len(pending) if finished_here else float("nan")
            console.print(f"progress: {done} done, {failed} failed, {len(pending)} running or queued of {total}"
                          + (f", ETA {eta:.0f} s" if finished_here and pending else ""))


def summary_table(outcomes: list[JobOutcome]) -> Table:
    """Each fine-tune's state, score, base score and lift."""
    base = {(o.job.base_model.name, o.job.task.name): o.score for o in outcomes if o.job.kind == "evaluate_base"}
    table = Table(title="Sweep summary")
    for column in ("base model", "task", "state", "metric", "base", "fine-tuned", "lift"):
        table.add_column(column)
    for o in outcomes:
        if o.job.kind != "train":
            continue
        before = base.get((o.job.base_model.name, o.job.task.name))
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        lift = "" if o.score is None or before is None else f"{o.score - before:+.3f}"
        table.add_row(o.job.base_model.name, o.job.task.name, o.state if not o.error else f"failed: {o.error}",
                      o.job.task.metric, fmt(before), fmt(o.score), lift)
    return table
