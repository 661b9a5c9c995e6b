"""From plans to Ray: what a job or a co-training group asks of the cluster (its Ray resources and plan's time for it),
and how an attempt goes out as a Ray task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.config import JobConfig
from orchestrator.config import SweepConfig
from orchestrator.plan import job_gpu_hours, plan_group, plan_job, wall_hours


def job_demand(job: JobConfig, sweep: SweepConfig) -> dict[str, float]:
    """The Ray resources of one job by Ray's names: CPUs, the sweep's custom resources, and `plan`'s GPU share from its
    memory estimate unless on the CPU."""
    return _demand(sweep, lambda: plan_job(job, sweep.resources).gpus)


def group_demand(members: list[JobConfig], sweep: SweepConfig) -> dict[str, float]:
    """A co-training group's Ray resources: a job's CPUs and custom resources, and `plan`'s GPU share of the group."""
    return _demand(sweep, lambda: plan_group(members, sweep.resources).gpus)


def _demand(sweep: SweepConfig, gpus: Callable[[], float]) -> dict[str, float]:
    """CPUs per job and the sweep's custom resources, plus `gpus()` unless the sweep runs on CPUs."""
    demand = {"CPU": sweep.resources.cpus_per_job, **sweep.resources.custom}
    if sweep.resources.device != "cpu":
        demand["GPU"] = gpus()
    return demand


def planned_seconds(job: JobConfig, sweep: SweepConfig) -> float:
    """Plan's time for one job in seconds (`plan_job`'s hours, not rounded: a tiny job's would round to 0)."""
    return wall_hours(job_gpu_hours(job, sweep.resources), plan_job(job, sweep.resources).gpus) * 3600


def group_planned_seconds(members: list[JobConfig], sweep: SweepConfig) -> float:
    """Plan's time for a co-training group in seconds: its members' compute on the group's GPU share."""
    hours = sum(job_gpu_hours(member, sweep.resources) for member in members)
    return wall_hours(hours, group_demand(members, sweep).get("GPU", 0.0)) * 3600


def ray_options(demand: dict[str, float]) -> dict[str, Any]:
    """A demand as `.options()` keywords."""
    custom = {name: amount for name, amount in demand.items() if name not in ("CPU", "GPU")}
    resources = {"num_cpus": demand.get("CPU", 0.0), "num_gpus": demand.get("GPU", 0.0)}
    return resources | ({"resources": custom} if custom else {})


def job_task(function: Callable[..., dict[str, Any]], sweep: SweepConfig, reuse_workers: bool = False) -> Any:
    """`function` as a Ray task of this sweep. A GPU job gets a fresh worker process (`max_calls=1`, Ray's own default
    for GPU tasks, which `.options(num_gpus=...)` alone does not apply), so the CUDA memory it cached goes back to the
    GPU's other jobs when it ends; CPU jobs (and `reuse_workers`, for stand-ins that touch no GPU) reuse their
    workers."""
    import ray

    return ray.remote(max_calls=0 if reuse_workers or sweep.resources.device == "cpu" else 1)(function)


def submit_task(task: Any, name: str, demand: dict[str, float], *args: Any) -> Any:
    """Submit one attempt, `task(*args)`: named `name` (a job key: `ray list tasks`, the dashboard, the worker's process
    title), with the resources `demand`, no Ray-side retries (the scheduler retries, see orchestrator/scheduler.py).
    Returns its ObjectRef."""
    return task.options(name=name, max_retries=0, retry_exceptions=False, **ray_options(demand)).remote(*args)
