"""`make demo`: the demo sweep end to end on the embedded default (tiny models, CPU, no downloads).

Today it validates and plans the sweep, runs every job in this process (base evaluation, then the
fine-tune, per pair), logs each to MLflow through tracking/, and prints the leaderboard and where to
look. The Ray driver (`loraland sweep`) replaces the in-process loop when it lands.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from jobs.config import PROJECT_ROOT, JobConfig, data_home
from jobs.run import JobResult, run_job
from orchestrator.config import SweepConfig, expand_jobs, load_sweep
from orchestrator.plan import plan_json

DEMO_SWEEP = PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"
console = Console()


def run_demo_jobs(sweep: SweepConfig) -> list[JobResult]:
    """Run every job of the sweep in order, base evaluations first, printing progress."""
    jobs = sorted(expand_jobs(sweep), key=lambda job: job.kind != "evaluate_base")
    results = []
    for index, job in enumerate(jobs, 1):
        started = time.perf_counter()
        console.print(f"[{index}/{len(jobs)}] {job.kind:13s} {job.base_model.name} x {job.task.name} ...", end=" ")
        result = run_job(job)
        console.print(f"{result.metric} {result.score:.3f} ({time.perf_counter() - started:.0f} s)")
        results.append(result)
    return results


def leaderboard(results: list[JobResult]) -> Table:
    """Base score, fine-tuned score and lift per (base model, task)."""
    base = {(r.base_model, r.task): r.score for r in results if r.kind == "evaluate_base"}
    table = Table(title="Demo leaderboard")
    for column in ("base model", "task", "metric", "base", "fine-tuned", "lift"):
        table.add_column(column)
    for r in (r for r in results if r.kind == "train"):
        before = base.get((r.base_model, r.task))
        lift = "" if before is None else f"{r.score - before:+.3f}"
        table.add_row(r.base_model, r.task, r.metric, "" if before is None else f"{before:.3f}", f"{r.score:.3f}", lift)
    return table


def main() -> int:
    """Plan, run and summarise the demo sweep."""
    sweep = load_sweep(DEMO_SWEEP)
    totals = plan_json(sweep)["totals"]
    console.print(f"Demo sweep: {totals['jobs']} fine-tunes + {totals['base_evaluations']} base evaluations on the CPU")
    results = run_demo_jobs(sweep)
    console.print(leaderboard(results))
    console.print(f"Adapters, checkpoints and results: {data_home() / 'sweeps' / sweep.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
