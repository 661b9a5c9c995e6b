"""Mistral: Llama's projections; the `[INST]` chat format of Mistral-Instruct and Zephyr's `<|role|>` one."""

from __future__ import annotations

from collections.abc import Sequence

from core.families.base import FamilySpec, Turn, fold_system
from core.families.llama import BLOCK


def mistral(messages: Sequence[Turn]) -> str:
    """Mistral-Instruct: no system role (folded into the first user turn), answers closed by `</s>`."""
    text = ""
    for message in fold_system(messages):
        text += f"[INST] {message.content} [/INST]" if message.role == "user" else f"{message.content}</s>"
    return text


def zephyr(messages: Sequence[Turn]) -> str:
    """Zephyr: `<|role|>` headers, every turn closed by `</s>`."""
    return "".join(f"<|{m.role}|>\n{m.content}</s>\n" for m in messages) + "<|assistant|>\n"


FAMILY = FamilySpec("mistral", "MistralConfig", BLOCK, {"mistral": mistral, "zephyr": zephyr})
