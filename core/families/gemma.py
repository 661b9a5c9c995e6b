"""Gemma: Llama's projections, a head width of its own in the config; the `<start_of_turn>` chat format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.families.base import FamilySpec, Turn, fold_system
from core.families.llama import BLOCK

if TYPE_CHECKING:
    from core.schemas import Architecture


def gemma(messages: Sequence[Turn]) -> str:
    """Gemma-it: `user`/`model` turns, no system role (folded into the first user turn)."""
    turns = "".join(f"<start_of_turn>{'model' if m.role == 'assistant' else 'user'}\n{m.content}<end_of_turn>\n"
                    for m in fold_system(messages))
    return turns + "<start_of_turn>model\n"


def config_extras(arch: Architecture) -> dict[str, Any]:
    """GemmaConfig's head width defaults to 256 whatever the model's width: a tiny model's is width / heads."""
    return {"head_dim": arch.hidden_size // arch.num_attention_heads}


FAMILY = FamilySpec("gemma", "GemmaConfig", BLOCK, {"gemma": gemma}, config_extras)
