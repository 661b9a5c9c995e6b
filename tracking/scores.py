"""Scores of published adapters for a leaderboard: what each adapter's train run logged (its fine-tuned
score, the base model's zero-shot score on the same task, the lift), the MLflow UI address of the run,
and the study's published scores for the same (task, base model) pair.

The train run's metrics are logged by `tracking.tracker.JobTracker.finish`: `score`, and `base_score`
and `lift` when the base was evaluated before (the sweep runs base evaluations first).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mlflow.exceptions import MlflowException

from core.parsing import hide_credentials
from tracking import store
from tracking.report import STUDY_SCORES
from tracking.retry import call_with_retry


@dataclass(frozen=True)
class RunScores:
    """What one adapter's train run logged (None where a value is missing)."""

    run_id: str
    experiment_id: str
    score: float | None
    base_score: float | None
    lift: float | None


@dataclass(frozen=True)
class StudyScores:
    """The study's published scores for one (task, base model) pair, and GPT-3.5's and GPT-4's on the task."""

    base_score: float | None
    finetuned_score: float | None
    gpt35_score: float | None
    gpt4_score: float | None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def run_scores(run_ids: list[str], uri: str | None = None) -> dict[str, RunScores]:
    """The scores each run logged, by run id; a run that no longer exists is left out."""
    found: dict[str, RunScores] = {}
    for run_id in dict.fromkeys(run_ids):
        try:
            run = call_with_retry(store.client(uri).get_run, run_id)
        except MlflowException:
            continue
        metrics = run.data.metrics
        score, base = _finite(metrics.get("score")), _finite(metrics.get("base_score"))
        if "lift" in metrics:
            lift = _finite(metrics.get("lift"))
        else:
            lift = score - base if score is not None and base is not None else None
        found[run_id] = RunScores(run_id, run.info.experiment_id, score, base, lift)
    return found


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when tracking goes to an http(s) server (never with the URI's `user:pass@`),
    else None (a SQLite store has no address of its own: `loraland ui` serves it)."""
    resolved = store.resolve_tracking_uri(uri)
    if not store.is_server_uri(resolved):
        return None
    return f"{hide_credentials(resolved, mask='').rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _number(text: str | None) -> float | None:
    try:
        return _finite(float(text)) if text not in (None, "") else None
    except ValueError:
        return None


@lru_cache(maxsize=4)
def study_scores(path: Path = STUDY_SCORES) -> dict[tuple[str, str], StudyScores]:
    """The study's table (tracking/reference/lora_land_paper_scores.csv) by (task, base model)."""
    with open(path, newline="") as handle:
        return {(row["task"], row["base_model"]): StudyScores(
                    _number(row.get("base_score")), _number(row.get("finetuned_score")),
                    _number(row.get("gpt35_score")), _number(row.get("gpt4_score")))
                for row in csv.DictReader(handle)}


def gpt_scores(task: str) -> tuple[float | None, float | None]:
    """GPT-3.5's and GPT-4's published scores on `task` (the study lists them once per base model, all equal)."""
    found = next((scores for (name, _), scores in study_scores().items() if name == task), None)
    return (found.gpt35_score, found.gpt4_score) if found else (None, None)
