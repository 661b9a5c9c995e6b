"""The study's serving load test, through the real endpoint: users against throughput and latency.

The real application (`serving.app`: HTTP proxy, OpenAI ingress, one replica of the base model with the batching
engine) on 127.0.0.1, adapters resolved through an MLflow registry (a SQLite store in a temporary folder) and read
from the replica's local adapter cache. N users (N = 1, 4, 16, 32, 64) start evenly over `--ramp-s` (1 s) and are
held for `--hold-s` (60 s): each streams `/v1/completions` with 90-110 random words in (about one token each) and
90-110 new tokens (greedy), then pauses 1 s, and asks again. Twice per N: with one of 25 adapters drawn uniformly per
request (the study's count) and with the base model alone.

Per N and mode: aggregate tokens/s and tokens/s per user (completion tokens of the requests sent during the hold,
over the hold), TTFT (request sent to first text chunk) and request latency p50/p99, requests and errors.

    python benchmarks/serve_load.py [--hold-s 60] [--users 1,4,16,32,64] [--out FILE]

Writes JSON (default benchmarks/results/serve_load.json) and a PNG beside it (tokens/s and p99 latency against N).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from serving_app import Shape, http_users, local_serve, prime, publish_adapters, summarise_load, vocabulary_words  # noqa: E402

from core.catalog import load_catalog  # noqa: E402
from core.errors import UserError, print_user_error  # noqa: E402
from core.schemas import QuantizationSettings  # noqa: E402
from jobs.models import load_base_model, load_tokenizer  # noqa: E402
from serving.config import BaseDeployment, EngineSettings, IngressSettings, ServeConfig  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
MODES = ("adapters", "base")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (the PNG goes beside it)")
    parser.add_argument("--base", default="tiny-llama", help="catalogue base model (a tiny one on a CPU)")
    parser.add_argument("--users", default="1,4,16,32,64", help="comma-separated user counts")
    parser.add_argument("--adapters", type=int, default=25, help="distinct adapters (the study served 25)")
    parser.add_argument("--hold-s", type=float, default=60.0, help="seconds the users are held at each N (measured)")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="seconds over which the users start")
    parser.add_argument("--pause-s", type=float, default=1.0, help="pause after each answer")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (replica 1, proxy and ingress the rest)")
    args = parser.parse_args(argv)
    try:
        args.user_counts = [int(n) for n in args.users.split(",")]
    except ValueError:
        parser.error(f"--users: not a comma-separated list of integers: {args.users!r}")
    if min(args.user_counts) < 1 or args.adapters < 1 or args.hold_s <= 0 or args.ramp_s < 0:
        parser.error("--users and --adapters must be at least 1, --hold-s positive, --ramp-s not negative")
    return args


def serve_config(args: argparse.Namespace, uri: str, cache: Path) -> ServeConfig:
    """One replica of the base with room for every user in one batch."""
    engine = EngineSettings(max_batch_size=64, max_queued_requests=256, host_adapter_slots=max(64, args.adapters),
                            device_adapter_slots=max(32, args.adapters), max_lora_rank=16)
    from core.ports import free_port

    return ServeConfig(name="serve-load", port=free_port(), tracking_uri=uri, adapter_cache_dir=str(cache),
                       ingress=IngressSettings(num_cpus=0, request_timeout_s=300),
                       deployments=[BaseDeployment(base_model=args.base, device="cpu", num_cpus=1, engine=engine,
                                                   max_adapters_per_replica=max(32, args.adapters))])


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    spec = load_catalog().base_model(args.base)
    words = vocabulary_words(load_tokenizer(spec))
    shape = Shape(pause_s=args.pause_s)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        uri, cache = f"sqlite:///{tmp}/mlflow.db", Path(tmp) / "cache"
        model = load_base_model(spec, QuantizationSettings(), "cpu")
        models = publish_adapters(uri, cache, model, spec, args.adapters)
        del model
        with local_serve(serve_config(args, uri, cache), args.cpus) as url:
            asyncio.run(prime(url, models, words))  # every adapter into the replica once, before anything is measured
            for users in args.user_counts:
                for mode in MODES:
                    load = asyncio.run(http_users(url, users, model_picker(mode, models, spec.name), words, shape, args.ramp_s, args.hold_s, args.ramp_s,
                                                  seed=users))
                    rows.append({"users": users, "mode": mode} | summarise_load(load, users, args.hold_s))
                    print(row_line(rows[-1]), flush=True)
    return {"results": rows, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
            "command": "python benchmarks/serve_load.py " + shlex.join(argv if argv is not None else sys.argv[1:])}


def model_picker(mode: str, adapters: list[str], base: str) -> Callable[[random.Random], str]:
    """Each request's model id: one of the adapters, uniformly, or `base` alone."""
    return (lambda rng: rng.choice(adapters)) if mode == "adapters" else (lambda rng: base)


def row_line(r: dict[str, Any]) -> str:
    return (f"| {r['users']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_per_user']:.1f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | {r['requests']} | {r['errors']} |")


def print_table(report: dict[str, Any]) -> None:
    print("\n| users | mode | tokens/s | tokens/s per user | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms "
          "| requests | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        print(row_line(r))


def plot(report: dict[str, Any], path: Path) -> None:
    """Aggregate tokens/s and p99 latency against users, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rows = [r for r in report["results"] if r["mode"] == mode]
        label = f"{report['settings']['adapters']} adapters" if mode == "adapters" else "base model"
        throughput.plot([r["users"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=label)
        latency.plot([r["users"] for r in rows], [r["latency_p99_ms"] / 1000 for r in rows], marker="o", label=label)
    for axis, title in ((throughput, "aggregate tokens/s"), (latency, "request latency p99 (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent users")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args, argv)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as error:  # e.g. an unknown --base: one line, exit 2
        raise SystemExit(print_user_error(error)) from None
