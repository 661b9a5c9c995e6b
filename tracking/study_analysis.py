"""The study's headline analyses, recomputed on a sweep's leaderboard, and a per-pair comparison with the study.

Pure pandas over `tracking.report.leaderboard` frames and the study's published table
(tracking/reference/lora_land_paper_scores.csv): no MLflow here. `tracking/report.py` writes what these return.

- `headline`: mean fine-tuned vs mean base vs GPT-4 / GPT-3.5, how many tasks the best fine-tune beats GPT-4 on and
  by how much (ties counted on neither side), the best base model overall; once for the sweep and once for the study's
  own table, side by side.
- `fig8_matrix`: the study's Fig 8-style Pearson matrix of the task heuristics against the per-task base, fine-tuned,
  lift and GPT-4 scores, and among themselves.
- `study_vs_ours`: per (base model, task), the published base and fine-tuned scores beside ours, the differences, and
  every setting each of our two runs logged that differs from the study's (`STUDY_TRAINING`, `STUDY_EVALUATION`, the
  scoring, evaluated rows and split, the prompts' worked examples), so a gap explains itself. Everything is read from
  what the runs logged (`jobs.result.job_params`), never from today's catalogue: a setting a run did not log is named
  "unknown".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

# The study's 40,000 Ludwig steps are batches of one example: 2,500 optimizer steps of 16 (see lora_land.yaml)
STUDY_STEPS = 2500
STUDY_ROWS = 1000
STUDY_PROMPT_CHARS = 1500
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
    "study_base_score",
    "base_score",
    "base_difference",
    "scoring",
    "failed_generations",
    "differs",
    "base_differs",
]
# The study's settings (shared/reference/README.md, "Training setup reported by the paper"; alpha, dropout, nf4 and
# double quantization are its framework's defaults), keyed by the MLflow params our runs log. Training settings apply
# to fine-tunes; evaluation settings to both runs of a pair.
STUDY_TRAINING: dict[str, Any] = {
    "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.05, "lora.target_modules": ["q_proj", "v_proj"],
    "training.max_steps": STUDY_STEPS, "training.micro_batch_size": 1, "training.gradient_accumulation_steps": 16,
    "training.learning_rate": 2e-4, "training.lr_scheduler": "cosine", "training.warmup_ratio": 0.03,
    "training.packing": False,
}
STUDY_EVALUATION: dict[str, Any] = {
    "quantization.load_in_4bit": True, "quantization.quant_type": "nf4", "quantization.double_quant": True,
    "evaluation.prompt_cut": "study", "evaluation.prompt_max_chars": STUDY_PROMPT_CHARS,
    "evaluation.max_new_tokens": None,  # None: the task's own limit, the study's (256; 1024 for mmlu)
}
# The worked examples of the study's prompts (its examples_in_prompt; each its task's first training rows); every other
# task's prompt has none.
STUDY_WORKED_EXAMPLES = {"bc5cdr": 1, "conllpp": 1, "e2e_nlg": 1, "viggo": 2, "webnlg": 1, "hellaswag_processed": 1}
WORKED_EXAMPLES = "task.worked_examples"  # how many first training rows a run's prompts showed (jobs.result.job_params)
SCORING_PARAMS = ("evaluation.scoring", "task.study_metric", "evaluation.limit", "task.eval_split")
SETTING_COLUMNS = (*STUDY_TRAINING, *STUDY_EVALUATION, *SCORING_PARAMS, WORKED_EXAMPLES)  # run columns (MLflow params)
UNKNOWN = "unknown"  # a setting the run did not log


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
    the best fine-tune's score (the study's analysis correlates it too), GPT-4's score and the best fine-tune's lift
    over GPT-4 (the study's "max lift over GPT-4")."""
    best = board.groupby("task")["finetuned_score"].max()
    out = means.join(best.rename("best_finetuned_score"), how="left")
    out = out.join(_gpt_scores(reference)["gpt4_score"], how="left")
    out["max_lift_over_gpt4"] = best - out["gpt4_score"]
    return out


