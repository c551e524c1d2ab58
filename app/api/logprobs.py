"""Log-probabilities in OpenAI's shapes, from the engine's per-token `{token_id: logprob}` dicts.

Chat: `choices[].logprobs.content[]`, one `{token, logprob, bytes, top_logprobs}` per generated
token. Completions: `choices[].logprobs` with parallel lists `tokens`, `token_logprobs`,
`top_logprobs` (a `{token: logprob}` dict per position, the chosen token included, as vLLM
does) and `text_offset` (where each token starts in the choice's text; with `echo` the prompt's
tokens come first, the first of them with null values). Values are the model's raw next-token
log-probabilities (before penalties, temperature and filters); -inf becomes -9999.0 (JSON has no
infinity), as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from engine.tokenizer import Tokenizer

NO_LOGPROB = -9999.0
Entry = dict[int, float]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token uses -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenText:
    """A token id's text and raw bytes (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id])
            piece = self.tokenizer.id_to_token(token_id)
            decoder = _byte_decoder()
            if piece is not None and all(c in decoder for c in piece):
                raw = [decoder[c] for c in piece]
            else:  # an added token written as itself
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def _value(logprob: float) -> float:
    return max(logprob, NO_LOGPROB)


def _top(entry: Entry, n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:n]


def chat_logprobs(
    tokens: TokenText, token_ids: Sequence[int], entries: Sequence[Entry], top_n: int
) -> dict[str, Any]:
    """`{"content": [...]}` for generated tokens (entries[i] holds token_ids[i] and its top-k)."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        text, raw = tokens.get(token_id)
        top = []
        for other, value in _top(entry, top_n):
            other_text, other_raw = tokens.get(other)
            top.append({"token": other_text, "logprob": _value(value), "bytes": other_raw})
        content.append(
            {
                "token": text,
                "logprob": _value(entry.get(token_id, NO_LOGPROB)),
                "bytes": raw,
                "top_logprobs": top,
            }
        )
    return {"content": content}


def completion_logprobs(
    tokens: TokenText,
    token_ids: Sequence[int],
    entries: Sequence[Entry | None],
    text_offset: int,
) -> tuple[dict[str, Any], int]:
    """The completions `logprobs` object for these tokens, and the text offset after them."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token_id, entry in zip(token_ids, entries):
        text = tokens.text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_value(entry.get(token_id, NO_LOGPROB)))
        top: dict[str, float] = {}
        for other, value in _top(entry, len(entry)):
            top.setdefault(tokens.text(other), _value(value))
        out["top_logprobs"].append(top)
    return out, text_offset


def merge_completion_logprobs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One completions `logprobs` object from consecutive parts (prompt, then answer)."""
    merged: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for part in parts:
        for key in merged:
            merged[key] += part[key]
    return merged


def prompt_logprobs(
    tokens: TokenText, prompt_ids: Sequence[int], entries: Sequence[Entry | None], top_n: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt position (the first null), `{token_id: {logprob,
    rank, decoded_token}}` for the prompt's token and the `top_n` most likely ones. The rank
    (1 = most likely) is known within the top `top_n`; a prompt token below them has rank null
    (the engine reports only the top of the distribution)."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        top = _top(entry, top_n)
        ranks = {other: i + 1 for i, (other, _) in enumerate(top)}
        position: dict[str, dict[str, Any]] = {}
        for other, value in [(token_id, entry.get(token_id, NO_LOGPROB)), *top]:
            position.setdefault(
                str(other),
                {
                    "logprob": _value(value),
                    "rank": ranks.get(other),
                    "decoded_token": tokens.text(other),
                },
            )
        out.append(position)
    return out
