"""A sweep's `search` section: the LoRA hyper-parameter search run on Ray Tune for its tasks (orchestrator/search.py).

    search:
      space: {r: [4, 8, 16], alpha: [16, 32], learning_rate: {low: 1.0e-4, high: 1.0e-2}, max_steps: [200, 400]}
      num_samples: 8            # trials per (base model, task)
      validation_rows: 32       # the objective: the task's metric on this many held-out training rows
      eval_every: 50            # ... measured every this many steps
      scheduler: asha           # or none: every trial runs to its max_steps
      asha: {grace_period: 50, reduction_factor: 2}
      algorithm: random         # or optuna (TPE)
      max_concurrent_trials: 4
      per_task: {demo_colors: {num_samples: 4, space: {r: [2, 4]}}}

A dimension left out of `space` keeps the sweep's own value (`lora`, `training`). Each task's settings are the section
with that task's `per_task` entry laid over it (a `space` entry's dimensions replace the section's one by one).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from core.schemas import BaseModelSpec, StrictModel, names_or
from jobs.config import lora_target_problems

PositiveInt = Annotated[int, Field(gt=0)]
Targets = list[str] | Literal["all-linear"]


class LogRange(StrictModel):
    """A learning rate drawn log-uniformly between `low` and `high`."""

    low: float = Field(gt=0, description="Smallest value.")
    high: float = Field(gt=0, description="Largest value.")

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


def _rates_kind(value: Any) -> str:
    return "range" if isinstance(value, (dict, LogRange)) else "choices"


# One error per problem: a {low, high} mapping is checked as a range only, anything else as a list of choices.
LearningRates = Annotated[
    Annotated[list[Annotated[float, Field(gt=0)]], Tag("choices")] | Annotated[LogRange, Tag("range")],
    Discriminator(_rates_kind),
]


class SearchSpace(StrictModel):
    """The values a trial draws from; a dimension left out keeps the sweep's own setting."""

    r: list[PositiveInt] | None = Field(default=None, min_length=1, description="LoRA ranks to choose from.")
    alpha: list[PositiveInt] | None = Field(default=None, min_length=1, description="LoRA alphas to choose from.")
    dropout: list[Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        default=None, min_length=1, description="LoRA dropouts to choose from.")
    target_modules: list[Targets] | None = Field(
        default=None, min_length=1, description="Target module choices: each a list of layer names, or all-linear.")
    learning_rate: LearningRates | None = Field(
        default=None, description="Peak learning rates to choose from, or {low, high} drawn log-uniformly.")
    max_steps: list[PositiveInt] | None = Field(
        default=None, min_length=1, description="Training steps to choose from (a trial runs at most this many).")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _each_choice(cls, value: Any) -> Any:
        if isinstance(value, list):
            for choice in value:
                names_or("all-linear")(choice)
        return value

    def searched(self) -> list[str]:
        """The dimensions this space searches."""
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class AshaSettings(StrictModel):
    """Ray Tune's ASHA (asynchronous successive halving) on the validation score against training steps."""

    grace_period: int = Field(default=50, gt=0, description="Steps every trial trains before ASHA may stop it.")
    reduction_factor: float = Field(default=2.0, gt=1, description="Trials kept at each rung: 1 in this many.")


class SearchOverride(StrictModel):
    """One task's changes to the search section (any field of it but `tasks`, `validation_rows` (one slice size per
    base model's trial host) and `per_task`)."""

    space: SearchSpace | None = Field(default=None, description="Dimensions that replace the section's, one by one.")
    num_samples: int | None = Field(default=None, gt=0, description="Trials for this task.")
    eval_every: int | None = Field(default=None, gt=0, description="Validation interval for this task.")
    scheduler: Literal["asha", "none"] | None = Field(default=None, description="Scheduler for this task.")
    asha: AshaSettings | None = Field(default=None, description="ASHA settings for this task.")
    algorithm: Literal["random", "optuna"] | None = Field(default=None, description="Search algorithm for this task.")
    max_concurrent_trials: int | None = Field(default=None, gt=0, description="Concurrent trials for this task.")


