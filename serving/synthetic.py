"""Random LoRA adapters in PEFT's on-disk format, for engine tests and serving benchmarks.

They are written straight from the base model's layer shapes (no PEFT wrapping), so making a
hundred adapters for a 7B-shaped model takes seconds; PEFT loads them like any trained adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from serving.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS


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
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
              "lora_dropout": 0.0, "target_modules": sorted(targets), "base_model_name_or_path": base_model_name,
              "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "inference_mode": True}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return path
