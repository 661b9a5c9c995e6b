"""LoRA search on Ray Tune: the fine-tune of a (base model, task) whose task a sweep's `search` section names is a Tune
experiment, whose best trial's adapter becomes the job's adapter (docs/search.md).

- One search is one work unit of the scheduler (`SearchJob`): a Ray task (`run_search_job`) that holds the job's MLflow
  run, runs the Tune experiment in storage under the job's output folder (`<output_dir>/tune`: a driver submitted again
  `Tuner.restore`s it, so no finished trial runs again and the winner is the same), then evaluates the winner once on
  the task's evaluation rows and finishes the job's run with it, which registers it and moves the task's champion.
- Trials are function trainables that train nothing themselves: each calls the base model's trial host, a Ray actor
  (`TrialHostActor`, one per sweep and base model, named) wrapping `jobs.trials.TrialHost`, which co-trains up to K
  trials over one loaded base; a trial the scheduler stops frees its slot for the next without reloading the base. The
  host asks for plan's GPU share of K co-trained members (`plan.group_size`, co-training's memory model); K also caps
  the trials Tune runs at once.
- A trial reports `{"score", "step"}` (the task's metric on the validation rows) every `eval_every` steps with a
  checkpoint; its own training checkpoints are in `<output_dir>/trials/<trial id>`, where the host resumes it from.
  Each trial logs to its own MLflow run nested under the job's (tracking/search_runs.py); `TrialEnd`, a Tune callback
  in the search's process, ends that run and frees the trial's slot however the trial ended. A failed trial does not
  fail the search; a search with no scored trial fails its job.
- Faults and storage (docs/search.md#faults-and-resume): everything lives on the sweep's storage (a shared folder or
  an object store), the winner's adapter copied into the job's own folder. A trial whose host is lost with its node
  starts a new host and resumes there from its checkpoint (no failure); trials run on the search's own node, so they
  die only with the search, which the scheduler resubmits and Tune restores.

This module is the driver's side (the space, trial settings, the host, the units, `plan`'s view); what runs on Ray
(the search's task, its trials, the callback) is orchestrator/search_trials.py, which imports Ray Tune.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from core.schemas import BaseModelSpec, LoraSettings, QuantizationSettings, TrainingSettings
from jobs import storage
from jobs.config import JobConfig
from orchestrator.config import SweepConfig
from orchestrator.plan import group_size
from orchestrator.resources import group_demand, job_demand, planned_seconds, ray_options, submit_task
from orchestrator.search_config import SearchSettings, SearchSpace
from orchestrator.units import SingleJob, WorkUnit

TUNE_DIR = "tune"  # the Tune experiment, under the job's output folder
TRIALS_DIR = "trials"  # each trial's checkpoints and adapter, by trial id
STEP_FILE = "step.json"  # what a trial's Tune checkpoint holds: the step it reached
HOST_NAMESPACE = "loraland"
SEARCH_TASK_DEMAND = {"CPU": 0.0}  # the search's own task only coordinates; its host holds the resources
LINEAR_ALL = "all-linear"


# --------------------------------------------------------------------------- the space and a trial's job


def param_space(space: SearchSpace) -> dict[str, Any]:
    """The space as Tune's param space. Target module choices are strings (`q_proj,v_proj` or `all-linear`): Optuna's
    categorical values must be plain."""
    from ray import tune

    values: dict[str, Any] = {}
    for name in ("r", "alpha", "dropout", "max_steps"):
        if getattr(space, name) is not None:
            values[name] = tune.choice(getattr(space, name))
    if space.target_modules is not None:
        values["target_modules"] = tune.choice([choice if isinstance(choice, str) else ",".join(choice)
                                                for choice in space.target_modules])
    rates = space.learning_rate
    if isinstance(rates, list):
        values["learning_rate"] = tune.choice(rates)
    elif rates is not None:
        values["learning_rate"] = tune.loguniform(rates.low, rates.high)
    return values


def trial_settings(job: JobConfig, config: dict[str, Any], eval_every: int) -> tuple[LoraSettings, TrainingSettings]:
    """The job's LoRA and training settings with a trial's draws applied (checkpoints every `eval_every` steps, where
    the trial reports, and its loss logged at least as often, for ASHA's tie-break on it)."""
    lora = job.lora.model_dump() | {name: type(getattr(job.lora, name))(config[name])
                                    for name in ("r", "alpha", "dropout") if name in config}
    if "target_modules" in config:
        targets = str(config["target_modules"])
        lora["target_modules"] = targets if targets == LINEAR_ALL else targets.split(",")
    training = job.training.model_dump() | {"checkpoint_every": eval_every,
                                            "log_every": min(job.training.log_every, eval_every)}
    if "learning_rate" in config:
        training["learning_rate"] = float(config["learning_rate"])
    if "max_steps" in config:
        training["max_steps"] = int(config["max_steps"])
    return LoraSettings.model_validate(lora), TrainingSettings.model_validate(training)


def trial_job(job: JobConfig, config: dict[str, Any], trial_id: str, eval_every: int) -> JobConfig:
    """The job one trial trains: the searched job with the trial's settings, its own key and output folder."""
    lora, training = trial_settings(job, config, eval_every)
    return job.model_copy(update={"lora": lora, "training": training, "job_key": f"{job.job_key}/{trial_id}",
                                  "output_dir": storage.join(job.output_dir, TRIALS_DIR, trial_id)})


def winner_job(job: JobConfig, config: dict[str, Any], eval_every: int) -> JobConfig:
    """The searched job with the winning trial's settings: what its run and result record."""
    lora, training = trial_settings(job, config, eval_every)
    return job.model_copy(update={"lora": lora, "training": training})


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's draws as MLflow params (`lora.r`, `training.learning_rate`, ...)."""
    section = {"r": "lora", "alpha": "lora", "dropout": "lora", "target_modules": "lora"}
    return {f"{section.get(name, 'training')}.{name}": value for name, value in sorted(config.items())}


# --------------------------------------------------------------------------- the trial host


@dataclass(frozen=True)
class HostSpec:
    """The trial host of a sweep's base model: its actor name, what it loads, its slots and Ray demand."""

    name: str
    base_model: BaseModelSpec
    quantization: QuantizationSettings
    device: str
    slots: int
    validation_rows: int
    demand: dict[str, float]


class TrialHostActor:
    """`jobs.trials.TrialHost` as a Ray actor: the base loaded once, up to `slots` trials co-trained over it. Its
    methods run on threads (`max_concurrency`), so one trial's `train` waits on the shared steps while others call."""

    def __init__(self, base: BaseModelSpec, quantization: QuantizationSettings, device: str, slots: int,
                 validation_rows: int) -> None:
        from jobs.trials import TrialHost

        self.host = TrialHost(base, quantization, device, slots, validation_size=validation_rows)

    def train(self, trial_id: str, job: JobConfig, until_step: int) -> list[dict[str, float]]:
        return self.host.train(trial_id, job, until_step)

    def validate(self, trial_id: str) -> float:
        return self.host.validate(trial_id)

    def save(self, trial_id: str) -> str:
        return self.host.save(trial_id)

    def drop(self, trial_id: str) -> None:
        self.host.drop(trial_id)

    def resumed_from(self, trial_id: str) -> int:
        return self.host.resumed_from(trial_id)


def host_name(sweep_name: str, base_model: str) -> str:
    """The trial host's actor name (in namespace `HOST_NAMESPACE`)."""
    return f"trials:{sweep_name}:{base_model}"


def trial_host(spec: HostSpec) -> Any:
    """The named trial host, started if it is not running (first trial, or after its node was lost)."""
    import ray

    actor = ray.remote(TrialHostActor).options(
        name=spec.name, namespace=HOST_NAMESPACE, get_if_exists=True, lifetime="detached",
        max_concurrency=spec.slots + 4, scheduling_strategy="DEFAULT",  # never in a calling trial's placement group
        **ray_options(spec.demand))
    return actor.remote(spec.base_model, spec.quantization, spec.device, spec.slots, spec.validation_rows)


def release_hosts(sweep: SweepConfig) -> None:
    """End the sweep's trial hosts (detached actors: they outlive a killed driver, so a new driver ends them first)."""
    import ray

    for base_model in sweep.base_models:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(host_name(sweep.name, base_model), namespace=HOST_NAMESPACE))


