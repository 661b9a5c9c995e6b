"""Serving many adapters: our engine against one adapter, against transformers + PEFT, and hot adapters across replicas.

A closed-loop load shaped like the study's serving test: `--users` concurrent users, each streams a request (a prompt
of about `--prompt-tokens` random tokens, up to `--new-tokens` new tokens, greedy) for an adapter drawn from K, then
waits a random think time (exponential, mean `--think-s`) and asks again. Tokens streamed inside the measured window
count; TTFT (submit to first streamed delta) is taken for every request submitted inside the window.

Parts (`--parts`, all by default):

- **engine**: `serving.batching.BatchingEngine` in this process, K = 1, 8, 32, 128, 1000 distinct adapters (uniform),
  every adapter read into host memory first (`prefetch`), the accelerator tier `--device-slots`; the configurations
  run interleaved, `--repeats` times each, and the median tokens/s counts (the machine's load drifts).
- **peft**: what a user writes without us, K = 32, same load: transformers + PEFT with every adapter loaded and static
  batches of the requests waiting when the previous batch ends, any adapters mixed, `adapter_names=[...]` per row
  (PEFT's mixed-adapter batch inference); and plain multiplexing (`@serve.multiplexed` + `@serve.batch` style): one
  adapter active at a time, batches of its requests only, a swap (PEFT load from disk, delete the previous) between.
  A baseline's window ends at its `--baseline-seconds` however slow it is (requests still running are abandoned): its
  tokens/s counts the tokens streamed inside the window, its `requests` only those finished there (0 when a batch takes
  longer than the window, as the 7B shape's mixed PEFT batch does on a GPU).
- **hot**: the real application (`serving.app`) on loopback with 2 replicas of the base (1 CPU each) and 256 adapters
  in the registry, through HTTP: uniform traffic, then Zipf traffic where one adapter takes half of the requests
  (the rest Zipf, s = 1), spread by the ingress (`serving/replication.py`), then the same Zipf traffic with the hot
  adapter held to one replica (what Serve's multiplexed routing does alone).
- **cold**: an adapter fetched from local disk into host memory (`prefetch`), and its copy into an accelerator slot,
  p50 over 16 fresh adapters.

`--engine vllm` runs the engine part on vLLM (`serving.vllm_engine`, benchmarks/vllm_runs.py) instead of our engine,
`--engine both` on both, one after the other over the same adapter folders: rows `vllm-<precision>` per K and
`vllm-<precision> base` (no adapter), for each of `--vllm-precisions` (fp32 on a CPU; 4bit,bf16 with --gpu-shape).

    python -m benchmarks.serve_adapters [--out FILE] [--parts engine,peft,hot,cold] [--seconds 5] [--users 32]
    python -m benchmarks.serve_adapters --gpu-shape mistral-7b [--layers 32]   # random 7B-shaped 4-bit model, a GPU
    python -m benchmarks.serve_adapters --parts engine --engine both            # vLLM beside our engine

Writes JSON (default benchmarks/results/serve_adapters.json) with top-level `ratio_1000_vs_1`, `ratio_128_vs_1`,
`ratio_32_vs_1` (engine tokens/s with K adapters over 1), `ratio_32_vs_peft` and `ratio_32_vs_naive` (engine over the
baselines at 32 adapters), `hot_vs_uniform` (Zipf over uniform tokens/s, 2 replicas) and `hot_p99_ttft_ratio` (the hot
adapter's p99 TTFT over the other adapters', Zipf run); with vLLM, `vllm-<precision>_32_vs_engine` and
`vllm-<precision>_32_vs_base`, or `vllm_skipped` saying why vLLM did not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.common import RESULTS, command, machine, percentiles_ms, random_4bit_model, write_report
from benchmarks.serving_app import Shape, http_users, prime, summarise_load, vocabulary_words
from benchmarks.vllm_runs import ENGINES, model_folder, run_vllm, vllm_missing, vllm_ratios, wants
from core.catalog import load_catalog
from core.errors import DeviceUnavailable, UserError, print_user_error
from core.schemas import BaseModelSpec, QuantizationSettings
from jobs.models import load_base_model, load_tokenizer
from serving.batching import BatchingEngine
from serving.config import BatchingEngineConfig, HotAdapterSettings, ReplicaBounds, ServeConfig
from serving.engine import Delta, SamplingParams
from serving.synthetic import RANKS, publish_adapters, random_adapters
from tests.helpers import local_serve, two_replica_config

DEFAULT_OUT = RESULTS / "serve_adapters.json"
PARTS = ("engine", "peft", "hot", "cold")
ADAPTER_COUNTS = (1, 8, 32, 128, 1000)
BASELINE_COUNT = 32
HOT_ADAPTERS = 256
HOT_SHARE = 0.5
GPU_SHAPES = ("mistral-7b",)


# --------------------------------------------------------------------------- the transformers + PEFT baselines


@dataclass(eq=False)
class _Request:
    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)


class PeftBaseline:
    """transformers + PEFT on one thread, static batches streamed token by token.

    mixed: every adapter loaded once; a batch is every waiting request (up to `max_batch_size`), any adapters,
    run with `adapter_names=[...]` per row. Otherwise (swap): one adapter loaded at a time; a batch is the oldest
    request's adapter's waiting requests; a swap (load from disk, delete the previous) when the adapter changes."""

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        adapter_dir: Path,
        max_batch_size: int,
        mixed_adapters: list[str] | None = None,
    ) -> None:
        from peft import PeftModel

        self.base = base.eval()
        self.tokenizer = tokenizer
        self.adapter_dir = adapter_dir
        self.max_batch_size = max_batch_size
        self.mixed = mixed_adapters is not None
        self.model: Any = None
        self.current: str | None = None
        self.swaps = 0
        for name in mixed_adapters or []:
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(adapter_dir / name), adapter_name=name).eval()
            else:
                self.model.load_adapter(str(adapter_dir / name), adapter_name=name)
        self.queue: list[_Request] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.eos = self.base.generation_config.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    async def generate(
        self, prompt_ids: list[int], adapter: str | None, params: SamplingParams
    ) -> AsyncIterator[Delta]:
        request = _Request(adapter or "", list(prompt_ids), params, asyncio.get_running_loop())
        with self.lock:
            self.queue.append(request)
            self.lock.notify()
        while True:
            delta = await request.stream.get()
            yield delta
            if delta.finish_reason:
                return

    def _swap(self, adapter: str) -> None:
        from peft import PeftModel

        if self.model is None:
            self.model = PeftModel.from_pretrained(
                self.base, str(self.adapter_dir / adapter), adapter_name=adapter
            ).eval()
        else:
            self.model.load_adapter(str(self.adapter_dir / adapter), adapter_name=adapter)
            self.model.set_adapter(adapter)
            self.model.delete_adapter(self.current)
        self.current = adapter
        self.swaps += 1

    def _next_batch(self) -> list[_Request]:
        """The waiting requests the next static batch takes (see the class docstring)."""
        adapter = self.queue[0].adapter  # first come, first served; in swap mode its adapter's requests ride along
        batch = [r for r in self.queue if self.mixed or r.adapter == adapter][: self.max_batch_size]
        self.queue = [r for r in self.queue if r not in batch]
        return batch

    def _loop(self) -> None:
        while not self.stopping:
            with self.lock:
                while not self.queue and not self.stopping:
                    self.lock.wait(timeout=0.1)
                if self.stopping:
                    return
                batch = self._next_batch()
            if not self.mixed and batch[0].adapter != self.current:
                self._swap(batch[0].adapter)
            with torch.inference_mode():
                self._run(batch)

    def _forward(self, batch: list[_Request], **inputs: Any) -> Any:
        if self.mixed:
            inputs["adapter_names"] = [r.adapter for r in batch]
        return self.model(use_cache=True, **inputs)

    def _run(self, batch: list[_Request]) -> None:
        device = self.base.device
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
        mask = (
            torch.arange(width, device=device)[None, :]
            >= torch.tensor([width - len(r.prompt_ids) for r in batch], device=device)[:, None]
        ).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._forward(batch, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        done = [False] * len(batch)
        counts = [0] * len(batch)
        for _ in range(max(r.params.max_tokens for r in batch)):
            if self.stopping:  # shut down at a window's hard deadline: its requests are abandoned
                return
            tokens = out.logits[:, -1].argmax(-1)
            for row, request in enumerate(batch):
                if done[row]:
                    continue
                token = int(tokens[row])
                counts[row] += 1
                finished = token == self.eos or counts[row] >= request.params.max_tokens
                done[row] = finished
                delta = Delta(
                    text="",
                    token_ids=[token],
                    finish_reason=("length" if finished else None),
                    completion_tokens=counts[row],
                )
                with contextlib.suppress(RuntimeError):  # abandoned at a hard deadline: its event loop is closed
                    request.loop.call_soon_threadsafe(request.stream.put_nowait, delta)
            if all(done):
                return
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self._forward(
                batch, input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache
            )

    def shutdown(self) -> None:
        self.stopping = True
        with self.lock:
            self.lock.notify()
        self.thread.join(timeout=30)


# --------------------------------------------------------------------------- the in-process load


@dataclass
class Window:
    tokens: int = 0  # streamed inside the window
    requests: int = 0  # finished inside the window
    ttft_s: list[float] = field(default_factory=list)
    in_flight: int = 0  # requests submitted and not finished yet
    abandoned: int = 0  # with a hard deadline: requests still in flight when the window ended


async def closed_loop(engine: Any, adapters: list[str], args: argparse.Namespace, vocab: int, seed: int,
                      hard_deadline: bool = False) -> Window:
    """`args.users` users for warm-up + measured seconds; returns what the measured window saw. Requests in flight at
    the window's end finish (outside it) before this returns, unless `hard_deadline`: then it returns at the window's
    end and the users' requests still in flight are abandoned (counted in `abandoned`; the engine is left to drop
    them)."""
    window = Window()
    started = time.perf_counter()
    measure_from = started + args.warmup_s
    stop_at = measure_from + args.seconds

    async def user(index: int) -> None:
        user_rng = random.Random(seed * 1000 + index)
        await asyncio.sleep(user_rng.uniform(0, args.think_s))  # users do not arrive in lock-step
        while time.perf_counter() < stop_at:
            length = max(8, int(user_rng.gauss(args.prompt_tokens, args.prompt_tokens * 0.1)))
            prompt = [user_rng.randrange(3, vocab) for _ in range(length)]
            adapter = adapters[user_rng.randrange(len(adapters))]
            submitted = time.perf_counter()
            first = True
            window.in_flight += 1
            async for delta in engine.generate(prompt, adapter, SamplingParams(max_tokens=args.new_tokens)):
                now = time.perf_counter()
                if first and measure_from <= submitted <= stop_at:  # in-flight requests finish after the window
                    window.ttft_s.append(now - submitted)
                first = False
                if measure_from <= now <= stop_at:
                    window.tokens += len(delta.token_ids)
                if delta.finish_reason and measure_from <= now <= stop_at:
                    window.requests += 1
            window.in_flight -= 1
            await asyncio.sleep(user_rng.expovariate(1 / args.think_s))

    users = [asyncio.ensure_future(user(i)) for i in range(args.users)]
    if not hard_deadline:
        await asyncio.gather(*users)
        return window
    _, running = await asyncio.wait(users, timeout=max(0.0, stop_at - time.perf_counter()))
    window.abandoned = window.in_flight
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return window


def summarise(
    name: str, adapters: int, windows: list[Window], seconds: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One row: median tokens/s over the windows (one per repeat); TTFT percentiles and requests over all of them."""
    return {
        "engine": name,
        "adapters": adapters,
        "tokens_per_s": statistics.median(w.tokens / seconds for w in windows),
        "tokens_per_s_runs": [round(w.tokens / seconds, 1) for w in windows],
        "requests": sum(w.requests for w in windows),
        **percentiles_ms("ttft", [t for w in windows for t in w.ttft_s]),
        **(extra or {}),
    }


