"""What the benchmarks share: where results go, the machine and command line a result records, writing it, a child
process that reports one JSON line, latency percentiles, a benchmark's job config, and the random 4-bit model of a
real base's shape that the GPU modes build."""

from __future__ import annotations

import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.paths import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
RESULT_MARK = "BENCHMARK_RESULT "  # a child process's result line: this mark, then one JSON object


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces a run of `benchmarks.<module>` (`argv`, else this process's arguments)."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


def machine(*packages: str) -> dict[str, Any]:
    """The machine a run measured on: CPUs, CPU model, Python, platform, load average now, the versions of `packages`
    (importable names), and with torch among them the device (and the GPU's name and memory when there is one)."""
    info: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "processor": cpu_model(),
                            "python": platform.python_version(), "platform": platform.platform(),
                            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    info |= {name: importlib.import_module(name).__version__ for name in packages}
    if "torch" in packages:
        import torch

        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 10**9
    return info


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write `report` as JSON to `out` (its folder made) and say so."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def percentiles_ms(prefix: str, seconds: Sequence[float], qs: Sequence[int] = (50, 99)) -> dict[str, float]:
    """`{prefix}_p<q>_ms` for each q in `qs` (0-100, numpy's linear interpolation) of durations in seconds; NaN when
    there are none."""
    values = np.percentile(seconds, qs) * 1000 if len(seconds) else [float("nan")] * len(qs)
    return {f"{prefix}_p{q}_ms": float(value) for q, value in zip(qs, values)}


def child_env(threads: int) -> dict[str, str]:
    """This environment for a measuring child process: offline, quiet, and `threads` OpenMP/MKL threads (0: as is)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore")
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def spawn(module: str, arguments: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `python -m benchmarks.<module> ARGUMENTS` from the project root; `collect` reads its result."""
    return subprocess.Popen([sys.executable, "-m", f"benchmarks.{module}", *arguments], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_child(module: str, arguments: list[str], threads: int) -> subprocess.Popen[str]:
    """`spawn` a measuring child in `child_env(threads)`: offline, quiet, `threads` OpenMP/MKL threads."""
    return spawn(module, arguments, child_env(threads))


def benchmark_job(base: str, task: str, output_dir: str | Path, device: str = "auto",
                  lora: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None, **training: Any) -> Any:
    """A benchmark's JobConfig: `base` x `task` from the catalogue on `device`, LoRA on all linear layers (updated by
    `lora`), the evaluation settings `evaluation`, and `training` over TrainingSettings' defaults with no checkpoint but
    the last."""
    from core.catalog import load_catalog
    from core.schemas import EvalSettings, LoraSettings, TrainingSettings
    from jobs.config import JobConfig

    catalog = load_catalog()
    return JobConfig(base_model=catalog.base_model(base), task=catalog.task(task), output_dir=str(output_dir),
                     device=device, lora=LoraSettings(**({"target_modules": "all-linear"} | (lora or {}))),
                     evaluation=EvalSettings(**(evaluation or {})),
                     training=TrainingSettings(**({"checkpoint_every": 10**6} | training)))


def emit(result: dict[str, Any]) -> None:
    """Report `result` to the parent process (`collect` reads it)."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def collect(process: subprocess.Popen[str], what: str, timeout_s: float = 3600) -> dict[str, Any]:
    """Wait for a child started by `spawn` and return the result it `emit`ted; fails naming `what`, with the end of the
    child's output, when it exits non-zero or reports nothing."""
    out, err = process.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {process.returncode}):\n{out[-2000:]}{err[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def random_4bit_model(spec: Any, quant: Any, device: str) -> Any:
    """A random-initialised model of `spec`'s real shape (a `BaseModelSpec`) with every block linear in bitsandbytes
    4-bit per `quant` (`QuantizationSettings`), as `load_base_model` would load the real checkpoint (lm_head and
    embeddings stay in the compute dtype)."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import QuantizationMethod

    from jobs.models import compute_dtype
    from jobs.tiny import model_config

    dtype = compute_dtype(quant, device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(spec), dtype=dtype)  # e.g. a MistralConfig
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=quant.double_quant,
                                      quant_type=quant.quant_type, device="meta")
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=quant.double_quant,
                                       quant_type=quant.quant_type, module=layer)
            layer.weight = weight.to(device)  # quantizes
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            del child
    # What a bitsandbytes load sets: attach_lora then prepares the model for k-bit training, and Trainer does not
    # `.to()` it.
    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    if device == "cuda":
        torch.cuda.empty_cache()
    return model
