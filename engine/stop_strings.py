"""Stop strings over streamed text: emit what is safe, hold back what may begin a stop.

A stop string can arrive split across deltas ("<|" then "end|>"), so text that could still turn
into a stop string is held back until the next delta decides it. When a stop string completes,
the text before it is emitted and the stop string itself never is (OpenAI semantics).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas; get back the part that is safe to show and whether a stop matched."""

    def __init__(self, stops: Sequence[str] | str | None, include: bool = False) -> None:
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in dict.fromkeys(stops or ()) if s]
        self.include = include  # emit the matched stop string too (include_stop_str_in_output)
        self.pending = ""  # held-back text that could be the start of a stop string
        self.matched = False
        self.matched_stop: str | None = None

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string has matched). After a match, later
        text is dropped: the sequence is over."""
        if self.matched:
            return "", True
        if not self.stops:
            return delta, False
        text = self.pending + delta
        # Earliest stop occurrence wins. Only the new delta (plus what was held back) is searched:
        # emitted text was already checked, and any stop spanning it would have been held back.
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            cut, stop = min(found, key=lambda f: f[0])
            self.matched = True
            self.matched_stop = stop
            self.pending = ""
            return text[: cut + len(stop)] if self.include else text[:cut], True
        keep = self._partial_suffix_len(text)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Text still held back when the stream ends without a stop (it was not a stop after all)."""
        rest, self.pending = self.pending, ""
        return "" if self.matched else rest

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
