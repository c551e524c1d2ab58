"""The sampler against independent references: HF transformers' logits processors and warpers,
the OpenAI penalty formula written out by hand, and the empirical distribution of many draws."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import engine.sampler as sampler_module
from engine.sampler import Sampler, SamplingRow, make_generator
from engine.sampling_params import SamplingParams

VOCAB = 2048


def row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    generator = make_generator(seed, "cpu") if seed is not None else None
    return SamplingRow(SamplingParams(seed=seed, **params), list(prompt), list(output), generator)


def hf_warped(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF's warpers in generate()'s order (temperature, top-k, top-p, min-p) on one row [1, V]."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k != -1:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    return warpers(torch.zeros((1, 0), dtype=torch.long), logits.clone())


def openai_penalized(
    logits: torch.Tensor, output: list[int], params: SamplingParams
) -> torch.Tensor:
    """OpenAI's formula from a Python Counter: logit - count * frequency - (count > 0) * presence."""
    out = logits.clone()
    for token, count in Counter(output).items():
        out[token] -= count * params.frequency_penalty + params.presence_penalty
    return out


def hf_repetition(logits: torch.Tensor, ids: list[int], penalty: float) -> torch.Tensor:
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    return processor(torch.tensor([ids]), logits.clone().unsqueeze(0)).squeeze(0)


def assert_same_distribution(probs: torch.Tensor, expected: torch.Tensor) -> None:
    """Same support, and the same log-probabilities on it (so tiny probabilities count too)."""
    assert torch.equal(probs > 0, expected > 0)
    support = expected > 0
    torch.testing.assert_close(probs[support].log(), expected[support].log(), atol=1e-4, rtol=0)


@pytest.fixture
def logits() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn((6, VOCAB), generator=generator) * 3.0


FILTER_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.7, top_k=20, top_p=0.8),  # top-p on the top-k candidates, no sort
    dict(temperature=1.0, top_k=1500, top_p=0.95),  # top-k above the candidate limit: full sort
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=1.1, top_k=50, top_p=0.9, min_p=0.1),
    dict(temperature=0.5, top_k=1),
    dict(temperature=2.0, top_k=VOCAB + 10),
    dict(temperature=1.0, top_p=0.3, min_p=0.2),
    dict(temperature=1.0, top_p=1e-9),  # only the most likely token survives
    dict(temperature=1.0, top_k=5, top_p=1e-9),
]


def test_filters_match_transformers_row_by_row(logits):
    """One batch whose rows all use different settings; each row equals HF's warpers on it."""
    logits = logits.repeat(2, 1)[: len(FILTER_CASES)]
    rows = [row(**case) for case in FILTER_CASES]
    probs = Sampler(VOCAB, "cpu").sampling_probs(logits, rows)
    for i, r in enumerate(rows):
        expected = hf_warped(logits[i : i + 1], r.params).softmax(dim=-1)[0]
        assert_same_distribution(probs[i], expected)
    kept = (probs > 0).sum(dim=-1).tolist()
    assert kept[1] == 20 and kept[7] == 1 and kept[8] == VOCAB and 1 < kept[3] < 20
    assert kept[-2:] == [1, 1]


def test_ties_are_kept_together():
    """Tied logits (common with bf16 logits): top-k keeps every tie like HF; top-p keeps every
    token tied with its last kept one, where HF keeps an arbitrary subset of them."""
    base = torch.zeros(16)
    base[:6] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 3.0])
    cases = [dict(top_k=3), dict(top_k=3, top_p=0.9), dict(top_p=0.9), dict(top_k=2000, top_p=0.9)]
    rows = [row(**c) for c in cases]
    probs = torch.cat([Sampler(16, "cpu").sampling_probs(base[None], [r]) for r in rows])
    for i, r in enumerate(rows):
        hf = hf_warped(base[None], r.params).softmax(dim=-1)[0]
        kept, hf_kept = probs[i] > 0, hf > 0
        assert torch.equal(kept, torch.arange(16) < 6), cases[i]
        assert (hf_kept & ~kept).sum() == 0
        assert torch.all(base[kept & ~hf_kept] == base[hf_kept].min())
    assert_same_distribution(probs[0], hf_warped(base[None], rows[0].params).softmax(dim=-1)[0])


