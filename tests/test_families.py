"""Base-model families (core/families/): every `Family` and `ChatFormat` of the schemas has its entry, and a family's
entry alone is what the tiny-model build, the memory estimate and LoRA's `all-linear` need (checked, table-driven,
against the real transformers model each entry builds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from core.families import CHAT_FORMATS, FAMILIES
from core.schemas import Architecture, BaseModelSpec, ChatFormat, Family, LoraSettings
from jobs.memory import lora_parameters
from jobs.tiny import model_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
# Small, with grouped-query attention and MLP wider than the model, so every dimension of a shape is told apart.
SHAPE = Architecture(num_layers=2, hidden_size=32, intermediate_size=48, vocab_size=64, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=64)


def test_every_family_and_chat_format_literal_has_its_entry() -> None:
    assert set(get_args(Family)) == set(FAMILIES)
    assert set(get_args(ChatFormat)) == set(CHAT_FORMATS)
    named = [name for spec in FAMILIES.values() for name in spec.chat_formats]
    assert len(named) == len(set(named)) and "plain" not in named  # no format claimed twice


def spec_of(family: str) -> BaseModelSpec:
    """A base model no catalogue lists: its family (and shape) is all it says."""
    return BaseModelSpec(name=f"test-{family}", hf_id=f"tiny/test-{family}", family=family, params_billion=0.0001,
                         instruction_tuned=False, chat_format="plain", architecture=SHAPE, tiny=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_entry_is_what_the_model_build_memory_and_lora_need(family: str) -> None:
    spec = spec_of(family)
    assert spec.all_linear_modules == FAMILIES[family].linear_modules  # LoRA targets default to the family's layers
    model = AutoModelForCausalLM.from_config(model_config(spec), dtype=torch.float32)
    assert type(model).__name__.lower().startswith(family)
    block = {name.rsplit(".", 1)[-1]: (module.in_features, module.out_features)
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers.0." in name}
    assert block == FAMILIES[family].linear_shapes(SHAPE)  # the memory estimate's shapes are the real layers'
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == lora_parameters(spec, LoraSettings(r=4, target_modules="all-linear"))


def test_listed_linear_layers_must_be_the_familys() -> None:
    data = spec_of("phi").model_dump() | {"all_linear_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    with pytest.raises(ValueError, match="not the linear layers of family phi .*dense"):
        BaseModelSpec.model_validate(data)
    reordered = spec_of("phi").model_dump() | {"all_linear_modules": ["fc2", "fc1", "dense", "v_proj", "k_proj",
                                                                      "q_proj"]}
    assert BaseModelSpec.model_validate(reordered).all_linear_modules[0] == "fc2"


@pytest.mark.parametrize("module", ["jobs/tiny.py", "jobs/memory.py", "serving/chat.py", "core/schemas.py"])
def test_no_family_is_special_cased_outside_its_entry(module: str) -> None:
    source = (ROOT / module).read_text()
    compared = [f'== "{name}"' for name in [*FAMILIES, *CHAT_FORMATS]] + [f'"{name}":' for name in FAMILIES]
    assert not [text for text in compared if text in source]


def test_the_families_import_no_transformers() -> None:
    check = "import sys, core.families, core.schemas, serving.chat; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True)
