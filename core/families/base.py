"""What the code knows about one base-model family (`FamilySpec`), and the chat-format helpers the families share.

Nothing here imports transformers: a family names its config class, and `FamilySpec.config_type` imports it on use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from core.schemas import Architecture

Dim = Literal["hidden", "intermediate", "q", "kv"]  # model width, MLP width, all query heads, all key/value heads


class Turn(Protocol):
    """One chat turn as a renderer reads it (`serving.chat.Message`)."""

    @property
    def role(self) -> str: ...  # system | user | assistant

    @property
    def content(self) -> str: ...


ChatRenderer = Callable[[Sequence[Turn]], str]  # messages -> the prompt, ending where the assistant's answer starts


def no_extras(arch: Architecture) -> dict[str, Any]:
    """No config arguments beyond the shared ones."""
    return {}


@dataclass(frozen=True)
class FamilySpec:
    """One base-model family: the module names and shapes of a block's linear layers (LoRA targets, memory estimate),
    its transformers config class (tiny models are built from it), and the chat formats of its checkpoints."""

    name: str
    config_class: str  # a class of `transformers`, by name
    linear_layers: dict[str, tuple[Dim, Dim]]  # a block's linear projections: module name -> (in, out) features
    chat_formats: dict[str, ChatRenderer] = field(default_factory=dict)  # `chat_format` name -> renderer
    config_extras: Callable[[Architecture], dict[str, Any]] = no_extras  # config arguments of its own (tiny models)

    @property
    def linear_modules(self) -> list[str]:
        """The names of a block's linear layers (what LoRA `all-linear` adapts)."""
        return list(self.linear_layers)

    def linear_shapes(self, arch: Architecture) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block of a model of shape `arch`, by module name."""
        head_dim = arch.hidden_size // arch.num_attention_heads
        sizes: dict[Dim, int] = {"hidden": arch.hidden_size, "intermediate": arch.intermediate_size,
                                 "q": arch.num_attention_heads * head_dim, "kv": arch.num_key_value_heads * head_dim}
        return {name: (sizes[fan_in], sizes[fan_out]) for name, (fan_in, fan_out) in self.linear_layers.items()}

    def config_type(self) -> Any:
        """The transformers config class (transformers imported now)."""
        import transformers

        return getattr(transformers, self.config_class)


QKV: dict[str, tuple[Dim, Dim]] = {"q_proj": ("hidden", "q"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv")}


def split_system(messages: Sequence[Turn]) -> tuple[str, list[Turn]]:
    """The system prompt (joined if several) and the other turns."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    return system, [m for m in messages if m.role != "system"]


@dataclass(frozen=True)
class Said:
    """A turn made while rendering (a user turn with the system prompt folded in)."""

    role: str
    content: str


def fold_system(messages: Sequence[Turn]) -> list[Turn]:
    """For formats without a system role: the system prompt opens the first user turn."""
    system, turns = split_system(messages)
    if system and turns and turns[0].role == "user":
        return [Said("user", f"{system}\n\n{turns[0].content}"), *turns[1:]]
    return ([Said("user", system)] if system else []) + turns


def plain(messages: Sequence[Turn]) -> str:
    """Every turn's text on its own line (base models without a chat convention)."""
    return "\n".join(m.content for m in messages)