def test_each_row_filters_alone_whatever_the_batch(logits):
    """A row's distribution is the same alone and next to rows that take other code paths."""
    sampler = Sampler(VOCAB, "cpu")
    rows = [row(**case) for case in FILTER_CASES]
    batch = logits.repeat(2, 1)[: len(rows)]
    together = sampler.sampling_probs(batch, rows)
    for i, r in enumerate(rows):
        alone = sampler.sampling_probs(batch[i : i + 1], [r])
        assert torch.equal(alone[0], together[i]), FILTER_CASES[i]


def test_greedy_is_argmax_and_input_untouched(logits):
    before = logits.clone()
    rows = [row(temperature=0.0, top_k=3, top_p=0.1, seed=i) for i in range(logits.shape[0])]
    ids = Sampler(VOCAB, "cpu")(logits, rows)
    assert ids.dtype == torch.int64 and ids.shape == (logits.shape[0],)
    assert torch.equal(ids, logits.argmax(dim=-1))
    assert torch.equal(logits, before)


def test_all_greedy_without_penalties_skips_every_filter(logits, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the greedy fast path must not filter")

    monkeypatch.setattr(Sampler, "_filtered_probs", boom)
    monkeypatch.setattr(Sampler, "_apply_penalties", boom)
    ids = Sampler(VOCAB, "cpu")(logits, [row(temperature=0.0) for _ in range(6)])
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_full_vocabulary_sort_only_for_rows_that_need_it(logits, monkeypatch):
    """top-k alone or with top-p uses topk; only top-p without top-k sorts the vocabulary."""
    sampler = Sampler(VOCAB, "cpu")
    sorts = []
    original = Sampler._cut_from_sort

    def counting(self, x, ks, top_ps):
        sorts.append(x.shape[0])
        return original(self, x, ks, top_ps)

    monkeypatch.setattr(Sampler, "_cut_from_sort", counting)
    cheap = [row(top_k=20), row(top_k=40, top_p=0.9), row(min_p=0.1), row(), row(temperature=0)]
    sampler(logits[:5], cheap)
    assert sorts == []
    sampler(logits, [*cheap, row(top_p=0.9)])
    assert sorts == [1]  # just the one row that needs it
    big_k = sampler_module.TRUNCATED_TOP_K + 1
    sampler(logits[:2], [row(top_k=20), row(top_k=big_k)])
    assert sorts == [1, 1]


def test_repetition_penalty_matches_transformers(logits):
    prompt, output = [5, 9, 9, 100, 2047], [9, 17, 3000 % VOCAB, 17]
    seen = sorted(set(prompt + output))
    base = logits[0].clone()
    # Make a repeated token the argmax by a small margin, with both signs among the seen logits.
    base[17] = base.max() + 0.1
    base[5] = -4.0
    cases = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.8),
        dict(repetition_penalty=2.0),
    ]
    batch = base.repeat(len(cases) * 2, 1)
    rows = [row(prompt, output, temperature=0.0, **c) for c in cases]
    rows += [row(prompt, output, temperature=1.0, **c) for c in cases]
    sampler = Sampler(VOCAB, "cpu")
    ids = sampler(batch, rows)
    probs = sampler.sampling_probs(batch, rows)
    for i, c in enumerate(cases):
        expected = hf_repetition(base, prompt + output, c["repetition_penalty"])
        assert ids[i].item() == expected.argmax().item()
        assert_same_distribution(probs[len(cases) + i], expected.softmax(dim=-1))
    assert ids[0].item() != 17  # 1.3 divides the repeated argmax below the runner-up
    unseen = torch.ones(VOCAB, dtype=torch.bool)
    unseen[seen] = False
    ratio = probs[len(cases)][unseen] / base.softmax(dim=-1)[unseen]
    assert ratio.min() > 1.0  # penalizing seen tokens moves mass to unseen ones


def test_presence_and_frequency_match_openai_formula(logits):
    outputs = [[3, 3, 3, 8], [], [1, 2, 3, 4, 4, 4000 % VOCAB], [7] * 10]
    cases = [
        dict(presence_penalty=0.5, frequency_penalty=0.3),
        dict(presence_penalty=2.0, frequency_penalty=2.0),
        dict(presence_penalty=-1.0, frequency_penalty=0.0),
        dict(presence_penalty=0.0, frequency_penalty=-0.7),
    ]
    rows = [row([3, 7, 11], out, **c) for out, c in zip(outputs, cases)]
    probs = Sampler(VOCAB, "cpu").sampling_probs(logits[:4], rows)
    for i, r in enumerate(rows):
        expected = openai_penalized(logits[i], r.output_token_ids, r.params)
        assert_same_distribution(probs[i], expected.softmax(dim=-1))


