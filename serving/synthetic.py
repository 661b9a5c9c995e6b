"""Random LoRA adapters in PEFT's on-disk format, for engine tests and serving benchmarks.

They are written straight from the base model's layer shapes (no PEFT wrapping), so making a
hundred adapters for a 7B-shaped model takes seconds; PEFT loads them like any trained adapter.
`publish_adapters` registers N of them in an MLflow registry, their weights already in the replicas' adapter cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from core.paths import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from core.schemas import BaseModelSpec

RANKS = (8, 16, 4, 8)  # mixed ranks, cycled over the adapters


def random_adapter(model: nn.Module, path: Path, rank: int, target_modules: list[str], seed: int,
                   base_model_name: str = "", alpha: float | None = None, strength: float = 1.0) -> Path:
    """Write a rank-`rank` LoRA adapter over `target_modules` of `model` with random A and B to `path`."""
    generator = torch.Generator().manual_seed(seed)
    targets = set(target_modules)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets or not hasattr(module, "in_features") or "lora" in name:
            continue
        fan_in, fan_out = module.in_features, module.out_features
        a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=generator) * strength / rank**0.5
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise ValueError(f"no layer of the model is named one of {sorted(targets)}")
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": alpha if alpha is not None else 2 * rank,
              "lora_dropout": 0.0, "target_modules": sorted(targets), "base_model_name_or_path": base_model_name,
              "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "inference_mode": True}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def random_adapters(model: nn.Module, spec: BaseModelSpec, folders: list[Path], ranks: tuple[int, ...] = RANKS) -> None:
    """Write one random all-linear adapter of `spec` into each folder (ranks cycled, seeded by position)."""
    for index, folder in enumerate(folders):
        random_adapter(model, folder, ranks[index % len(ranks)], list(spec.all_linear_modules), seed=index,
                       base_model_name=spec.hf_id)


def publish_adapters(uri: str, cache_dir: Path, model: nn.Module, spec: BaseModelSpec, count: int,
                     prefix: str = "bench") -> list[str]:
    """Register `count` tasks `<prefix>_<i>` with one version each on `spec` in the registry at `uri`, their distinct
    random weights in `cache_dir` (where replicas look first, so they read them from local disk; one run's artifact
    backs every version: the registry only has to resolve the ids); returns the model ids (`<base>:<task>`)."""
    from tracking import registry, store

    client = store.client(uri)
    experiment_id = store.ensure_experiment("serving-benchmark", uri)
    run_id = client.create_run(experiment_id, run_name="synthetic-adapters").info.run_id
    tasks = [f"{prefix}_{index:04d}" for index in range(count)]
    folders = [cache_dir / registry.model_name(task) / "1" for task in tasks]
    random_adapters(model, spec, folders)
    client.log_artifact(run_id, str(folders[0] / ADAPTER_CONFIG), store.ADAPTER_ARTIFACT)
    client.set_terminated(run_id)
    for task, folder in zip(tasks, folders):
        version = registry.register_adapter(run_id, task, spec.name, 0.5, uri=uri)
        if str(version) != "1":  # a store reused from another run: place the weights where the replicas look
            folder.rename(folder.parent / str(version))
    return [f"{spec.name}:{task}" for task in tasks]
