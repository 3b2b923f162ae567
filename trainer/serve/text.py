"""Turning a stream of token ids into a stream of text, with OpenAI ``stop`` strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Decoder(Protocol):
    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: Any
    ) -> str | list[str]: ...


class TextStream:
    """Incremental detokenizer for one sequence.

    Decodes a short window of recent ids instead of the whole sequence per token (the approach of
    text-generation-inference), and holds text back while it is an unfinished UTF-8 character or
    could still become a stop string, so streamed deltas never have to be taken back.
    """

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # everything decoded so far
        self._emitted = 0  # how much of _text was handed out
        self.stopped = False  # a stop string was found; the text ends before it

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: return whatever was held back."""
        if self.stopped:
            return ""
        rest = self._decode(self._ids[self._prefix_offset :])
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if len(rest) > len(prefix):
            self._text += rest[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            # A stop string may straddle the previous release, so search from a little before it.
            start = max(0, self._emitted - max(len(s) for s in self._stop) + 1)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i != -1]
            if hits:
                self.stopped = True
                end = max(min(hits), self._emitted)
                delta = self._text[self._emitted : end]
                self._text = self._text[:end]
                self._emitted = end
                return delta
        end = len(self._text) if final else len(self._text) - self._held_back()
        delta = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)
        return text