def test_all_penalties_together_in_vllm_order(logits):
    """Repetition (HF) first, then frequency and presence, then temperature and filters."""
    prompt, output = [1, 2, 3, 50], [50, 50, 60, 2]
    params = dict(
        repetition_penalty=1.2,
        presence_penalty=0.4,
        frequency_penalty=0.6,
        temperature=0.8,
        top_k=30,
        top_p=0.9,
    )
    r = row(prompt, output, **params)
    expected = openai_penalized(hf_repetition(logits[0], prompt + output, 1.2), output, r.params)
    expected = hf_warped(expected.unsqueeze(0), r.params).softmax(dim=-1)[0]
    probs = Sampler(VOCAB, "cpu").sampling_probs(logits[:1], [r])[0]
    assert_same_distribution(probs, expected)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_empirical_distribution_matches_softmax():
    """20k unseeded draws in one call follow softmax(logits / T): chi-square and max-abs error."""
    torch.manual_seed(0)
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.2, 1.2])
    n, temperature = 20_000, 0.7
    ids = Sampler(10, "cpu")(base.repeat(n, 1), [row(temperature=temperature)] * n)
    counts = torch.bincount(ids, minlength=10).float()
    expected = (base / temperature).softmax(dim=-1)
    assert (counts / n - expected).abs().max() < 0.015
    assert chi_square(counts, expected) < 27.88  # chi-square, 9 degrees of freedom, p = 0.001


def test_empirical_distribution_of_filtered_seeded_rows():
    """5k rows, each with its own seed, under top-k/top-p/min-p: draws follow HF's distribution."""
    base = torch.tensor([3.0, 2.6, 2.2, 2.0, 1.0, 0.5, 0.4, -1.0, -3.0, 0.9, 1.9, 2.5])
    params = dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.1)
    expected = hf_warped(base.unsqueeze(0), SamplingParams(**params)).softmax(dim=-1)[0]
    n = 5000
    ids = Sampler(12, "cpu")(base.repeat(n, 1), [row(seed=s, **params) for s in range(n)])
    counts = torch.bincount(ids, minlength=12).float()
    assert torch.equal(counts > 0, expected > 0)
    assert (counts / n - expected).abs().max() < 0.03
    assert int((expected > 0).sum()) == 6
    assert chi_square(counts, expected) < 20.52  # chi-square, 5 degrees of freedom, p = 0.001


def run_steps(logits_per_step, layouts, seed_params):
    """Tokens of the seeded request over several steps; `layouts[t]` = (mates, position)."""
    sampler = Sampler(VOCAB, "cpu")
    target = row(**seed_params)
    tokens = []
    for step, (step_logits, (mates, position)) in enumerate(zip(logits_per_step, layouts)):
        torch.manual_seed(1000 + step * 17 + len(mates))  # the global generator differs per run
        rows = list(mates)
        rows.insert(position, target)
        batch = step_logits.repeat(len(rows), 1) + torch.randn(len(rows), VOCAB)
        batch[position] = step_logits
        ids = sampler(batch, rows)
        tokens.append(int(ids[position]))
        target.output_token_ids.append(tokens[-1])
    return tokens


@pytest.mark.parametrize(
    "seed_params",
    [
        dict(seed=1234, temperature=1.0),
        dict(seed=99, temperature=0.8, top_k=50, top_p=0.9),
        dict(seed=7, temperature=1.2, top_p=0.95, min_p=0.02, presence_penalty=0.5),
    ],
)
def test_seed_reproducible_whatever_the_batch(seed_params):
    generator = torch.Generator().manual_seed(3)
    steps = [torch.randn(VOCAB, generator=generator) * 2.0 for _ in range(8)]
    alone = run_steps(steps, [([], 0)] * len(steps), seed_params)

    def mates(step):
        return [
            row(temperature=1.0),
            row(temperature=0.0),
            row(seed=step, top_p=0.5),  # another seeded row
            row(top_k=5, repetition_penalty=1.5, prompt=[1, 2]),
            row(top_p=0.7),  # a full-vocabulary sort in the same call
        ][: step % 5 + 1]

    layouts = [(mates(t), (t * 3) % (len(mates(t)) + 1)) for t in range(len(steps))]
    assert run_steps(steps, layouts, seed_params) == alone
    reordered = [(list(reversed(m)), len(m) - p) for m, p in layouts]
    assert run_steps(steps, reordered, seed_params) == alone
    other_seed = dict(seed_params, seed=seed_params["seed"] + 1)
    assert run_steps(steps, [([], 0)] * len(steps), other_seed) != alone