def fig8_matrix(features: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Pearson r between every pair of heuristics and per-task scores (both indexed by task); NaN where fewer than
    MIN_CORRELATION_TASKS tasks have both values or either is constant."""
    joined = features.join(scores, how="inner").astype(float)
    return joined.corr(method="pearson", min_periods=MIN_CORRELATION_TASKS)


def _known(value: Any) -> bool:
    return not (value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA)


def _logged(run: pd.Series, key: str) -> Any:
    """The value the run logged for `key`: None for a logged null (pandas keeps it as NaN), UNKNOWN when the run logged
    nothing for it (`runs_frame` writes UNKNOWN; a frame without the column)."""
    value = run.get(key, UNKNOWN)
    return None if not _known(value) else value


def scoring_used(run: pd.Series) -> str:
    """How the run's evaluation was scored, from what it logged: "study" (the task's study rule), "strict" or
    UNKNOWN."""
    setting, rule = _logged(run, "evaluation.scoring"), _logged(run, "task.study_metric")
    if UNKNOWN in (setting, rule):
        return UNKNOWN
    return "study" if setting == "study" and _known(rule) else "strict"


def _differences(run: pd.Series, study: Mapping[str, Any], study_split: str | None) -> list[str]:
    """The settings one run logged that differ from `study` and the study's scoring, rows and split, as short
    phrases."""
    out = []
    used = scoring_used(run)
    if used == UNKNOWN:
        out.append("scoring unknown")
    elif used == "strict":
        out.append("scoring strict" if _known(_logged(run, "task.study_metric"))
                   else "scoring strict (the study's code has no rule)")
    for key, theirs in study.items():
        ours = _logged(run, key)
        if ours == UNKNOWN:
            out.append(f"{key} unknown")
        elif ours != theirs and not (isinstance(theirs, float) and isinstance(ours, (int, float))
                                     and abs(float(ours) - theirs) <= 1e-12):
            out.append(f"{key} {ours} (study {theirs})")
    limit = pd.to_numeric(_logged(run, "evaluation.limit"), errors="coerce")
    if not pd.isna(limit) and int(limit) != STUDY_ROWS:
        out.append(f"rows {int(limit)} (study first {STUDY_ROWS})")
    split = _logged(run, "task.eval_split")
    if study_split and split not in (UNKNOWN, study_split):
        out.append(f"eval split {split} (study's table: {study_split})")
    return out + _example_difference(run)


def _example_difference(run: pd.Series) -> list[str]:
    """How the run's worked examples differ from the study's (the task's first training rows, as many as its prompt
    held): UNKNOWN for a run that logged none (runs before they were logged showed examples written by us)."""
    shown, theirs = _logged(run, WORKED_EXAMPLES), STUDY_WORKED_EXAMPLES.get(str(run.get("task")), 0)
    if shown in (UNKNOWN, None):
        return [f"worked examples {UNKNOWN}"]
    return [] if int(shown) == theirs else [f"worked examples {int(shown)} (study {theirs})"]


def study_vs_ours(comparison: pd.DataFrame, runs: pd.DataFrame, study_splits: Mapping[str, str]) -> pd.DataFrame:
    """Per (base model, task) both have: the published fine-tuned and base scores, ours, ours - published, how our
    fine-tune was scored, and the settings of our fine-tuning run (`differs`) and base run (`base_differs`) that differ
    from the study's ("; "-joined, "" when none), all as the runs logged them. `comparison` is
    `tracking.report.study_comparison`'s table, `runs` `tracking.report.runs_frame`'s (a row per run id);
    `study_splits` the study's evaluation split per task (its published task table)."""
    by_id = runs.set_index("run_id")
    pairs = comparison.copy()
    pairs["difference"] = pairs["finetuned_score"] - pairs["study_finetuned_score"]
    pairs["base_difference"] = pairs["base_score"] - pairs["study_base_score"]
    tuned = [by_id.loc[i] if isinstance(i, str) and i in by_id.index else pd.Series(dtype=object)
             for i in pairs["finetuned_run_id"]]
    base = [by_id.loc[i] if isinstance(i, str) and i in by_id.index else pd.Series(dtype=object)
            for i in pairs["base_run_id"]]
    splits = [study_splits.get(task) for task in pairs["task"]]
    pairs["scoring"] = [scoring_used(run) for run in tuned]
    pairs["failed_generations"] = [_logged(run, "failed_generations") for run in tuned]
    pairs["differs"] = ["; ".join(_differences(run, STUDY_TRAINING | STUDY_EVALUATION, split))
                        for run, split in zip(tuned, splits)]
    pairs["base_differs"] = ["; ".join(_differences(run, STUDY_EVALUATION, split)) if len(run) else ""
                             for run, split in zip(base, splits)]
    return pairs[VS_COLUMNS].sort_values(["task", "base_model"]).reset_index(drop=True)


def study_splits(tasks_table: pd.DataFrame) -> dict[str, str]:
    """The study's evaluation split per task, from its published task table (tracking/reference/lora_land_tasks.csv)."""
    return dict(zip(tasks_table["task"], tasks_table["eval_split"]))
