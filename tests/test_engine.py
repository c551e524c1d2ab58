"""The engine core end to end on the tiny checkpoint: batching, chunking, caching, preemption.

The reference for every greedy result is transformers' Qwen3 on the same weights.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine_helpers import hf_greedy, random_prompts

LENGTHS = [1, 7, 16, 33, 64, 100, 211, 300]
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=1)


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoint, prompts):
    return [hf_greedy(tiny_checkpoint, p, NEW_TOKENS) for p in prompts]


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.kv_blocks_used == 0, f"{stats.kv_blocks_used} blocks still held"
    assert stats.num_running == 0 and stats.num_waiting == 0


ENGINE_VARIANTS = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "chunked-7": {"max_num_batched_tokens": 7},
    # 40 blocks of 16 tokens cannot hold all eight sequences at once: forces preemption.
    "preempting": {"num_kv_blocks": 40, "max_num_batched_tokens": 64},
    "few-seqs": {"max_num_seqs": 3},
    # The Triton kernels (under TRITON_INTERPRET=1 on CPU), chunked so prefix reads are exercised.
    "triton": {"attention_backend": "triton", "max_num_batched_tokens": 64},
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_batched_greedy_equals_solo_and_hf(tiny_checkpoint, prompts, hf_reference, variant):
    llm = LLM(str(tiny_checkpoint), **ENGINE_VARIANTS[variant])
    together = llm.generate(prompts, GREEDY)
    for out, expected in zip(together, hf_reference):
        assert out.token_ids == expected
        assert out.finish_reason == "length"
    assert_all_blocks_free(llm)
    # Under the Triton interpreter every kernel launch runs in Python (~4 s a solo run here):
    # one solo prompt there, a full block's worth, is enough beside the batched run above.
    alone = [2] if variant == "triton" else [0, 1, 2]
    solo = [llm.generate([prompts[i]], GREEDY)[0].token_ids for i in alone]
    assert solo == [hf_reference[i] for i in alone]
    assert_all_blocks_free(llm)


def test_preemption_actually_happens(tiny_checkpoint, prompts):
    llm = LLM(str(tiny_checkpoint), **ENGINE_VARIANTS["preempting"])
    for p in prompts:
        llm.engine.add_request(p, GREEDY)
    preempted = 0
    while llm.engine.has_unfinished():
        before = llm.engine.scheduler.num_preemptions
        llm.engine.step()
        preempted += llm.engine.scheduler.num_preemptions - before
    assert preempted > 0
    assert_all_blocks_free(llm)


def test_multi_turn_reuses_every_full_block_and_matches_uncached_logits(tiny_checkpoint):
    turn1_prompt = random_prompts([150], seed=7)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=5)
    cached = LLM(str(tiny_checkpoint))
    uncached = LLM(str(tiny_checkpoint), enable_prefix_caching=False)
    turn1 = cached.generate([turn1_prompt], params)[0]
    assert turn1.num_cached_tokens == 0
    history = turn1_prompt + turn1.token_ids
    turn2_prompt = history + random_prompts([23], seed=8)[0]
    turn2 = cached.generate([turn2_prompt], params)[0]
    # Every full block whose KV turn 1 computed (all its tokens but the last sampled one).
    block = cached.config.block_size
    assert turn2.num_cached_tokens == (len(history) - 1) // block * block
    reference = uncached.generate([turn2_prompt], params)[0]
    assert reference.num_cached_tokens == 0
    assert turn2.token_ids == reference.token_ids
    for got, want in zip(turn2.logprobs, reference.logprobs):
        assert got.keys() == want.keys()
        for token, value in want.items():
            assert got[token] == pytest.approx(value, abs=1e-4)
    assert_all_blocks_free(cached)


def test_shared_prefix_is_held_once(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint))
    engine = llm.engine
    prefix = random_prompts([200], seed=3)[0]
    tails = random_prompts([5, 9, 13, 21], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    first = engine.add_request(prefix + tails[0], params)
    while engine.requests[first].seq.num_computed_tokens < 200:
        engine.step()
    others = [engine.add_request(prefix + t, params) for t in tails[1:]]
    engine.step()
    full_blocks = 200 // 16
    tables = [engine.requests[r].seq.block_table[:full_blocks] for r in [first, *others]]
    assert all(t == tables[0] for t in tables)
    for rid in others:
        assert engine.requests[rid].seq.num_cached_tokens == full_blocks * 16
    used_distinct = {b for r in [first, *others] for b in engine.requests[r].seq.block_table}
    assert engine.stats().kv_blocks_used == len(used_distinct)
    while engine.has_unfinished():
        engine.step()
    assert_all_blocks_free(llm)


def test_a_later_copy_of_a_prompt_copies_the_partial_block_of_a_running_one(tiny_checkpoint):
    """Choices 1.. of an n > 1 request: every full block is a hit, the partial block's computed
    slots are copied from the running choice 0, so one prompt token is computed per copy; its
    greedy tokens and logprobs equal an engine without prefix caching. Lengths: the partial
    block is the first one, the third, and a full last block (the copy is then replaced by the
    block choice 0 registered)."""
    llm = LLM(str(tiny_checkpoint))
    uncached = LLM(str(tiny_checkpoint), enable_prefix_caching=False)
    engine, bs = llm.engine, llm.config.block_size
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    for n_prompt, seed in [(10, 21), (45, 22), (48, 23)]:
        prompt = random_prompts([n_prompt], seed=seed)[0]
        reference = uncached.generate([prompt], params)[0]
        computed = engine.scheduler.num_computed_prompt_tokens
        first = engine.add_request(prompt, params)
        outs = {}
        while not engine.requests[first].seq.output_token_ids:
            outs.update({o.request_id: o for o in engine.step()})
        later = [engine.add_request(prompt, params) for _ in range(2)]
        while engine.has_unfinished():
            outs.update({o.request_id: o for o in engine.step()})
            engine.scheduler.check_integrity()
        assert engine.scheduler.num_computed_prompt_tokens - computed == n_prompt + 2
        for rid in later:
            assert outs[rid].num_cached_tokens == n_prompt - 1
        for rid in [first, *later]:
            assert outs[rid].token_ids == reference.token_ids
            for got, want in zip(outs[rid].logprobs, reference.logprobs):
                assert got.keys() == want.keys()
                for token, value in want.items():
                    assert got[token] == pytest.approx(value, abs=1e-4)
        assert_all_blocks_free(llm)
    assert engine.scheduler.num_partial_copies == 2 * 3
    assert engine.stats().prompt_tokens_computed == engine.scheduler.num_computed_prompt_tokens
    assert uncached.engine.scheduler.num_partial_copies == 0
    assert bs == 16  # the lengths above were chosen for 16-token blocks


def test_preempted_twins_resume_from_each_others_partial_block(tiny_checkpoint, prompts):
    """Identical greedy prompts under preemption: a re-admitted twin copies the partial block of
    the one still running (same prompt and same generated tokens) and still matches HF."""
    # 34 blocks of 16 tokens: the 300-token prompt preempts the newest twin (seen: 1
    # preemption, 2 copies).
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=34, max_num_batched_tokens=64)
    engine = llm.engine
    batch = [prompts[6], prompts[7], prompts[6], prompts[6]]
    ids = [engine.add_request(p, GREEDY) for p in batch]
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
        engine.scheduler.check_integrity()
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_partial_copies > 0
    expected = [hf_greedy(tiny_checkpoint, p, NEW_TOKENS) for p in batch]
    assert [outs[r].token_ids for r in ids] == expected
    assert_all_blocks_free(llm)


def test_refuses_prompts_that_can_never_fit(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), max_model_len=64)
    with pytest.raises(ValueError, match="64"):
        llm.generate([list(range(100, 200))], GREEDY)
    small_pool = LLM(str(tiny_checkpoint), num_kv_blocks=4)
    with pytest.raises(ValueError, match="4"):
        small_pool.generate([list(range(100, 200))], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    assert_all_blocks_free(llm)
    assert_all_blocks_free(small_pool)


def test_error_in_one_request_fails_only_that_request(tiny_checkpoint, prompts, hf_reference):
    llm = LLM(str(tiny_checkpoint))
    runner = llm.engine.runner
    original = runner.start
    poison = 424242 % 150_000

    def flaky_start(batch):
        if any(poison in s.seq.token_ids for s in batch):
            raise RuntimeError("injected fault")
        return original(batch)

    runner.start = flaky_start
    outs = llm.generate(prompts[:4] + [[poison, 1, 2, 3]], GREEDY)
    assert [o.token_ids for o in outs[:4]] == hf_reference[:4]
    assert outs[4].finish_reason == "error" and outs[4].error
    assert_all_blocks_free(llm)


def test_text_prompts_stop_strings_and_chat(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint))
    free = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert free.text == llm.tokenizer.decode(free.token_ids, skip_special_tokens=True)
    # Use a piece of the free-running text as a stop string: the output ends right before it.
    cut = len(free.text) // 2
    stop = free.text[cut : cut + 3]
    if stop.strip() and free.text.find(stop) == cut:
        stopped = llm.generate(
            "Hello", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
        )[0]
        assert stopped.finish_reason == "stop"
        assert stopped.text == free.text[:cut]
    chat = llm.chat([{"role": "user", "content": "你好"}], SamplingParams(temperature=0, max_tokens=5))
    assert chat[0].prompt_token_ids[:3] == [151644, 872, 198]
    assert_all_blocks_free(llm)


def test_seeded_sampling_is_reproducible_across_batches(tiny_checkpoint, prompts):
    llm = LLM(str(tiny_checkpoint))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[3]], seeded)[0].token_ids
    mates = [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)] * 3
    batch = llm.generate([prompts[0], prompts[3], prompts[5], prompts[6]], [mates[0], seeded, *mates[1:]])
    assert batch[1].token_ids == alone
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", 0),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("logprobs", 50),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
