"""Turns a batch's logits into next-token ids on the model's device.

The semantics follow HF transformers and vLLM so that results can be checked against them:

0. a structured-output row's grammar bitmask first (engine.structured_output: the tokens its
   grammar forbids at -inf, on that row only), then logit_bias added, and the stop ids a row
   may not pick yet (min_tokens) masked to -inf, as vLLM's logits processors do before penalties;
1. penalties on those logits: repetition (HF: over prompt + output tokens, positive logits
   divided, negative multiplied), then frequency and presence (OpenAI: over output tokens,
   `logit - count * frequency - (count > 0) * presence`);
2. greedy rows (temperature 0) take the argmax of the penalized logits;
3. sampled rows: temperature, top-k (ties with the k-th value kept, as HF does), top-p (tokens
   tied with the last kept one kept too, where HF keeps an arbitrary subset of them), min-p
   (relative to the most likely token), in HF's order, then an exponential race `argmax(p / E)` with
   `E ~ Exp(1)`: an exact categorical draw that needs one noise tensor and no cumulative sums.

Every filter is computed from the row's own logits and parameters, and a seeded row draws its
noise from its own generator only, so a seed gives the same tokens whatever the batch mates.
Everything stays on the device: per-row settings travel in a few small host-to-device copies
and nothing is read back until `SampledTokens.read()` reads the ids (and the log-probabilities
rows asked for) back in one go: the step's one sync, which the engine can put off until it has
done other host work (engine.llm_engine: async output).

Log-probabilities are those of the model's raw distribution (`log_softmax` of the logits,
before penalties, temperature and filters), as vLLM and the OpenAI API report them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.structured_output import GrammarState, apply_grammar_bitmasks

# Rows whose top_k is at most this run top-p on their top-k candidates (a cheap `topk`);
# only rows with top-p and no (or a larger) top-k pay for a full-vocabulary sort.
TRUNCATED_TOP_K = 1024
# Most top log-probabilities a row may ask for (SamplingParams.logprobs is checked against it).
MAX_LOGPROBS = 20


@dataclass
class SamplingRow:
    """What the sampler needs about one request: its settings, its tokens, its own generator."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # from make_generator when params.seed is set
    banned_ids: Sequence[int] = ()  # may not be sampled this step (EOS before min_tokens)
    grammar: GrammarState | None = None  # the request's grammar matcher (structured output)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (any Python int; reduced modulo 2**64)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed % (1 << 64))
    return generator


def has_logit_processing(row: SamplingRow) -> bool:
    return bool(row.params.logit_bias) or bool(row.banned_ids)


def has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


@dataclass
class SampledTokens:
    """A batch's sampled ids (and the log-probabilities its rows asked for) still on the device."""

    token_ids: torch.Tensor  # [N] int64
    wanted: list[int | None]  # per row, how many top log-probabilities it asked for
    chosen: torch.Tensor | None = None  # [N] log-probability of each sampled id
    top_ids: torch.Tensor | None = None  # [N, k] the most likely ids of the raw distribution
    top_values: torch.Tensor | None = None

    def read(self) -> tuple[list[int], list[dict[int, float] | None]]:
        """Wait for the device; the ids and per row its log-probabilities (None: not asked)."""
        ids = self.token_ids.tolist()
        if self.chosen is None:
            return ids, [None] * len(ids)
        chosen = self.chosen.tolist()
        top_ids = self.top_ids.tolist() if self.top_ids is not None else [[] for _ in ids]
        top_values = self.top_values.tolist() if self.top_values is not None else [[] for _ in ids]
        logprobs: list[dict[int, float] | None] = []
        for i, k in enumerate(self.wanted):
            if k is None:
                logprobs.append(None)
                continue
            entry = dict(zip(top_ids[i][:k], top_values[i][:k]))
            entry[ids[i]] = chosen[i]
            logprobs.append(entry)
        return ids, logprobs


