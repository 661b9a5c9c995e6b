"""The `loraland` command line: catalogue, validation, planning, sweeps, tracking and serving.

A user's mistake exits with status 2 and one line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from core.catalog import load_catalog, load_catalog_file
from core.errors import USER_ERROR_EXIT, ConfigError, NotFound, UserError, print_user_error
from core.parsing import parse_model, read_yaml
from jobs.config import parse_job_config

console = Console()
USER_ERROR = USER_ERROR_EXIT


def cmd_catalog(args: argparse.Namespace) -> int:
    """The base models and tasks (the study's; `--all` adds the tiny models and demo tasks)."""
    catalog = load_catalog()
    models = [m for m in catalog.base_models.values() if args.all or m.name in catalog.study_base_models]
    tasks = [t for t in catalog.tasks.values() if args.all or t.name in catalog.study_tasks]
    if args.json:
        print(json.dumps({
            "base_models": [{"name": m.name, "hf_id": m.hf_id, "family": m.family, "params_billion": m.params_billion,
                             "instruction_tuned": m.instruction_tuned} for m in models],
            "tasks": [{"name": t.name, "metric": t.metric, "category": t.category, "dataset": t.dataset.id}
                      for t in tasks],
        }, indent=2))
        return 0
    table = Table(title=f"Base models ({len(models)})")
    for column in ("name", "Hugging Face id", "family", "params (B)", "instruct"):
        table.add_column(column)
    for m in models:
        table.add_row(m.name, m.hf_id, m.family, f"{m.params_billion:g}", "yes" if m.instruction_tuned else "no")
    console.print(table)
    table = Table(title=f"Tasks ({len(tasks)})")
    for column in ("name", "category", "dataset", "metric", "description"):
        table.add_column(column)
    for t in tasks:
        table.add_row(t.name, t.category, t.dataset.id, t.metric, t.description)
    console.print(table)
    return 0


def _validate_any(path: Path) -> str:
    """Validate one of our YAML files, recognised by its keys; returns what it is."""
    from orchestrator.config import load_sweep
    from serving.config import is_serve_config_file, load_serve_config

    data = read_yaml(path)
    if "deployments" in data or is_serve_config_file(data):
        load_serve_config(path)
        return "serve config"
    if "base_model" in data and "task" in data:
        parse_job_config(data, str(path))
        return "job config"
    listed = [data[key] for key in ("base_models", "tasks") if key in data]
    if "name" not in data and any(isinstance(v, list) and v and isinstance(v[0], dict) for v in listed):
        load_catalog_file(path)
        return "catalogue"
    load_sweep(path)
    return "sweep"


def cmd_validate(args: argparse.Namespace) -> int:
    """Check any of our YAML files: sweep, catalogue, job or serve config."""
    kind = _validate_any(Path(args.file))
    console.print(f"[green]ok[/green] {args.file} is a valid {kind}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The job matrix of a sweep with memory, GPU share, time and cost."""
    from orchestrator.config import ResourceSettings, load_sweep
    from orchestrator.plan import plan_json

    sweep = load_sweep(args.sweep)
    options = (("gpu_memory_gb", args.gpu_memory_gb), ("price_per_gpu_hour", args.price_per_gpu_hour))
    overrides = {k: v for k, v in options if v is not None}
    if overrides:
        try:
            sweep.resources = parse_model(ResourceSettings, sweep.resources.model_dump() | overrides, "command line")
        except ConfigError as exc:  # name the option, not the sweep field it overrides
            fields = [problem.partition(":") for problem in exc.problems]
            raise ConfigError(exc.source, [f"--{f.replace('_', '-')}{sep}{rest}" if f in overrides else f + sep + rest
                                           for f, sep, rest in fields]) from None
    plan = plan_json(sweep)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    t = plan["totals"]
    table = Table(title=f"Sweep {sweep.name}: {t['jobs']} fine-tunes + {t['base_evaluations']} base evaluations")
    for column in ("base model", "task", "GPU mem (GB)", "GPUs", "jobs/GPU", "GPU-hours", "hours", "eval hours"):
        table.add_column(column, justify="right" if column not in ("base model", "task") else "left")
    for job in plan["jobs"]:  # eval hours: its evaluation through its base's evaluator (0 with engine: generate)
        table.add_row(job["base_model"], job["task"], f"{job['gpu_memory_gb']:.2f}", f"{job['gpus']:g}",
                      str(job["jobs_per_gpu"]), f"{job['gpu_hours']:.2f}", f"{job['hours']:.2f}",
                      f"{job['eval_hours']:.3f}")
    console.print(table)
    if plan["groups"]:
        groups = Table(title=f"Co-training groups (resources.co_train: {sweep.resources.co_train})")
        for column in ("base model", "members", "tasks", "GPU mem (GB)", "GPUs", "GPU-hours", "hours"):
            groups.add_column(column, justify="left" if column in ("base model", "tasks") else "right")
        for group in plan["groups"]:
            groups.add_row(group["base_model"], str(len(group["tasks"])), ", ".join(group["tasks"]),
                           f"{group['gpu_memory_gb']:.2f}", f"{group['gpus']:g}", f"{group['gpu_hours']:.2f}",
                           f"{group['hours']:.2f}")
        console.print(groups)
    if plan["searches"]:
        searches = Table(title="LoRA searches (docs/search.md): trials run to their longest max_steps, an upper bound")
        for column in ("base model", "task", "trials", "co-trained", "searched", "GPU mem (GB)", "GPUs", "GPU-hours",
                       "cost"):
            searches.add_column(column, justify="left" if column in ("base model", "task", "searched") else "right")
        for row in plan["searches"]:
            searches.add_row(row["base_model"], row["task"], str(row["trials"]), str(row["co_trained"]),
                             ", ".join(row["searched"]), f"{row['gpu_memory_gb']:.2f}", f"{row['gpus']:g}",
                             f"{row['gpu_hours']:.2f}", f"${row['cost']:,.2f}")
        console.print(searches)
    console.print(f"Total: {t['jobs']} fine-tunes, {t['base_evaluations']} base evaluations, "
                  f"{t['gpu_hours']:.1f} GPU-hours ({t['eval_gpu_hours']:.1f} evaluating), "
                  f"${t['cost']:,.2f} at ${t['price_per_gpu_hour']}/GPU-hour; "
                  f"up to {t['jobs_per_gpu']} jobs per {t['gpu_memory_gb']:g} GB GPU "
                  f"(largest job {t['max_gpu_memory_gb']:.1f} GB).")
    if budget := plan["study_budget"]:
        console.print(
            f"Per fine-tune: {budget['gpu_hours_per_adapter']:.2f} GPU-hours, ${budget['cost_per_adapter']:.2f} "
            f"({budget['examples_per_adapter']:,} examples of ~{budget['mean_example_tokens']:.0f} tokens at "
            f"{budget['mfu']:.0%} of {budget['gpu_tflops']:g} TFLOPs); the study published under "
            f"${budget['study_cost_per_adapter']:.0f} per adapter (about ${budget['study_total_cost']:,.0f} for 310, "
            f"A10G GPUs), {budget['study_gpu_hours_per_adapter_at_this_price']:.1f} GPU-hours at this price. The gap "
            "is the GPU's type and price, the utilisation reached (resources.mfu) and the tokens per example "
            "(packing, prompt length): docs/cluster.md#the-studys-budget.")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a sweep on Ray (the cluster of `ray job submit`, else a local one), exactly once per job."""
    from orchestrator.config import load_sweep
    from orchestrator.notes import summary_table
    from orchestrator.sweep import run_sweep

    # progress reaches `ray job logs -f` (or a log file) line by line, not in blocks, and survives an exit that skips
    # flushing (Ray's, after a lost node)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    sweep = load_sweep(args.sweep)  # the whole sweep is validated before Ray is touched
    if args.storage_path:
        sweep.storage_path = args.storage_path
    outcomes = run_sweep(sweep, args.tracking_uri, config_file=args.sweep)
    console.print(summary_table(outcomes))
    failed = [o for o in outcomes if o.state == "failed"]
    console.print(f"{len(outcomes) - len(failed)} of {len(outcomes)} jobs finished; open the runs with `loraland ui`.")
    return 1 if failed else 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the MLflow UI on the tracking store (the embedded SQLite default unless --tracking-uri)."""
    from orchestrator.signals import exit_on_signals
    from tracking.server import stop_server
    from tracking.ui import start_ui

    with exit_on_signals():  # SIGTERM and SIGHUP, like Ctrl-C, stop the server and all its processes
        process = start_ui(args.tracking_uri, port=args.port)  # stops it again if a signal comes while it starts
        try:  # from here on (a signal during the print below left the server running)
            console.print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C stops it)")
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop_server(process)


def cmd_report(args: argparse.Namespace) -> int:
    """Write the leaderboard and the study's analysis for an experiment, and log them to its sweep run."""
    from tracking.report import build_report

    report = build_report(args.experiment, args.out, args.tracking_uri)
    console.print(f"report written to {report.out_dir}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Turn a task's original download (legal, covid, jigsaw, customer_support) into the split files its catalogue
    entry reads."""
    from jobs.prepare import prepare, task_dir

    counts = prepare(args.task, args.source)
    written = ", ".join(f"{split} {rows} rows" for split, rows in counts.items())
    console.print(f"{args.task}: wrote {written} to {task_dir(args.task)}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """For every task and base model of a sweep: where its data and weights come from, whether they load, and the
    command that fixes each problem (offline: which checks could not be made, and how)."""
    import os

    from orchestrator.config import load_sweep
    from orchestrator.datacheck import HfHub, data_check

    checks = data_check(load_sweep(args.sweep), None if args.offline else HfHub(os.environ.get("HF_TOKEN")))
    if args.json:
        print(json.dumps([vars(c) for c in checks], indent=2))
    else:
        table = Table(title=f"Data and weights of {args.sweep}")
        for column in ("subject", "source", "state", "detail", "fix"):
            table.add_column(column, overflow="fold")
        colour = {"ok": "green", "fix": "red", "unchecked": "yellow"}
        for c in checks:
            table.add_row(c.subject, c.source, f"[{colour[c.state]}]{c.state}[/]", c.detail, c.fix)
        console.print(table)
    unchecked = sum(c.state == "unchecked" for c in checks)
    if unchecked and not args.json:
        console.print(f"{unchecked} checks could not be made here (the Hub did not answer): run `loraland data check "
                      f"{args.sweep}` where huggingface.co answers (or HF_ENDPOINT names a mirror), with the HF_TOKEN "
                      "the workers get.")
    return 1 if any(c.state == "fix" for c in checks) else 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Point a task's `champion` alias at a given adapter version."""
    from tracking.registry import promote

    if args.task not in load_catalog().tasks:
        raise NotFound(f"unknown task {args.task!r}; see `loraland catalog --all` for the task names")
    promote(args.task, args.version, args.tracking_uri)
    console.print(f"{args.task}: champion is now version {args.version}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the published adapters behind an OpenAI-compatible endpoint (blocks until Ctrl-C)."""
    from serving.config import load_serve_config

    config = load_serve_config(args.config)  # validated before Ray is touched
    if args.port is not None:
        config.port = args.port
    from ray import serve

    from orchestrator.cluster import connect_ray
    from orchestrator.signals import exit_on_signals
    from serving.app import deploy
    from serving.webapp import page_url

    with exit_on_signals():  # SIGTERM and SIGHUP, like Ctrl-C, shut Serve and the local Ray down (Ray's atexit handler)
        connect_ray()
        endpoint = deploy(config)
        console.print(f"OpenAI-compatible endpoint: {endpoint} (models: {endpoint}/models); Ctrl-C stops it")
        console.print(f"LoRA Land page (pick a task, compare fine-tuned and base answers): {page_url(endpoint)}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `loraland` command."""
    parser = argparse.ArgumentParser(prog="loraland",
                                     description="Fine-tune, track and serve many QLoRA adapters on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = commands.add_parser("catalog", help=cmd_catalog.__doc__)
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("--all", action="store_true", help="include the tiny offline models and demo tasks")
    sub.set_defaults(run=cmd_catalog)
    sub = commands.add_parser("validate", help=cmd_validate.__doc__)
    sub.add_argument("file", help="a YAML file of ours")
    sub.set_defaults(run=cmd_validate)
    sub = commands.add_parser("plan", help=cmd_plan.__doc__)
    sub.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/lora_land.yaml")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU (overrides resources.gpu_memory_gb)")
    sub.add_argument("--price-per-gpu-hour", type=float,
                     help="price of a GPU-hour (overrides resources.price_per_gpu_hour)")
    sub.set_defaults(run=cmd_plan)
    sub = commands.add_parser("sweep", help=cmd_sweep.__doc__)
    sub.add_argument("sweep", help="sweep YAML")
    sub.add_argument("--tracking-uri",
                     help="MLflow URI (default: $MLFLOW_TRACKING_URI, else the embedded SQLite store)")
    sub.add_argument("--storage-path", help="checkpoints and results (shared storage on a cluster)")
    sub.set_defaults(run=cmd_sweep)
    sub = commands.add_parser("ui", help=cmd_ui.__doc__)
    sub.add_argument("--tracking-uri")
    sub.add_argument("--port", type=int, default=5000)
    sub.set_defaults(run=cmd_ui)
    sub = commands.add_parser("report", help=cmd_report.__doc__)
    sub.add_argument("--experiment", required=True, help="experiment (sweep) name")
    sub.add_argument("--out", help="output folder (default: .loraland/reports/NAME)")
    sub.add_argument("--tracking-uri")
    sub.set_defaults(run=cmd_report)
    data = commands.add_parser("data", help="prepare data that is not on the Hub; check a sweep's data").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND")
    sub = data.add_parser("prepare", help=cmd_data_prepare.__doc__)
    sub.add_argument("task", help="task name (legal, covid, jigsaw or customer_support)")
    sub.add_argument("--from", dest="source", required=True, help="folder of the task's unzipped original download")
    sub.set_defaults(run=cmd_data_prepare)
    sub = data.add_parser("check", help=cmd_data_check.__doc__)
    sub.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/lora_land.yaml")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_argument("--offline", action="store_true", help="only the checks that need no network (the preflight)")
    sub.set_defaults(run=cmd_data_check)
    sub = commands.add_parser("promote", help=cmd_promote.__doc__)
    sub.add_argument("task")
    sub.add_argument("version")
    sub.add_argument("--tracking-uri")
    sub.set_defaults(run=cmd_promote)
    sub = commands.add_parser("serve", help=cmd_serve.__doc__)
    sub.add_argument("config",
                     help="serve config: a Ray Serve config file like configs/serve/demo.yaml, or a bare ServeConfig")
    sub.add_argument("--port", type=int, help="HTTP port (overrides the config's)")
    sub.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loraland` console script."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UserError as exc:  # only a user's mistake is one line; anything else is a bug and keeps its traceback
        return print_user_error(exc)
    except OverflowError as exc:  # a number so large that arithmetic on it overflows (bounds catch the usual ones)
        print(f"error: a number in the input is too large ({exc}); use a realistic value", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
