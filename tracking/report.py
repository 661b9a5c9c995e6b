"""`loraland report`: the sweep's leaderboard, plots, and the study's question (which task properties
predict what fine-tuning gains), written to a folder and logged to the sweep's parent run.

Built from the experiment's FINISHED job runs: a `train` run gives the fine-tuned score, an
`evaluate_base` run the base score, joined on (task, base model); lift = fine-tuned - base.
Files (in `out_dir`, and under `report/` of the parent run):
- leaderboard.csv (a row per (task, base model)), runs.csv (a row per job run), leaderboard.md and
  leaderboard.html (every table below, with the plots);
- finetuned_heatmap.png, lift_by_base_model.png, and, when the sweep shares base models and tasks
  with the study, vs_study.png (ours against the study's published fine-tuned and GPT-4 scores,
  tracking/reference/lora_land_paper_scores.csv, source named on the chart);
- heuristics.csv (tracking.heuristics per task, with the `length_unit` its lengths are counted in:
  a base model's tokens, or words when no tokenizer of the sweep loads), correlations.csv + heuristics_correlation.png
  (Pearson r of each heuristic with the per-task mean base score, fine-tuned score and lift; below
  study_analysis.MIN_CORRELATION_TASKS tasks, or with nothing varying, no chart: the report says "n/a" and why),
  predictor.json + lift_predictor.png (ridge regression of mean lift on the standardised
  heuristics, with its leave-one-task-out mean absolute error next to that of predicting the mean);
- study_headline.csv, study_vs_ours.csv and fig8_correlations.csv (tracking/study_analysis.py): the study's
  headline numbers for this sweep beside the study's own, per pair our score against the published one with the
  settings that differ, and the study's Fig 8-style correlation matrix.
The charts are drawn by `tracking/charts.py`, each coming back as a `Chart` naming what it drew.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.paths import data_home
from core.prompts import CODE_METRIC
from tracking import heuristics as heur
from tracking import store
from tracking import study_analysis as study
from tracking.charts import (
    Chart,
    plot_correlations,
    plot_finetuned_heatmap,
    plot_lift_by_base_model,
    plot_predictor,
    plot_vs_study,
)
from tracking.retry import call_with_retry
from tracking.search_report import SearchRecord, mark_searched_adapters, search_record, search_sections

log = logging.getLogger(__name__)

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
STUDY_SCORES = REFERENCE_DIR / "lora_land_paper_scores.csv"
STUDY_TASKS = REFERENCE_DIR / "lora_land_tasks.csv"
STUDY_SOURCE = ('Zhao et al. 2024, "LoRA Land: 310 Fine-tuned LLMs that Rival GPT-4" (arXiv 2405.00732); '
                "scores transcribed in tracking/reference/lora_land_paper_scores.csv")
RUN_COLUMNS = ["run_id", "job_key", "kind", "base_model", "task", "category", "metric", "score", "peak_memory_mb",
               "train_wall_time_s", "job_wall_time_s", "start_time", "failed_generations", "unconfined_code",
               *study.SETTING_COLUMNS]
BOARD_COLUMNS = ["task", "category", "metric", "base_model", "base_score", "finetuned_score", "lift", "best",
                 "finetuned_run_id", "base_run_id"]
TARGETS = ("base_score", "finetuned_score", "lift")
RIDGE_ALPHA = 1.0


@dataclass
class Section:
    """One part of the Markdown/HTML report: a title, a line of text, and optionally a table or an image."""

    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    image: str | None = None


@dataclass
class Report:
    """What `build_report` wrote."""

    out_dir: Path
    files: list[Path]
    leaderboard: pd.DataFrame
    parent_run_id: str | None = None
    predictor: dict[str, Any] = field(default_factory=dict)
    length_unit: str = ""
    charts: dict[str, Chart] = field(default_factory=dict)  # file name -> what it drew


# --------------------------------------------------------------------------- data


def runs_frame(experiment_id: str, uri: str | None = None) -> pd.DataFrame:
    """A row per FINISHED job run of the experiment (RUN_COLUMNS; the settings columns are the params the run logged,
    `study_analysis.UNKNOWN` where it logged none)."""
    rows = []
    for run in store.job_runs(experiment_id, uri, status="FINISHED"):
        tags, metrics = run.data.tags, run.data.metrics
        rows.append({"run_id": run.info.run_id, "job_key": tags.get(store.TAG_JOB_KEY),
                     "kind": tags.get(store.TAG_KIND), "base_model": tags.get(store.TAG_BASE_MODEL),
                     "task": tags.get(store.TAG_TASK),
                     "category": tags.get(store.TAG_CATEGORY), "metric": tags.get(store.TAG_METRIC),
                     "score": metrics.get("score", math.nan), "peak_memory_mb": metrics.get("peak_memory_mb", math.nan),
                     "train_wall_time_s": metrics.get("train_wall_time_s", math.nan),
                     "job_wall_time_s": metrics.get("job_wall_time_s", math.nan), "start_time": run.info.start_time,
                     "failed_generations": metrics.get("eval_failed_generations", math.nan),
                     "unconfined_code": tags.get(store.TAG_METRIC) == CODE_METRIC  # code allowed to run unconfined
                     and store.decode_param(run.data.params.get("evaluation.unconfined_code", "false")) is True,
                     **{key: store.decode_param(run.data.params[key]) if key in run.data.params else study.UNKNOWN
                        for key in study.SETTING_COLUMNS}})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """A row per (task, base model): base score, fine-tuned score, lift, and whether it is the task's best."""
    runs = runs.sort_values("start_time").drop_duplicates(["kind", "base_model", "task"], keep="last")
    keys = ["task", "base_model"]
    trained = runs[runs["kind"] == "train"].rename(columns={"score": "finetuned_score", "run_id": "finetuned_run_id"})
    base = runs[runs["kind"] == "evaluate_base"].rename(columns={"score": "base_score", "run_id": "base_run_id"})
    board = trained[keys + ["category", "metric", "finetuned_score", "finetuned_run_id"]].merge(
        base[keys + ["category", "metric", "base_score", "base_run_id"]], on=keys, how="outer", suffixes=("", "_b"))
    for column in ("category", "metric"):
        board[column] = board[column].fillna(board.pop(f"{column}_b"))
    board["category"] = [c if isinstance(c, str) and c else _catalog_category(t)
                         for c, t in zip(board["category"], board["task"])]
    board["lift"] = board["finetuned_score"] - board["base_score"]
    best = board.groupby("task")["finetuned_score"].transform("max")
    board["best"] = board["finetuned_score"].notna() & (board["finetuned_score"] == best)
    return board[BOARD_COLUMNS].sort_values(["category", "task", "base_model"]).reset_index(drop=True)