class SearchSettings(StrictModel):
    """A sweep's hyper-parameter search: per (base model, task) of `tasks`, `num_samples` trials on Ray Tune whose
    best adapter (by the task's metric on `validation_rows` held-out training rows) becomes the job's adapter."""

    tasks: list[str] | Literal["all"] = Field(
        default="all", description="Tasks whose fine-tunes are searched (the others train once with the sweep's "
        "settings): all, or a list of the sweep's tasks.")
    space: SearchSpace = Field(default_factory=SearchSpace, description="What the trials draw from.")
    num_samples: int = Field(default=8, gt=0, description="Trials per (base model, task).")
    validation_rows: int = Field(default=32, gt=0, description="Training rows held out to score trials: the "
                                 "objective is the task's own metric on them (never an evaluation row).")
    eval_every: int = Field(default=50, gt=0, description="A trial is scored (and checkpointed) every this many steps.")
    scheduler: Literal["asha", "none"] = Field(default="asha", description="asha stops weak trials early; none runs "
                                               "every trial to its max_steps.")
    asha: AshaSettings = Field(default_factory=AshaSettings, description="ASHA's grace period and reduction factor.")
    algorithm: Literal["random", "optuna"] = Field(default="random", description="How trials draw from the space: "
                                                   "random, or optuna (Tree-structured Parzen Estimator).")
    max_concurrent_trials: int = Field(default=4, gt=0, description="Trials training at once per (base model, task); "
                                       "they are co-trained over one base in one process.")
    seed: int = Field(default=0, description="Seed of the search algorithm's draws.")
    per_task: dict[str, SearchOverride] = Field(default_factory=dict, description="Per-task changes, by task name.")

    _tasks = field_validator("tasks", mode="before")(names_or("all"))

    def searches(self, task: str) -> bool:
        """Whether the fine-tunes of `task` are searched."""
        return self.tasks == "all" or task in self.tasks

    def for_task(self, task: str) -> SearchSettings:
        """The section with `task`'s override laid over it (no `per_task` left)."""
        override = self.per_task.get(task)
        changes: dict[str, Any] = {"per_task": {}}
        if override is not None:
            changes |= {name: getattr(override, name) for name in override.model_fields_set if name != "space"}
            if override.space is not None:
                space = {name: getattr(override.space, name) for name in override.space.model_fields_set}
                changes["space"] = self.space.model_copy(update=space)
        return self.model_copy(update=changes)


def search_problems(search: Any, tasks: Any, base_models: list[BaseModelSpec]) -> list[str]:
    """What a raw `search` section contradicts in its sweep: tasks (searched or overridden) the sweep does not list,
    and target module choices that are not linear layers of its base models."""
    if not isinstance(search, dict):
        return []
    listed = set(tasks) if isinstance(tasks, list) else set()
    problems = []
    named = search.get("tasks")
    for index, task in enumerate(named if isinstance(named, list) else []):
        if task not in listed:
            problems.append(f"search.tasks[{index}]: {task!r} is not one of the sweep's tasks")
    overrides = search.get("per_task")
    sections: list[tuple[str, Any]] = [("search.space", search.get("space"))]
    for task, override in (overrides.items() if isinstance(overrides, dict) else []):
        if task not in listed:
            problems.append(f"search.per_task.{task}: not one of the sweep's tasks")
        if isinstance(override, dict):
            sections.append((f"search.per_task.{task}.space", override.get("space")))
    for where, space in sections:
        choices = space.get("target_modules") if isinstance(space, dict) else None
        for index, choice in enumerate(choices if isinstance(choices, list) else []):
            problems += lora_target_problems(choice, base_models, f"{where}.target_modules[{index}]")
    return problems