@contextlib.contextmanager
def trial_hosts(sweep: SweepConfig) -> Iterator[None]:
    """The sweep's trial hosts start fresh inside the block (a killed driver's are ended) and are ended after it."""
    if sweep.search is not None:
        release_hosts(sweep)
    try:
        yield
    finally:
        if sweep.search is not None:
            release_hosts(sweep)


def largest_trial(job: JobConfig, space: SearchSpace) -> JobConfig:
    """The job with the space's largest rank and widest targets: what plan's memory model prices a slot at."""
    lora = job.lora.model_dump()
    if space.r:
        lora["r"] = max(space.r)
    if space.target_modules and LINEAR_ALL in space.target_modules:
        lora["target_modules"] = LINEAR_ALL
    return job.model_copy(update={"lora": LoraSettings.model_validate(lora)})


def host_spec(job: JobConfig, sweep: SweepConfig, settings: SearchSettings) -> HostSpec:
    """The host of `job`'s base model: K slots (the trials at once: `max_concurrent_trials`, capped by the co-training
    memory model's group size for one GPU, K as set with `resources.co_train: K`), and plan's GPU share of K members."""
    largest = largest_trial(job, settings.space)
    resources = sweep.resources
    if resources.co_train == "off":
        resources = resources.model_copy(update={"co_train": "auto"})
    slots = max(1, min(settings.max_concurrent_trials, settings.num_samples, group_size(largest, resources)))
    return HostSpec(host_name(sweep.name, job.base_model.name), job.base_model, job.quantization, job.device, slots,
                    settings.validation_rows, group_demand([largest] * slots, sweep))


