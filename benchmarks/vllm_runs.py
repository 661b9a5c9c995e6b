"""vLLM's side of the serving benchmarks (`--engine vllm|both`): the same closed-loop users over the same adapter
folders as our engine, through `serving.vllm_engine` in this process; its base alone; a 4-bit base beside a bf16 one.

vLLM reads a model folder, so a `--gpu-shape` run saves its random weights once in bf16 (with --base's tokenizer) and
both precisions load that folder: bf16 as it is, 4-bit with vLLM's bitsandbytes quantization of it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ENGINES = ("batching", "vllm", "both")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_missing() -> str | None:
    """Why vLLM cannot run here (None when `import vllm` works)."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # an ImportError, or a broken native extension
        return f"import vllm failed ({type(error).__name__}: {error}); `make setup` installs it"
    return None


def wants(args: argparse.Namespace, engine: str) -> bool:
    """Whether `--engine` asks for `engine` ("batching" or "vllm")."""
    return bool(args.engine in (engine, "both"))


def model_folder(spec: Any, tokenizer: Any, gpu_shape: bool, folder: Path) -> str:
    """The folder vLLM loads: the tiny base's cached one, or `spec`'s shape with random bf16 weights saved in
    `folder`."""
    from jobs.models import model_source

    if not gpu_shape:
        return model_source(spec)
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.tiny import model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(spec), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    return str(folder)


def vllm_config(args: argparse.Namespace, adapters: int) -> Any:
    """vLLM's settings for `adapters` distinct adapters and `args.users` users (every user's request in one step)."""
    from serving.config import VllmEngineConfig

    return VllmEngineConfig(kind="vllm", max_loras=max(1, min(adapters, args.users, 32)),
                            max_cpu_loras=max(adapters + 1, 2), max_num_seqs=max(args.users, 8),
                            max_lora_rank=next(rank for rank in VLLM_RANKS if rank >= args.max_rank),
                            cpu_kv_cache_gb=1.0, gpu_memory_utilization=0.85)


def run_vllm(source: str, tokenizer: Any, precision: str, device: str, adapter_dir: Path, names: list[str],
             counts: list[int], args: argparse.Namespace,
             window: Callable[[Any, list[Any], int], Coroutine[Any, Any, Any]],
             summarise: Callable[[str, int, list[Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows `vllm-<precision>` at each adapter count and `vllm-<precision> base` (no adapter), `args.repeats`
    interleaved windows each; `window(engine, adapters, seed)` runs one, `summarise(name, count, windows)` makes a
    row."""
    from serving.vllm_engine import start_engine

    config = vllm_config(args, max(counts))
    context = min(4096, 2 * (args.prompt_tokens + args.new_tokens) + 64)
    engine = start_engine(source, tokenizer, precision, device, lambda adapter: adapter_dir / adapter, config, context)
    name = f"vllm-{precision}"
    try:
        asyncio.run(_prefetch(engine, names[: min(max(counts), config.max_cpu_loras)]))
        runs: dict[int, list[Any]] = {count: [] for count in [0, *counts]}
        for repeat in range(args.repeats):
            for count in runs:
                adapters: list[Any] = names[:count] if count else [None]
                runs[count].append(asyncio.run(window(engine, adapters, count + 7919 * repeat)))
                print(f"  {name} {count:5d} adapters, run {repeat + 1}: "
                      f"{runs[count][-1].tokens / args.seconds:8.1f} tok/s", flush=True)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    return [summarise(f"{name} base" if count == 0 else name, count, windows) for count, windows in runs.items()]


async def _prefetch(engine: Any, names: list[str]) -> None:
    for name in names:
        await engine.prefetch(name)


def vllm_ratios(tokens: dict[tuple[str, int], float], precision: str) -> dict[str, float]:
    """The issue's goals where the rows allow: vLLM over our engine at 32 adapters (>= 3 on a GPU) and over its own
    base alone (>= 0.7)."""
    name, out = f"vllm-{precision}", {}
    if (name, 32) in tokens and ("engine", 32) in tokens:
        out[f"{name}_32_vs_engine"] = tokens[(name, 32)] / tokens[("engine", 32)]
    if (name, 32) in tokens and (f"{name} base", 0) in tokens:
        out[f"{name}_32_vs_base"] = tokens[(name, 32)] / tokens[(f"{name} base", 0)]
    return out
