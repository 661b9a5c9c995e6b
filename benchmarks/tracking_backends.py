"""Benchmark: metrics logged per second by concurrent job loggers through `mlflow server` on PostgreSQL vs on SQLite.

    python -m benchmarks.tracking_backends [--loggers 32] [--steps 40] [--keys 10] [--repeats 2] [--out FILE]

Two servers, side by side in one run, differing only in their backend store: the cluster's (PostgreSQL, a real one
from Debian's `postgresql` package, `tests/postgres_stack.py`) and the single machine's (a SQLite file). Both run with
the settings of `infra/mlflow/docker-compose.yaml` (`--workers`, the connection pool, job execution off; PostgreSQL's
max_connections) and keep artifacts in a local folder (no artifact is logged here).

Each of `--loggers` processes (forked from one that imported MLflow once) is a job's tracker, as on a worker: it opens
its run (`JobTracker.start`: look-up-then-create by job key), and once every logger is ready (a barrier) logs
`--steps` steps of `--keys` metrics, each step buffered by `on_step` and sent at once by `flush` (one `log-batch`
request per step, retried as in a job), so the server, not the logger, sets the pace. Then it finishes its run.

Per backend and repeat: metrics/s = loggers x steps x keys / (last logger's end - first logger's start, both after the
barrier); requests/s likewise; the latency of one step's request (median, 95th percentile); and a check that every
point arrived (the history of each run's first key has every step). The backends run interleaved (sqlite, postgres,
postgres, sqlite for `--repeats 2`), each repeat in a fresh experiment; the table shows each backend's median.

Prints a table and writes JSON (default benchmarks/results/tracking_backends.json) with top-level
`postgres_over_sqlite` (ratio of the median metrics/s), `backends`, `runs`, `settings`, `machine` and `command`.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, command, machine, percentiles_ms, write_report
from core.ports import free_port
from tests.postgres_stack import StackSettings, compose_settings, mlflow_server, postgres_bin, tracking_stack

BACKENDS = ("sqlite", "postgres")


# --------------------------------------------------------------------------- one logger (a child process)


def log_steps(uri: str, experiment_id: str, index: int, steps: int, keys: int, start: Any, results: Any) -> None:
    """One job's tracker: open the run, wait at the barrier `start`, log `steps` steps of `keys` metrics (one request
    each), finish the run; put (index, run id, first start, end, per-step latencies) on `results`."""
    from jobs.run import JobResult
    from tracking.tracker import JobTracker

    tracker = JobTracker(
        experiment_id,
        f"bench/w{index:02d}",
        "tiny-llama",
        "demo_sentiment",
        parent_run_id=None,
        uri=uri,
        system_metrics=False,
        register=False,
        flush_interval_s=3600.0,
    )
    with tracker:
        start.wait(timeout=600)
        began = time.time()
        latencies = []
        for step in range(1, steps + 1):
            tracker.on_step(step, {f"metric_{k:02d}": step + k / 100 for k in range(keys)})
            sent = time.perf_counter()
            tracker.flush()
            latencies.append(time.perf_counter() - sent)
        ended = time.time()
        tracker.finish(
            JobResult(tracker.job_key, "train", "tiny-llama", "demo_sentiment", "accuracy", 0.5, 1, None, {}),
            base_score=0.0,
        )
    results.put((index, tracker.run_id, began, ended, latencies))


# --------------------------------------------------------------------------- one measurement


def measure(uri: str, experiment: str, loggers: int, steps: int, keys: int) -> dict[str, Any]:
    """Run `loggers` concurrent loggers against the server at `uri` into a new experiment; the figures of the run."""
    from tracking import store

    experiment_id = store.ensure_experiment(experiment, uri)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tracking.tracker", "jobs.run"])
    results = context.Queue()
    start = context.Barrier(loggers)
    processes = [
        context.Process(target=log_steps, args=(uri, experiment_id, i, steps, keys, start, results))
        for i in range(loggers)
    ]
    for process in processes:
        process.start()
    reported = [results.get(timeout=1200) for _ in processes]
    for process in processes:
        process.join(60)
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    wall = max(r[3] for r in reported) - min(r[2] for r in reported)
    latencies = [latency for r in reported for latency in r[4]]
    client = store.client(uri)
    complete = sum(len(client.get_metric_history(run_id, "metric_00")) == steps for _, run_id, *_ in reported)
    return {
        "metrics": loggers * steps * keys,
        "requests": loggers * steps,
        "wall_s": round(wall, 3),
        "metrics_per_s": round(loggers * steps * keys / wall, 1),
        "requests_per_s": round(loggers * steps / wall, 1),
        **{key: round(value, 1) for key, value in percentiles_ms("latency", latencies, (50, 95)).items()},
        "runs_complete": complete,
        "loggers_failed": len(failed),
    }


# --------------------------------------------------------------------------- the two servers


@contextlib.contextmanager
def servers(root: Path, settings: StackSettings) -> Iterator[dict[str, str]]:
    """Both servers running with `settings`: backend name -> tracking URI; stopped after."""
    with tracking_stack(root / "postgres", str(root / "postgres" / "artifacts"), settings=settings) as stack:
        sqlite = mlflow_server(
            f"sqlite:///{root / 'sqlite' / 'mlflow.db'}",
            str(root / "sqlite" / "artifacts"),
            free_port(),
            root / "sqlite" / "mlflow.log",
            settings,
        )
        sqlite.start()
        try:
            yield {"sqlite": sqlite.uri, "postgres": stack.uri}
        finally:
            sqlite.stop()


def interleaved(repeats: int) -> list[str]:
    """sqlite, postgres, postgres, sqlite, ...: each backend as often, in both positions."""
    order: list[str] = []
    for repeat in range(repeats):
        order += list(BACKENDS if repeat % 2 == 0 else reversed(BACKENDS))
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loggers", type=int, default=32, help="concurrent job loggers (processes)")
    parser.add_argument("--steps", type=int, default=40, help="steps each logger logs (one request each)")
    parser.add_argument("--keys", type=int, default=10, help="metrics per step")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per backend, interleaved")
    parser.add_argument("--out", type=Path, default=RESULTS / "tracking_backends.json", help="JSON result file")
    args = parser.parse_args(argv)
    binaries = postgres_bin()
    if binaries is None:
        parser.error("PostgreSQL is not installed: apt-get install -y postgresql")
    settings = compose_settings()
    machine_info = machine("mlflow", "sqlalchemy") | {"postgresql": binaries.parts[-2]}
    runs = []
    with tempfile.TemporaryDirectory(prefix="loraland-bench-") as scratch:
        root = Path(scratch)
        for backend in BACKENDS:
            (root / backend).mkdir()
        with servers(root, settings) as uris:
            for number, backend in enumerate(interleaved(args.repeats)):
                figures = measure(uris[backend], f"bench-{number}-{backend}", args.loggers, args.steps, args.keys)
                runs.append({"backend": backend} | figures)
                print(
                    f"  {backend:8s} {figures['metrics_per_s']:8.0f} metrics/s  p50 {figures['latency_p50_ms']} ms",
                    flush=True,
                )
    backends = {backend: {key: statistics.median(r[key] for r in runs if r["backend"] == backend)
                          for key in ("metrics_per_s", "requests_per_s", "latency_p50_ms", "latency_p95_ms", "wall_s")}
                | {"runs_complete": min(r["runs_complete"] for r in runs if r["backend"] == backend),
                   "loggers_failed": max(r["loggers_failed"] for r in runs if r["backend"] == backend)}
                for backend in BACKENDS}
    ratio = backends["postgres"]["metrics_per_s"] / backends["sqlite"]["metrics_per_s"]
    print_table(backends, args.loggers, ratio)
    result = {
        "postgres_over_sqlite": round(ratio, 3),
        "backends": backends,
        "runs": runs,
        "settings": {
            "loggers": args.loggers,
            "steps": args.steps,
            "keys": args.keys,
            "repeats": args.repeats,
            "server": {"workers": settings.workers, "env": settings.server_env, "postgres": settings.postgres_options},
        },
        "machine": machine_info,
        "command": command("tracking_backends", argv),
    }
    write_report(result, args.out)
    return 0 if all(b["loggers_failed"] == 0 and b["runs_complete"] == args.loggers for b in backends.values()) else 1


def print_table(backends: dict[str, dict[str, float]], loggers: int, ratio: float) -> None:
    print(f"\n{loggers} concurrent job loggers, median of the runs per backend")
    print("| backend | metrics/s | requests/s | p50 ms | p95 ms | runs complete | loggers failed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend, b in backends.items():
        print(f"| {backend} | {b['metrics_per_s']:.0f} | {b['requests_per_s']:.0f} | {b['latency_p50_ms']:.0f} | "
              f"{b['latency_p95_ms']:.0f} | {b['runs_complete']:.0f} of {loggers} | {b['loggers_failed']:.0f} |")
    print(f"\npostgres / sqlite: {ratio:.2f}x metrics/s")


if __name__ == "__main__":
    raise SystemExit(main())
