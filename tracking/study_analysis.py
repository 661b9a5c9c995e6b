"""The study's headline analyses, recomputed on a sweep's leaderboard, and a per-pair comparison with the study.

Pure pandas over `tracking.report.leaderboard` frames and the study's published table
(tracking/reference/lora_land_paper_scores.csv): no MLflow here. `tracking/report.py` writes what these return.

- `headline`: mean fine-tuned vs mean base vs GPT-4 / GPT-3.5, how many tasks the best fine-tune beats GPT-4 on and
  by how much (ties counted on neither side), the best base model overall; once for the sweep and once for the study's
  own table, side by side.
- `fig8_matrix`: the study's Fig 8-style Pearson matrix of the task heuristics against the per-task base, fine-tuned,
  lift and GPT-4 scores, and among themselves.
- `study_vs_ours`: per (base model, task), the published fine-tuned score, ours, the difference, and which of our
  settings differ from the study's (scoring, rows, steps), so a gap explains itself.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

STUDY_STEPS = 40000
STUDY_ROWS = 1000
MIN_CORRELATION_TASKS = 3  # a Pearson r over fewer tasks means nothing
HEADLINE_COLUMNS = [
    "source",
    "tasks",
    "pairs",
    "mean_base_score",
    "mean_finetuned_score",
    "mean_best_finetuned_score",
    "gpt4_mean",
    "gpt35_mean",
    "tasks_best_beats_gpt4",
    "tasks_gpt4_beats_best",
    "mean_margin_over_gpt4",
    "mean_margin_where_beaten",
    "best_base_model",
    "best_base_model_mean",
]
VS_COLUMNS = [
    "base_model",
    "task",
    "study_finetuned_score",
    "finetuned_score",
    "difference",
    "scoring",
    "failed_generations",
    "differs",
]
SETTING_COLUMNS = ("scoring", "max_steps", "eval_limit")  # run columns `study_vs_ours` reads


def _gpt_scores(reference: pd.DataFrame) -> pd.DataFrame:
    """GPT-4 and GPT-3.5 score per task (index task), from the study's table (one value per task)."""
    return reference.groupby("task")[["gpt4_score", "gpt35_score"]].first()


def headline_row(board: pd.DataFrame, gpt: pd.DataFrame, source: str) -> dict[str, object]:
    """The headline numbers of one leaderboard (`task`, `base_model`, `base_score`, `finetuned_score` columns) against
    the GPT scores of the same tasks. GPT means and margins count only tasks with both a fine-tune and a GPT score."""
    scored = board.dropna(subset=["finetuned_score"])
    best = scored.groupby("task")["finetuned_score"].max()
    both = pd.concat([best.rename("best"), gpt], axis=1, join="inner").dropna(subset=["best", "gpt4_score"])
    margin = both["best"] - both["gpt4_score"]
    by_base = scored.groupby("base_model")["finetuned_score"].mean().sort_values(ascending=False)
    return {
        "source": source, "tasks": int(best.size), "pairs": int(len(scored)),
        "mean_base_score": board["base_score"].mean(), "mean_finetuned_score": scored["finetuned_score"].mean(),
        "mean_best_finetuned_score": best.mean(), "gpt4_mean": both["gpt4_score"].mean(),
        "gpt35_mean": both["gpt35_score"].mean(), "tasks_best_beats_gpt4": int((margin > 0).sum()),
        "tasks_gpt4_beats_best": int((margin < 0).sum()),
        "mean_margin_over_gpt4": margin.mean(), "mean_margin_where_beaten": margin[margin > 0].mean(),
        "best_base_model": by_base.index[0] if len(by_base) else None,
        "best_base_model_mean": by_base.iloc[0] if len(by_base) else float("nan"),
    }


def headline(board: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Two rows: the sweep's headline numbers, and the study's own over the same tasks (its table as a leaderboard)."""
    gpt = _gpt_scores(reference)
    study = reference[reference["task"].isin(board["task"])]
    rows = [headline_row(board, gpt, "this sweep"), headline_row(study, gpt, "the study (same tasks)")]
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS)


def task_scores(board: pd.DataFrame, means: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per task (index): `means` (`tracking.report.task_means(board)`: mean base, fine-tuned and lift over base models),
    GPT-4's score and the best fine-tune's lift over GPT-4 (the study's "max lift over GPT-4")."""
    best = board.groupby("task")["finetuned_score"].max()
    out = means.join(_gpt_scores(reference)["gpt4_score"], how="left")
    out["max_lift_over_gpt4"] = best - out["gpt4_score"]
    return out


def fig8_matrix(features: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Pearson r between every pair of heuristics and per-task scores (both indexed by task); NaN where fewer than
    MIN_CORRELATION_TASKS tasks have both values or either is constant."""
    joined = features.join(scores, how="inner").astype(float)
    return joined.corr(method="pearson", min_periods=MIN_CORRELATION_TASKS)


def _differences(run: pd.Series, has_study_rule: bool) -> list[str]:
    """The settings of one fine-tuning run that differ from the study's, as short phrases."""
    out = []
    scoring = run.get("scoring")
    if not isinstance(scoring, str) or not scoring:
        out.append("scoring unknown")
    elif scoring != "study" or not has_study_rule:
        out.append("scoring strict" if has_study_rule else "scoring strict (the study's code has no rule)")
    steps = pd.to_numeric(run.get("max_steps"), errors="coerce")
    if pd.isna(steps):
        out.append("steps unknown")
    elif int(steps) != STUDY_STEPS:
        out.append(f"steps {int(steps)} (study {STUDY_STEPS})")
    limit = pd.to_numeric(run.get("eval_limit"), errors="coerce")
    if not pd.isna(limit) and int(limit) != STUDY_ROWS:
        out.append(f"rows {int(limit)} (study first {STUDY_ROWS})")
    return out


def study_vs_ours(comparison: pd.DataFrame, runs: pd.DataFrame, study_rules: dict[str, bool]) -> pd.DataFrame:
    """Per (base model, task) both have: the published fine-tuned score, ours, ours - published, our scoring, and the
    settings of our fine-tuning run that differ from the study's (`differs`, "; "-joined, "" when none).
    `comparison` is `tracking.report.study_comparison`'s table, `runs` `tracking.report.runs_frame`'s (a row per run
    id); `study_rules` says per task whether a study scoring rule exists."""
    settings = runs.set_index("run_id")[[*SETTING_COLUMNS, "failed_generations"]]
    pairs = comparison.merge(settings, left_on="finetuned_run_id", right_index=True, how="left")
    pairs["difference"] = pairs["finetuned_score"] - pairs["study_finetuned_score"]
    pairs["differs"] = [
        "; ".join(_differences(run, study_rules.get(run["task"], False))) for _, run in pairs.iterrows()
    ]
    pairs["scoring"] = [scoring if isinstance(scoring, str) else "" for scoring in pairs["scoring"]]
    return pairs[VS_COLUMNS].sort_values(["task", "base_model"]).reset_index(drop=True)


def study_rules_of(tasks: list[str], catalog_dir: Path | None = None) -> dict[str, bool]:
    """Per task, whether the catalogue names a study scoring rule for it (unknown tasks: False)."""
    from core.catalog import CATALOG_DIR, load_catalog

    catalog = load_catalog(catalog_dir or CATALOG_DIR)
    return {name: name in catalog.tasks and catalog.tasks[name].study_metric is not None for name in tasks}
