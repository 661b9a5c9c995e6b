"""What the driver tells: its console, the progress line, the summary table, and the sweep's note in MLflow (the
description of its experiment and parent run: Markdown, no links)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jobs.config import JobConfig
from orchestrator.config import SweepConfig
from orchestrator.units import JobOutcome

console = Console(highlight=False)


def progress_line(outcomes: Mapping[str, JobOutcome], submitted: int, queued: int, total: int,
                  eta_s: float | None, evaluations: tuple[int, int] = (0, 0)) -> str:
    """The driver's progress line: done (finished or skipped), failed, submitted, queued, the ETA when there is one,
    and of the submitted and queued jobs those at the evaluators' (`evaluations`: running, queued) when any are."""
    done = sum(o.state in ("finished", "skipped") for o in outcomes.values())
    failed = sum(o.state == "failed" for o in outcomes.values())
    eta = f", ETA {eta_s:.0f} s" if eta_s is not None and (submitted or queued) else ""
    at_evaluators = f"; evaluations {evaluations[0]} running, {evaluations[1]} queued" if any(evaluations) else ""
    return (f"progress: {done} done, {failed} failed, {submitted} running or starting, {queued} queued of {total}"
            f"{at_evaluators}{eta}")


def lifts(outcomes: list[JobOutcome]) -> list[tuple[JobOutcome, float | None, float | None]]:
    """Each fine-tune's outcome with its base score (the base evaluation's of the same base model and task, else the one
    its run logged) and its lift (None when either score is missing)."""
    base = {(o.job.base_model.name, o.job.task.name): o.score for o in outcomes if o.job.kind == "evaluate_base"}
    rows = []
    for o in outcomes:
        if o.job.kind != "train":
            continue
        before = base.get((o.job.base_model.name, o.job.task.name), o.base_score)
        rows.append((o, before, None if o.score is None or before is None else o.score - before))
    return rows


def summary_table(outcomes: list[JobOutcome]) -> Table:
    """Each fine-tune's state, score, base score and lift."""
    table = Table(title="Sweep summary")
    for column in ("base model", "task", "state", "metric", "base", "fine-tuned", "lift"):
        table.add_column(column)
    for o, before, lift in lifts(outcomes):
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(o.job.base_model.name, o.job.task.name, o.state if not o.error else f"failed: {o.error}",
                      o.job.task.metric, fmt(before), fmt(o.score), "" if lift is None else f"{lift:+.3f}")
    return table


def sweep_description(sweep: SweepConfig, config_file: str | Path | None, jobs: list[JobConfig], to_run: int) -> str:
    """What the sweep is: its name, config file, its own `description`, base models x tasks and the job counts at the
    start."""
    fine_tunes = sum(job.kind == "train" for job in jobs)
    source = f" from `{config_file}`" if config_file else ""
    purpose = f"\n\n{sweep.description.strip()}" if sweep.description.strip() else ""
    return (f"**LoRA Land sweep `{sweep.name}`**{source}: {len(sweep.base_models)} base models x {len(sweep.tasks)} "
            f"tasks, {len(jobs)} jobs ({fine_tunes} fine-tunes, {len(jobs) - fine_tunes} base evaluations); "
            f"at the start {len(jobs) - to_run} already finished, {to_run} to run.{purpose}")


def results_description(outcomes: list[JobOutcome]) -> str:
    """The results: jobs finished (here or before) and failed, the best lift of each task with its base model, and the
    mean fine-tuned score and lift."""
    finished = sum(o.state == "finished" for o in outcomes)
    skipped = sum(o.state == "skipped" for o in outcomes)
    failed = sum(o.state == "failed" for o in outcomes)
    lines = [f"**Results**: {finished + skipped} of {len(outcomes)} jobs done ({skipped} in an earlier run), "
             f"{failed} failed."]
    best: dict[str, tuple[float, str]] = {}
    for o, _, lift in lifts(outcomes):
        if lift is not None and (o.job.task.name not in best or lift > best[o.job.task.name][0]):
            best[o.job.task.name] = (lift, o.job.base_model.name)
    if best:
        lines.append("Best lift per task: "
                     + ", ".join(f"{task} {lift:+.3f} ({base})" for task, (lift, base) in sorted(best.items())) + ".")
    scored = [(o.score, lift) for o, _, lift in lifts(outcomes) if o.score is not None]
    if scored:
        known = [lift for _, lift in scored if lift is not None]
        lines.append(f"Mean fine-tuned score {sum(score for score, _ in scored) / len(scored):.3f}"
                     + (f", mean lift {sum(known) / len(known):+.3f}." if known else "."))
    return "\n".join(lines)