# --------------------------------------------------------------------------- the scheduler's unit


@dataclass(frozen=True)
class SearchPlan:
    """Everything one search needs on its worker: the job, the task's search settings, its host, the winner's
    evaluation demand, the retries of a trial (`max_failures`) and the losses of its host a trial outlives
    (`max_node_losses`, -1: any), and where it is tracked."""

    job: JobConfig
    settings: SearchSettings
    host: HostSpec
    evaluation_demand: dict[str, float]
    max_failures: int
    max_node_losses: int
    experiment_id: str
    uri: str




@dataclass(frozen=True)
class SearchJob(SingleJob):
    """A searched job as the scheduler's unit: one Ray task (`run_search_job`) that coordinates the search; its
    `demand` is its trial host's (what the search holds of the cluster), its task itself asks for none."""

    @property
    def label(self) -> str:
        return f"{'search':13s} {self.job.base_model.name} x {self.job.task.name}"

    def submit(self) -> Any:
        return submit_task(self.task, self.key, SEARCH_TASK_DEMAND, *self.args)


def is_searched(job: JobConfig, sweep: SweepConfig) -> bool:
    """Whether `job` is a fine-tune the sweep's search section covers."""
    return job.kind == "train" and sweep.search is not None and sweep.search.searches(job.task.name)


def search_plan(job: JobConfig, sweep: SweepConfig, experiment_id: str, uri: str) -> SearchPlan:
    """The plan of `job`'s search under the sweep's settings for its task."""
    assert sweep.search is not None
    settings = sweep.search.for_task(job.task.name)
    return SearchPlan(job, settings, host_spec(job, sweep, settings), job_demand(job, sweep),
                      sweep.retries.max_failures, sweep.retries.max_node_losses, experiment_id, uri)


def search_units(todo: list[JobConfig], sweep: SweepConfig, tracking: tuple[str, str, str]) -> list[WorkUnit]:
    """The searched jobs among `todo` as units (the others are left to `units.work_units`); `tracking` is (experiment
    id, parent run id, URI). Plan's time for one: its trials' compute, K at a time."""
    import ray

    experiment_id, parent_run_id, uri = tracking
    from orchestrator.search_trials import run_search_job

    task = ray.remote(max_calls=1)(run_search_job)  # a fresh process per search: Tune keeps state per process
    units: list[WorkUnit] = []
    for job in (job for job in todo if is_searched(job, sweep)):
        plan = search_plan(job, sweep, experiment_id, uri)
        seconds = planned_seconds(job, sweep) * plan.settings.num_samples / plan.host.slots
        units.append(SearchJob(job, task, (plan, parent_run_id), plan.host.demand, seconds))
    return units



def plan_searches(sweep: SweepConfig) -> list[dict[str, Any]]:
    """What `loraland plan` shows of each search: its trials, how many co-train at once on its host, the host's memory
    and GPU share, and the trials' GPU-hours and cost run to their longest `max_steps` (ASHA stops most of them
    earlier: an upper bound)."""
    from orchestrator.config import expand_jobs
    from orchestrator.plan import job_gpu_hours, plan_group

    rows = []
    for job in (job for job in expand_jobs(sweep) if is_searched(job, sweep)):
        assert sweep.search is not None
        settings = sweep.search.for_task(job.task.name)
        host = host_spec(job, sweep, settings)
        longest = largest_trial(job, settings.space)
        steps = max(settings.space.max_steps or [job.training.max_steps])
        longest = longest.model_copy(update={"training": longest.training.model_copy(update={"max_steps": steps})})
        hours = settings.num_samples * job_gpu_hours(longest, sweep.resources)
        rows.append({"base_model": job.base_model.name, "task": job.task.name, "job_key": job.job_key,
                     "trials": settings.num_samples, "co_trained": host.slots, "scheduler": settings.scheduler,
                     "algorithm": settings.algorithm, "searched": settings.space.searched(),
                     "gpu_memory_gb": plan_group([longest] * host.slots, sweep.resources).gpu_memory_gb,
                     "gpus": host.demand.get("GPU", 0.0), "gpu_hours": round(hours, 6),
                     "cost": round(hours * sweep.resources.price_per_gpu_hour, 2)})
    return rows
