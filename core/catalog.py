"""The catalogue: the study's 10 base models and 31 tasks, plus tiny offline counterparts and demo tasks.

Reading the catalogue files and resolving names happens here; the entries' schemas are `core/schemas.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from core.errors import ConfigError, NotFound
from core.parsing import parse_model, read_yaml
from core.paths import CONFIG_DIR
from core.prompts import EXAMPLES, template_problems, template_reads
from core.schemas import BaseModelSpec, TaskSpec

CATALOG_DIR = CONFIG_DIR / "catalog"
STUDY_FILES = ("base_models.yaml", "tasks.yaml")
OFFLINE_FILES = ("tiny_models.yaml", "demo_tasks.yaml")
Spec = TypeVar("Spec", BaseModelSpec, TaskSpec)


@dataclass(frozen=True)
class Catalog:
    """Base models and tasks by name; `study` marks the names that come from the LoRA Land paper."""

    base_models: dict[str, BaseModelSpec] = field(default_factory=dict)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    study_base_models: frozenset[str] = frozenset()
    study_tasks: frozenset[str] = frozenset()

    def base_model(self, name: str) -> BaseModelSpec:
        """The named base model, or a NotFound (a KeyError) listing the known names."""
        if name not in self.base_models:
            raise NotFound(f"unknown base model {name!r}; known: {', '.join(sorted(self.base_models))}")
        return self.base_models[name]

    def task(self, name: str) -> TaskSpec:
        """The named task, or a NotFound (a KeyError) listing the known names."""
        if name not in self.tasks:
            raise NotFound(f"unknown task {name!r}; known: {', '.join(sorted(self.tasks))}")
        return self.tasks[name]


def load_catalog_file(path: Path) -> tuple[list[BaseModelSpec], list[TaskSpec]]:
    """Read one catalogue YAML (`base_models:` and/or `tasks:` lists), validating every entry; every problem
    is collected into one ConfigError."""
    data = read_yaml(path)
    if not set(data) <= {"base_models", "tasks"}:
        raise ConfigError(str(path), ["a catalogue file holds only `base_models:` and `tasks:` lists"])
    models, model_problems = _parse_entries(data, "base_models", BaseModelSpec, str(path))
    tasks, task_problems = _parse_entries(data, "tasks", TaskSpec, str(path))
    if model_problems or task_problems:
        raise ConfigError(str(path), model_problems + task_problems)
    return models, tasks


def _parse_entries(data: dict[str, Any], key: str, spec_type: type[Spec], source: str) -> tuple[list[Spec], list[str]]:
    """The valid entries of the `key:` list and a line per problem (invalid entry, name listed twice, broken
    template)."""
    entries = data.get(key) or []
    if not isinstance(entries, list):
        return [], [f"{key}: expected a list of entries"]
    specs: list[Spec] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            spec = parse_model(spec_type, entry, source)
        except ConfigError as exc:
            problems += [f"{key}[{index}].{p}" for p in exc.problems]
            continue
        if spec.name in seen:
            problems.append(f"{key}[{index}].name: {spec.name!r} is listed twice")
        seen.add(spec.name)
        if isinstance(spec, TaskSpec):
            problems += [f"{key}[{index}].{p}" for p in template_problems_of(spec)]
        specs.append(spec)
    return specs, problems


def template_problems_of(task: TaskSpec) -> list[str]:
    """A line per broken template of a task: each must parse and read only the columns it declares (a prompt also
    its worked `examples`, which it must show when the task declares some, and only then)."""
    shown = [EXAMPLES] if task.worked_examples else []
    checks = [("prompt", task.prompt, task.columns + shown), ("completion", task.completion, task.columns)]
    if task.eval:
        checks.append(("eval.prompt", task.eval.prompt, task.eval.columns + shown))
    problems = [f"{name}: {problem}" for name, source, columns in checks
                for problem in template_problems(source, columns)]
    return problems or example_problems(task)


def example_problems(task: TaskSpec) -> list[str]:
    """A line per clash of a task's worked examples with its (valid) templates and columns."""
    if not task.worked_examples:
        return []
    problems = [f"columns: {name!r} names the worked examples in its templates; rename the column"
                for name in (EXAMPLES, "completion") if name in task.columns]
    if not template_reads(task.prompt, EXAMPLES):
        problems.append(f"prompt: never shows its {task.worked_examples} worked `{EXAMPLES}`; show them, or set "
                        "worked_examples: 0")
    return problems


@lru_cache(maxsize=8)
def load_catalog(directory: Path = CATALOG_DIR) -> Catalog:
    """The whole catalogue in `directory`: the study's files, then the offline tiny models and demo tasks."""
    base_models: dict[str, BaseModelSpec] = {}
    tasks: dict[str, TaskSpec] = {}
    study: dict[str, set[str]] = {"models": set(), "tasks": set()}
    for filename in STUDY_FILES + OFFLINE_FILES:
        path = directory / filename
        if not path.exists():
            continue
        models, new_tasks = load_catalog_file(path)
        clashes = sorted(({m.name for m in models} & set(base_models)) | ({t.name for t in new_tasks} & set(tasks)))
        if clashes:
            raise ConfigError(str(path), [f"{name!r} is already defined by another catalogue file" for name in clashes])
        for model in models:
            base_models[model.name] = model
            if filename in STUDY_FILES:
                study["models"].add(model.name)
        for task in new_tasks:
            tasks[task.name] = task
            if filename in STUDY_FILES:
                study["tasks"].add(task.name)
    return Catalog(base_models, tasks, frozenset(study["models"]), frozenset(study["tasks"]))
