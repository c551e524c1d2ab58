"""Streaming detokenization: text deltas for newly generated ids, never broken UTF-8.

A byte-level BPE token can hold part of a multi-byte character (one Chinese character or emoji
often spans two or three tokens), so decoding each new token alone would stream U+FFFD. As in
vLLM's `detokenize_incrementally`, each push decodes a short window: the ids already shown in
the previous delta (`prefix_offset:read_offset`, for context) plus the new ones. If the window's
text ends in U+FFFD the last character is incomplete: the text before it is emitted and the
character waits until a later push completes it. Work per push is proportional to the new ids
plus the last emitted chunk (and any ids of a split character), not to the whole output, and
the concatenated deltas equal `decode(all ids)` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas for one sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: ids shown in the previous delta
        self.read_offset = 0  # ids from here on are not fully shown yet
        self._prefix_len: int | None = 0  # len(text of ids[prefix_offset:read_offset])
        self._sent = 0  # chars of ids[read_offset:]'s text already shown (before a split char)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(
            self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens
        )

    def push(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete ('' while a character is split)."""
        if not new_ids:
            return ""
        self.token_ids.extend(int(i) for i in new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back rest at the end of the stream (an unfinished character becomes U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        if self._prefix_len is None:
            self._prefix_len = len(self._decode(self.prefix_offset, self.read_offset))
        text = self._decode(self.prefix_offset)
        end = len(text)
        if not final:
            # Trailing U+FFFD: the bytes of the last character are not all here yet.
            while end > self._prefix_len and text[end - 1] == REPLACEMENT_CHAR:
                end -= 1
        start = self._prefix_len + self._sent
        delta = text[start:end] if end > start else ""
        if end < len(text):
            self._sent += len(delta)
        elif len(text) > self._prefix_len:
            # A clean end: what was just shown becomes the next window's context.
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            self._prefix_len = None
            self._sent = 0
        else:
            self.read_offset = len(self.token_ids)  # only invisible ids (skipped special tokens)
        return delta
