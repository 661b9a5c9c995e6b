"""`loraland sweep`: the Ray driver that fans a sweep out over a cluster, exactly once per job.

Ray core tasks, not Tune, for the jobs: every job is one function call with its own resources (a GPU share from
`plan`), and the exactly-once state lives where it must survive a lost driver anyway: the job's MLflow run (found by its
job key) and its checkpoints on the storage path. Tune runs only inside a searched fine-tune (a sweep's `search`
section, orchestrator/search.py): one scheduler unit per searched job, whose Tune experiment is stored in the job's own
output folder and restored when the unit is resubmitted.

Jobs go out base evaluations first (a fine-tune's lift needs its base score), then fine-tunes longest first (plan's
estimate; LPT keeps the longest job from starting last). With `evaluation.engine: evaluator` (the default) evaluations
go through one evaluator actor per base model (orchestrator/evaluator.py): a fine-tune's task only trains, and its
evaluation follows on its base's evaluator. The scheduler (orchestrator/scheduler.py) keeps the cluster
full, follows it as nodes join or go, and retries by the sweep's `retries` rules. A resubmitted job reuses its MLflow
run and resumes from its checkpoint.

With `resources.co_train`, a base model's unfinished fine-tunes go out in groups (`plan.co_train_groups`), each one Ray
task that trains its members together over one base (jobs/cotrain.py) with the group's memory as its GPU share; every
member keeps its own MLflow run, job key, adapter registration and champion update, and a member failing in the group
fails alone. A group is retried, or resubmitted after a node loss, as one unit; it then skips finished members and
resumes the others from their checkpoints. The progress line counts a group's members as the jobs they are.

Run again after a crash, or submitted twice, the driver skips jobs whose run is FINISHED, closes runs left RUNNING by
killed workers, and resubmits the rest, which resume from their checkpoints. One driver runs a sweep at a time
(`tracking.lease.sweep_lease` on the parent run): a second submission while the first is alive stops in one line,
before it touches a run, and a driver that lost the lease stops submitting.

The parts: orchestrator/cluster.py (joining Ray), workers.py (what runs on a worker), resources.py (plans as Ray
resources and tasks), units.py (the work units), evaluator.py (one evaluation engine per base model), search.py and
search_trials.py (LoRA search on Ray Tune), scheduler.py (running them), eta.py, notes.py (progress, summary, the
sweep's note in MLflow), datacheck.py (data and weights preflight).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs.config import JobConfig
from jobs.storage import check_writable
from orchestrator.cluster import cluster_address, connect_ray
from orchestrator.config import SweepConfig, expand_jobs, storage_root
from orchestrator.datacheck import data_preflight
from orchestrator.evaluator import evaluator_pool
from orchestrator.notes import console, results_description, sweep_description
from orchestrator.plan import plan_job
from orchestrator.scheduler import SchedulerSettings, run_units
from orchestrator.search import is_searched, search_units, trial_hosts
from orchestrator.units import JobOutcome, RayTasks, work_units


@dataclass(frozen=True)
class SweepRun:
    """Where a sweep is tracked: its MLflow experiment, its parent run and the tracking URI."""

    experiment_id: str
    parent_run_id: str
    uri: str


def submission_order(jobs: list[JobConfig], sweep: SweepConfig) -> list[JobConfig]:
    """Base evaluations first, then fine-tunes longest first by plan's estimate (ties keep catalogue order)."""
    return sorted(jobs, key=lambda job: (job.kind != "evaluate_base", -plan_job(job, sweep.resources).hours))


def run_sweep(sweep: SweepConfig, tracking_uri: str | None = None,
              config_file: str | Path | None = None) -> list[JobOutcome]:
    """Run every unfinished job of the sweep on Ray, base evaluations first; returns each job's outcome in catalogue
    order. The experiment and the parent run are described (MLflow's note) with the sweep, its `config_file`, its job
    counts, and at the end a summary of the results."""
    data_preflight(sweep)  # missing prepared files, no HF_TOKEN for a gated model...: one line each, first of all
    cluster_address()  # a RAY_ADDRESS no cluster answers at fails here, before storage, MLflow or Ray are touched
    from tracking import lease, preflight, store

    check_writable(storage_root(sweep))  # a wrong bucket, credential or mount fails here, before MLflow or Ray

    uri = store.check_reachable(tracking_uri or sweep.tracking.uri)  # a wrong or dead server: one line, before Ray
    preflight.check_server(uri)  # a server whose database or bucket would fail the workers: one line, before Ray
    experiment_id = store.ensure_experiment(sweep.tracking.experiment or sweep.name, uri)
    parent_run_id = store.start_sweep_run(experiment_id, sweep.name, sweep.model_dump(mode="json"), uri=uri)
    run = SweepRun(experiment_id, parent_run_id, uri)
    catalogue_order = expand_jobs(sweep)
    jobs = submission_order(catalogue_order, sweep)
    skipped = finished_before(jobs, run)
    todo = [job for job in jobs if job.job_key not in skipped]
    # One driver per sweep: a second one stops here in one line, before it closes a run or submits a job (with nothing
    # left to run there is nothing to guard).
    with lease.sweep_lease(run.parent_run_id, sweep.name, uri) if todo else contextlib.nullcontext() as held:
        outcomes = run_unfinished(sweep, jobs, skipped, run, config_file, held.check if held else None)
    return [outcomes[job.job_key] for job in catalogue_order]


