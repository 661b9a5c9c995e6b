"""The report's part on LoRA searches (docs/search.md): per searched job a table of its trials (settings, the step each
stopped at, its best validation score), a plot of validation score against step for every trial, and the winner's
settings beside the study's default. Read from the trial runs tracking/search_runs.py logs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from core.schemas import LoraSettings, TrainingSettings
from tracking import store
from tracking.search_runs import (
    ROLE_TRIAL,
    TAG_SEARCH_JOB,
    TAG_STOPPED_AT,
    TAG_STOPPED_EARLY,
    TAG_TRIAL,
    VALIDATION_METRIC,
)

SETTINGS = ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "training.learning_rate",
            "training.max_steps")
TRIAL_COLUMNS = ["job_key", "base_model", "task", "trial", "status", *SETTINGS, "stopped_at", "stopped_early",
                 "best_validation_score"]
CURVE_COLUMNS = ["job_key", "trial", "step", "score"]


@dataclass(frozen=True)
class SearchRecord:
    """What the report shows of an experiment's searches: its trials, their validation curves, its searched jobs."""

    trials: pd.DataFrame
    curves: pd.DataFrame
    searched: dict[str, dict[str, Any]]


def search_record(experiment_id: str, uri: str | None = None) -> SearchRecord:
    """The experiment's searches as the report reads them (empty when it has none)."""
    trials, curves = trial_frames(experiment_id, uri)
    return SearchRecord(trials, curves, searched_jobs(experiment_id, uri))


def study_defaults() -> dict[str, Any]:
    """The study's setting of each searched dimension (the schemas' defaults: r 8, alpha 16, q_proj/v_proj, 2e-4)."""
    lora, training = LoraSettings(), TrainingSettings()
    return {f"lora.{k}": getattr(lora, k) for k in ("r", "alpha", "dropout", "target_modules")} | {
        "training.learning_rate": training.learning_rate, "training.max_steps": training.max_steps}


def trial_frames(experiment_id: str, uri: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(a row per trial run of the experiment, a row per (trial, step) validation score)."""
    rows, curves = [], []
    client = store.client(uri)
    for run in store.search_all_runs(experiment_id, store.tag_filter(role=ROLE_TRIAL), uri):
        tags, params = run.data.tags, run.data.params
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, VALIDATION_METRIC))
        job_key, trial = tags.get(TAG_SEARCH_JOB, ""), tags.get(TAG_TRIAL, "")
        curves += [{"job_key": job_key, "trial": trial, "step": step, "score": score} for step, score in history]
        stopped = tags.get(TAG_STOPPED_AT)
        rows.append({"job_key": job_key, "base_model": tags.get(store.TAG_BASE_MODEL), "task": tags.get(store.TAG_TASK),
                     "trial": trial, "status": run.info.status,
                     **{key: store.decode_param(params[key]) if key in params else None for key in SETTINGS},
                     "stopped_at": int(stopped) if stopped and stopped != "None" else None,
                     "stopped_early": tags.get(TAG_STOPPED_EARLY) == "true",
                     "best_validation_score": max((s for _, s in history), default=math.nan)})
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS), pd.DataFrame(curves, columns=CURVE_COLUMNS)


def searched_jobs(experiment_id: str, uri: str | None = None) -> dict[str, dict[str, Any]]:
    """The experiment's finished searched job runs: job key -> its `run_id`, the winning trial (`trial`) and the
    settings its run logged (the winner's)."""
    from tracking.search_runs import TAG_SEARCHED, TAG_WINNER

    found = {}
    for run in store.job_runs(experiment_id, uri, status="FINISHED"):
        if run.data.tags.get(TAG_SEARCHED) == "true":
            params = run.data.params
            found[run.data.tags.get(store.TAG_JOB_KEY, "")] = {"run_id": run.info.run_id,
                                                               "trial": run.data.tags.get(TAG_WINNER, "")} | {
                key: store.decode_param(params[key]) for key in SETTINGS if key in params}
    return found


def winner_settings(searched: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Per searched job (`searched_jobs`), each searched dimension's winning value beside the study's default."""
    defaults = study_defaults()
    rows = [{"job_key": job_key, "setting": setting, "winner": winner.get(setting), "study_default": default}
            for job_key, winner in sorted(searched.items()) for setting, default in defaults.items()]
    return pd.DataFrame(rows, columns=["job_key", "setting", "winner", "study_default"])


def curves_chart(curves: pd.DataFrame, job_key: str, path: Path) -> Any:
    """Validation score against step, a line per trial of the job (tracking/charts.py's style)."""
    from tracking.charts import plot_validation_curves

    return plot_validation_curves(curves[curves["job_key"] == job_key], job_key.split("/", 1)[-1], path)


def search_sections(record: SearchRecord, out: Path) -> list[tuple[str, str, pd.DataFrame, str, Any]]:
    """The report's sections on the searches: (title, text, table, its CSV file name, chart or None) each: the winners'
    settings beside the study's defaults, then per searched job its trials and their validation curves."""
    sections: list[tuple[str, str, pd.DataFrame, str, Any]] = [(
        "Searched adapters", "Adapters chosen by a LoRA search (docs/search.md): each searched dimension of the "
        "winning trial beside the study's default.", winner_settings(record.searched), "search_winners.csv", None)]
    for index, job_key in enumerate(sorted(record.searched)):
        trials = record.trials[record.trials["job_key"] == job_key].drop(columns=["job_key"])
        text = (f"{len(trials)} trials, winner {record.searched[job_key].get('trial')}; stopped_at: the step a trial "
                "reached (stopped_early: the scheduler stopped it), best_validation_score: on the held-out rows.")
        sections.append((f"Search: {job_key}", text, trials, f"search_trials_{index}.csv",
                         curves_chart(record.curves, job_key, out / f"search_curves_{index}.png")))
    return sections


def mark_searched_adapters(board: pd.DataFrame, record: SearchRecord) -> pd.DataFrame:
    """The leaderboard with a `searched` column (its fine-tuned adapter is a search's winner)."""
    run_ids = {job["run_id"] for job in record.searched.values()}
    return board.assign(searched=board["finetuned_run_id"].isin(run_ids))