def test_mixed_batch_in_one_call(logits):
    """Greedy, sampled, seeded and penalized rows in one call each behave as they do alone."""
    output = [int(logits[1].argmax()), 4, 4]
    rows = [
        row(temperature=0.0),
        row(temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.0, output=output),
        row(temperature=0.8, top_k=10),
        row(temperature=0.7, top_p=0.8, seed=42),
        row(temperature=1.0, top_k=30, top_p=0.9, presence_penalty=1.5, output=output, seed=5),
        row(temperature=1.0, min_p=0.3),
    ]
    sampler = Sampler(VOCAB, "cpu")
    ids = sampler(logits, rows)
    assert ids.shape == (6,) and ids.dtype == torch.int64
    assert ids[0].item() == logits[0].argmax().item()
    penalized = openai_penalized(hf_repetition(logits[1], output, 3.0), output, rows[1].params)
    assert ids[1].item() == penalized.argmax().item() != output[0]
    for i in (2, 3, 5):
        allowed = hf_warped(logits[i : i + 1], rows[i].params)[0] > float("-inf")
        assert allowed[ids[i]]
    allowed = hf_warped(openai_penalized(logits[4], output, rows[4].params)[None], rows[4].params)
    assert allowed[0, ids[4]] > float("-inf")
    for i in (3, 4):
        params = {k: v for k, v in vars(rows[i].params).items() if k != "seed"}
        solo = row(
            rows[i].prompt_token_ids, rows[i].output_token_ids, rows[i].params.seed, **params
        )
        assert sampler(logits[i : i + 1], [solo]).item() == ids[i].item()


def test_make_generator_is_deterministic_for_any_int():
    for seed in (0, 1, 2**64 + 5, -3):
        a = torch.rand(5, generator=make_generator(seed, "cpu"))
        b = torch.rand(5, generator=make_generator(seed, torch.device("cpu")))
        assert torch.equal(a, b)
    assert not torch.equal(
        torch.rand(5, generator=make_generator(1, "cpu")),
        torch.rand(5, generator=make_generator(2, "cpu")),
    )


def test_ids_beyond_the_vocabulary_are_ignored_by_penalties(logits):
    """Token ids the output layer cannot produce (embedding rows beyond it) change nothing."""
    rows = [row([VOCAB + 5], [VOCAB + 1, 3], repetition_penalty=1.5, frequency_penalty=1.0)]
    probs = Sampler(VOCAB, "cpu").sampling_probs(logits[:1], rows)
    expected = openai_penalized(hf_repetition(logits[0], [3], 1.5), [3], rows[0].params)
    assert_same_distribution(probs[0], expected.softmax(dim=-1))


def test_rejects_mismatched_rows(logits):
    with pytest.raises(ValueError, match="sampling rows"):
        Sampler(VOCAB, "cpu")(logits, [row()])


def test_sample_reads_back_ids_and_the_raw_logprobs_rows_asked_for():
    """Log-probabilities are the raw model distribution's (before penalties and temperature):
    the row's top-k plus the sampled token; None for rows that did not ask."""
    torch.manual_seed(5)
    logits = torch.randn(4, VOCAB) * 3
    rows = [
        row(temperature=0.0, logprobs=3),
        row(temperature=0.0),
        row(temperature=0.7, top_k=50, output=[1, 2], repetition_penalty=1.5, seed=1, logprobs=0),
        row(temperature=1.0, seed=2, logprobs=20),
    ]
    ids, logprobs = Sampler(VOCAB, "cpu").sample(logits, rows)
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    assert ids[0] == int(logits[0].argmax()) and ids[1] == int(logits[1].argmax())
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[1] is None
    top3 = reference[0].topk(3)
    assert logprobs[0] == pytest.approx(dict(zip(top3.indices.tolist(), top3.values.tolist())))
    assert logprobs[2] == pytest.approx({ids[2]: reference[2, ids[2]].item()})
    entry = logprobs[3]
    assert entry is not None and len(entry) in (20, 21) and ids[3] in entry
    assert entry[ids[3]] == pytest.approx(reference[3, ids[3]].item())