# --------------------------------------------------------------------------- models


@dataclass
class Base:
    """The base model the in-process parts share the shape of: how to build it, its tokenizer and adapter targets."""

    spec: BaseModelSpec
    build: Callable[[], PreTrainedModel]
    tokenizer: PreTrainedTokenizerBase


def base_for(args: argparse.Namespace) -> Base:
    """The catalogue's --base (4-bit on this machine's device), or with --gpu-shape a random-initialised model of that
    base's real shape in 4-bit on the GPU (`--layers` of them), tokens from --base's tokenizer."""
    tokenizer_spec = load_catalog().base_model(args.base)
    tokenizer = load_tokenizer(tokenizer_spec)
    if args.gpu_shape is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return Base(tokenizer_spec, lambda: load_base_model(tokenizer_spec, QuantizationSettings(), device), tokenizer)
    spec = load_catalog().base_model(args.gpu_shape)
    if args.layers:
        spec = spec.model_copy(
            update={"architecture": spec.architecture.model_copy(update={"num_layers": args.layers})}
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.layers:
        raise DeviceUnavailable(f"--gpu-shape {args.gpu_shape} needs a CUDA GPU (torch.cuda.is_available() is False); "
                                "--layers N builds N layers of it on the CPU for a smoke run")
    return Base(spec, lambda: random_4bit_model(spec, QuantizationSettings(), device), tokenizer)


def engine_settings(args: argparse.Namespace, host_slots: int) -> BatchingEngineConfig:
    return BatchingEngineConfig(max_batch_size=args.max_batch_size, device_adapter_slots=args.device_slots,
                                host_adapter_slots=host_slots, max_lora_rank=args.max_rank,
                                max_queued_requests=10 * args.users)


def make_engine(base: Base, model: PreTrainedModel, adapter_dir: Path,
                settings: BatchingEngineConfig) -> BatchingEngine:
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    return BatchingEngine(model, base.tokenizer, lambda adapter: adapter_dir / adapter, settings, context,
                          list(base.spec.all_linear_modules))


# --------------------------------------------------------------------------- parts


def run_engine(
    engine: BatchingEngine, names: list[str], counts: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every adapter count, interleaved `args.repeats` times; one row per count."""
    vocab = len(engine.tokenizer)
    asyncio.run(_prefetch(engine, names[: max(counts)]))
    windows: dict[int, list[Window]] = {count: [] for count in counts}
    for repeat in range(args.repeats):
        for count in counts:
            windows[count].append(
                asyncio.run(closed_loop(engine, names[:count], args, vocab, seed=count + 7919 * repeat))
            )
            print(
                f"  engine {count:5d} adapters, run {repeat + 1}: {windows[count][-1].tokens / args.seconds:8.1f} "
                "tok/s",
                flush=True,
            )
    return [summarise("engine", count, windows[count], args.seconds, {"held_on_device": len(engine.held_adapters())})
            for count in counts]


async def _prefetch(engine: BatchingEngine, names: list[str]) -> None:
    await asyncio.gather(*(engine.prefetch(name) for name in names))


def run_baselines(base: Base, adapter_dir: Path, names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The PEFT mixed-batch baseline and the swap-per-batch baseline at BASELINE_COUNT adapters, each for its warm-up
    and `--baseline-seconds` and no longer: a hard deadline, since a slow baseline may finish no request in its window
    (its tokens/s then counts the tokens it streamed in the window; `requests` counts only finished ones)."""
    rows: list[dict[str, Any]] = []
    adapters = names[:BASELINE_COUNT]
    for name, mixed in (("peft", adapters), ("naive", None)):
        baseline = PeftBaseline(base.build(), base.tokenizer, adapter_dir, args.max_batch_size, mixed)
        window = asyncio.run(
            closed_loop(
                baseline,
                adapters,
                argparse.Namespace(**vars(args) | {"seconds": args.baseline_seconds}),
                len(base.tokenizer),
                seed=BASELINE_COUNT,
                hard_deadline=True,
            )
        )
        baseline.shutdown()
        rows.append(
            summarise(
                name,
                BASELINE_COUNT,
                [window],
                args.baseline_seconds,
                {"swaps": baseline.swaps, "hard_deadline": True, "abandoned_at_deadline": window.abandoned},
            )
        )
        print(_row(rows[-1]) + _deadline_note(rows[-1], args.baseline_seconds), flush=True)
        del baseline
    return rows


def run_cold(engine: BatchingEngine, names: list[str]) -> dict[str, float]:
    """Disk -> host (fetch + read + checks) through `prefetch`, and host -> accelerator slot, per fresh adapter."""
    async def measure() -> tuple[list[float], list[float]]:
        disk, slot_copy = [], []
        for name in names:  # the engine is idle here, as `measure_slot_copy` requires
            disk.append(await engine.prefetch(name))
            slot_copy.append(engine.tiers.measure_slot_copy(name))
        return disk, slot_copy

    disk, slot_copy = asyncio.run(measure())
    return {
        "disk_to_host_ms_p50": 1000 * statistics.median(disk),
        "host_to_slot_ms_p50": 1000 * statistics.median(slot_copy),
    }


def zipf_picker(models: list[str], hot_share: float) -> Callable[[random.Random], str]:
    """models[0] with probability `hot_share`, else models[1:] by Zipf (s = 1)."""
    tail = models[1:]
    weights = [1 / rank for rank in range(1, len(tail) + 1)]

    def pick(rng: random.Random) -> str:
        return models[0] if rng.random() < hot_share else rng.choices(tail, weights)[0]
    return pick


def hot_config(args: argparse.Namespace, uri: str, cache: Path, port: int, hot_task: str | None) -> ServeConfig:
    """2 replicas of the base, 1 CPU each; with `hot_task`, that task held to one replica (Serve's behaviour alone)."""
    bounds = {hot_task: ReplicaBounds(max_replicas=1)} if hot_task else {}
    return two_replica_config("serve-hot", uri, cache, port, 300, base_model=args.base, num_cpus=1,
                              engine=engine_settings(args, HOT_ADAPTERS + 16), max_adapters_per_replica=HOT_ADAPTERS,
                              hot_adapters=HotAdapterSettings(adapters=bounds))


def run_hot(base: Base, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Uniform, Zipf spread, and Zipf with the hot adapter on one replica, through the real app (2 replicas)."""
    from core.ports import free_port
    from serving.app import deploy

    uri, cache = f"sqlite:///{tmp}/mlflow.db", tmp / "cache"
    models = publish_adapters(uri, cache, base.build(), base.spec, HOT_ADAPTERS)
    words = vocabulary_words(base.tokenizer)
    shape = Shape(
        words=(args.prompt_tokens - 10, args.prompt_tokens + 10),
        new_tokens=(args.new_tokens - 10, args.new_tokens),
        pause_s=args.think_s,
        exponential_pause=True,
    )
    port = free_port()
    runs = (("uniform", lambda rng: rng.choice(models), None), ("zipf", zipf_picker(models, HOT_SHARE), None),
            ("zipf_one_replica", zipf_picker(models, HOT_SHARE), models[0].split(":", 1)[1]))
    rows: list[dict[str, Any]] = []
    with local_serve(hot_config(args, uri, cache, port, None), num_cpus=3) as url:
        asyncio.run(prime(url, models, words))  # every adapter read once (into whichever replica Serve picks)
        for name, pick, held in runs:
            if held:
                deploy(hot_config(args, uri, cache, port, held))
            load = asyncio.run(
                http_users(url, args.users, pick, words, shape, args.hot_warmup_s, args.hot_seconds, seed=len(rows))
            )
            hot = summarise_load(load, args.users, args.hot_seconds, lambda r: r.model == models[0])
            rest = summarise_load(load, args.users, args.hot_seconds, lambda r: r.model != models[0])
            rows.append(
                {"engine": f"2 replicas, {name}", "adapters": HOT_ADAPTERS}
                | summarise_load(load, args.users, args.hot_seconds)
                | {"hot_ttft_p99_ms": hot["ttft_p99_ms"], "others_ttft_p99_ms": rest["ttft_p99_ms"]}
            )
            print(_row(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    parser.add_argument(
        "--base",
        default="tiny-llama",
        help="catalogue base model (a tiny one on a CPU); its tokenizer with --gpu-shape",
    )
    parser.add_argument("--gpu-shape", choices=GPU_SHAPES, help="random weights of that model's real shape in 4-bit, "
                        "rank-8 adapters on every linear layer (needs a GPU; the hot part is skipped)")
    parser.add_argument("--layers", type=int, default=0, help="with --gpu-shape: build only this many layers (0: all; "
                        "a few run on the CPU as a smoke test)")
    parser.add_argument("--adapter-counts", default=",".join(map(str, ADAPTER_COUNTS)), help="engine part's K values")
    parser.add_argument("--engine", choices=ENGINES, default="batching", help="the engine part's engine: ours "
                        "(batching), vLLM, or both side by side")
    parser.add_argument("--vllm-precisions", default="", help="comma-separated base precisions vLLM runs (default: "
                        "fp32 on a CPU, 4bit,bf16 with --gpu-shape)")
    parser.add_argument("--users", type=int, default=32, help="concurrent closed-loop users")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--think-s", type=float, default=0.2, help="mean think time between a user's requests")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured seconds per in-process configuration and run"
    )
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each in-process window")
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved runs per engine configuration (median counts)"
    )
    parser.add_argument("--baseline-seconds", type=float, default=10.0, help="measured seconds per PEFT baseline")
    parser.add_argument("--hot-seconds", type=float, default=10.0, help="measured seconds per hot-part run")
    parser.add_argument(
        "--hot-warmup-s", type=float, default=10.0, help="unmeasured seconds before each hot-part window"
    )
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--device-slots", type=int, default=256, help="adapters held in the accelerator tier (0: sized "
                        "from free GPU memory)")
    parser.add_argument("--max-rank", type=int, default=16)
    args = parser.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose among {', '.join(PARTS)}")
    try:
        args.counts = sorted({int(count) for count in args.adapter_counts.split(",")})
    except ValueError:
        parser.error(f"--adapter-counts: not a comma-separated list of integers: {args.adapter_counts!r}")
    for name in ("users", "prompt_tokens", "new_tokens", "max_batch_size", "max_rank", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if (
        min(args.seconds, args.baseline_seconds, args.hot_seconds) <= 0
        or args.think_s <= 0
        or min(args.counts) < 1
        or args.new_tokens <= 10
        or args.prompt_tokens <= 10
    ):
        parser.error(
            "--seconds and --think-s must be positive, --adapter-counts at least 1, --new-tokens and --prompt-tokens "
            "above 10"
        )
    args.vllm_precisions = [p for p in (args.vllm_precisions or ("4bit,bf16" if args.gpu_shape else "fp32")).split(",")
                            if p]
    if set(args.vllm_precisions) - {"4bit", "bf16", "fp32"}:
        parser.error(f"--vllm-precisions: choose among 4bit, bf16, fp32, not {args.vllm_precisions}")
    if args.gpu_shape:
        args.parts = [part for part in args.parts if part != "hot"]
        if not args.parts:
            parser.error("--parts hot is not available with --gpu-shape; add engine, peft or cold")
    return args


def ranks_for(args: argparse.Namespace) -> tuple[int, ...]:
    """Adapter ranks, cycled: rank 8 on a 7B shape (the study's), mixed 4-16 on the tiny model."""
    return (8,) if args.gpu_shape else RANKS


def run_in_process(
    base: Base, args: argparse.Namespace, tmp: Path
) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
    """The engine, peft and cold parts, of which `args.parts` holds at least one (one model in memory at a time)."""
    counts = args.counts if "engine" in args.parts else [BASELINE_COUNT]
    names = [f"adapter-{i:04d}" for i in range(max(counts + [BASELINE_COUNT]) + 16)]
    model = base.build()
    random_adapters(model, base.spec, [tmp / name for name in names], ranks_for(args))
    rows: list[dict[str, Any]] = []
    cold = None
    if (wants(args, "batching") and "engine" in args.parts) or "peft" in args.parts or "cold" in args.parts:
        engine = make_engine(base, model, tmp, engine_settings(args, len(names)))
        if wants(args, "batching") and ("engine" in args.parts or "peft" in args.parts):
            rows += run_engine(engine, names, counts, args)
        if "cold" in args.parts:
            cold = run_cold(engine, names[-16:])
        engine.shutdown()
        del engine
    del model
    if "peft" in args.parts:
        rows += run_baselines(base, tmp, names, args)
    if wants(args, "vllm") and "engine" in args.parts and not args.vllm_skipped:
        rows += run_vllm_part(base, tmp, names, counts, args)
    return rows, cold


def run_vllm_part(base: Base, tmp: Path, names: list[str], counts: list[int],
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """The engine part on vLLM, for each of `args.vllm_precisions`, over the adapters in `tmp`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gc.collect()
    if device == "cuda":  # vLLM sizes its KV cache from the memory free when it starts
        torch.cuda.empty_cache()
    source = model_folder(base.spec, base.tokenizer, bool(args.gpu_shape), tmp.parent / "vllm-base")
    vocab = len(base.tokenizer)
    rows: list[dict[str, Any]] = []
    for precision in args.vllm_precisions:
        rows += run_vllm(source, base.tokenizer, precision, device, tmp, names, counts, args,
                         window=lambda engine, adapters, seed: closed_loop(engine, adapters, args, vocab, seed),
                         summarise=lambda name, count, windows: summarise(name, count, windows, args.seconds))
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The goals' ratios that the rows allow."""
    by = {(r["engine"], r["adapters"]): r for r in rows}
    tokens = {key: r["tokens_per_s"] for key, r in by.items()}
    out: dict[str, float] = {}
    for count in (1000, 128, 32):
        if ("engine", count) in tokens and ("engine", 1) in tokens:
            out[f"ratio_{count}_vs_1"] = tokens[("engine", count)] / tokens[("engine", 1)]
    for name in ("peft", "naive"):
        if (name, BASELINE_COUNT) in tokens and ("engine", BASELINE_COUNT) in tokens:
            out[f"ratio_32_vs_{name}"] = tokens[("engine", BASELINE_COUNT)] / tokens[(name, BASELINE_COUNT)]
    for precision in ("4bit", "bf16", "fp32"):
        out |= vllm_ratios(tokens, precision)
    uniform, zipf = by.get(("2 replicas, uniform", HOT_ADAPTERS)), by.get(("2 replicas, zipf", HOT_ADAPTERS))
    if uniform and zipf:
        out["hot_vs_uniform"] = zipf["tokens_per_s"] / uniform["tokens_per_s"]
        out["hot_p99_ttft_ratio"] = zipf["hot_ttft_p99_ms"] / zipf["others_ttft_p99_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine_info = machine("torch", "transformers", "peft")
    torch.manual_seed(0)
    base = base_for(args)
    args.vllm_skipped = vllm_missing() if wants(args, "vllm") else None
    if args.vllm_skipped:
        print(f"vLLM not run: {args.vllm_skipped}", flush=True)
    rows: list[dict[str, Any]] = []
    cold = None
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if set(args.parts) & {"engine", "peft", "cold"}:
            (Path(tmp) / "local").mkdir()
            rows, cold = run_in_process(base, args, Path(tmp) / "local")
        if "hot" in args.parts:
            (Path(tmp) / "hot").mkdir()
            rows += run_hot(base, args, Path(tmp) / "hot")
    report = {
        **ratios(rows),
        "vllm_skipped": args.vllm_skipped,
        "cold_load": cold,
        "results": rows,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info,
        "command": command("serve_adapters", argv),
    }
    print_table(report)
    write_report(report, args.out)
    return 0


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['engine']} | {r['adapters']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | "
        f"{r['ttft_p99_ms']:.1f} | "
        f"{r['requests']} |"
    )


def _deadline_note(r: dict[str, Any], seconds: float) -> str:
    """For a baseline row that finished no request in its hard-deadline window: what its figures are then."""
    if not r.get("hard_deadline") or r["requests"]:
        return ""
    return (
        f"\n  ({r['engine']}: no request finished in its {seconds:g} s window, {r['abandoned_at_deadline']} abandoned "
        "at the "
        "deadline; tokens/s counts the tokens it streamed inside the window)"
    )


def print_table(report: dict[str, Any]) -> None:
    print("\n| engine | adapters | tokens/s | TTFT p50 ms | TTFT p99 ms | requests |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        print(_row(r))
    for r in report["results"]:
        if note := _deadline_note(r, report["settings"]["baseline_seconds"]):
            print(note.strip())
    print()
    for key in (
        "ratio_1000_vs_1",
        "ratio_128_vs_1",
        "ratio_32_vs_1",
        "ratio_32_vs_peft",
        "ratio_32_vs_naive",
        *(f"vllm-{precision}_32_vs_{other}" for precision in ("4bit", "bf16", "fp32") for other in ("engine", "base")),
        "hot_vs_uniform",
        "hot_p99_ttft_ratio",
    ):
        if key in report:
            print(f"{key} = {report[key]:.3f}")
    cold = report["cold_load"]
    if cold:
        print(
            f"cold load: disk -> host {cold['disk_to_host_ms_p50']:.1f} ms, host -> slot "
            f"{cold['host_to_slot_ms_p50']:.2f} ms (p50)"
        )


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as error:  # e.g. an unknown --base, or --gpu-shape without a GPU: one line, exit 2
        raise SystemExit(print_user_error(error)) from None