class Sampler:
    """Penalties, greedy and filtered random sampling for a batch of rows, vectorized."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"

    # ---- public -------------------------------------------------------------------------------

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[list[int], list[dict[int, float] | None]]:
        """Next-token ids on the host, and per row the top log-probabilities it asked for.

        A row's log-probabilities are its `params.logprobs` most likely tokens of the raw model
        distribution plus the sampled token (None when the row did not ask).
        """
        return self.sample_on_device(logits, rows).read()

    def sample_on_device(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampledTokens:
        """`sample` without the read back: the work is queued on the device and nothing waits
        for it until `SampledTokens.read()` (the step's one sync)."""
        token_ids = self(logits, rows)
        wanted = [r.params.logprobs for r in rows]
        if all(k is None for k in wanted):
            return SampledTokens(token_ids, wanted)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        k_max = min(max(k for k in wanted if k is not None), MAX_LOGPROBS)
        top = log_probs.topk(k_max, dim=-1) if k_max > 0 else None
        chosen = log_probs.gather(1, token_ids.view(-1, 1)).view(-1)
        return SampledTokens(
            token_ids,
            wanted,
            chosen,
            top.indices if top is not None else None,
            top.values if top is not None else None,
        )

    def logprobs_of(
        self, logits: torch.Tensor, targets: Sequence[int], k: int
    ) -> list[dict[int, float]]:
        """Per row, the raw log-probabilities of its `k` most likely tokens and of its target."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        target_ids = self._tensor(list(targets), torch.int64)
        chosen = log_probs.gather(1, target_ids.view(-1, 1)).view(-1).tolist()
        k = min(k, MAX_LOGPROBS)
        top = log_probs.topk(k, dim=-1) if k > 0 else None
        top_ids = top.indices.tolist() if top is not None else [[] for _ in targets]
        top_values = top.values.tolist() if top is not None else [[] for _ in targets]
        out = []
        for i, target in enumerate(targets):
            entry = dict(zip(top_ids[i], top_values[i]))
            entry[target] = chosen[i]
            out.append(entry)
        return out

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Next-token ids [N] (int64, on the device) for logits [N, V]; `logits` is not modified."""
        logits = self._check(logits, rows)
        logits = apply_grammar_bitmasks(logits, [r.grammar for r in rows])
        logits = self._apply_logit_processing(logits, rows)
        penalized = [i for i, r in enumerate(rows) if has_penalty(r.params)]
        if penalized:
            logits = self._apply_penalties(logits, rows, penalized)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not sampled:
            return logits.argmax(dim=-1)
        sampled_rows = [rows[i] for i in sampled]
        probs = self._filtered_probs(self._take(logits, sampled), sampled_rows)
        sampled_ids = self._draw(probs, sampled_rows)
        if len(sampled) == len(rows):
            return sampled_ids
        ids = logits.argmax(dim=-1)
        return ids.index_copy_(0, self._tensor(sampled, torch.int64), sampled_ids)

    def sampling_probs(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The distribution [N, V] each row is drawn from (one-hot at the argmax for greedy rows).

        Same computation as `__call__` up to the draw; for tests and debugging. (Reported
        log-probabilities are not these: `sample` takes them from the raw logits.)
        """
        logits = self._check(logits, rows)
        logits = apply_grammar_bitmasks(logits, [r.grammar for r in rows])
        logits = self._apply_logit_processing(logits, rows)
        penalized = [i for i, r in enumerate(rows) if has_penalty(r.params)]
        if penalized:
            logits = self._apply_penalties(logits, rows, penalized)
        probs = torch.zeros_like(logits)
        probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            p = self._filtered_probs(self._take(logits, sampled), [rows[i] for i in sampled])
            p = p / p.sum(dim=-1, keepdim=True)
            probs.index_copy_(0, self._tensor(sampled, torch.int64), p)
        return probs

    # ---- steps --------------------------------------------------------------------------------

    def _check(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(rows)} sampling rows"
            )
        return logits if logits.dtype == torch.float32 else logits.float()

    def _apply_logit_processing(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> torch.Tensor:
        """logit_bias added and banned ids set to -inf, per row (a new tensor when any row has them)."""
        if not any(has_logit_processing(r) for r in rows):
            return logits
        vocab = logits.shape[1]
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_values: list[float] = []
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for i, r in enumerate(rows):
            for token, value in (r.params.logit_bias or {}).items():
                if 0 <= token < vocab:
                    bias_rows.append(i)
                    bias_cols.append(token)
                    bias_values.append(float(value))
            for token in r.banned_ids:
                if 0 <= token < vocab:
                    ban_rows.append(i)
                    ban_cols.append(token)
        logits = logits.clone()
        if bias_rows:
            index = (self._tensor(bias_rows, torch.int64), self._tensor(bias_cols, torch.int64))
            logits.index_put_(index, self._tensor(bias_values, torch.float32), accumulate=True)
        if ban_rows:
            index = (self._tensor(ban_rows, torch.int64), self._tensor(ban_cols, torch.int64))
            logits.index_put_(index, self._tensor([float("-inf")] * len(ban_rows), torch.float32))
        return logits

    def _apply_penalties(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], penalized: list[int]
    ) -> torch.Tensor:
        """Repetition, then frequency and presence penalties on the penalized rows (a new tensor)."""
        params = [rows[i].params for i in penalized]
        n, vocab = len(penalized), logits.shape[1]
        sub = self._take(logits, penalized)
        # Token counts through scatter_add over a padded id matrix; padding lands in column V.
        output_ids = self._padded([rows[i].output_token_ids for i in penalized], vocab)
        counts = torch.zeros((n, vocab + 1), dtype=torch.float32, device=logits.device)
        counts.scatter_add_(1, output_ids, torch.ones(output_ids.shape, device=logits.device))
        counts = counts[:, :vocab]
        settings = self._tensor(
            [
                [p.repetition_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.presence_penalty for p in params],
            ],
            torch.float32,
        ).unsqueeze(2)
        if any(p.repetition_penalty != 1.0 for p in params):
            prompt_ids = self._padded(
                [
                    rows[i].prompt_token_ids if p.repetition_penalty != 1.0 else ()
                    for i, p in zip(penalized, params)
                ],
                vocab,
            )
            seen = torch.zeros((n, vocab + 1), dtype=torch.bool, device=logits.device)
            seen.scatter_(1, prompt_ids, True)
            seen = seen[:, :vocab] | (counts > 0)
            penalty = settings[0]
            sub = torch.where(seen, torch.where(sub < 0, sub * penalty, sub / penalty), sub)
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            sub = sub - settings[1] * counts - settings[2] * (counts > 0)
        if n == logits.shape[0]:
            return sub
        return logits.index_copy(0, self._tensor(penalized, torch.int64), sub)

    def _filtered_probs(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Probabilities after temperature, top-k, top-p and min-p (rows not renormalized)."""
        params = [r.params for r in rows]
        settings = self._tensor(
            [[p.temperature for p in params], [p.min_p for p in params]], torch.float32
        ).unsqueeze(2)
        x = logits / settings[0]
        cut = self._top_k_top_p_cut(x, params)
        if cut is not None:
            x = x.masked_fill(x < cut, float("-inf"))
        probs = x.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            # Applied after top-k/top-p like HF: their renormalization scales every kept
            # probability and the maximum alike, so the relative test is unchanged.
            probs = probs.masked_fill(probs < settings[1] * probs.amax(dim=-1, keepdim=True), 0.0)
        return probs

    def _top_k_top_p_cut(
        self, x: torch.Tensor, params: list[SamplingParams]
    ) -> torch.Tensor | None:
        """Per-row logit threshold [M, 1] below which top-k/top-p remove a token (None: no row filters)."""
        vocab = x.shape[1]
        ks = [vocab if p.top_k == -1 else min(p.top_k, vocab) for p in params]
        small = [
            i for i, (p, k) in enumerate(zip(params, ks)) if p.top_k != -1 and k <= TRUNCATED_TOP_K
        ]
        small_set = set(small)
        full = [
            i
            for i, p in enumerate(params)
            if i not in small_set and (p.top_k != -1 or p.top_p < 1.0)
        ]
        if not small and not full:
            return None
        groups = [
            (rows, method)
            for rows, method in (
                (small, self._cut_from_top_candidates),
                (full, self._cut_from_sort),
            )
            if rows
        ]
        if len(groups) == 1 and len(groups[0][0]) == len(params):
            rows, method = groups[0]
            return method(x, [ks[i] for i in rows], [params[i].top_p for i in rows])
        cut = torch.full((len(params), 1), float("-inf"), device=x.device)
        for rows, method in groups:
            part = method(
                self._take(x, rows), [ks[i] for i in rows], [params[i].top_p for i in rows]
            )
            cut.index_copy_(0, self._tensor(rows, torch.int64), part)
        return cut

    def _cut_from_top_candidates(
        self, x: torch.Tensor, ks: list[int], top_ps: list[float]
    ) -> torch.Tensor:
        """Top-k, then top-p among the top-k candidates: no full-vocabulary sort.

        A token survives top-p when the probability of the tokens ranked above it is below p,
        which is HF's rule (cumulative probability from the bottom above 1 - p) read from the top.
        """
        values = x.topk(max(ks), dim=-1).values  # descending
        k = self._tensor(ks, torch.int64).unsqueeze(1)
        kth = values.gather(1, k - 1)
        if all(p >= 1.0 for p in top_ps):
            return kth
        top_p = self._tensor(top_ps, torch.float32).unsqueeze(1)
        # Normalize over every token top-k keeps, ties with the k-th value outside the candidates too.
        log_z = x.masked_fill(x < kth, float("-inf")).logsumexp(dim=-1, keepdim=True)
        probs = (values - log_z).exp().masked_fill(values < kth, 0.0)
        above = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
        # A prefix; at least the top token, also when p underflows to 0 in float32 (p < 1e-45).
        num_kept = (above < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
        top_p_cut = values.gather(1, num_kept - 1)
        top_p_cut = top_p_cut.masked_fill(top_p >= 1.0, float("-inf"))
        return torch.maximum(kth, top_p_cut)

    def _cut_from_sort(self, x: torch.Tensor, ks: list[int], top_ps: list[float]) -> torch.Tensor:
        """Top-k and top-p over the ascending sort of the whole vocabulary, as HF and vLLM do."""
        vocab = x.shape[1]
        ordered = x.sort(dim=-1).values
        k = self._tensor(ks, torch.int64).unsqueeze(1)
        kth = ordered.gather(1, vocab - k)
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        limit = self._tensor([1.0 - p if p < 1.0 else -1.0 for p in top_ps], torch.float32)
        num_removed = (cumulative <= limit.unsqueeze(1)).sum(dim=-1, keepdim=True)
        # The most likely token always stays.
        first_kept = ordered.gather(1, num_removed.clamp_(max=vocab - 1))
        return torch.maximum(kth, first_kept)

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Exponential race: argmax(p / E), E = -log(U) ~ Exp(1) per token, U ~ Uniform[0, 1).

        Seeded rows draw their U from their own generator alone. -log(U) costs a fraction of
        `exponential_` on CPU; clamping U away from 0 keeps E finite, and E > 0 since U < 1,
        so a filtered-out token (p = 0) can never win and no NaN appears.
        """
        seeded = [(i, r.generator) for i, r in enumerate(rows) if r.generator is not None]
        noise = torch.empty_like(probs)
        if len(seeded) < len(rows):
            noise.uniform_()  # one draw for the unseeded rows from the default generator
        for i, generator in seeded:
            noise[i].uniform_(generator=generator)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny).log_().neg_()
        return probs.div_(noise).argmax(dim=-1)

    # ---- helpers ------------------------------------------------------------------------------

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the device without blocking the host (pinned copy on CUDA)."""
        tensor = torch.tensor(values, dtype=dtype)
        if self._pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _take(self, x: torch.Tensor, indices: list[int]) -> torch.Tensor:
        if len(indices) == x.shape[0]:
            return x
        return x.index_select(0, self._tensor(indices, torch.int64))

    def _padded(self, sequences: list[Sequence[int]], pad: int) -> torch.Tensor:
        """Token ids as an [n, L] int64 matrix padded with `pad`; ids >= pad are mapped to it."""
        width = max(1, max(len(s) for s in sequences))
        matrix = torch.full((len(sequences), width), pad, dtype=torch.int64)
        for i, ids in enumerate(sequences):
            if len(ids):
                matrix[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
        matrix.clamp_(0, pad)
        if self._pin:
            matrix = matrix.pin_memory()
        return matrix.to(self.device, non_blocking=True)
