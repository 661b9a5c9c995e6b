"""Job settings resolve to the study's setup: compute dtype and optimizer by device, nf4 4-bit layers
with double quantization, the default LoRA targets, and the Hub loader's `load_dataset` calls.

Fast and offline: the tiny models from the catalogue on the CPU; `datasets.load_dataset` is faked.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import datasets
import pytest
import torch
from peft import PeftModel

from core.catalog import load_catalog
from core.schemas import LoraSettings, QuantizationSettings, TrainingSettings
from jobs.data import eval_rows, load_rows, train_rows
from jobs.models import attach_lora, compute_dtype, load_base_model
from jobs.train import make_optimizer

pytestmark = pytest.mark.unit

CATALOG = load_catalog()


@pytest.fixture(scope="module")
def base_4bit() -> torch.nn.Module:
    """tiny-llama loaded as a job loads it on the CPU (default quantization settings)."""
    return load_base_model(CATALOG.base_model("tiny-llama"), QuantizationSettings(), "cpu")


@pytest.fixture(scope="module")
def default_adapter() -> PeftModel:
    """A 4-bit tiny-llama of its own (attaching changes the base in place) with a fresh default LoRA adapter."""
    base = load_base_model(CATALOG.base_model("tiny-llama"), QuantizationSettings(), "cpu")
    return attach_lora(base, LoraSettings(), gradient_checkpointing=False)


# --------------------------------------------------------------------------- compute dtype and optimizer


@pytest.mark.parametrize(("device", "expected"), [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_auto_compute_dtype_is_bf16_on_a_gpu_and_fp32_on_a_cpu(device: str, expected: torch.dtype) -> None:
    assert QuantizationSettings().compute_dtype == "auto"
    assert compute_dtype(QuantizationSettings(), device) == expected


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_named_compute_dtype_wins_on_every_device(device: str) -> None:
    assert compute_dtype(QuantizationSettings(compute_dtype="float16"), device) == torch.float16


def test_auto_optimizer_is_paged_adamw_32bit_on_a_gpu(default_adapter: PeftModel) -> None:
    # bitsandbytes builds its paged optimizer without a GPU; the state is only allocated at the first step.
    settings = TrainingSettings()
    assert settings.optimizer == "auto"
    optimizer = make_optimizer(default_adapter, settings, "cuda")
    assert type(optimizer) is bnb.optim.PagedAdamW32bit
    assert optimizer.defaults["lr"] == settings.learning_rate


def test_auto_optimizer_is_torch_adamw_on_a_cpu(default_adapter: PeftModel) -> None:
    settings = TrainingSettings()
    optimizer = make_optimizer(default_adapter, settings, "cpu")
    assert type(optimizer) is torch.optim.AdamW
    trainable = [p for p in default_adapter.parameters() if p.requires_grad]
    assert [p for group in optimizer.param_groups for p in group["params"]] == trainable


# --------------------------------------------------------------------------- 4-bit layers and LoRA


def test_4bit_layers_are_nf4_with_double_quantization_and_fp32_compute_on_a_cpu(base_4bit: torch.nn.Module) -> None:
    layers = [module for module in base_4bit.modules() if isinstance(module, bnb.nn.Linear4bit)]
    arch = CATALOG.base_model("tiny-llama").architecture
    assert len(layers) == 7 * arch.num_layers  # q, k, v, o, gate, up, down in every block
    for layer in layers:
        assert isinstance(layer.weight, bnb.nn.Params4bit)
        state = layer.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested and state.state2 is not None  # the absmax constants are quantized too
        assert layer.compute_dtype == torch.float32


def test_default_lora_settings_adapt_only_q_and_v_projections(default_adapter: PeftModel) -> None:
    settings = LoraSettings()
    assert (settings.r, settings.alpha, settings.dropout) == (8, 16, 0.05)
    adapted = {name: module for name, module in default_adapter.named_modules() if hasattr(module, "lora_A")}
    arch = CATALOG.base_model("tiny-llama").architecture
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "v_proj"}
    assert len(adapted) == 2 * arch.num_layers
    for module in adapted.values():
        assert module.r["default"] == 8 and module.lora_alpha["default"] == 16
        assert module.scaling["default"] == 2.0
        assert module.lora_dropout["default"].p == 0.05
    trainable = [name for name, p in default_adapter.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


# --------------------------------------------------------------------------- the Hugging Face loader


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Fake `datasets.load_dataset`: records each call, returns 3 rows naming the config and split."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_load_dataset(*args: Any, **kwargs: Any) -> datasets.Dataset:
        calls.append((args, kwargs))
        config, split = args[1], kwargs["split"]
        return datasets.Dataset.from_list([{"config": str(config), "split": split, "index": i} for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_loader_passes_the_catalogues_id_config_and_split(hub_calls: list) -> None:
    task = CATALOG.task("glue_qnli")
    rows = train_rows(task)
    assert hub_calls == [(("nyu-mll/glue", "qnli"), {"split": "train", "revision": task.dataset.revision})]
    assert [row["index"] for row in rows] == [0, 1, 2]
    eval_rows(task, limit=2)
    assert hub_calls[-1] == (("nyu-mll/glue", "qnli"), {"split": "validation", "revision": task.dataset.revision})


def test_hub_loader_without_a_config_passes_none(hub_calls: list) -> None:
    train_rows(CATALOG.task("boolq"))
    assert hub_calls == [(("google/boolq", None), {"split": "train", "revision": "main"})]


def test_hub_loader_concatenates_a_plus_b_configs_in_order(hub_calls: list) -> None:
    task = CATALOG.task("arc_combined")
    assert task.dataset.config == "ARC-Easy+ARC-Challenge"  # the study's evaluation rows come Easy first
    rows = train_rows(task)
    assert hub_calls == [
        (("allenai/ai2_arc", "ARC-Easy"), {"split": "train", "revision": "main"}),
        (("allenai/ai2_arc", "ARC-Challenge"), {"split": "train", "revision": "main"}),
    ]
    assert [(row["config"], row["index"]) for row in rows] == [("ARC-Easy", i) for i in range(3)] + [
        ("ARC-Challenge", i) for i in range(3)
    ]
    # a limit is applied to each config, then to the whole
    assert [(row["config"], row["index"]) for row in load_rows(task.dataset, "test", limit=2)] == [
        ("ARC-Easy", 0), ("ARC-Easy", 1),
    ]
    assert hub_calls[-1] == (("allenai/ai2_arc", "ARC-Challenge"), {"split": "test", "revision": "main"})


def test_hub_loader_reads_a_separate_eval_set_from_its_own_source(hub_calls: list) -> None:
    task = CATALOG.task("magicoder")
    assert task.eval is not None
    eval_rows(task)
    source = task.eval.dataset
    assert hub_calls == [((source.id, None), {"split": source.eval_split, "revision": source.revision})]
