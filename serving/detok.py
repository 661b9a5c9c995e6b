"""A completion's text as its tokens arrive: incremental detokenization, stop strings and held-back text.

`Detokenizer` turns each new token into the text it adds. The text comes from a window of ids
(vLLM/TGI-style): a piece is released only when the window's text grows and does not end inside a
multi-byte character, so the pieces concatenate to text that stays stable across BPE merges.
`tokenizers`' `DecodeStream` runs that window in Rust; tokenizers it cannot reproduce exactly decode
the same window in Python (see `Detokenizer`).

`CompletionText` accumulates the pieces, cuts the text at the first stop string and holds back the
end that could still grow into one, so a stop string never reaches the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"  # what a decoder shows for an unfinished multi-byte character


class Detokenizer:
    """The text each new token of one completion adds; special tokens are skipped.

    `DecodeStream` is used when the tokenizer has a `tokenizers` backend and does not clean up
    tokenization spaces on decode (DecodeStream never does, so its text would differ); otherwise, or
    if DecodeStream refuses a window, the window is decoded in Python with `tokenizer.decode`, which
    gives the same text. The window's offsets are mirrored here either way, for `held()`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, use_decode_stream: bool = True) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        exact = isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.backend: Tokenizer | None = backend if use_decode_stream and exact else None
        self.stream: DecodeStream | None = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window: ids[prefix_offset:]; its text up to read_offset was released before
        self.read_offset = 0

    def step(self, token: int) -> str:
        """The text `token` adds ("" while it ends inside a multi-byte character or adds nothing visible)."""
        self.ids.append(token)
        piece = self._stream_step(token) if self.stream is not None else self._window_step()
        if piece:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return piece

    def held(self) -> str:
        """Text of the tokens that released none yet (an unfinished multi-byte character shows as U+FFFD)."""
        prefix, full = self._window()
        return full[len(prefix):]

    def _stream_step(self, token: int) -> str:
        assert self.stream is not None and self.backend is not None
        try:
            return self.stream.step(self.backend, token) or ""
        except Exception:  # the window's text does not extend its prefix's (DecodeStream's InvalidPrefix)
            self.stream = None
            return self._window_step()

    def _window_step(self) -> str:
        prefix, full = self._window()
        return full[len(prefix):] if len(full) > len(prefix) and not full.endswith(REPLACEMENT) else ""

    def _window(self) -> tuple[str, str]:
        """Text of the window up to its read offset, and to its end."""
        return self._decode(self.ids[self.prefix_offset: self.read_offset]), self._decode(self.ids[self.prefix_offset:])

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text


@dataclass
class CompletionText:
    """One completion's text: cut at the first stop string, streamed except an end that may grow into one."""

    stops: tuple[str, ...] = ()
    text: str = ""
    sent: int = 0  # characters of `text` already streamed

    def extend(self, piece: str) -> None:
        """Append `piece` (no stop check: `cut_at_stop` does that)."""
        self.text += piece

    def cut_at_stop(self) -> bool:
        """If a stop string occurs in the unsent part (or straddles its start), cut the text before the first one
        and return True."""
        if not self.stops:
            return False
        start = max(0, self.sent - max(len(stop) for stop in self.stops))
        hits = [index for index in (self.text.find(stop, start) for stop in self.stops) if index >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def take_ready(self) -> str:
        """The unsent text that can no longer become part of a stop string ("" if none), marked sent."""
        upto = len(self.text) - stop_prefix_len(self.text, self.stops)
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent: upto], upto
        return piece

    def take_rest(self) -> str:
        """All unsent text (the completion has ended), marked sent."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string (held back from the stream)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest
