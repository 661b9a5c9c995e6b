"""What only a CUDA GPU runs: the 4-bit QLoRA step as the study trains (bf16 compute, paged AdamW). Skipped without
CUDA (tests/conftest.py); run on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import tiny_job


@pytest.mark.integration
@pytest.mark.gpu
def test_a_4bit_qlora_fine_tune_on_cuda_computes_in_bf16_with_paged_adamw(tmp_path: Path) -> None:
    import bitsandbytes as bnb
    import torch

    from jobs.train import make_optimizer, train

    config = tiny_job(tmp_path / "job", max_steps=4, log_every=1).model_copy(update={"device": "cuda"})
    assert config.training.optimizer == "auto" and config.quantization.compute_dtype == "auto"  # the study's defaults
    result, model, _ = train(config)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.compute_dtype == torch.bfloat16 and m.weight.device.type == "cuda" for m in quantized)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cuda" for p in trainable)
    assert isinstance(make_optimizer(model, config.training, "cuda"), bnb.optim.PagedAdamW32bit)
    assert [row["step"] for row in result.history] == [1.0, 2.0, 3.0, 4.0]
    assert all(math.isfinite(row["loss"]) for row in result.history)
    assert result.summary["peak_memory_mb"] > 0 and (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