def best_per_task(board: pd.DataFrame) -> pd.DataFrame:
    """The best fine-tuned base model of each task."""
    rows = board[board["best"]].drop_duplicates("task")
    return rows[["task", "category", "base_model", "base_score", "finetuned_score", "lift"]].reset_index(drop=True)


def means_by(board: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean base score, fine-tuned score and lift per `column` (base_model or category), with task counts."""
    grouped = board.groupby(column)
    out = grouped[list(TARGETS)].mean()
    out["tasks"] = grouped["task"].nunique()
    return out.reset_index().sort_values("finetuned_score", ascending=False).reset_index(drop=True)


def task_means(board: pd.DataFrame) -> pd.DataFrame:
    """Per task, the mean over base models of base score, fine-tuned score and lift (index: task)."""
    return board.groupby("task")[list(TARGETS)].mean()


def study_comparison(board: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Our (task, base model) pairs that the study also ran (`reference`: its published table, STUDY_SCORES), with its
    base, fine-tuned and GPT-4 scores and the ids of our fine-tuning and base runs."""
    published = reference.rename(columns={"base_score": "study_base_score", "finetuned_score": "study_finetuned_score"})
    joined = board.merge(published.drop(columns=["category"]), on=["task", "base_model"], how="inner")
    return joined[["task", "base_model", "base_score", "finetuned_score", "study_base_score", "study_finetuned_score",
                   "gpt35_score", "gpt4_score", "finetuned_run_id", "base_run_id"]].reset_index(drop=True)


def heuristics_frame(tasks: list[str], unit: heur.LengthUnit, limit: int = heur.SAMPLE_ROWS) -> pd.DataFrame:
    """tracking.heuristics for each task (index: task), lengths in `unit`; a task whose data cannot be read gets
    NaNs."""
    from core.catalog import load_catalog

    rows = {}
    for name in tasks:
        try:
            rows[name] = heur.task_heuristics(load_catalog().task(name), unit.tokenize, limit)
        except Exception as error:
            log.warning("heuristics of task %s not computed: %s", name, error)
            rows[name] = {key: math.nan for key in heur.HEURISTICS}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(heur.HEURISTICS)).rename_axis("task")


