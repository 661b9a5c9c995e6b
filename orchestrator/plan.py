"""`loraland plan`: the job matrix before anything runs: memory, GPU share, time and cost per job, and with
`resources.co_train` the groups of fine-tunes trained together over one base (jobs/cotrain.py)."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

from jobs.config import JobConfig
from jobs.memory import estimate_memory_gb, member_memory_gb, shared_memory_gb
from orchestrator.config import ResourceSettings, SweepConfig, expand_jobs

EVAL_EFFICIENCY = 0.25  # decoding reaches a fraction of training's utilisation


@dataclass(frozen=True)
class PlannedJob:
    """One job as `plan` shows it."""

    base_model: str
    task: str
    kind: str
    job_key: str
    gpu_memory_gb: float
    gpus: float
    jobs_per_gpu: int
    gpu_hours: float
    hours: float


def gpu_share(memory_gb: float, resources: ResourceSettings) -> tuple[float, int]:
    """(GPU fraction to ask Ray for, jobs that fit on one GPU); a job bigger than a GPU asks for whole GPUs."""
    need = memory_gb * resources.memory_headroom
    per_gpu = int(resources.gpu_memory_gb // need)
    if per_gpu >= 1:
        return math.floor(10_000 / per_gpu) / 10_000, per_gpu  # Ray keeps 4 decimals of a resource
    return float(math.ceil(need / resources.gpu_memory_gb)), 0


def job_gpu_hours(job: JobConfig, resources: ResourceSettings) -> float:
    """Compute time on one whole GPU: ~8N FLOPs per trained token (6N, plus 2N recomputation), 2N per evaluated one."""
    params = job.base_model.params_billion * 1e9
    rate = resources.gpu_tflops * 1e12 * resources.mfu
    limit = job.evaluation.limit or job.task.eval_limit
    eval_tokens = limit * (job.task.mean_example_tokens + (job.evaluation.max_new_tokens or job.task.max_new_tokens))
    seconds = eval_tokens * 2 * params / (rate * EVAL_EFFICIENCY)
    if job.kind == "train":
        t = job.training
        flops_per_token = (8 if t.gradient_checkpointing else 6) * params
        tokens = t.max_steps * t.micro_batch_size * t.gradient_accumulation_steps * job.task.mean_example_tokens
        seconds += tokens * flops_per_token / rate
    return seconds / 3600


def wall_hours(gpu_hours: float, gpus: float) -> float:
    """Hours a job takes on its GPU share: a fraction of a GPU runs its compute that much slower; whole GPUs (or the
    CPU, `gpus` 0) at the full rate."""
    return gpu_hours / min(gpus, 1.0) if gpus else gpu_hours


def plan_job(job: JobConfig, resources: ResourceSettings) -> PlannedJob:
    """One job's memory, GPU share (0 on the CPU) and time: what `plan` shows and what the driver asks Ray for."""
    memory = estimate_memory_gb(job.base_model, job.lora, job.quantization, job.training)
    gpus, per_gpu = gpu_share(memory, resources)
    if resources.device == "cpu":
        gpus = 0.0
    gpu_hours = job_gpu_hours(job, resources)
    return PlannedJob(job.base_model.name, job.task.name, job.kind, job.job_key, round(memory, 2), gpus, per_gpu,
                      round(gpu_hours, 3), round(wall_hours(gpu_hours, gpus), 3))


@dataclass(frozen=True)
class PlannedGroup:
    """Fine-tunes of one base model co-trained in one process over one base, as `plan` shows them and the driver
    submits them: one base's memory plus each member's own, the GPU share of that, and the members' compute."""

    base_model: str
    tasks: tuple[str, ...]
    job_keys: tuple[str, ...]
    gpu_memory_gb: float
    gpus: float
    gpu_hours: float
    hours: float


