"""Tiny offline base models: the real transformers classes at a tiny size, built once and cached.

The tokenizer is a byte-level BPE trained locally on the demo tasks' data and prompts, so any text tokenizes and nothing
is downloaded. Weights are random from a fixed seed: a build is reproducible, and concurrent builders (several Ray
workers) race safely through an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from core.catalog import CATALOG_DIR, load_catalog_file
from core.families import family
from core.paths import data_home
from core.schemas import BaseModelSpec
from jobs.demo_data import GENERATORS, demo_rows

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
BUILD_SEED = 1234
DEMO_TASKS = load_catalog_file(CATALOG_DIR / "demo_tasks.yaml")[1]


def tiny_model_dir(spec: BaseModelSpec) -> Path:
    """The cached folder of a tiny model (weights, config and tokenizer), built on first use."""
    if not spec.tiny:
        raise ValueError(f"{spec.name} is not a tiny model")
    target = data_home() / "models" / f"{spec.name}-{build_digest(spec)}"
    if not (target / "config.json").exists():
        _build(spec, target)
    return target


@lru_cache(maxsize=16)
def _digest(spec_json: str) -> str:
    recipe = json.dumps([spec_json, BUILD_SEED, SPECIAL_TOKENS, _corpus(), transformers.__version__])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def build_digest(spec: BaseModelSpec) -> str:
    """A hash of everything a tiny model's build depends on (its catalogue entry, the seed, the tokenizer's corpus, the
    transformers version), so a changed recipe builds into a new folder instead of reusing a stale one."""
    return _digest(spec.model_dump_json())


def _corpus() -> list[str]:
    texts = [" ".join(map(str, row.values())) for name in GENERATORS for row in demo_rows(name, "train")[:500]]
    texts += [line for task in DEMO_TASKS for line in (task.prompt, task.description)] * 20
    texts.append("0123456789 .,;:!?()[]{}<>=+-*/#'\"_ \n\t abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return texts


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the local corpus (deterministic)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def model_config(spec: BaseModelSpec) -> PretrainedConfig:
    """The transformers config of a tiny model, from the catalogue's architecture numbers (its family's config class
    and arguments)."""
    arch, model_family = spec.architecture, family(spec.family)
    kwargs = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # Frozen LM head and norms bound the logits a LoRA can reach: |logit| <= |h| |w|. At the usual
        # 0.02 a 64-wide model cannot move past near-uniform outputs; 1/sqrt(width) lets it learn.
        initializer_range=arch.hidden_size**-0.5,
    )
    config: PretrainedConfig = model_family.config_type()(**kwargs, **model_family.config_extras(arch))
    return config


def _build(spec: BaseModelSpec, target: Path) -> None:
    tokenizer = build_tokenizer(spec.architecture.vocab_size)
    torch.manual_seed(BUILD_SEED)
    model = AutoModelForCausalLM.from_config(model_config(spec), dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(staging, ignore_errors=True)
