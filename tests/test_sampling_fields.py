"""Issue 17 on the engine side: logit_bias and min_tokens per row inside one batched sampler
step, SamplingParams validation naming the field, prompt logprobs through the scheduler and
runner (chunked, and for a cached prompt), stop_reason and include_stop_str_in_output."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.stop_strings import StopStringMatcher

VOCAB = 50


def test_logit_bias_and_banned_ids_apply_to_their_row_only():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    sampler = Sampler(VOCAB, "cpu")
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logit_bias={7: 100.0}), (), ()),
        SamplingRow(SamplingParams(temperature=0.0), (), ()),
        SamplingRow(SamplingParams(temperature=0.0), (), (), banned_ids=(int(logits[2].argmax()),)),
    ]
    before = logits.clone()
    ids, logprobs = sampler.sample(logits, rows)
    assert torch.equal(logits, before)  # not modified
    assert ids[0] == 7 and ids[1] == int(logits[1].argmax())
    assert ids[2] == int(logits[2].topk(2).indices[1])  # the best one is banned
    # Sampled rows too: a -100 bias removes a token, a banned id never comes.
    many = torch.zeros(64, VOCAB)
    hot = [SamplingRow(SamplingParams(logit_bias={3: -100.0, 4: 5.0}), (), ()) for _ in range(64)]
    assert set(sampler(many, hot).tolist()) <= set(range(VOCAB)) - {3}
    probs = sampler.sampling_probs(many[:1], hot[:1])
    assert probs[0, 4] > 0.7 and probs[0, 3] == 0.0


def test_reported_logprobs_are_raw():
    logits = torch.randn(1, VOCAB)
    sampler = Sampler(VOCAB, "cpu")
    row = SamplingRow(SamplingParams(temperature=0.0, logprobs=2, logit_bias={9: 100.0}), (), ())
    ids, logprobs = sampler.sample(logits, [row])
    assert ids == [9]
    raw = torch.log_softmax(logits, -1)[0]
    assert logprobs[0] is not None and abs(logprobs[0][9] - raw[9].item()) < 1e-6


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_tokens", -1),
        ("logit_bias", {1: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("prompt_logprobs", 21),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="SamplingParams.min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_stop_string_can_be_kept():
    keep = StopStringMatcher(["END"], include=True)
    assert keep.feed("abcE") == ("abc", False)
    assert keep.feed("NDxyz") == ("END", True)
    drop = StopStringMatcher(["END"])
    assert drop.feed("abcENDxyz") == ("abc", True) and drop.matched_stop == "END"
    keep = StopStringMatcher(["END"], include=True)
    assert keep.feed("abcENDxyz") == ("abcEND", True) and keep.matched_stop == "END"


def test_prompt_logprobs_and_min_tokens_through_the_engine(tiny_checkpoint):
    from transformers import Qwen3ForCausalLM

    from engine import LLM

    llm = LLM(
        str(tiny_checkpoint), device="cpu", dtype="float32", num_kv_blocks=64,
        max_num_batched_tokens=24,  # the prompt is read in chunks
    )
    hf = Qwen3ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(" ".join(f"w{i}" for i in range(30)))
    assert len(ids) > 24
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry = out.prompt_logprobs[p]
        assert entry is not None and abs(entry[ids[p]] - ref[p - 1, ids[p]].item()) < 1e-4
        top = ref[p - 1].topk(2)
        for value, token in zip(top.values, top.indices):
            assert abs(entry[int(token)] - value.item()) < 1e-4
    # The same prompt again, now cached: still all of them (the request skips the cache).
    again = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))[0]
    assert again.num_cached_tokens == 0 and again.prompt_logprobs is not None
    assert [e and e[t] for e, t in zip(again.prompt_logprobs, ids)] == [
        e and e[t] for e, t in zip(out.prompt_logprobs, ids)
    ]
    # min_tokens: the greedy first token is a stop token, kept out for three tokens.
    first = out.token_ids[0]
    stopped = llm.generate([ids], SamplingParams(temperature=0.0, stop_token_ids=[first]))[0]
    assert stopped.token_ids == [first] and stopped.stop_reason == first and stopped.text == ""
    later = llm.generate(
        [ids], SamplingParams(temperature=0.0, stop_token_ids=[first], min_tokens=3, max_tokens=6)
    )[0]
    assert first not in later.token_ids[:3] and len(later.token_ids) >= 3
