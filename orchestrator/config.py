"""The sweep config (what the user edits to fan out jobs) and its expansion into job configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from core.catalog import Catalog, load_catalog
from core.errors import ConfigError
from core.parsing import parse_model, read_yaml
from core.paths import data_home
from core.schemas import EvalSettings, LoraSettings, QuantizationSettings, StrictModel, TrainingSettings
from jobs import storage
from jobs.config import JobConfig, JobKind, lora_target_problems, outcome_settings
from orchestrator.search_config import SearchSettings, search_problems


class ResourceSettings(StrictModel):
    """What each job asks Ray for, and the hardware `plan` prices."""

    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="Where jobs run; cpu for the tiny demo.")
    gpu_memory_gb: float = Field(default=24.0, gt=0, le=4096,
                                 description="Memory of one GPU of the cluster (the study used 24 GB A10G).")
    gpu_tflops: float = Field(default=125.0, gt=0, le=1e6,
                              description="Peak bf16 TFLOP/s of one GPU, for the time estimate.")
    mfu: float = Field(default=0.2, gt=0, le=1,
                       description="Fraction of peak a QLoRA job reaches, for the time estimate.")
    price_per_gpu_hour: float = Field(default=1.21, ge=0,
                                      description="Price of one GPU-hour in dollars (A10G on demand).")
    cpus_per_job: float = Field(default=1.0, gt=0, description="CPUs each job reserves.")
    custom: dict[str, float] = Field(default_factory=dict,
                                     description="Custom Ray resources each job asks for, e.g. {worker: 0.01}.")
    memory_headroom: float = Field(default=1.15, ge=1.0, le=10.0,
                                   description="Multiplier on the memory estimate before packing GPUs.")
    co_train: Literal["off", "auto"] | Annotated[int, Field(ge=1)] = Field(
        default="off", description="Fine-tunes of one base model trained together in one process over one shared base "
        "(jobs/cotrain.py), each still its own job and run: off; K members per group; or auto, as many as fit one GPU "
        "with memory_headroom (plan's memory model), all of a base's on the CPU.")
    queue_ahead: float = Field(
        default=1.0, ge=0, description="Jobs submitted to Ray beyond what the cluster holds, as a fraction of its "
        "capacity: Ray fills a freed share from them at once; the rest wait in the driver, where a resubmitted job "
        "goes first.")
    eval_tokens_per_second: float = Field(
        default=600.0, gt=0, description="Generated tokens per second of one evaluator (a base model's multi-LoRA "
        "engine, `evaluation.engine: evaluator`) on one whole GPU for a 7B base, all its evaluations' rows together; "
        "plan scales it by parameters (decoding reads every weight per step). 600: about a third of vLLM's 1,788 "
        "tok/s with a rank-8 LoRA on an A100, for an A10G (docs/driver.md).")


class RetrySettings(StrictModel):
    """Failure handling."""

    max_failures: int = Field(
        default=3, ge=0,
        description="Retries of a job that raised or whose worker crashed, before it is marked failed.")
    max_node_losses: int = Field(
        default=-1, ge=-1, description="Resubmissions of a job whose node was lost (preemption, scale-down); -1: no "
        "limit. They never count toward max_failures.")


class TrackingSettings(StrictModel):
    """Where runs are logged."""

    uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else SQLite in the data folder.")
    experiment: str | None = Field(default=None, description="Experiment name; default: the sweep's name.")


class SweepConfig(StrictModel):
    """A sweep: base models x tasks, with shared LoRA, quantization, training and evaluation settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Sweep name: experiment name and job-key prefix.")
    description: str = Field(default="", description="What this sweep is for.")
    base_models: list[str] = Field(min_length=1, description="Base model names from the catalogue.")
    tasks: list[str] = Field(min_length=1, description="Task names from the catalogue.")
    evaluate_base: bool = Field(default=True, description="Also score each base model zero-shot on each task.")
    lora: LoraSettings = Field(default_factory=LoraSettings,
                               description="LoRA settings (study: r 8, alpha 16, q_proj/v_proj).")
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings, description="4-bit loading.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Optimisation (study defaults).")
    evaluation: EvalSettings = Field(default_factory=EvalSettings, description="Evaluation settings.")
    resources: ResourceSettings = Field(default_factory=ResourceSettings, description="Per-job resources and pricing.")
    retries: RetrySettings = Field(default_factory=RetrySettings, description="Failure handling.")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="MLflow settings.")
    storage_path: str = Field(
        default="", description="Checkpoints, adapters and results: a folder every node sees (NFS, EFS, FSx) or an "
        "object store URI (s3://bucket/prefix, gs://...). Default: the data folder.")
    search: SearchSettings | None = Field(
        default=None, description="LoRA hyper-parameter search on Ray Tune for the fine-tunes of some or all tasks "
        "(docs/search.md); without it every fine-tune trains once with the settings above.")


