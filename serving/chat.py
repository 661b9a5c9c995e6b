"""Each base model's chat convention (`chat_format` in the catalogue): messages -> one prompt string.

The renderers live with their base-model family (core/families/: `CHAT_FORMATS`). The string is then encoded like
every prompt (`jobs.encoding.encode_prompt`: BOS + text), so it never starts with a BOS of its own. Turn separators
that are special tokens in the real tokenizers (`</s>`, `<end_of_turn>`) are written as text; those tokenizers map
them back to their ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.families import CHAT_FORMATS

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str  # system | user | assistant
    content: str


def render_chat(messages: list[Message], chat_format: str) -> str:
    """The prompt for `messages` in `chat_format`, ending where the assistant's answer starts.

    The conversation must end with a user turn (the caller validates roles and order)."""
    return CHAT_FORMATS[chat_format](messages)
