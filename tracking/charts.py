"""The report's charts (`tracking/report.py` writes them): matplotlib on the Agg backend, each saved as a PNG and
returned as a `Chart` naming what it drew, read off the figure before saving, so a test can tell a chart with data from
an empty grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Chart:
    """A PNG of the report and the data drawn on it: finite heatmap cells, bars of finite height,
    scatter points with finite coordinates."""

    path: Path
    cells: int = 0
    bars: int = 0
    points: int = 0



def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _annotated_heatmap(ax: Any, matrix: pd.DataFrame, cmap: str, vmin: float, vmax: float) -> Any:
    values = matrix.to_numpy(dtype=float)
    colours = _pyplot().get_cmap(cmap).with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    for (row, col), value in np.ndenumerate(values):
        red, green, blue, _ = image.to_rgba(value) if not math.isnan(value) else (1.0, 1.0, 1.0, 1.0)
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # white text on dark cells
        ax.text(col, row, "n/a" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    return image


def drawn(fig: Any, path: Path) -> Chart:
    """What the figure's axes show, counted from its artists (see `Chart`)."""
    from matplotlib.collections import PathCollection
    from matplotlib.patches import Rectangle

    cells = bars = points = 0
    for ax in fig.axes:
        cells += sum(
            int(np.isfinite(np.ma.filled(image.get_array().astype(float), np.nan)).sum()) for image in ax.images
        )
        bars += sum(1 for patch in ax.patches if isinstance(patch, Rectangle) and math.isfinite(patch.get_height()))
        for collection in ax.collections:
            if isinstance(collection, PathCollection):
                offsets: np.ndarray = np.ma.filled(np.ma.asarray(collection.get_offsets(), dtype=float), np.nan)
                points += int(np.isfinite(offsets).all(axis=1).sum()) if offsets.size else 0
    return Chart(path, cells, bars, points)


def _save(fig: Any, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Chart:
    chart = drawn(fig, path)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return chart


def plot_finetuned_heatmap(board: pd.DataFrame, path: Path) -> Chart:
    """Fine-tuned score per task (rows) and base model (columns)."""
    plt = _pyplot()
    matrix = board.pivot_table(index="task", columns="base_model", values="finetuned_score", dropna=False)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * matrix.shape[1] + 3), max(4.0, 0.45 * matrix.shape[0] + 2)))
    fig.colorbar(_annotated_heatmap(ax, matrix, "viridis", 0.0, 1.0), ax=ax, label="fine-tuned score")
    ax.set_title("Fine-tuned score by task and base model")
    return _save(fig, path)


def plot_lift_by_base_model(board: pd.DataFrame, path: Path) -> Chart:
    """Mean lift over base per base model (bars) with each task's lift (dots)."""
    plt = _pyplot()
    models = sorted(board["base_model"].dropna().unique())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(models) + 3), 4.5))
    means = [board.loc[board["base_model"] == m, "lift"].mean() for m in models]
    ax.bar(range(len(models)), means, color="#4c72b0", alpha=0.8, label="mean over tasks")  # NaN: no bar
    for i, model in enumerate(models):
        lifts = board.loc[board["base_model"] == model, "lift"].dropna()
        ax.scatter(np.full(len(lifts), i) + np.linspace(-0.2, 0.2, len(lifts)), lifts, color="#dd8452", zorder=3,
                   label="one task" if i == 0 else None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel("lift (fine-tuned - base)")
    ax.set_title("Lift from fine-tuning, per base model")
    ax.legend()
    return _save(fig, path)


def plot_vs_study(comparison: pd.DataFrame, source: str, path: Path) -> Chart:
    """Per task: our fine-tuned score, the study's (same base models, averaged) and GPT-4's; `source` names the
    study's scores under the chart."""
    plt = _pyplot()
    per_task = comparison.groupby("task")[["finetuned_score", "study_finetuned_score", "gpt4_score"]].mean()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(per_task) + 3), 5))
    width = 0.27
    labels = {
        "finetuned_score": "ours (fine-tuned)",
        "study_finetuned_score": "study (fine-tuned)",
        "gpt4_score": "GPT-4 (study)",
    }
    for offset, (column, label) in zip((-width, 0.0, width), labels.items()):
        ax.bar(np.arange(len(per_task)) + offset, per_task[column], width, label=label)  # NaN: no bar
    ax.set_xticks(range(len(per_task)), per_task.index, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (task metric)")
    ax.set_title("Ours against the LoRA Land study, same base models and tasks")
    ax.legend()
    fig.text(0.01, 0.005, f"Source: {source}", fontsize=6, ha="left", va="bottom", wrap=True)
    return _save(fig, path, rect=(0, 0.05, 1, 1))


def plot_correlations(matrix: pd.DataFrame, tasks: int, path: Path) -> Chart:
    """Pearson r of each heuristic (rows) with the per-task results (columns: mean base score, fine-tuned score, lift)
    over `tasks` tasks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, max(5.0, 0.4 * len(matrix) + 1.5)))
    fig.colorbar(_annotated_heatmap(ax, matrix, "RdBu_r", -1.0, 1.0), ax=ax, label="Pearson r")
    ax.set_title(f"Task heuristics vs results (Pearson r, {tasks} tasks)")
    return _save(fig, path)


def plot_predictor(predictor: dict[str, Any], lift: pd.Series, path: Path) -> Chart:
    """Leave-one-task-out predicted lift against the actual mean lift of each task."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    predicted = pd.Series(predictor["loo_predictions"], dtype=float)
    actual = lift.reindex(predicted.index)
    ax.scatter(actual, predicted, color="#4c72b0", zorder=3)
    for task in predicted.index:
        ax.annotate(str(task), (actual[task], predicted[task]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ends = [np.nanmin([*actual, *predicted, 0.0]), np.nanmax([*actual, *predicted, 0.0])]
    ax.plot(ends, ends, color="grey", linestyle="--", label="perfect")
    ax.set_xlabel("actual mean lift")
    ax.set_ylabel("predicted (leave one task out)")
    ax.set_title(f"Lift predictor: LOO MAE {predictor['loo_mae']:.3f} (mean-only {predictor['baseline_loo_mae']:.3f})")
    ax.legend()
    return _save(fig, path)


def plot_validation_curves(curves: pd.DataFrame, title: str, path: Path) -> Chart:
    """A LoRA search's validation score against training step, a line (with a dot per score) for every trial
    (`curves`: trial, step, score); a trial the scheduler stopped early ends where its line ends."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial, points in curves.sort_values("step").groupby("trial"):
        ax.plot(points["step"], points["score"], marker="o", linewidth=1.2, label=str(trial))
        ax.scatter(points["step"], points["score"], s=12, zorder=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation score (task metric)")
    ax.set_title(f"Search trials: {title}")
    if len(curves):
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
