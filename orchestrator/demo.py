"""`make demo`: the demo sweep end to end on the embedded default (local Ray, SQLite MLflow, tiny models, CPU).

It runs what `ray job submit -- loraland sweep configs/sweeps/demo.yaml` runs on a cluster (here on a
local one-node Ray on loopback), writes the leaderboard report, then serves the sweep's adapters
(`configs/serve/demo.yaml`, what `loraland serve` runs) and sends one request to each, prints where to
look, and exits (0 when every job finished and every adapter answered). `loraland serve
configs/serve/demo.yaml` keeps the endpoint up afterwards.
"""

from __future__ import annotations

import socket

import httpx
from rich.console import Console
from rich.table import Table

from jobs.config import PROJECT_ROOT
from orchestrator.config import load_sweep
from orchestrator.plan import plan_json
from orchestrator.sweep import run_sweep, summary_table

DEMO_SWEEP = PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"
DEMO_SERVE = PROJECT_ROOT / "configs" / "serve" / "demo.yaml"
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
    served = serve_and_ask()
    console.print(f"MLflow runs and registered adapters: {uri}; browse them with `.venv/bin/loraland ui` -> http://127.0.0.1:5000")
    console.print(f"Keep the endpoint up: `.venv/bin/loraland serve {DEMO_SERVE.relative_to(PROJECT_ROOT)}`")
    failed = any(o.state == "failed" for o in outcomes) or not served
    return 1 if failed else 0


def serve_and_ask() -> bool:
    """Serve the demo's adapters, send one greedy request to each (`<base>:<task>`), print the answers
    and the endpoint; True when every adapter answered."""
    from jobs.catalog import load_catalog
    from jobs.data import eval_rows
    from jobs.prompts import prompt_for
    from orchestrator.sweep import connect_ray
    from serving.app import deploy
    from serving.config import load_serve_config

    config = load_serve_config(DEMO_SERVE)
    config.port = config.port if port_is_free(config.port) else free_port()
    connect_ray()
    endpoint = deploy(config)
    models = [m["id"] for m in httpx.get(f"{endpoint}/models", timeout=60).json()["data"] if ":" in m["id"]]
    table = Table(title=f"One request to each adapter at {endpoint}")
    for column in ("model", "adapter", "answer"):
        table.add_column(column, no_wrap=column != "answer")
    answered = 0
    for model in models:
        task = load_catalog().task(model.split(":", 1)[1])
        prompt = prompt_for(task, eval_rows(task, 1)[0], evaluation=True)
        response = httpx.post(f"{endpoint}/completions", timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": task.max_new_tokens, "temperature": 0})
        body = response.json()
        ok = response.status_code == 200
        answered += ok
        answer = body["choices"][0]["text"].strip() if ok else f"error {response.status_code}: {body['error']['message']}"
        table.add_row(model, body.get("system_fingerprint", "") if ok else "", answer)
    console.print(table)
    console.print(f"OpenAI-compatible endpoint: {endpoint} (GET {endpoint}/models lists {len(models)} adapters, "
                  "their base models and each task's champion)")
    return answered == len(models) > 0


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
