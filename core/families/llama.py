"""Llama (Llama 2): attention and gated-MLP projections; the `[INST]`/`<<SYS>>` chat format of Llama-2-chat."""

from __future__ import annotations

from collections.abc import Sequence

from core.families.base import QKV, Dim, FamilySpec, Turn, split_system

# attention (q, k, v, o) and gated MLP (gate, up, down) projections, shared by Mistral and Gemma
BLOCK: dict[str, tuple[Dim, Dim]] = QKV | {
    "o_proj": ("q", "hidden"),
    "gate_proj": ("hidden", "intermediate"),
    "up_proj": ("hidden", "intermediate"),
    "down_proj": ("intermediate", "hidden"),
}


def llama2(messages: Sequence[Turn]) -> str:
    """Llama-2-chat: the system prompt inside the first `[INST]`, each answer closed by `</s>`."""
    system, turns = split_system(messages)
    text, first = "", True
    for message in turns:
        if message.role == "user":
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{message.content}" if first and system else message.content
            text += ("" if first else "<s>") + f"[INST] {content} [/INST]"
            first = False
        else:
            text += f" {message.content} </s>"
    return text


FAMILY = FamilySpec("llama", "LlamaConfig", BLOCK, {"llama2": llama2})