def finished_before(jobs: list[JobConfig], run: SweepRun) -> dict[str, JobOutcome]:
    """The jobs whose MLflow run is FINISHED, as skipped outcomes with the scores their runs logged, by job key."""
    from tracking import store

    skipped = {}
    for job in jobs:
        found = store.find_job_run(run.experiment_id, job.job_key, run.uri)
        if found is not None and found.info.status == "FINISHED":
            metrics = found.data.metrics
            skipped[job.job_key] = JobOutcome(job, "skipped", metrics.get("score"), metrics.get("base_score"))
    return skipped


def run_unfinished(sweep: SweepConfig, jobs: list[JobConfig], skipped: dict[str, JobOutcome], run: SweepRun,
                   config_file: str | Path | None = None,
                   lease_check: Callable[[], None] | None = None) -> dict[str, JobOutcome]:
    """Describe the sweep on its experiment and parent run, close the runs of the jobs not `skipped` left RUNNING by
    lost workers, run those jobs, settle the champions, add the results to the description and end the parent run.
    Returns every job's outcome by job key."""
    from tracking import store
    from tracking.registry import update_champion

    todo = [job for job in jobs if job.job_key not in skipped]
    about = sweep_description(sweep, config_file, jobs, len(todo))
    store.describe(run.experiment_id, run.parent_run_id, about, run.uri)
    closed = store.close_stale_runs(run.experiment_id, [job.job_key for job in todo], uri=run.uri)
    console.print(f"sweep {sweep.name}: {len(jobs)} jobs, {len(skipped)} already finished, {len(todo)} to run"
                  + (f"; closed {len(closed)} runs left RUNNING by lost workers" if closed else ""))
    outcomes = dict(skipped)
    if todo:
        connect_ray()
        settings = SchedulerSettings(sweep.retries, len(jobs), sweep.resources.queue_ahead, earlier=skipped,
                                     lease_check=lease_check)
        plain = [job for job in todo if not is_searched(job, sweep)]  # searched fine-tunes: orchestrator/search.py
        with trial_hosts(sweep), evaluator_pool(plain, sweep) as evaluators:
            tasks = RayTasks.of(sweep, (run.experiment_id, run.parent_run_id, run.uri), evaluators)
            outcomes |= run_units(search_units(todo, sweep, tasks.args) + work_units(plain, sweep, tasks), settings)
        close_given_up(outcomes, run)
    for task in sweep.tasks:  # settles a race between two workers finishing one task at the same instant
        update_champion(task, run.uri)
    results = results_description([outcomes[job.job_key] for job in jobs])
    store.describe(run.experiment_id, run.parent_run_id, f"{about}\n\n{results}", run.uri)
    failed = any(o.state == "failed" for o in outcomes.values())
    store.finish_sweep_run(run.parent_run_id, "FAILED" if failed else "FINISHED", run.uri)
    return outcomes


def close_given_up(outcomes: dict[str, JobOutcome], run: SweepRun) -> list[str]:
    """End FAILED, with the driver's reason, the runs of the jobs it gave up on that nothing ended: a worker or an
    evaluator that crashed (its retries spent) or a node lost too often leaves the job's run RUNNING, a fine-tune's also
    while its evaluation waited. A run its job ended itself keeps its own status and error. Returns the closed run ids.
    """
    from tracking import store

    reasons = {key: f"the sweep gave up on it: {outcome.error or 'no error recorded'}"
               for key, outcome in outcomes.items() if outcome.state == "failed"}
    if not reasons:
        return []
    return store.close_stale_runs(run.experiment_id, reasons, uri=run.uri, reasons=reasons)
