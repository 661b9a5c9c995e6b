"""Serving many adapters from one replica: our engine against one adapter and against naive multiplexing.

A closed-loop load shaped like the study's serving test: `--users` concurrent users, each streams a
request (a prompt of about `--prompt-tokens` random tokens, up to `--new-tokens` new tokens, greedy)
for an adapter drawn uniformly from K distinct adapters, then waits a random think time (exponential,
mean `--think-s`) and asks again. Each configuration runs `--warmup-s` unmeasured, then `--seconds`
measured; tokens streamed inside the measured window count; TTFT (submit to first streamed delta) is
taken for every request submitted inside the window, however long it waits.

Configurations, all on one replica of the same base model (default tiny-llama, 4-bit nf4):

- engine, K = 1, 8, 32, 128 distinct adapters: `serving.batching.BatchingEngine` (mixed-adapter
  continuous batching, gathered LoRA); the accelerator tier holds `--device-slots` adapters.
- naive, K = 32 (and 8): plain multiplexing as `@serve.multiplexed` + `@serve.batch` give it: one
  PEFT adapter active at a time, batches only of requests for that adapter (static: a batch runs until
  its last request ends), and a swap (PEFT load from local disk, delete the previous) whenever the
  next batch's adapter differs.
- cold load: an adapter fetched from local disk into host memory (`prefetch`), and its copy into an
  accelerator slot, p50 over 16 fresh adapters.

    python benchmarks/serve_adapters.py [--out FILE] [--seconds 20] [--users 32]

Writes JSON (default benchmarks/results/serve_adapters.json) with top-level `ratio_32_vs_1` (engine
tokens/s with 32 adapters / with 1) and `ratio_32_vs_naive` (engine / naive, both 32 adapters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from jobs.catalog import load_catalog  # noqa: E402
from jobs.config import BaseModelSpec  # noqa: E402
from jobs.errors import UserError, print_user_error  # noqa: E402
from serving.batching import BatchingEngine, build_engine  # noqa: E402
from serving.config import EngineSettings  # noqa: E402
from serving.engine import Delta, SamplingParams  # noqa: E402
from serving.synthetic import random_adapter  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_adapters.json"
ADAPTER_COUNTS = (1, 8, 32, 128)
NAIVE_COUNTS = (8, 32)
RANKS = (8, 16, 4, 8)  # mixed ranks, cycled over the adapters


# --------------------------------------------------------------------------- the naive baseline


@dataclass(eq=False)
class _Request:
    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)


class NaiveMultiplexEngine:
    """One PEFT adapter at a time; batches of one adapter's requests; a swap from disk between adapters."""

    def __init__(self, spec: BaseModelSpec, precision: str, adapter_dir: Path, max_batch_size: int) -> None:
        from jobs.config import QuantizationSettings
        from jobs.models import load_base_model, load_tokenizer

        quant = QuantizationSettings() if precision == "4bit" else QuantizationSettings(load_in_4bit=False)
        self.base = load_base_model(spec, quant, "cuda" if torch.cuda.is_available() else "cpu").eval()
        self.tokenizer = load_tokenizer(spec)
        self.adapter_dir = adapter_dir
        self.max_batch_size = max_batch_size
        self.model: Any = None
        self.current: str | None = None
        self.swaps = 0
        self.queue: list[_Request] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.eos = self.base.generation_config.eos_token_id
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    async def generate(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> AsyncIterator[Delta]:
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
            self.model = PeftModel.from_pretrained(self.base, str(self.adapter_dir / adapter), adapter_name=adapter).eval()
        else:
            self.model.load_adapter(str(self.adapter_dir / adapter), adapter_name=adapter)
            self.model.set_adapter(adapter)
            self.model.delete_adapter(self.current)
        self.current = adapter
        self.swaps += 1

    def _loop(self) -> None:
        while not self.stopping:
            with self.lock:
                while not self.queue and not self.stopping:
                    self.lock.wait(timeout=0.1)
                if self.stopping:
                    return
                adapter = self.queue[0].adapter  # first come, first served; its adapter's requests ride along
                batch = [r for r in self.queue if r.adapter == adapter][: self.max_batch_size]
                self.queue = [r for r in self.queue if r not in batch]
            if adapter != self.current:
                self._swap(adapter)
            with torch.inference_mode():
                self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        device = self.base.device
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= torch.tensor([width - len(r.prompt_ids) for r in batch], device=device)[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        done = [False] * len(batch)
        counts = [0] * len(batch)
        for _ in range(max(r.params.max_tokens for r in batch)):
            tokens = out.logits[:, -1].argmax(-1)
            for row, request in enumerate(batch):
                if done[row]:
                    continue
                token = int(tokens[row])
                counts[row] += 1
                finished = token == self.eos or counts[row] >= request.params.max_tokens
                done[row] = finished
                delta = Delta(text="", token_ids=[token], finish_reason=("length" if finished else None),
                              completion_tokens=counts[row])
                request.loop.call_soon_threadsafe(request.stream.put_nowait, delta)
            if all(done):
                return
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True)

    def shutdown(self) -> None:
        self.stopping = True
        with self.lock:
            self.lock.notify()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- the load


@dataclass
class Window:
    tokens: int = 0
    requests: int = 0
    ttft_s: list[float] = field(default_factory=list)


async def closed_loop(engine: Any, adapters: list[str], args: argparse.Namespace, vocab: int, seed: int) -> Window:
    """`args.users` users for warm-up + measured seconds; returns what the measured window saw."""
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
            async for delta in engine.generate(prompt, adapter, SamplingParams(max_tokens=args.new_tokens)):
                now = time.perf_counter()
                if first and measure_from <= submitted <= stop_at:  # in-flight requests finish after the window
                    window.ttft_s.append(now - submitted)
                first = False
                if measure_from <= now <= stop_at:
                    window.tokens += len(delta.token_ids)
                if delta.finish_reason and measure_from <= now <= stop_at:
                    window.requests += 1
            await asyncio.sleep(user_rng.expovariate(1 / args.think_s))

    await asyncio.gather(*(user(i) for i in range(args.users)))
    return window


def summarise(name: str, adapters: int, window: Window, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ttft = sorted(window.ttft_s) or [float("nan")]
    return {"engine": name, "adapters": adapters, "tokens_per_s": window.tokens / seconds, "requests": window.requests,
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            **(extra or {})}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--base", default="tiny-llama", help="catalogue base model (a tiny one on a CPU)")
    parser.add_argument("--precision", default="4bit", choices=["4bit", "fp32", "bf16"])
    parser.add_argument("--users", type=int, default=32, help="concurrent closed-loop users")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--think-s", type=float, default=0.2, help="mean think time between a user's requests")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per configuration")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--device-slots", type=int, default=64, help="adapters held in the accelerator tier")
    parser.add_argument("--max-rank", type=int, default=16)
    args = parser.parse_args(argv)
    for name in ("users", "prompt_tokens", "new_tokens", "max_batch_size", "device_slots", "max_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0 or args.think_s <= 0:
        parser.error("--seconds and --think-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = load_catalog().base_model(args.base)
    torch.manual_seed(0)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        adapter_dir = Path(tmp)
        settings = EngineSettings(max_batch_size=args.max_batch_size, device_adapter_slots=args.device_slots,
                                  host_adapter_slots=max(ADAPTER_COUNTS) + 16, max_lora_rank=args.max_rank,
                                  max_queued_requests=10 * args.users)
        engine = build_engine(spec, args.precision, "auto", lambda adapter: adapter_dir / adapter, settings)
        names = [f"adapter-{i:03d}" for i in range(max(ADAPTER_COUNTS) + 16)]
        for i, name in enumerate(names):
            random_adapter(engine.model, adapter_dir / name, RANKS[i % len(RANKS)], list(spec.all_linear_modules), seed=i,
                           base_model_name=spec.hf_id)
        vocab = len(engine.tokenizer)
        cold = asyncio.run(_cold_loads(engine, names[-16:]))
        for count in ADAPTER_COUNTS:
            window = asyncio.run(closed_loop(engine, names[:count], args, vocab, seed=count))
            results.append(summarise("engine", count, window, args.seconds, {"held_on_device": len(engine.held_adapters())}))
            print(_row(results[-1]), flush=True)
        engine.shutdown()
        del engine
        naive = NaiveMultiplexEngine(spec, args.precision, adapter_dir, args.max_batch_size)
        for count in NAIVE_COUNTS:
            swaps = naive.swaps
            window = asyncio.run(closed_loop(naive, names[:count], args, vocab, seed=count))
            results.append(summarise("naive", count, window, args.seconds, {"swaps": naive.swaps - swaps}))
            print(_row(results[-1]), flush=True)
        naive.shutdown()
    by = {(r["engine"], r["adapters"]): r["tokens_per_s"] for r in results}
    report = {
        "ratio_32_vs_1": by[("engine", 32)] / by[("engine", 1)],
        "ratio_32_vs_naive": by[("engine", 32)] / by[("naive", 32)],
        "cold_load": cold,
        "results": results,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "command": "python benchmarks/serve_adapters.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


async def _cold_loads(engine: BatchingEngine, names: list[str]) -> dict[str, float]:
    """Disk -> host (fetch + read + checks) through `prefetch`, and host -> accelerator slot, per fresh adapter."""
    disk, slot_copy = [], []
    for name in names:  # the engine is idle here, as `measure_slot_copy` requires
        disk.append(await engine.prefetch(name))
        slot_copy.append(engine.tiers.measure_slot_copy(name))
    return {"disk_to_host_ms_p50": 1000 * statistics.median(disk), "host_to_slot_ms_p50": 1000 * statistics.median(slot_copy)}


def _row(r: dict[str, Any]) -> str:
    extra = f"held on device {r['held_on_device']}" if "held_on_device" in r else f"swaps {r.get('swaps', 0)}"
    return (f"{r['engine']:>7} {r['adapters']:>4} adapters  {r['tokens_per_s']:9.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.1f} ms  "
            f"p99 {r['ttft_p99_ms']:8.1f} ms  {r['requests']:5d} requests  {extra}")


def print_table(report: dict[str, Any]) -> None:
    print("\n| engine | adapters | tokens/s | TTFT p50 ms | TTFT p99 ms | requests |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        print(f"| {r['engine']} | {r['adapters']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['requests']} |")
    cold = report["cold_load"]
    print(f"\nratio_32_vs_1 = {report['ratio_32_vs_1']:.3f}   ratio_32_vs_naive = {report['ratio_32_vs_naive']:.2f}")
    print(f"cold load: disk -> host {cold['disk_to_host_ms_p50']:.1f} ms, host -> slot {cold['host_to_slot_ms_p50']:.2f} ms (p50)")


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as error:  # e.g. an unknown --base: one line, exit 2
        raise SystemExit(print_user_error(error)) from None
