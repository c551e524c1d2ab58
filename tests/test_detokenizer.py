"""Streaming detokenization: deltas concatenate to decode(all ids), never broken UTF-8."""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.stop_strings import StopStringMatcher
from engine.tokenizer import Tokenizer
from tests.test_tokenizer import sample_texts

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_checkpoint(tiny_checkpoint)


def _byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte (byte-level BPE has all 256)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    return [tok.token_to_id(byte_to_char[b]) for b in data]


def _stream(tok, ids, rng, skip, max_chunk=3):
    """Push ids in random chunks; check each step; return the concatenated text."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    emitted = ""
    i = 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        emitted += detok.push(ids[i : i + n])
        i += n
        # Text once shown is final: a prefix of the whole decode, so no premature U+FFFD.
        assert full.startswith(emitted), (ids, emitted, full)
    emitted += detok.flush()
    assert emitted == full, ids
    return emitted


def test_real_texts_stream_exactly_and_promptly(tok):
    rng = random.Random(0)
    texts = sample_texts(n_mixed=300, seed=5)
    split_chars_seen = 0
    for text in texts:
        ids = tok.encode(text)
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            emitted = ""
            i = 0
            while i < len(ids):
                n = rng.randint(1, 3)
                delta = detok.push(ids[i : i + n])
                i += n
                assert FFFD not in delta, (text, ids[:i])
                emitted += delta
                so_far = tok.decode(ids[:i], skip_special_tokens=skip)
                split_chars_seen += so_far.endswith(FFFD)
                # Everything except a character still missing bytes is already out.
                assert emitted == so_far.rstrip(FFFD), (text, ids[:i])
            assert emitted + detok.flush() == tok.decode(ids, skip_special_tokens=skip)
    assert split_chars_seen > 50  # the samples really do split characters across tokens


def test_split_character_is_held_back_then_completed(tok):
    detok = IncrementalDetokenizer(tok)
    e4, b8, ad = _byte_ids(tok, "中".encode())
    hello = tok.encode("Hello")
    assert detok.push(hello + [e4]) == "Hello"  # the complete text before the split goes out
    assert detok.push([b8]) == ""
    assert detok.push([ad]) == "中"
    assert detok.push(_byte_ids(tok, "🙂".encode())[:2]) == ""
    assert detok.flush() == FFFD  # the stream ended inside a character: as decode() says
    assert detok.flush() == ""


def test_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nHi 👋<|im_end|><tool_call>x</tool_call><|endoftext|>")
    for skip, want in ((True, "assistant\nHi 👋<tool_call>x</tool_call>"), (False, None)):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        text = "".join(detok.push([i]) for i in ids) + detok.flush()
        assert text == (want or tok.decode(ids))
    assert IncrementalDetokenizer(tok).push([]) == ""


def test_random_id_streams(tok):
    """Any ids at all (UTF-8 fragments, added tokens, embedding padding) still concatenate exactly."""
    rng = random.Random(1)
    fragment_ids = _byte_ids(tok, bytes(range(0x80, 0x100)))  # continuation and lead bytes
    emoji_ids = tok.encode("👨\u200d👩\u200d👧🇯🇵中文かな")
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(1, 40)):
            pool = rng.random()
            if pool < 0.35:
                ids.append(rng.randrange(151643))
            elif pool < 0.7:
                ids.append(rng.choice(fragment_ids))
            elif pool < 0.85:
                ids.append(rng.choice(emoji_ids))
            elif pool < 0.95:
                ids.append(rng.randrange(151643, 151669))
            else:
                ids.append(rng.randrange(151669, 151936))
        for skip in (True, False):
            _stream(tok, ids, rng, skip, max_chunk=4)


def test_work_per_push_does_not_grow_with_the_output(tok):
    ids = tok.encode(" ".join(sample_texts(n_mixed=40, seed=9)))
    assert len(ids) > 1000
    decoded_lengths = []

    class Counting:
        def decode(self, token_ids, skip_special_tokens=False):
            decoded_lengths.append(len(token_ids))
            return tok.decode(token_ids, skip_special_tokens)

    detok = IncrementalDetokenizer(Counting())  # type: ignore[arg-type]
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert max(decoded_lengths) <= 12  # a window of a few tokens, never the whole output


@pytest.mark.parametrize("skip", [True, False])
def test_stream_through_stop_strings(tok, skip):
    """Detokenizer deltas fed to the stop matcher: the text up to the first stop, never past it."""
    rng = random.Random(3 + skip)
    for text in sample_texts(n_mixed=200, seed=11):
        ids = tok.encode(text)
        full = tok.decode(ids, skip_special_tokens=skip)
        if len(full) < 8:
            continue
        # Stops cut from the text itself (so they occur), plus one that never does.
        a = rng.randrange(len(full) - 3)
        stops = [full[a : a + rng.randint(1, 3)], "never-there§"]
        if len(full) > 20:
            b = rng.randrange(len(full) - 5)
            candidate = full[b : b + rng.randint(2, 5)]
            if all(candidate not in s and s not in candidate for s in stops):
                stops.append(candidate)
        want = full[: min(i for s in stops if (i := full.find(s)) >= 0)]

        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        matcher = StopStringMatcher(stops)
        out, matched, i = "", False, 0
        while i < len(ids) and not matched:
            n = rng.randint(1, 3)
            delta, matched = matcher.feed(detok.push(ids[i : i + n]))
            i += n
            out += delta
            assert FFFD not in delta
        if not matched:
            delta, matched = matcher.feed(detok.flush())
            out += delta + matcher.flush()
        assert matched, (text, stops)
        assert out == want, (text, stops)
