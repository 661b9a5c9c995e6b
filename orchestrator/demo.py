"""`make demo`: the demo sweep end to end on the embedded default (local Ray, SQLite MLflow, tiny models, CPU).

It runs what `ray job submit -- loraland sweep configs/sweeps/demo.yaml` runs on a cluster (here on a
local one-node Ray on loopback), writes the leaderboard report, then serves the sweep's adapters
(`configs/serve/demo.yaml`, what `loraland serve` runs) and sends one request to each, prints where to
look, and exits (0 when every job finished and every adapter answered). `loraland serve
configs/serve/demo.yaml` keeps the endpoint up afterwards.
"""

from __future__ import annotations

import httpx
from rich.console import Console
from rich.table import Table

from core.paths import PROJECT_ROOT
from core.ports import free_port, port_is_free
from orchestrator.config import load_sweep
from orchestrator.notes import summary_table
from orchestrator.plan import plan_json
from orchestrator.signals import exit_on_signals
from orchestrator.sweep import run_sweep

DEMO_SWEEP = PROJECT_ROOT / "configs" / "sweeps" / "demo.yaml"
DEMO_SERVE = PROJECT_ROOT / "configs" / "serve" / "demo.yaml"
console = Console()


def main() -> int:
    """Plan, run, report the demo sweep; print where to look. Ended by SIGTERM or SIGHUP (not only Ctrl-C), it stops the
    local Ray cluster and the endpoint it started."""
    with exit_on_signals():
        return run_demo()


def run_demo() -> int:
    """`main` without the signal handling."""
    from tracking import store
    from tracking.report import build_report

    sweep = load_sweep(DEMO_SWEEP)
    totals = plan_json(sweep)["totals"]
    console.print(f"Demo sweep: {totals['jobs']} fine-tunes + {totals['base_evaluations']} base evaluations on the CPU")
    outcomes = run_sweep(sweep, config_file=DEMO_SWEEP.relative_to(PROJECT_ROOT))
    console.print(summary_table(outcomes))
    report = build_report(sweep.name)
    uri = store.resolve_tracking_uri(None)
    console.print(f"Report (leaderboard, plots, heuristics): {report.out_dir}")
    served = serve_and_ask()
    console.print(f"MLflow runs and registered adapters: {uri}; browse them with `.venv/bin/loraland ui` -> http://127.0.0.1:5000")
    console.print(f"Keep the endpoint up: `.venv/bin/loraland serve {DEMO_SERVE.relative_to(PROJECT_ROOT)}`")
    console.print(f"LoRA Land page (pick a task, compare fine-tuned and base answers) while it runs: {demo_page_url()}")
    failed = any(o.state == "failed" for o in outcomes) or not served
    return 1 if failed else 0


def demo_page_url() -> str:
    """Where `loraland serve configs/serve/demo.yaml` shows the LoRA Land page."""
    from serving.config import load_serve_config
    from serving.webapp import config_page_url

    return config_page_url(load_serve_config(DEMO_SERVE))


def serve_and_ask() -> bool:
    """Serve the demo's adapters, send one greedy request to each (`<base>:<task>`), print the answers
    and the endpoint; True when every adapter answered."""
    from core.catalog import load_catalog
    from core.prompts import prompt_for
    from jobs.data import eval_rows, example_rows
    from orchestrator.cluster import connect_ray
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
        prompt = prompt_for(task, eval_rows(task, 1)[0], evaluation=True, examples=example_rows(task))
        response = httpx.post(f"{endpoint}/completions", timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": task.max_new_tokens, "temperature": 0})
        body = response.json()
        ok = response.status_code == 200
        answered += ok
        answer = (body["choices"][0]["text"].strip() if ok
                  else f"error {response.status_code}: {body['error']['message']}")
        table.add_row(model, body.get("system_fingerprint", "") if ok else "", answer)
    console.print(table)
    console.print(f"OpenAI-compatible endpoint: {endpoint} (GET {endpoint}/models lists {len(models)} adapters, "
                  "their base models and each task's champion)")
    return answered == len(models) > 0


if __name__ == "__main__":
    raise SystemExit(main())