def catalog_problems(data: Any, catalog: Catalog) -> list[str]:
    """What in a raw sweep dict the catalogue contradicts: unknown or repeated base models and tasks, and
    LoRA target modules that are not linear layers of a listed base model (checked even when other fields are wrong)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return problems
    for key, known in (("base_models", catalog.base_models), ("tasks", catalog.tasks)):
        names = data.get(key)
        for index, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in known:
                what = key[:-1].replace("_", " ")
                problems.append(f"{key}[{index}]: unknown {what} {name!r}; see `loraland catalog --all`")
        if isinstance(names, list) and len(set(map(str, names))) != len(names):
            problems.append(f"{key}: lists a name twice")
    names = data.get("base_models")
    listed = dict.fromkeys(n for n in (names if isinstance(names, list) else []) if isinstance(n, str))
    bases = [catalog.base_models[n] for n in listed if n in catalog.base_models]
    lora = data.get("lora")
    problems += search_problems(data.get("search"), data.get("tasks"), bases)
    return problems + lora_target_problems(lora.get("target_modules") if isinstance(lora, dict) else None, bases)


def load_sweep(path: str | Path, catalog: Catalog | None = None) -> SweepConfig:
    """Load and validate a sweep file; every problem is collected and raised at once as a ConfigError."""
    catalog = catalog or load_catalog()
    data = read_yaml(path)
    problems = catalog_problems(data, catalog)
    try:
        sweep = parse_model(SweepConfig, data, str(path))
    except ConfigError as exc:
        raise ConfigError(str(path), exc.problems + problems) from None
    if problems:
        raise ConfigError(str(path), problems)
    return sweep


def storage_root(sweep: SweepConfig) -> str:
    """Where the sweep's jobs keep checkpoints and results: a folder or an object store URI."""
    return sweep.storage_path or str(data_home() / "sweeps" / sweep.name)


def config_hash(sweep: SweepConfig, kind: str) -> str:
    """Hash of every setting that changes a job's outcome (not resources, tracking or storage)."""
    relevant = {"kind": kind} | outcome_settings(sweep, kind)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def job_key(sweep: SweepConfig, base_model: str, task: str, kind: str) -> str:
    """The stable key of a job: sweep, base model, task, kind and config hash; a searched fine-tune's kind part is
    `search` and its hash covers the task's search settings too."""
    if kind == "train" and sweep.search is not None and sweep.search.searches(task):
        settings = json.dumps(sweep.search.for_task(task).model_dump(mode="json", exclude={"tasks"}), sort_keys=True)
        digest = hashlib.sha256(f"{config_hash(sweep, kind)}{settings}".encode()).hexdigest()[:12]
        return f"{sweep.name}/{base_model}/{task}/search-{digest}"
    return f"{sweep.name}/{base_model}/{task}/{kind}-{config_hash(sweep, kind)}"


def expand_jobs(sweep: SweepConfig, catalog: Catalog | None = None) -> list[JobConfig]:
    """Every job of the sweep: a fine-tune per (base, task), plus a base evaluation per pair if asked."""
    catalog = catalog or load_catalog()
    kinds: list[JobKind] = ["train", "evaluate_base"] if sweep.evaluate_base else ["train"]
    jobs = []
    for base_name in sweep.base_models:
        for task_name in sweep.tasks:
            for kind in kinds:
                key = job_key(sweep, base_name, task_name, kind)
                jobs.append(JobConfig(
                    kind=kind, job_key=key, base_model=catalog.base_model(base_name), task=catalog.task(task_name),
                    lora=sweep.lora, quantization=sweep.quantization, training=sweep.training,
                    evaluation=sweep.evaluation, device=sweep.resources.device,
                    output_dir=storage.join(storage_root(sweep), key.split("/", 1)[1]),
                ))
    return jobs