def group_size(job: JobConfig, resources: ResourceSettings) -> int:
    """Members per co-training group of `job`'s base model: 1 with co_train off, K as set, or with auto as many as fit
    one GPU with `memory_headroom` (one shared base, then each member's adapter, optimizer state and activations), every
    fine-tune of the base on the CPU."""
    setting = resources.co_train
    if setting == "off":
        return 1
    if setting != "auto":
        return setting
    if resources.device == "cpu":
        return sys.maxsize
    shared = shared_memory_gb(job.base_model, job.quantization)
    member = member_memory_gb(job.base_model, job.lora, job.training)
    return max(1, int((resources.gpu_memory_gb / resources.memory_headroom - shared) // member))


def co_train_groups(jobs: list[JobConfig], resources: ResourceSettings) -> list[list[JobConfig]]:
    """The fine-tunes among `jobs` in co-training groups: per base model, in order, `group_size` members at most (each
    alone with co_train off)."""
    by_base: dict[str, list[JobConfig]] = {}
    for job in jobs:
        if job.kind == "train":
            by_base.setdefault(job.base_model.name, []).append(job)
    groups = []
    for members in by_base.values():
        size = group_size(members[0], resources)
        groups += [members[start : start + size] for start in range(0, len(members), size)]
    return groups


def plan_group(members: list[JobConfig], resources: ResourceSettings) -> PlannedGroup:
    """A group's memory (the base once, each member's own part), GPU share (0 on the CPU) and time (the members'
    compute, one after another: a conservative bound, co-training only fills the GPU better)."""
    first = members[0]
    shared = shared_memory_gb(first.base_model, first.quantization)
    memory = shared + sum(member_memory_gb(m.base_model, m.lora, m.training) for m in members)
    gpus = 0.0 if resources.device == "cpu" else gpu_share(memory, resources)[0]
    gpu_hours = sum(job_gpu_hours(m, resources) for m in members)
    return PlannedGroup(first.base_model.name, tuple(m.task.name for m in members), tuple(m.job_key for m in members),
                        round(memory, 2), gpus, round(gpu_hours, 3), round(wall_hours(gpu_hours, gpus), 3))


def plan_sweep(sweep: SweepConfig) -> list[PlannedJob]:
    """Every job of the sweep with its resource and time estimate."""
    return [plan_job(job, sweep.resources) for job in expand_jobs(sweep)]


def plan_totals(planned: list[PlannedJob], resources: ResourceSettings) -> dict[str, float]:
    """Totals over the sweep: jobs, GPU-hours, cost, and how many jobs share one GPU (the tightest base model)."""
    gpu_hours = sum(p.gpu_hours for p in planned)
    return {
        "jobs": sum(p.kind == "train" for p in planned),
        "base_evaluations": sum(p.kind == "evaluate_base" for p in planned),
        "gpu_hours": round(gpu_hours, 2),
        "cost": round(gpu_hours * resources.price_per_gpu_hour, 2),
        "price_per_gpu_hour": resources.price_per_gpu_hour,
        "gpu_memory_gb": resources.gpu_memory_gb,
        "jobs_per_gpu": min((p.jobs_per_gpu for p in planned), default=0),
        "max_gpu_memory_gb": max((p.gpu_memory_gb for p in planned), default=0.0),
    }


def plan_json(sweep: SweepConfig) -> dict:
    """The machine-readable plan: fine-tuning `jobs`, `base_evaluations`, `totals` over both, and the co-training
    `groups` (none with co_train off)."""
    planned = plan_sweep(sweep)
    groups = co_train_groups(expand_jobs(sweep), sweep.resources) if sweep.resources.co_train != "off" else []
    return {
        "sweep": sweep.name,
        "jobs": [asdict(p) for p in planned if p.kind == "train"],
        "base_evaluations": [asdict(p) for p in planned if p.kind == "evaluate_base"],
        "totals": plan_totals(planned, sweep.resources),
        "groups": [asdict(plan_group(group, sweep.resources)) for group in groups],
    }
