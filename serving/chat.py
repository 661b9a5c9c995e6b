"""Each base model's chat convention (`chat_format` in the catalogue): messages -> one prompt string.

The string is then encoded like every prompt (`jobs.train.encode_prompt`: BOS + text), so it never
starts with a BOS of its own. Turn separators that are special tokens in the real tokenizers
(`</s>`, `<end_of_turn>`) are written as text; those tokenizers map them back to their ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str  # system | user | assistant
    content: str


def _split_system(messages: list[Message]) -> tuple[str, list[Message]]:
    """The system prompt (joined if several) and the other turns."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    return system, [m for m in messages if m.role != "system"]


def _fold_system(messages: list[Message]) -> list[Message]:
    """For formats without a system role: the system prompt opens the first user turn."""
    system, turns = _split_system(messages)
    if system and turns and turns[0].role == "user":
        return [Message("user", f"{system}\n\n{turns[0].content}")] + turns[1:]
    return ([Message("user", system)] if system else []) + turns


def _llama2(messages: list[Message]) -> str:
    system, turns = _split_system(messages)
    text, first = "", True
    for message in turns:
        if message.role == "user":
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{message.content}" if first and system else message.content
            text += ("" if first else "<s>") + f"[INST] {content} [/INST]"
            first = False
        else:
            text += f" {message.content} </s>"
    return text


def _mistral(messages: list[Message]) -> str:
    text = ""
    for message in _fold_system(messages):
        text += f"[INST] {message.content} [/INST]" if message.role == "user" else f"{message.content}</s>"
    return text


def _zephyr(messages: list[Message]) -> str:
    return "".join(f"<|{m.role}|>\n{m.content}</s>\n" for m in messages) + "<|assistant|>\n"


def _gemma(messages: list[Message]) -> str:
    turns = "".join(f"<start_of_turn>{'model' if m.role == 'assistant' else 'user'}\n{m.content}<end_of_turn>\n"
                    for m in _fold_system(messages))
    return turns + "<start_of_turn>model\n"


def _phi(messages: list[Message]) -> str:
    lines = [f"Instruct: {m.content}" if m.role == "user" else f"Output: {m.content}" for m in _fold_system(messages)]
    return "\n".join(lines) + "\nOutput:"


def _plain(messages: list[Message]) -> str:
    return "\n".join(m.content for m in messages)


FORMATS: dict[str, Callable[[list[Message]], str]] = {
    "llama2": _llama2, "mistral": _mistral, "zephyr": _zephyr, "gemma": _gemma, "phi": _phi, "plain": _plain,
}


def render_chat(messages: list[Message], chat_format: str) -> str:
    """The prompt for `messages` in `chat_format`, ending where the assistant's answer starts.

    The conversation must end with a user turn (the caller validates roles and order)."""
    return FORMATS[chat_format](messages)