def correlations(features: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Pearson r of every heuristic (rows) with every per-task target (columns); NaN below study.MIN_CORRELATION_TASKS
    tasks or for a constant (the heuristics-by-targets block of `study.fig8_matrix`), and the count of tasks both
    have."""
    table = study.fig8_matrix(features, targets).loc[list(features.columns), list(targets.columns)]
    table["tasks"] = len(features.join(targets, how="inner"))
    return table.rename_axis("heuristic")


@dataclass
class Ridge:
    """A fitted ridge regression on standardised features (`usable` marks the features it uses)."""

    usable: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.intercept + ((x[:, self.usable] - self.mean) / self.std) @ self.coef


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float = RIDGE_ALPHA) -> Ridge:
    """Ridge regression of y on the standardised columns of x; missing or constant columns are left out."""
    usable = np.isfinite(x).all(axis=0)
    usable[usable] = x[:, usable].std(axis=0) > 0
    mean, std = x[:, usable].mean(axis=0), x[:, usable].std(axis=0)
    z = (x[:, usable] - mean) / std
    intercept = float(y.mean())
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - intercept))
    return Ridge(usable, mean, std, coef, intercept)


def lift_predictor(features: pd.DataFrame, lift: pd.Series, alpha: float = RIDGE_ALPHA) -> dict[str, Any]:
    """Predict a task's mean lift from its heuristics; leave-one-task-out MAE, against predicting the mean."""
    data = features.join(lift.rename("lift"), how="inner").dropna(subset=["lift"])
    names = list(features.columns)
    x, y = data[names].to_numpy(dtype=float), data["lift"].to_numpy(dtype=float)
    result: dict[str, Any] = {"model": f"ridge (alpha={alpha}) on standardised heuristics, target: mean lift per task",
                              "tasks": len(y), "loo_mae": math.nan, "baseline_loo_mae": math.nan, "loo_predictions": {},
                              "coefficients": {}, "intercept": math.nan}
    if len(y) == 0:
        return result
    full = ridge_fit(x, y, alpha)
    result["coefficients"] = dict(zip([n for n, used in zip(names, full.usable) if used], full.coef.tolist()))
    result["intercept"] = full.intercept
    if len(y) < 2:
        return result
    predictions, baseline = [], []
    for left_out in range(len(y)):
        keep = np.arange(len(y)) != left_out
        predictions.append(float(ridge_fit(x[keep], y[keep], alpha).predict(x[[left_out]])[0]))
        baseline.append(float(y[keep].mean()))
    result["loo_predictions"] = dict(zip(data.index, predictions))
    result["loo_mae"] = float(np.mean(np.abs(np.array(predictions) - y)))
    result["baseline_loo_mae"] = float(np.mean(np.abs(np.array(baseline) - y)))
    return result


def correlation_gap(table: pd.DataFrame) -> str | None:
    """Why `correlations` gave no number to plot ("n/a: needs at least 3 tasks (this sweep has 2)"), or None."""
    tasks = int(table["tasks"].iloc[0]) if len(table) else 0
    if tasks < study.MIN_CORRELATION_TASKS:
        return f"n/a: needs at least {study.MIN_CORRELATION_TASKS} tasks (this sweep has {tasks})"
    if not table[list(TARGETS)].notna().to_numpy().any():
        return f"n/a: no heuristic and no result varies across the {tasks} tasks"
    return None


def _catalog_category(task: str) -> str:
    from core.catalog import load_catalog

    try:
        return load_catalog().task(task).category
    except KeyError:
        return "unknown"


# --------------------------------------------------------------------------- documents


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (floats to 3 decimals, NaN as n/a)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [p for p in (section.text, markdown_table(section.table) if section.table is not None else "",
                              f"![{section.title}]({section.image})" if section.image else "") if p]
    return "\n\n".join(parts) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    """The report as one self-contained HTML page (images referenced next to it)."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
    parts = [f"<!doctype html><html><head>{head}</head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.table is not None:
            parts.append(section.table.to_html(index=False, na_rep="n/a", float_format=lambda v: f"{v:.3f}", border=0))
        if section.image:
            parts.append(f"<img src='{html.escape(section.image)}' alt='{html.escape(section.title)}'>")
    return "\n".join(parts) + "\n</body></html>\n"


def write_report(runs: pd.DataFrame, out_dir: str | Path, title: str = "LoRA Land leaderboard",
                 features: pd.DataFrame | None = None, heuristics_limit: int = heur.SAMPLE_ROWS,
                 length_unit: str | None = None, search: SearchRecord | None = None) -> Report:
    """Write every file of the report for `runs` (see `runs_frame`) into `out_dir`; with `search` (the experiment's
    LoRA searches, tracking/search_report.py) the leaderboard says which adapters were searched, and a section per
    searched job shows its trials.

    `features` (heuristics per task, index task) is computed with tracking.heuristics when not given,
    lengths in a tokenizer of the runs' base models (heuristics.length_unit); given, `length_unit` says
    what its lengths count."""
    if runs.empty:
        raise ValueError("no finished job runs to report on")
    if features is not None and not length_unit:
        raise ValueError("features given without the length_unit they are counted in")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    board = leaderboard(runs)
    if search is not None and search.searched:
        board = mark_searched_adapters(board, search)
    files = []
    drawn: dict[str, Chart] = {}

    def chart(made: Chart) -> str:
        drawn[made.path.name] = made
        return made.path.name

    def table(frame: pd.DataFrame, name: str, index: bool = False) -> pd.DataFrame:
        frame.to_csv(out / name, index=index)
        files.append(out / name)
        return frame

    table(board, "leaderboard.csv")
    table(runs, "runs.csv")
    shown = board.drop(columns=["finetuned_run_id", "base_run_id"])
    sections = [
        Section("Leaderboard", "Score on each task's own metric; lift = fine-tuned - base (zero-shot). "
                f"{runs['run_id'].nunique()} finished job runs.", shown),
        Section("Best base model per task", table=best_per_task(board)),
        Section("Means per base model", table=means_by(board, "base_model")),
        Section("Means per category", table=means_by(board, "category")),
        Section("Fine-tuned scores", image=chart(plot_finetuned_heatmap(board, out / "finetuned_heatmap.png"))),
        Section("Lift per base model", image=chart(plot_lift_by_base_model(board, out / "lift_by_base_model.png"))),
    ]
    if "unconfined_code" in runs and runs["unconfined_code"].eq(True).any():  # jobs.sandbox: UnconfinedCode
        marked = runs[runs["unconfined_code"].eq(True)][["run_id", "kind", "base_model", "task", "score"]]
        sections.insert(1, Section("Scores made with unconfined code", "These code-task runs allowed model-written "
                                   "programs to run without the kernel's confinement (`evaluation.unconfined_code: "
                                   "true`, for a machine without bubblewrap): their scores may come from code that "
                                   "escaped its limits.", marked))
    reference = pd.read_csv(STUDY_SCORES)
    comparison = study_comparison(board, reference)
    if len(comparison):
        shared = table(comparison.drop(columns=["finetuned_run_id", "base_run_id"]), "vs_study.csv")
        sections.append(Section("Against the study", f"Pairs this sweep shares with the study. Source: {STUDY_SOURCE}.",
                                shared, chart(plot_vs_study(shared, STUDY_SOURCE, out / "vs_study.png"))))
    sections += [
        Section("Headline numbers against the study", "Means over (task, base model) pairs; GPT-4 / GPT-3.5 from the "
                "study's table over the tasks with a fine-tune; margins = best fine-tune - GPT-4 per task. Scores of "
                "this sweep use each run's `evaluation.scoring` (see study_vs_ours.csv). Source: " + STUDY_SOURCE + ".",
                table(study.headline(board, reference), "study_headline.csv")),
        Section("Study vs ours", "Per pair the study also ran: published fine-tuned and base scores, ours, the "
                "differences, and every setting our fine-tuning and base runs logged that differs from the study's "
                "(scoring, LoRA, training, quantization, prompt cut, generation limit, evaluated rows, split).",
                table(study.study_vs_ours(comparison, runs, study.study_splits(pd.read_csv(STUDY_TASKS))),
                      "study_vs_ours.csv")),
    ]
    targets = task_means(board)
    if features is None:
        unit = heur.length_unit(sorted(runs["base_model"].dropna().unique()))
        features, length_unit = heuristics_frame(list(targets.index), unit, heuristics_limit), unit.name
    table(features.assign(length_unit=length_unit), "heuristics.csv", index=True)
    corr = table(correlations(features, targets), "correlations.csv", index=True)
    predictor = lift_predictor(features, targets["lift"])
    (out / "predictor.json").write_text(json.dumps(predictor, indent=2, default=float))
    files.append(out / "predictor.json")
    gap = correlation_gap(corr)
    heatmap = None if gap else chart(plot_correlations(corr[list(TARGETS)], int(corr["tasks"].iloc[0]),
                                                       out / "heuristics_correlation.png"))
    fig8 = table(study.fig8_matrix(features, study.task_scores(board, targets, reference)), "fig8_correlations.csv",
                 index=True)
    minimum = study.MIN_CORRELATION_TASKS
    sections += [
        Section("Task complexity heuristics", f"Per task, from a seeded random sample of up to {heuristics_limit} "
                f"training examples (tracking/heuristics.py: lengths in {length_unit}"
                f"{heur.unit_note(str(length_unit))}, ROUGE-L of output vs input, zlib compressibility).",
                features.reset_index()),
        Section("Correlation with results", f"Pearson r with the per-task mean over base models: {gap}." if gap else
                f"Pearson r with the per-task mean over base models (n/a below {minimum} tasks or for a constant).",
                None if gap else corr.reset_index(), heatmap),
        Section("Correlation matrix (the study's Fig 8)", "Pearson r among the heuristics and the per-task mean base, "
                "fine-tuned and lift scores, the best fine-tune's score, GPT-4's score and the best fine-tune's lift "
                "over GPT-4 (n/a below "
                f"{minimum} tasks or for a constant).", fig8.round(2).reset_index(names="")),
        Section("Predicting lift from the heuristics", f"{predictor['model']}: {predictor['tasks']} tasks, "
                f"leave-one-task-out MAE {_fmt(predictor['loo_mae'])} against {_fmt(predictor['baseline_loo_mae'])} "
                "for predicting the mean.",
                image=chart(plot_predictor(predictor, targets["lift"], out / "lift_predictor.png"))
                if predictor["loo_predictions"] else None),
    ]
    if search is not None and search.searched:
        sections += [Section(title, text, table(frame, name), chart(made) if made else None)
                     for title, text, frame, name, made in search_sections(search, out)]
    files += [out / s.image for s in sections if s.image]
    (out / "leaderboard.md").write_text(render_markdown(title, sections))
    (out / "leaderboard.html").write_text(render_html(title, sections))
    files += [out / "leaderboard.md", out / "leaderboard.html"]
    return Report(out, files, board, predictor=predictor, length_unit=str(length_unit), charts=drawn)


def build_report(experiment: str, out_dir: str | Path | None = None, uri: str | None = None, log_to_run: bool = True,
                 heuristics_limit: int = heur.SAMPLE_ROWS, features: pd.DataFrame | None = None,
                 length_unit: str | None = None) -> Report:
    """`loraland report --experiment NAME [--out DIR]`: write the report (default folder
    `<data_home()>/reports/<experiment>`) and log it under `report/` of the sweep's parent run, with the
    heuristics' length unit as its tag `report.length_unit`. A tracking server that does not answer is a
    one-line Unreachable (`store.check_reachable`); a store that does not exist (nothing is created) or an unknown
    experiment a NotFound."""
    store.check_reachable(uri, existing=True)
    experiment_id = store.experiment_id_for(experiment, uri)
    out = Path(out_dir) if out_dir else data_home() / "reports" / experiment
    report = write_report(runs_frame(experiment_id, uri), out, f"LoRA Land leaderboard: {experiment}", features,
                          heuristics_limit, length_unit, search_record(experiment_id, uri))
    parent = store.find_sweep_run(experiment_id, uri=uri)
    if log_to_run and parent is not None:
        report.parent_run_id = parent.info.run_id
        call_with_retry(store.client(uri).log_artifacts, parent.info.run_id, str(out), "report")
        call_with_retry(store.client(uri).set_tag, parent.info.run_id, "report.length_unit", report.length_unit)
        board = report.leaderboard
        summary = {"report.mean_finetuned_score": board["finetuned_score"].mean(),
                   "report.mean_lift": board["lift"].mean(),
                   "report.lift_predictor_loo_mae": report.predictor.get("loo_mae", math.nan)}
        store.log_metrics(parent.info.run_id, [store.metric(k, v) for k, v in summary.items() if math.isfinite(v)], uri)
    elif log_to_run:
        log.warning("experiment %s has no sweep parent run: report written to %s only", experiment, out)
    return report
