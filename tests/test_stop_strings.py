"""Stop strings over streamed text: held back while partial, never emitted."""

from __future__ import annotations

import random

from engine.stop_strings import StopStringMatcher


def _run(stops, deltas):
    matcher = StopStringMatcher(stops)
    out, matched = [], False
    for delta in deltas:
        text, matched = matcher.feed(delta)
        out.append(text)
        if matched:
            break
    if not matched:
        out.append(matcher.flush())
    return out, matched


def test_stop_split_across_deltas_is_never_emitted():
    out, matched = _run(["<END>"], ["Hello <", "EN", "D> ignored"])
    assert matched
    assert out == ["Hello ", "", ""]
    assert "".join(out) == "Hello "


def test_partial_match_is_released_when_it_diverges():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P!") == ("", True)
    assert matcher.feed("more") == ("", True)  # the sequence is over
    assert matcher.flush() == ""

    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("ORM") == ("STORM", False)
    assert matcher.feed("S") == ("", False)
    assert matcher.flush() == "S"  # the stream ended: held text was not a stop after all


def test_earliest_stop_wins_and_text_before_it_is_kept():
    out, matched = _run(["world", "lo w"], ["hello world"])
    assert matched and out == ["hel"]
    out, matched = _run(["\n\n", "。"], ["第一句。第二句\n\n"])
    assert matched and out == ["第一句"]


def test_stop_at_the_very_start_and_repeated_prefixes():
    assert _run(["ab"], ["ab", "cd"]) == ([""], True)
    # "aab" holds "a", then "a" again: the held prefix restarts correctly.
    out, matched = _run(["ab"], ["a", "a", "b"])
    assert matched and "".join(out) == "a"
    out, matched = _run(["aab"], ["a", "a", "a", "b"])
    assert matched and "".join(out) == "a"


def test_no_stops_passes_everything_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("<|im_end|>") == ("<|im_end|>", False)
    assert matcher.flush() == ""
    matcher = StopStringMatcher(None)
    assert matcher.feed("x") == ("x", False)
    assert StopStringMatcher([""]).feed("abc") == ("abc", False)  # an empty stop matches nothing
    assert StopStringMatcher("bc").feed("abcd") == ("a", True)  # one stop string, not its letters


def test_held_back_text_is_only_what_could_still_become_a_stop():
    matcher = StopStringMatcher(["</answer>", "Observation:"])
    assert matcher.feed("x </ans") == ("x ", False)
    assert matcher.feed("wer") == ("", False)
    assert matcher.feed("s") == ("</answers", False)
    assert matcher.feed(" Obs") == (" ", False)
    assert matcher.feed("erv") == ("", False)
    assert matcher.feed("ation: done") == ("", True)


def test_random_streams_match_the_reference():
    """Random texts cut into random deltas: output == text up to the first stop occurrence."""
    rng = random.Random(0)
    alphabet = "ab c\n中🙂"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = []
        for _ in range(rng.randint(1, 3)):
            stop = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            if all(stop not in s and s not in stop for s in stops):
                stops.append(stop)
        found = [i for s in stops if (i := text.find(s)) >= 0]
        want = text[: min(found)] if found else text
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        out, matched = _run(stops, deltas)
        assert matched == bool(found), (text, stops)
        assert "".join(out) == want, (text, stops, deltas)
