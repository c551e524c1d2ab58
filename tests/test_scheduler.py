"""Scheduler behaviour driven by a fake model that really reads and writes a paged "KV cache".

The fake model's KV of position p is a chained hash of the tokens 0..p, written into the slot
the block table gives; before running a chunk it checks that every earlier position's slot holds
exactly that sequence's KV (as attention would read it), and it refuses to write into a block
that is shared or registered in the prefix cache. The next token is a function of the last KV.
So a wrong block table, a premature eviction, a false cache hit or an overwritten shared block
changes the tokens, which are compared with an independent solo computation.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

VOCAB = 40
EOS = [0]
SEED_KV = 0x5EED


def kv_of(prev: int, token: int, position: int) -> int:
    return hash((prev, token, position)) & 0xFFFF_FFFF_FFFF


def next_token(kv: int) -> int:
    return (kv >> 7) % VOCAB


def solo_output(prompt: list[int], params: SamplingParams, max_len: int) -> tuple[list[int], str]:
    """What the fake model generates for one request run alone, written independently."""
    tokens = list(prompt)
    kv = SEED_KV
    for p, t in enumerate(tokens):
        kv = kv_of(kv, t, p)
    stops = set(params.stop_token_ids or []) | set([] if params.ignore_eos else EOS)
    out: list[int] = []
    while True:
        token = next_token(kv)
        out.append(token)
        tokens.append(token)
        if token in stops:
            return out, "stop"
        if len(out) >= (params.max_tokens or max_len) or len(tokens) >= max_len:
            return out, "length"
        kv = kv_of(kv, token, len(tokens) - 1)


class FakeModel:
    def __init__(self, scheduler: Scheduler) -> None:
        self.bm = scheduler.block_manager
        self.bs = self.bm.block_size
        self.cache: list[int | None] = [None] * (self.bm.num_blocks * self.bs)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.bs] * self.bs + position % self.bs

    def run(self, out: SchedulerOutput) -> SchedulerOutput:
        """Run the step's copies within the pool (a prompt's partial block copied on write), then
        check and write each record's KV, fill the token of each record that samples."""
        for c in out.kv_copies:
            assert c.kind == "on_device", c  # no lower tiers here
            src, dst = c.src_block * self.bs, c.block_id * self.bs
            assert None not in self.cache[src : src + c.num_slots], f"{c}: copies unwritten slots"
            self.cache[dst : dst + c.num_slots] = self.cache[src : src + c.num_slots]
        for s in out.scheduled:
            seq, end = s.seq, s.start + s.num_new_tokens
            assert len(seq.block_table) * self.bs >= end, f"{seq}: block table too short for {end}"
            kv = SEED_KV
            for p in range(s.start):
                kv = kv_of(kv, seq.token_ids[p], p)
                assert self.cache[self._slot(seq, p)] == kv, f"{seq}: wrong KV at position {p}"
            for p in range(s.start, end):
                block = self.bm.blocks[seq.block_table[p // self.bs]]
                assert block.ref_count == 1 and block.hash is None, f"{seq}: writes a shared block"
                kv = kv_of(kv, seq.token_ids[p], p)
                self.cache[self._slot(seq, p)] = kv
            s.token_id = next_token(kv) if s.samples else None
        return out


def make_scheduler(num_blocks: int = 64, max_model_len: int = 10_000, **config) -> Scheduler:
    return Scheduler(EngineConfig(**config), num_blocks, max_model_len, EOS)


def check_step(sched: Scheduler, out: SchedulerOutput, running_before: list[Sequence]) -> None:
    """Invariants of one schedule() result."""
    sched.check_integrity()
    assert sum(s.num_new_tokens for s in out.scheduled) <= sched.max_num_batched_tokens
    seqs = [s.seq for s in out.scheduled]
    assert len({id(s) for s in seqs}) == len(seqs)
    assert not {id(s) for s in seqs} & {id(s) for s in out.preempted}
    for s in out.scheduled:
        assert s.num_new_tokens >= 1 and s.start == s.seq.num_computed_tokens
        assert s.start + s.num_new_tokens <= s.seq.num_tokens
        assert s.seq.status is SequenceStatus.RUNNING
    # Previously running decodes first, then their prefill chunks, then new admissions.
    before = {id(s) for s in running_before}

    def kind(s: ScheduledSequence) -> int:
        if id(s.seq) not in before:
            return 2
        return 0 if s.num_new_tokens == 1 and s.samples else 1

    kinds = [kind(s) for s in out.scheduled]
    assert kinds == sorted(kinds), kinds
    # The oldest running sequence always makes progress: nothing can starve it.
    if running_before:
        assert any(s.seq is running_before[0] for s in out.scheduled)
    # Every running decode runs every step, unless the pool is exhausted (then it may wait).
    if sched.block_manager.num_free_blocks > 0:
        scheduled = {id(s) for s in seqs}
        for seq in running_before:
            if (
                seq.status is SequenceStatus.RUNNING
                and seq.num_tokens - seq.num_computed_tokens == 1
            ):
                assert id(seq) in scheduled, f"{seq} skipped"


def drive(
    sched: Scheduler, model: FakeModel | None = None, max_steps: int = 20_000, on_step=None
) -> int:
    """Run until every request finished, checking invariants at each step; returns the step count."""
    model = model or FakeModel(sched)
    steps = 0
    while sched.has_unfinished():
        before = list(sched.running)
        out = sched.schedule()
        check_step(sched, out, before)
        if on_step is not None:
            on_step(out, before)
        sched.postprocess(model.run(out))
        sched.check_integrity()
        steps += 1
        assert steps < max_steps, "no progress"
    assert sched.block_manager.num_used_blocks == 0
    return steps


def add(sched: Scheduler, rid: str, prompt: list[int], **params) -> Sequence:
    params.setdefault("max_tokens", 8)
    seq = Sequence(rid, prompt, SamplingParams(**params))
    sched.add(seq)
    return seq


def assert_solo_equal(seqs: list[Sequence], max_len: int = 10_000) -> None:
    for seq in seqs:
        want = solo_output(seq.token_ids[: seq.num_prompt_tokens], seq.params, max_len)
        assert (seq.output_token_ids, seq.finish_reason) == want, seq.request_id


def prompt(n: int, salt: int = 0) -> list[int]:
    rng = random.Random(salt)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


# ---- admission ------------------------------------------------------------------------------


def test_add_refuses_what_can_never_fit_with_the_numbers():
    sched = make_scheduler(num_blocks=8, max_model_len=100)
    with pytest.raises(ValueError, match="101 tokens, more than max_model_len 100"):
        add(sched, "long", prompt(101))
    big_ctx = make_scheduler(num_blocks=8, max_model_len=1000)
    with pytest.raises(
        ValueError,
        match=r"129 tokens and needs 9 KV blocks of 16 tokens.*only 8 blocks \(128 tokens\)",
    ):
        add(big_ctx, "pool", prompt(129))
    with pytest.raises(ValueError, match="empty"):
        add(sched, "empty", [])
    add(sched, "ok", prompt(100))
    with pytest.raises(ValueError, match="'ok' is already in use"):
        add(sched, "ok", prompt(3))
    assert sched.num_waiting == 1 and big_ctx.num_waiting == 0
    drive(sched)
    # A prompt that exactly fills the pool is accepted and finishes at the pool's end.
    exact = add(big_ctx, "exact", prompt(128))
    drive(big_ctx)
    assert exact.output_token_ids and exact.finish_reason in {"length", "stop"}


# ---- batching -------------------------------------------------------------------------------


def test_every_prompt_is_chunked_and_chunks_mix_with_decodes():
    sched = make_scheduler(max_num_batched_tokens=7)
    seqs = [
        add(sched, f"r{i}", prompt(n, i), ignore_eos=True) for i, n in enumerate([1, 5, 9, 20, 33])
    ]
    chunks: Counter[str] = Counter()
    mixed_steps = 0
    partial_chunks_per_step: list[int] = []

    def on_step(out: SchedulerOutput, before: list[Sequence]) -> None:
        nonlocal mixed_steps
        decodes = [
            s for s in out.scheduled if s.seq.num_output_tokens > 0 and s.num_new_tokens == 1
        ]
        prefills = [s for s in out.scheduled if s.seq.num_output_tokens == 0]
        mixed_steps += bool(decodes and prefills)
        partial_chunks_per_step.append(sum(not s.samples for s in out.scheduled))
        for s in prefills:
            chunks[s.seq.request_id] += 1

    drive(sched, on_step=on_step)
    assert_solo_equal(seqs)
    for seq in seqs:
        assert chunks[seq.request_id] >= -(-seq.num_prompt_tokens // 7)
    assert chunks["r4"] >= 5 and mixed_steps > 0
    # Step 1: r0 (1 token) and r1 (5) complete, r2 (third in line) gets a 1-token chunk.
    assert partial_chunks_per_step[0] == 1


def test_several_waiting_prompts_are_chunked_in_one_step():
    sched = make_scheduler(max_num_batched_tokens=64, block_size=4)
    seqs = [add(sched, f"r{i}", prompt(40, i)) for i in range(3)]
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens, s.samples) for s in out.scheduled] == [
        ("r0", 40, True),
        ("r1", 24, False),
    ]
    # Blocks cover exactly what was scheduled, not whole prompts.
    assert [len(s.block_table) for s in seqs] == [10, 6, 0]
    sched.postprocess(FakeModel(sched).run(out))
    for seq in seqs:
        sched.abort(seq.request_id)
    sched.check_integrity()
    assert sched.block_manager.num_used_blocks == 0


def test_max_num_seqs_holds():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [add(sched, f"r{i}", prompt(10 + i, i), max_tokens=5, ignore_eos=True) for i in range(5)]
    peak = 0

    def on_step(out: SchedulerOutput, before: list[Sequence]) -> None:
        nonlocal peak
        assert sched.num_running <= 2 and len(out.scheduled) <= 2
        peak = max(peak, sched.num_running)

    drive(sched, on_step=on_step)
    assert peak == 2
    assert_solo_equal(seqs)


def test_a_long_prefill_never_stalls_running_decodes_and_allocates_as_it_goes():
    sched = make_scheduler(max_num_batched_tokens=16)
    chat = add(sched, "chat", prompt(10), max_tokens=60, ignore_eos=True)
    model = FakeModel(sched)
    out = sched.schedule()
    sched.postprocess(model.run(out))
    doc = add(sched, "doc", prompt(400, 3), max_tokens=2, ignore_eos=True)
    while doc.num_output_tokens == 0:
        out = sched.schedule()
        check_step(sched, out, list(sched.running))
        ids = [s.seq.request_id for s in out.scheduled]
        assert ids == ["chat", "doc"]
        assert out.scheduled[0].num_new_tokens == 1 and out.scheduled[1].num_new_tokens <= 15
        end = out.scheduled[1].start + out.scheduled[1].num_new_tokens
        assert len(doc.block_table) == -(-end // 16)
        sched.postprocess(model.run(out))
    drive(sched, model)
    assert_solo_equal([chat, doc])


# ---- prefix cache ---------------------------------------------------------------------------


def test_a_later_copy_of_a_running_prompt_copies_its_partial_block():
    """The fake model checks every earlier slot before it runs a chunk: the copied slots must
    hold exactly the prompt's KV. Only the last prompt token is computed; a different
    cache_salt or a different token in the partial block gets no copy."""
    sched = make_scheduler()
    model = FakeModel(sched)
    shared = prompt(40, 6)  # 2 full blocks, then 8 tokens in the third
    first = add(sched, "r0", shared, max_tokens=20, ignore_eos=True)
    out = sched.schedule()
    sched.postprocess(model.run(out))
    assert first.num_output_tokens == 1
    twin = add(sched, "twin", shared, max_tokens=20, ignore_eos=True)
    salted = add(sched, "salted", shared, max_tokens=20, ignore_eos=True, cache_salt="b")
    other = add(sched, "other", [*shared[:-2], 39 - shared[-2], shared[-1]], max_tokens=20)
    out = sched.schedule()
    assert [c.kind for c in out.kv_copies] == ["on_device"]
    copy = out.kv_copies[0]
    assert (copy.src_block, copy.block_id, copy.num_slots) == (
        first.block_table[2],
        twin.block_table[2],
        7,
    )
    assert twin.block_table[:2] == first.block_table[:2] and twin.num_cached_tokens == 39
    assert salted.num_cached_tokens == 0 and other.num_cached_tokens == 32
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in out.scheduled][1:] == [
        ("twin", 39, 1),
        ("salted", 0, 40),
        ("other", 32, 8),
    ]
    computed = sched.num_computed_prompt_tokens
    sched.postprocess(model.run(out))
    assert sched.num_computed_prompt_tokens - computed == 1 + 40 + 8
    assert sched.num_partial_copies == 1
    drive(sched, model)
    assert_solo_equal([first, twin, salted, other])


def test_four_requests_sharing_a_200_token_prefix_hold_one_copy():
    sched = make_scheduler()
    model = FakeModel(sched)
    shared = prompt(200, 5)
    first = add(sched, "r0", shared + [1, 2, 3], max_tokens=30, ignore_eos=True)
    while first.num_computed_tokens < 200:
        out = sched.schedule()
        sched.postprocess(model.run(out))
    others = [
        add(sched, f"r{i}", shared + [i] * (4 + i), max_tokens=30, ignore_eos=True)
        for i in (1, 2, 3)
    ]
    out = sched.schedule()
    sched.postprocess(model.run(out))
    seqs = [first, *others]
    for seq in others:
        assert seq.num_cached_tokens == 192
        assert seq.block_table[:12] == first.block_table[:12]
    bm = sched.block_manager
    assert [bm.blocks[b].ref_count for b in first.block_table[:12]] == [4] * 12
    assert bm.num_used_blocks == len({b for s in seqs for b in s.block_table}) == 12 + 4
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (12 + 3 * 12, 3 * 12)
    drive(sched, model)
    assert_solo_equal(seqs)


def test_prompts_computed_together_end_up_sharing_one_copy():
    sched = make_scheduler()
    model = FakeModel(sched)
    shared = prompt(200, 5)
    seqs = [
        add(sched, f"r{i}", shared + [i + 1] * 5, max_tokens=4, ignore_eos=True) for i in range(4)
    ]
    out = sched.schedule()
    assert len(out.scheduled) == 4 and sched.block_manager.num_used_blocks == 4 * 13
    sched.postprocess(model.run(out))
    assert all(s.block_table[:12] == seqs[0].block_table[:12] for s in seqs)
    assert sched.block_manager.num_used_blocks == 12 + 4
    drive(sched, model)
    assert_solo_equal(seqs)


def test_multi_turn_reuses_every_full_block_of_the_previous_turn():
    sched = make_scheduler()
    model = FakeModel(sched)
    turn1 = add(sched, "t1", prompt(50, 1), max_tokens=20, ignore_eos=True)
    drive(sched, model)
    history = turn1.token_ids
    turn2 = add(sched, "t2", history + prompt(9, 2), max_tokens=20, ignore_eos=True)
    drive(sched, model)
    # Every full block whose KV turn 1 wrote: all its tokens but the last sampled one.
    assert turn2.num_cached_tokens == (len(history) - 1) // 16 * 16 == 64
    assert_solo_equal([turn1, turn2])


def test_prefix_caching_off():
    sched = make_scheduler(enable_prefix_caching=False)
    model = FakeModel(sched)
    a = add(sched, "a", prompt(60), ignore_eos=True)
    drive(sched, model)
    b = add(sched, "b", prompt(60), ignore_eos=True)
    drive(sched, model)
    assert b.num_cached_tokens == 0 and sched.block_manager.num_cached_blocks == 0
    assert sched.block_manager.prefix_cache_queries == 0
    assert_solo_equal([a, b])


# ---- preemption -----------------------------------------------------------------------------


def test_preemption_by_recompute_when_the_pool_runs_out():
    max_len = 40
    sched = make_scheduler(
        num_blocks=10, max_model_len=max_len, block_size=4, max_num_batched_tokens=12
    )
    seqs = [
        add(sched, f"r{i}", prompt(8 + 5 * i, i), max_tokens=12, ignore_eos=True) for i in range(6)
    ]
    readmitted_with_hits = 0

    def on_step(out: SchedulerOutput, before: list[Sequence]) -> None:
        nonlocal readmitted_with_hits
        for s in out.scheduled:
            if s.seq.num_preemptions and s.seq not in before:  # re-admitted this step
                readmitted_with_hits += s.start > 0

    drive(sched, on_step=on_step)
    assert sched.num_preemptions > 0
    assert readmitted_with_hits > 0
    assert_solo_equal(seqs, max_len)
    # num_cached_tokens reports the first admission only, never a re-admission's hit.
    assert all(s.num_cached_tokens == 0 for s in seqs)


def test_a_sequence_longer_than_the_pool_allows_stops_at_the_pool_end():
    sched = make_scheduler(num_blocks=4, max_model_len=10_000, block_size=4)
    seq = add(sched, "r", prompt(10), max_tokens=100, ignore_eos=True)
    drive(sched)
    assert seq.num_tokens == 16 and seq.finish_reason == "length"


# ---- finishing ------------------------------------------------------------------------------


def step_with(sched: Scheduler, tokens: dict[str, int]) -> list[Sequence]:
    out = sched.schedule()
    for s in out.scheduled:
        s.token_id = tokens.get(s.seq.request_id) if s.samples else None
    return sched.postprocess(out)


def test_stop_conditions():
    sched = make_scheduler(max_model_len=12)
    plain = add(sched, "plain", prompt(4))
    ignore = add(sched, "ignore", prompt(4), ignore_eos=True)
    custom = add(sched, "custom", prompt(4), stop_token_ids=[9])
    custom_ignore = add(sched, "custom-ignore", prompt(4), stop_token_ids=[9], ignore_eos=True)
    short = add(sched, "short", prompt(4), max_tokens=2, ignore_eos=True)
    near_limit = add(sched, "near-limit", prompt(10), ignore_eos=True)
    full = add(sched, "full", prompt(12))
    everyone = ["plain", "ignore", "custom", "custom-ignore", "short", "near-limit", "full"]
    got = step_with(sched, dict.fromkeys(everyone, 0))  # every sequence samples eos
    assert [s.request_id for s in got] == everyone
    # stop_token_ids add to EOS (vLLM); ignore_eos ignores EOS only.
    assert (plain.finish_reason, ignore.finish_reason, custom.finish_reason) == ("stop", None, "stop")
    assert custom.stop_reason is None  # EOS is not named
    assert full.finish_reason == "stop"
    assert not custom_ignore.is_finished and not short.is_finished and not near_limit.is_finished
    step_with(sched, {"ignore": 5, "custom-ignore": 9, "short": 5, "near-limit": 5})
    assert custom_ignore.finish_reason == "stop" and custom_ignore.stop_reason == 9
    assert short.finish_reason == "length" and short.output_token_ids == [0, 5]
    assert near_limit.finish_reason == "length" and near_limit.num_tokens == 12
    step_with(sched, {"ignore": 5})
    assert not ignore.is_finished
    sched.abort("ignore")
    assert not sched.has_unfinished() and sched.block_manager.num_used_blocks == 0
    # A prompt that fills max_model_len gets exactly one token.
    sched = make_scheduler(max_model_len=12)
    one = add(sched, "one", prompt(12), ignore_eos=True)
    drive(sched)
    assert one.num_output_tokens == 1 and one.finish_reason == "length"


def test_abort_frees_blocks_at_once_waiting_and_running():
    sched = make_scheduler(num_blocks=20, max_num_batched_tokens=40, max_num_seqs=2)
    model = FakeModel(sched)
    decoding = add(sched, "decoding", prompt(30), max_tokens=50, ignore_eos=True)
    prefilling = add(sched, "prefilling", prompt(100, 1), max_tokens=5, ignore_eos=True)
    waiting = add(sched, "waiting", prompt(30, 2))
    for _ in range(2):
        out = sched.schedule()
        sched.postprocess(model.run(out))
    assert decoding.num_output_tokens > 0 and 0 < prefilling.num_computed_tokens < 100
    assert waiting.status is SequenceStatus.WAITING
    bm = sched.block_manager
    held = len(prefilling.block_table)
    used = bm.num_used_blocks
    assert sched.abort("prefilling") is prefilling
    assert bm.num_used_blocks == used - held and prefilling.block_table == []
    assert prefilling.finish_reason == "abort" and prefilling.is_finished
    assert sched.abort("waiting") is waiting and sched.num_waiting == 0
    sched.check_integrity()
    # Aborted while its step is in flight: postprocess skips it.
    out = sched.schedule()
    model.run(out)
    assert sched.abort("decoding") is decoding
    assert bm.num_used_blocks == 0
    assert sched.postprocess(out) == []
    assert sched.abort("decoding") is None and sched.abort("unknown") is None
    sched.check_integrity()
    assert not sched.has_unfinished()


def test_finish_by_the_engine_frees_blocks():
    sched = make_scheduler()
    seq = add(sched, "r", prompt(40), max_tokens=50)
    step_with(sched, {"r": 5})
    assert sched.block_manager.num_used_blocks == 3
    sched.finish(seq, "stop")
    assert seq.finish_reason == "stop" and sched.block_manager.num_used_blocks == 0
    sched.finish(seq, "error")  # a second finish changes nothing
    assert seq.finish_reason == "stop"
    sched.check_integrity()


def test_postprocess_rejects_a_missing_token():
    sched = make_scheduler()
    add(sched, "r", prompt(5))
    out = sched.schedule()
    with pytest.raises(ValueError, match="no token sampled"):
        sched.postprocess(out)
    sched.check_integrity()
    out.scheduled[0].token_id = 3
    assert sched.postprocess(out)[0].output_token_ids == [3]
    sched.abort("r")


# ---- randomized -----------------------------------------------------------------------------

BASE = prompt(120, 9)

add_op = st.tuples(
    st.just("add"),
    st.integers(0, 120),  # length of the shared base prefix
    st.lists(st.integers(0, VOCAB - 1), max_size=30),  # own tail
    st.integers(1, 25),  # max_tokens
    st.booleans(),  # ignore_eos
)
operation = st.one_of(
    add_op,
    add_op,
    st.tuples(st.just("step"), st.integers(1, 6)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    pool_tokens=st.integers(24, 300),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 8),
    caching=st.booleans(),
    initial=st.lists(add_op, min_size=2, max_size=8),
    ops=st.lists(operation, max_size=30),
)
def test_random_workloads_keep_invariants_and_match_solo_runs(
    block_size, pool_tokens, budget, max_num_seqs, caching, initial, ops
):
    num_blocks = max(1, pool_tokens // block_size)
    max_len = min(150, num_blocks * block_size)
    sched = make_scheduler(
        num_blocks=num_blocks,
        max_model_len=max_len,
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=caching,
    )
    model = FakeModel(sched)
    seqs: list[Sequence] = []
    aborted: set[str] = set()

    def one_step() -> None:
        before = list(sched.running)
        out = sched.schedule()
        check_step(sched, out, before)
        sched.postprocess(model.run(out))
        sched.check_integrity()

    for op in initial + ops:
        if op[0] == "add":
            _, base_len, tail, max_tokens, ignore_eos = op
            ids = (BASE[:base_len] + tail)[:max_len] or [1]
            seqs.append(
                add(sched, f"r{len(seqs)}", ids, max_tokens=max_tokens, ignore_eos=ignore_eos)
            )
        elif op[0] == "step":
            for _ in range(op[1]):
                if sched.has_unfinished():
                    one_step()
        elif seqs:
            seq = seqs[op[1] % len(seqs)]
            was_live = not seq.is_finished
            assert (sched.abort(seq.request_id) is seq) == was_live
            if was_live:
                aborted.add(seq.request_id)
            sched.check_integrity()
    drive(sched, model)
    event(f"preempted: {sched.num_preemptions > 0}")
    event(f"prefix cache hits: {sched.block_manager.prefix_cache_hits > 0}")
    event(f"aborted: {bool(aborted)}")
    for seq in seqs:
        want, reason = solo_output(seq.token_ids[: seq.num_prompt_tokens], seq.params, max_len)
        if seq.request_id in aborted:
            assert seq.finish_reason == "abort"
            assert want[: seq.num_output_tokens] == seq.output_token_ids
        else:
            assert (seq.output_token_ids, seq.finish_reason) == (want, reason)
