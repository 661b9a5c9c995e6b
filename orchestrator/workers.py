"""What runs on a Ray worker: a job, or a co-training group, logged to its MLflow runs. The driver submits these
functions as Ray tasks (`resources.job_task`); their small result dicts are all that comes back to it.

With `evaluation.engine: evaluator` a fine-tune's task only trains (`train_tracked_job`, `train_tracked_group`): its
run stays RUNNING, `{"trained": True}` comes back, and its evaluation goes to its base's evaluator
(orchestrator/evaluator.py), which finishes the run. With `generate` a job's task also evaluates (`run_tracked_job`,
`run_tracked_group`)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from jobs.config import JobConfig

GROUP_FAILED = "failed in its co-training group"


def run_tracked_job(job: JobConfig, experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
    """The job, logged to its MLflow run (reused on a retry); returns its score, job key, node and wall time."""
    from jobs.run import run_job
    from tracking.tracker import JobTracker

    started = time.monotonic()
    with JobTracker.for_job(job, experiment_id, parent_run_id, uri) as tracker:
        result = run_job(job, on_step=tracker.on_step)
        tracker.finish(result)
    return {"score": result.score, "job_key": job.job_key, "node": this_node(), "wall_s": time.monotonic() - started}


def run_tracked_group(jobs: list[JobConfig], experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
    """The members trained together (`jobs.cotrain.run_group`), each logged to its own MLflow run (reused on a retry)
    and ended FINISHED or, if it failed alone, FAILED with its error; returns each member's score or error by job
    key."""
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
                tracker.fail(outcome.error or GROUP_FAILED)
                members[outcome.config.job_key] = {"error": outcome.error or GROUP_FAILED}
    return {"members": members, "node": this_node(), "wall_s": time.monotonic() - started}


def train_tracked_job(job: JobConfig, experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
    """The fine-tune's training alone (`jobs.run.train_step`: skipped when trained before), its steps logged to its
    MLflow run (reused on a retry), which stays RUNNING for its evaluation; returns `trained`, job key, node, wall
    time."""
    from jobs.run import train_step
    from tracking.tracker import JobTracker

    started = time.monotonic()
    with JobTracker.for_job(job, experiment_id, parent_run_id, uri) as tracker:
        train_step(job, on_step=tracker.on_step)
        tracker.detach()
    return {"trained": True, "job_key": job.job_key, "node": this_node(), "wall_s": time.monotonic() - started}


def train_tracked_group(jobs: list[JobConfig], experiment_id: str, parent_run_id: str, uri: str) -> dict[str, Any]:
    """The members' training alone (`jobs.cotrain.train_group`), each logged to its own MLflow run, which stays RUNNING
    for its evaluation or, if it failed alone, ends FAILED with its error; returns each member's `trained` or error by
    job key."""
    from jobs.cotrain import train_group
    from tracking.tracker import JobTracker

    started = time.monotonic()
    members: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        trackers = [stack.enter_context(JobTracker.for_job(job, experiment_id, parent_run_id, uri)) for job in jobs]
        steps = {i: t.on_step for i, t in enumerate(trackers)}
        for tracker, outcome in zip(trackers, train_group(jobs, on_step=steps)):
            if outcome.result is not None:
                tracker.detach()
                members[outcome.config.job_key] = {"trained": True}
            else:
                tracker.fail(outcome.error or GROUP_FAILED)
                members[outcome.config.job_key] = {"error": outcome.error or GROUP_FAILED}
    return {"members": members, "node": this_node(), "wall_s": time.monotonic() - started}


def this_node() -> str:
    """The Ray node id of the calling task or actor ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
