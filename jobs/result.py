"""What a finished job leaves behind: result.json, the small record the driver and tracking read.

Light on purpose (no torch): the driver, tracking and tests read results without loading a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.prompts import examples_digest
from core.schemas import EVAL_PATH_FIELDS
from jobs.config import JobConfig

RESULT_FILE = "result.json"


@dataclass
class JobResult:
    """What a job hands to the orchestrator and tracking."""

    job_key: str
    kind: str
    base_model: str
    task: str
    metric: str
    score: float
    examples: int
    adapter_dir: str | None
    params: dict[str, Any]
    summary: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    failed_generations: int = 0  # left out of the mean by the study's scoring (jobs/study_metrics.py)
    # the rows its prompts showed as worked examples (the task's first training rows; the page's task card shows them)
    worked_examples: list[dict[str, Any]] = field(default_factory=list)
    # In memory only (never in result.json): the first training examples as trained on, {prompt, completion} each, for
    # the tracker to log as the run's training input; empty for a result loaded from its file or an evaluate_base job.
    training_examples: list[dict[str, str]] = field(default_factory=list, repr=False, metadata={"saved": False})

    def save(self, path: Path) -> None:
        """Write atomically (a job killed mid-write leaves no half result); the in-memory-only fields are left out."""
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved", True)}
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps(saved))
        staging.replace(path)

    @classmethod
    def load(cls, path: Path) -> JobResult:
        """The result saved at `path`."""
        return cls(**json.loads(path.read_text()))


def job_params(config: JobConfig, worked_examples: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Every hyper-parameter of the job, flattened (`lora.r`, `training.learning_rate`, ...), and what its prompts'
    `worked_examples` held (how many, a digest of the rows). The evaluation path (`evaluation.engine`,
    `evaluation.evaluator.*`) is left out: it changes no completion, and a job re-run on the other path reuses its
    MLflow run, whose params cannot change value."""
    params: dict[str, Any] = {"kind": config.kind, "base_model": config.base_model.name,
                              "base_model.hf_id": config.base_model.hf_id,
                              "task": config.task.name, "task.metric": config.task.metric,
                              # what the report compares with the study (tracking/study_analysis.py), as this run had it
                              "task.study_metric": config.task.study_metric,
                              "task.max_new_tokens": config.task.max_new_tokens,
                              "task.eval_split": (config.task.eval or config.task).dataset.eval_split,
                              "task.dataset_revision": config.task.dataset.revision,
                              "task.worked_examples": len(worked_examples),
                              "task.worked_examples_digest": examples_digest(worked_examples) if worked_examples
                              else None}
    sections = ("lora", "quantization", "training", "evaluation")
    path = set(EVAL_PATH_FIELDS)
    return params | flat({section: getattr(config, section).model_dump(mode="json", exclude=path if section ==
                                                                      "evaluation" else None) for section in sections})


def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"lora": {"r": 8}}` -> `{"lora.r": 8}`."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out
