"""The study's serving load test, through the real endpoint: users against throughput and latency.

The real application (`serving.app`: HTTP proxy, OpenAI ingress, one replica of the base model with the batching
engine) on 127.0.0.1, adapters resolved through an MLflow registry (a SQLite store in a temporary folder) and read
from the replica's local adapter cache. N users (N = 1, 4, 16, 32, 64) start evenly over `--ramp-s` (1 s) and are
held for `--hold-s` (60 s): each streams `/v1/completions` with 90-110 random words in (about one token each) and
90-110 new tokens (greedy), then pauses 1 s, and asks again. Twice per N: with one of 25 adapters drawn uniformly per
request (the study's count) and with the base model alone.

Per N and mode: aggregate tokens/s and tokens/s per user (completion tokens of the requests sent during the hold,
over the hold), TTFT (request sent to first text chunk) and request latency p50/p99, requests and errors.

    python -m benchmarks.serve_load [--hold-s 60] [--users 1,4,16,32,64] [--engine batching|vllm|both] [--out FILE]

`--engine vllm` serves with vLLM (`kind: vllm`, an fp32 base on a CPU) instead of our engine; `--engine both` runs the
whole load on each, one after the other, rows marked by `engine`.

Writes JSON (default benchmarks/results/serve_load.json) and a PNG beside it (tokens/s and p99 latency against N).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, command, machine, write_report
from benchmarks.serving_app import Shape, http_users, prime, summarise_load, vocabulary_words
from benchmarks.vllm_runs import ENGINES, vllm_config, vllm_missing, wants
from core.catalog import load_catalog
from core.errors import UserError, print_user_error
from core.schemas import QuantizationSettings
from jobs.models import load_base_model, load_tokenizer
from serving.config import BaseDeployment, BatchingEngineConfig, EngineConfig, IngressSettings, ServeConfig
from serving.synthetic import publish_adapters
from tests.helpers import local_serve

DEFAULT_OUT = RESULTS / "serve_load.json"
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
    parser.add_argument("--engine", choices=ENGINES, default="batching", help="the replica's engine: ours (batching), "
                        "vLLM, or both, one after the other")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (replica 1, proxy and ingress the rest)")
    args = parser.parse_args(argv)
    try:
        args.user_counts = [int(n) for n in args.users.split(",")]
    except ValueError:
        parser.error(f"--users: not a comma-separated list of integers: {args.users!r}")
    if min(args.user_counts) < 1 or args.adapters < 1 or args.hold_s <= 0 or args.ramp_s < 0:
        parser.error("--users and --adapters must be at least 1, --hold-s positive, --ramp-s not negative")
    return args


def serve_config(args: argparse.Namespace, uri: str, cache: Path, kind: str = "batching") -> ServeConfig:
    """One replica of the base with room for every user in one batch, on our engine or (`kind` vllm) vLLM's."""
    from core.ports import free_port

    engine: EngineConfig = BatchingEngineConfig(max_batch_size=64, max_queued_requests=256,
                                                host_adapter_slots=max(64, args.adapters),
                                                device_adapter_slots=max(32, args.adapters), max_lora_rank=16)
    precision: Any = "4bit"
    if kind == "vllm":
        engine = vllm_config(argparse.Namespace(users=max(64, *args.user_counts), max_rank=16), max(32, args.adapters))
        precision = "fp32"  # vLLM loads a 4-bit (bitsandbytes) base on a GPU only
    return ServeConfig(name="serve-load", port=free_port(), tracking_uri=uri, adapter_cache_dir=str(cache),
                       ingress=IngressSettings(num_cpus=0, request_timeout_s=300),
                       deployments=[BaseDeployment(base_model=args.base, device="cpu", num_cpus=1, engine=engine,
                                                   precision=precision,
                                                   max_adapters_per_replica=max(32, args.adapters))])


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    machine_info = machine("torch")
    spec = load_catalog().base_model(args.base)
    words = vocabulary_words(load_tokenizer(spec))
    shape = Shape(pause_s=args.pause_s)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        uri, cache = f"sqlite:///{tmp}/mlflow.db", Path(tmp) / "cache"
        model = load_base_model(spec, QuantizationSettings(), "cpu")
        models = publish_adapters(uri, cache, model, spec, args.adapters)
        del model
        for kind in [kind for kind in ("batching", "vllm") if wants(args, kind)]:
            rows += run_engine(args, kind, serve_config(args, uri, cache, kind), models, words, shape, spec.name)
    return {"results": rows, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine_info, "command": command("serve_load", argv)}


def run_engine(args: argparse.Namespace, kind: str, config: ServeConfig, models: list[str], words: list[str],
               shape: Shape, base: str) -> list[dict[str, Any]]:
    """Every user count and mode against the app served by engine `kind`; rows marked with it."""
    rows: list[dict[str, Any]] = []
    if kind == "vllm" and (missing := vllm_missing()):
        print(f"vLLM not run: {missing}", flush=True)
        return [{"engine": kind, "skipped": missing}]
    with local_serve(config, args.cpus) as url:
        asyncio.run(prime(url, models, words))  # every adapter into the replica once, before anything is measured
        for users in args.user_counts:
            for mode in MODES:
                load = asyncio.run(http_users(url, users, model_picker(mode, models, base), words, shape, args.ramp_s,
                                              args.hold_s, args.ramp_s, seed=users))
                rows.append({"engine": kind, "users": users, "mode": mode} | summarise_load(load, users, args.hold_s))
                print(row_line(rows[-1]), flush=True)
    return rows


def model_picker(mode: str, adapters: list[str], base: str) -> Callable[[random.Random], str]:
    """Each request's model id: one of the adapters, uniformly, or `base` alone."""
    return (lambda rng: rng.choice(adapters)) if mode == "adapters" else (lambda rng: base)


def row_line(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"| {r['engine']} | not run: {r['skipped']} |"
    return (
        f"| {r['engine']} | {r['users']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_per_user']:.1f} | "
        f"{r['ttft_p50_ms']:.0f} | "
        f"{r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | {r['requests']} | "
        f"{r['errors']} |"
    )


def print_table(report: dict[str, Any]) -> None:
    print(
        "\n| engine | users | mode | tokens/s | tokens/s per user | TTFT p50 ms | TTFT p99 ms | latency p50 ms "
        "| latency p99 ms | requests | errors |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        print(row_line(r))


def plot(report: dict[str, Any], path: Path) -> None:
    """Aggregate tokens/s and p99 latency against users, one line per mode (and engine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, mode in [(engine, mode) for engine in ("batching", "vllm") for mode in MODES]:
        rows = [r for r in report["results"] if r.get("engine") == engine and r.get("mode") == mode]
        if not rows:
            continue
        label = f"{report['settings']['adapters']} adapters" if mode == "adapters" else "base model"
        label = label if report["settings"]["engine"] == "batching" else f"{engine}, {label}"
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
    write_report(report, args.out)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as error:  # e.g. an unknown --base: one line, exit 2
        raise SystemExit(print_user_error(error)) from None
