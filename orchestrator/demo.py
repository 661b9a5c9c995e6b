"""`make demo`: the demo sweep end to end on the embedded default (local Ray, SQLite MLflow, tiny models, CPU).

It runs what `ray job submit -- loraland sweep configs/sweeps/demo.yaml` runs on a cluster (here on a
local one-node Ray on loopback), writes the leaderboard report, and prints where to look.
"""

from __future__ import annotations

from rich.console import Console

from jobs.config import PROJECT_ROOT
from orchestrator.config import load_sweep
from orchestrator.plan import plan_json
from orchestrator.sweep import run_sweep, summary_table

DEMO_SWEEP = PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"
console = Console()


def main() -> int:
    """Plan, run, report the demo sweep; print where to look."""
    from tracking import store
    from tracking.report import build_report

    sweep = load_sweep(DEMO_SWEEP)
    totals = plan_json(sweep)["totals"]
    console.print(f"Demo sweep: {totals['jobs']} fine-tunes + {totals['base_evaluations']} base evaluations on the CPU")
    outcomes = run_sweep(sweep)
    console.print(summary_table(outcomes))
    report = build_report(sweep.name)
    uri = store.resolve_tracking_uri(None)
    console.print(f"Report (leaderboard, plots, heuristics): {report.out_dir}")
    console.print(f"MLflow runs and registered adapters: {uri}; browse them with `.venv/bin/loraland ui` -> http://127.0.0.1:5000")
    return 1 if any(o.state == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
