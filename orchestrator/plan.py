"""`loraland plan`: the job matrix before anything runs: memory, GPU share, time and cost per job, and with
`resources.co_train` the groups of fine-tunes trained together over one base (jobs/cotrain.py)."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

from jobs.config import JobConfig
from jobs.memory import GB, estimate_memory_gb, lora_parameters, member_memory_gb, shared_memory_gb
from orchestrator.config import ResourceSettings, SweepConfig, expand_jobs

EVAL_EFFICIENCY = 0.25  # decoding reaches a fraction of training's utilisation
REFERENCE_PARAMS_BILLION = 7.0  # the base size `resources.eval_tokens_per_second` is given for
DEVICE_ADAPTERS_GUESS = 8  # adapters an evaluator holds on its GPU when `device_adapter_slots` is 0 (sized at start)


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
    eval_gpu_hours: float = 0.0  # its evaluation through its base's evaluator (0 with `evaluation.engine: generate`)
    eval_hours: float = 0.0  # the same on the evaluator's GPU share, as wall time


def gpu_share(memory_gb: float, resources: ResourceSettings) -> tuple[float, int]:
    """(GPU fraction to ask Ray for, jobs that fit on one GPU); a job bigger than a GPU asks for whole GPUs."""
    need = memory_gb * resources.memory_headroom
    per_gpu = int(resources.gpu_memory_gb // need)
    if per_gpu >= 1:
        return math.floor(10_000 / per_gpu) / 10_000, per_gpu  # Ray keeps 4 decimals of a resource
    return float(math.ceil(need / resources.gpu_memory_gb)), 0


def through_evaluator(job: JobConfig) -> bool:
    """Whether the job's evaluation goes through its base's evaluator (orchestrator/evaluator.py), not in the job."""
    return job.evaluation.engine == "evaluator"


def job_gpu_hours(job: JobConfig, resources: ResourceSettings) -> float:
    """Compute time of the job's own task on one whole GPU: ~8N FLOPs per trained token (6N, plus 2N recomputation),
    and with `evaluation.engine: generate` 2N per evaluated one (through the evaluator its evaluation is
    `eval_gpu_hours`, not the job's)."""
    params = job.base_model.params_billion * 1e9
    rate = resources.gpu_tflops * 1e12 * resources.mfu
    limit = job.evaluation.limit or job.task.eval_limit
    eval_tokens = limit * (job.task.mean_example_tokens + (job.evaluation.max_new_tokens or job.task.max_new_tokens))
    seconds = 0.0 if through_evaluator(job) else eval_tokens * 2 * params / (rate * EVAL_EFFICIENCY)
    if job.kind == "train":
        t = job.training
        flops_per_token = (8 if t.gradient_checkpointing else 6) * params
        tokens = t.max_steps * t.micro_batch_size * t.gradient_accumulation_steps * job.task.mean_example_tokens
        seconds += tokens * flops_per_token / rate
    return seconds / 3600


def eval_gpu_hours(job: JobConfig, resources: ResourceSettings) -> float:
    """The job's evaluation through its base's evaluator on one whole GPU: rows x new tokens at the evaluator's
    throughput (`resources.eval_tokens_per_second` for a 7B base, scaled by parameters); 0 with `engine: generate`."""
    if not through_evaluator(job):
        return 0.0
    rows = job.evaluation.limit or job.task.eval_limit
    tokens = rows * (job.evaluation.max_new_tokens or job.task.max_new_tokens)
    rate = resources.eval_tokens_per_second * REFERENCE_PARAMS_BILLION / job.base_model.params_billion
    return tokens / rate / 3600


def evaluator_memory_gb(jobs: list[JobConfig]) -> float:
    """GPU memory of the evaluator of `jobs`' base model (one engine for all of them): the base as a job holds it,
    its adapters on the GPU, and the KV cache of a full batch of the longest of their evaluations."""
    first = jobs[0]
    a, settings = first.base_model.architecture, first.evaluation.evaluator
    sequence = max(job.task.mean_example_tokens + (job.evaluation.max_new_tokens or job.task.max_new_tokens)
                   for job in jobs)
    kv_per_token = a.num_layers * 2 * a.num_key_value_heads * (a.hidden_size // a.num_attention_heads) * 2
    adapters = (settings.device_adapter_slots or DEVICE_ADAPTERS_GUESS) * lora_parameters(first.base_model, first.lora)
    return (shared_memory_gb(first.base_model, first.quantization) * GB
            + settings.max_batch_size * sequence * kv_per_token + adapters * 2) / GB


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
    evaluation = eval_gpu_hours(job, resources)
    share = 0.0 if resources.device == "cpu" else gpu_share(evaluator_memory_gb([job]), resources)[0]
    return PlannedJob(job.base_model.name, job.task.name, job.kind, job.job_key, round(memory, 2), gpus, per_gpu,
                      round(gpu_hours, 3), round(wall_hours(gpu_hours, gpus), 3), round(evaluation, 4),
                      round(wall_hours(evaluation, share), 4))


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
    """Totals over the sweep: jobs, GPU-hours (evaluations through the evaluators included, and apart), cost, and how
    many jobs share one GPU (the tightest base model)."""
    evaluation = sum(p.eval_gpu_hours for p in planned)
    gpu_hours = sum(p.gpu_hours for p in planned) + evaluation
    return {
        "jobs": sum(p.kind == "train" for p in planned),
        "base_evaluations": sum(p.kind == "evaluate_base" for p in planned),
        "gpu_hours": round(gpu_hours, 2),
        "eval_gpu_hours": round(evaluation, 2),
        "cost": round(gpu_hours * resources.price_per_gpu_hour, 2),
        "price_per_gpu_hour": resources.price_per_gpu_hour,
        "gpu_memory_gb": resources.gpu_memory_gb,
        "jobs_per_gpu": min((p.jobs_per_gpu for p in planned), default=0),
        "max_gpu_memory_gb": max((p.gpu_memory_gb for p in planned), default=0.0),
    }


def plan_json(sweep: SweepConfig) -> dict:
    """The machine-readable plan: fine-tuning `jobs`, `base_evaluations`, `totals` over both, the co-training
    `groups` (none with co_train off), and the `searches` (orchestrator/search.py; none without a search section)."""
    from orchestrator.search import plan_searches  # it builds on this module

    planned = plan_sweep(sweep)
    groups = co_train_groups(expand_jobs(sweep), sweep.resources) if sweep.resources.co_train != "off" else []
    return {
        "sweep": sweep.name,
        "jobs": [asdict(p) for p in planned if p.kind == "train"],
        "base_evaluations": [asdict(p) for p in planned if p.kind == "evaluate_base"],
        "totals": plan_totals(planned, sweep.resources),
        "groups": [asdict(plan_group(group, sweep.resources)) for group in groups],
        "study_budget": study_budget(sweep, planned),
        "searches": plan_searches(sweep),
    }


# The study's authors' published training cost: under $8 per adapter, about $2,500 for the 310, on A10G GPUs (24 GB).
STUDY_COST_PER_ADAPTER = 8.0
STUDY_TOTAL_COST = 2500.0


def study_budget(sweep: SweepConfig, planned: list[PlannedJob]) -> dict[str, float]:
    """Plan's cost per fine-tune beside the study's published one, with the inputs that explain a difference: the
    GPU's price and speed, the utilisation assumed (`mfu`) and the examples and tokens each fine-tune trains on."""
    trains = [job for job in expand_jobs(sweep) if job.kind == "train"]
    hours = [p.gpu_hours for p in planned if p.kind == "train"]
    if not trains:
        return {}
    t, resources = sweep.training, sweep.resources
    per_adapter = sum(hours) / len(hours)
    return {
        "gpu_hours_per_adapter": round(per_adapter, 3),
        "cost_per_adapter": round(per_adapter * resources.price_per_gpu_hour, 2),
        "study_cost_per_adapter": STUDY_COST_PER_ADAPTER,
        "study_total_cost": STUDY_TOTAL_COST,
        "study_gpu_hours_per_adapter_at_this_price": round(STUDY_COST_PER_ADAPTER / resources.price_per_gpu_hour, 2),
        "examples_per_adapter": t.max_steps * t.micro_batch_size * t.gradient_accumulation_steps,
        "mean_example_tokens": round(sum(job.task.mean_example_tokens for job in trains) / len(trains), 1),
        "mfu": resources.mfu,
        "gpu_tflops": resources.gpu_tflops,
    }
