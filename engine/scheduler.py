"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Every step carries all running decodes, then chunks of running prefills, then chunks of newly
admitted prompts, up to `max_num_batched_tokens` tokens; prefill chunks and decodes share the
batch, so a long document being read never freezes other streams. Blocks are allocated step by
step for the tokens actually scheduled. Priority is admission order: when blocks run out, a
sequence preempts the newest running sequences (their blocks are freed and they are recomputed
later, mostly from the prefix cache); the oldest sequence can always proceed on its own, so the
engine never deadlocks.

A prompt whose full blocks are all cache hits may continue, up to its last token, into the
partial block of a running sequence with the same prefix (the later choices of an `n > 1`
request): admission copies those computed slots into a fresh block of its own (copy on
write), so only the last token is computed. The copy runs in `SchedulerOutput.kv_copies`,
after the tiers' copies.

With lower KV tiers (engine.kv_tiers), admission continues the device pool's cached prefix in
the host tier and in blocks loaded from disk; when the disk holds more of a prompt's prefix, the
request first waits in a loading state (out of the waiting queue, holding no blocks) while the
disk tier's thread reads it, and the others keep stepping. A finished load puts the request back
at the head of the queue. Each step's block copies between tiers travel in
`SchedulerOutput.kv_copies`, in the order they were decided.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.kv_tiers import KVCopy, KVTiers, LowerHit
from engine.outputs import CachedPrefix
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ScheduledSequence:
    """One sequence's part of a step, from the scheduler through the runner to the outputs.

    The scheduler fills the plan: run `seq.token_ids[start : start + num_new_tokens]`. The
    model runner fills the results: the sampled `token_id` and its top `logprobs` when the chunk
    `samples`, or `error` when the model step failed for this sequence (the engine then drops
    the record before `Scheduler.postprocess`).
    """

    seq: Sequence
    num_new_tokens: int
    start: int  # seq.num_computed_tokens when scheduled
    token_id: int | None = None
    logprobs: dict[int, float] | None = None  # when seq.params.logprobs asked for them
    # Log-probabilities of the prompt tokens after `prompt_logprob_rows()` (params.prompt_logprobs).
    prompt_logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    _samples: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._samples = self.start + self.num_new_tokens >= self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so the step samples the next one."""
        return self._samples

    def prompt_logprob_rows(self) -> range:
        """Positions of this chunk whose logits give a prompt token's missing log-probabilities
        (position p predicts prompt token p + 1); empty unless the request asked for them."""
        seq = self.seq
        if seq.prompt_logprobs is None:
            return range(0)
        first = max(self.start, len(seq.prompt_logprobs) - 1)
        return range(first, min(self.start + self.num_new_tokens, seq.num_prompt_tokens - 1))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)  # decodes first, then prefills
    preempted: list[Sequence] = field(default_factory=list)
    # Block copies between the KV tiers, to run in this order before the forward pass.
    kv_copies: list[KVCopy] = field(default_factory=list)


@dataclass
class _Load:
    """A request waiting for its prefix's blocks from disk, from block `first` on."""

    seq: Sequence
    first: int
    future: Future[list[torch.Tensor]]
    started: float = field(default_factory=time.monotonic)


class Scheduler:
    """Decides which tokens of which sequences run each step and owns their lifecycle."""

    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        model_digest: bytes = b"",
        kv_tiers: KVTiers | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, model_digest
        )
        # The engine passes a max_model_len the pool can hold (LLMEngine fixes it once); one
        # given larger, as tests may, is capped the same way: a sequence stops growing where the
        # pool could no longer hold it alone.
        self.max_model_len = min(max_model_len, num_blocks * config.block_size)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        # Every running sequence gets at least one token of every step's budget.
        self.max_num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self._live: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # Prompt positions the model computed (postprocess): not served from a cache tier nor
        # copied; a chunked prompt counts once, a preempted one's recompute counts again.
        self.num_computed_prompt_tokens = 0
        # Admissions that copied a running sequence's partial prompt block, and this step's copies.
        self.num_partial_copies = 0
        self._device_copies: list[KVCopy] = []
        self.kv_tiers = kv_tiers
        if kv_tiers is not None:
            self.block_manager.on_evict = kv_tiers.on_evict
            self.block_manager.on_register = kv_tiers.on_register
            kv_tiers.max_unsaved = 4 * num_blocks
        self._loading: dict[str, _Load] = {}  # by request id, in order of their start
        self._staged: dict[str, dict[bytes, torch.Tensor]] = {}  # loaded blocks by key
        # Requests that had their disk load (one per admission: a failed one is not retried).
        self._loaded: set[str] = set()
        # How long each landed load took (start to landing), until the request is admitted.
        self._load_seconds: dict[str, float] = {}
        # Where each request's cached prefix came from, set at its first admission; the engine
        # takes it for the request's outputs (take_cached_prefix).
        self._cached_prefixes: dict[str, CachedPrefix] = {}

    # ---- requests ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._loading)

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError (with the numbers) if it could never be served."""
        n = seq.num_prompt_tokens
        if n == 0:
            raise ValueError("prompt is empty")
        if seq.request_id in self._live:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"{seq} was already scheduled")
        bm = self.block_manager
        need = bm.blocks_for(n)
        if need > bm.num_blocks:
            raise ValueError(
                f"prompt has {n} tokens and needs {need} KV blocks of {bm.block_size} tokens, "
                f"but the KV cache holds only {bm.num_blocks} blocks "
                f"({bm.num_blocks * bm.block_size} tokens)"
            )
        if n > self.max_model_len:
            raise ValueError(f"prompt has {n} tokens, more than max_model_len {self.max_model_len}")
        self.waiting.append(seq)
        self._live[seq.request_id] = seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (stop string, error, abort...) and free its blocks."""
        if seq.is_finished:
            return
        if self._live.get(seq.request_id) is seq:
            del self._live[seq.request_id]
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self.block_manager.free(seq)
            elif self._loading.pop(seq.request_id, None) is None:
                self.waiting.remove(seq)
            self._staged.pop(seq.request_id, None)
            self._loaded.discard(seq.request_id)
            self._load_seconds.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a waiting or running request with reason "abort"; its blocks are free at once."""
        seq = self._live.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens; each scheduled block table covers [0, start + num_new_tokens)."""
        step = _Step(self.max_num_batched_tokens)
        self._land_loads()
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, step.budget_left)
            n = self._reserve(seq, n, step)
            if n > 0:
                step.add(ScheduledSequence(seq, n, seq.num_computed_tokens))
        if not step.preempted:  # blocks are contended when something was just preempted
            self._admit_waiting(step)
        copies = self.kv_tiers.take_copies() if self.kv_tiers is not None else []
        copies += self._device_copies
        self._device_copies = []
        return SchedulerOutput(
            scheduled=list(step.scheduled.values()), preempted=step.preempted, kv_copies=copies
        )

    def _reserve(self, seq: Sequence, n: int, step: _Step) -> int:
        """Allocate blocks for n more tokens of a running seq, preempting newer sequences.

        With no newer sequence left to preempt, the chunk shrinks to what the free blocks hold
        (possibly nothing: the seq keeps its blocks and waits for older ones to free theirs).
        """
        bm = self.block_manager
        start = seq.num_computed_tokens
        while n > 0 and bm.num_new_blocks(seq, start + n) > bm.num_free_blocks:
            victim = self.running[-1]
            if victim is seq:
                capacity = (len(seq.block_table) + bm.num_free_blocks) * self.block_size - start
                n = min(n, capacity)
                break
            self._preempt(victim, step)
        if n > 0:
            bm.allocate(seq, start + n)
        return n

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        """Free a running sequence's blocks and requeue it first; it will be recomputed."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        step.remove(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._loaded.discard(seq.request_id)  # its blocks may be on disk by now
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        step.preempted.append(seq)

    def _admit_waiting(self, step: _Step) -> None:
        """Admit waiting sequences in order, each with its cached prefix and a first chunk."""
        bm = self.block_manager
        while self.waiting and len(self.running) < self.max_num_seqs and step.budget_left > 0:
            seq = self.waiting[0]
            # Prompt log-probabilities need the logits of every prompt position: no cache hits.
            hits = [] if seq.wants_prompt_logprobs else bm.find_cached_prefix(seq)
            lower: list[LowerHit] = []
            if self.kv_tiers is not None and not seq.wants_prompt_logprobs:
                lower = self._lower_hits(seq, len(hits))
                if self._start_load(seq, len(hits) + len(lower)):
                    self.waiting.popleft()
                    continue
            free_for_new = bm.num_free_blocks - bm.num_free_among(hits)
            # Lower-tier hits take fresh blocks; at least one more is left for the new tokens.
            lower = lower[: max(0, free_for_new - 1)]
            full = len(hits) + len(lower)
            # Every full block hit: a running sequence may hold the rest but the last token.
            partial = None
            if full == bm.num_max_cacheable_blocks(seq) and not seq.wants_prompt_logprobs:
                partial = bm.find_partial(seq, self.running)
            copied = partial[1] if partial is not None else 0
            cached = full * self.block_size + copied
            # The full blocks end on a block boundary, so the copied slots and the new tokens
            # fill fresh blocks only.
            n = min(
                seq.num_tokens - cached,
                step.budget_left,
                (free_for_new - len(lower)) * self.block_size - copied,
            )
            if n <= 0:
                break
            self.waiting.popleft()
            first_time = not seq.admitted_once
            filled = bm.admit(seq, hits, first_time, [h.ref for h in lower])
            if self.kv_tiers is not None:
                for hit, block_id in zip(lower, filled):
                    self.kv_tiers.copy_in(hit, block_id)
                if first_time:
                    self.kv_tiers.count_hits(len(hits), lower, self.block_size)
                self._staged.pop(seq.request_id, None)
            if first_time:
                seq.num_cached_tokens = cached
                seq.admitted_once = True
                on_host = sum(1 for h in lower if h.host_slot is not None)
                self._cached_prefixes[seq.request_id] = CachedPrefix(
                    device_tokens=len(hits) * self.block_size + copied,
                    host_tokens=on_host * self.block_size,
                    disk_tokens=(len(lower) - on_host) * self.block_size,
                    disk_load_seconds=self._load_seconds.pop(seq.request_id, 0.0),
                )
            bm.allocate(seq, cached + n)
            if partial is not None:
                # After the tiers' copies (which fill and empty blocks before this one is read).
                self._device_copies.append(
                    KVCopy(
                        "on_device", seq.block_table[full], src_block=partial[0], num_slots=copied
                    )
                )
                seq.num_computed_tokens = cached
                self.num_partial_copies += 1
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.add(ScheduledSequence(seq, n, cached))

    # ---- lower KV tiers ---------------------------------------------------------------------

    def take_cached_prefix(self, request_id: str) -> CachedPrefix | None:
        """Where the request's cached prefix came from, once it was admitted (then forgotten)."""
        return self._cached_prefixes.pop(request_id, None)

    def _lower_hits(self, seq: Sequence, start: int) -> list[LowerHit]:
        """Blocks from `start` on found in the host tier or among the seq's loaded blocks."""
        assert self.kv_tiers is not None
        bm = self.block_manager
        refs = (bm.block_ref(seq, i) for i in range(start, bm.num_max_cacheable_blocks(seq)))
        return self.kv_tiers.lower_hits(refs, self._staged.get(seq.request_id, {}))

    def _start_load(self, seq: Sequence, first: int) -> bool:
        """If the disk holds seq's blocks from `first` on, start loading them; True if started."""
        assert self.kv_tiers is not None
        disk = self.kv_tiers.disk
        bm = self.block_manager
        limit = bm.num_max_cacheable_blocks(seq)
        if (
            disk is None
            or first >= limit
            or seq.request_id in self._loaded
            or bm.block_hash(seq, first) not in disk
        ):
            return False
        refs = [bm.block_ref(seq, i) for i in range(first, limit)]
        count = disk.count_prefix([r.key for r in refs])
        if count == 0:
            return False
        self._loading[seq.request_id] = _Load(seq, first, disk.load(refs[:count]))
        self._loaded.add(seq.request_id)
        return True

    def _land_loads(self) -> None:
        """Requests whose disk load finished go back to the head of the queue, blocks staged."""
        done = [load for load in self._loading.values() if load.future.done()]
        for load in reversed(done):  # the earliest started ends up first
            rid = load.seq.request_id
            del self._loading[rid]
            self._load_seconds[rid] = time.monotonic() - load.started
            try:
                blocks = load.future.result()
            except Exception:
                logger.exception("KV disk cache: loading blocks for %s failed", rid)
                blocks = []
            bm = self.block_manager
            self._staged[rid] = {
                bm.block_hash(load.seq, load.first + i): kv for i, kv in enumerate(blocks)
            }
            self.waiting.appendleft(load.seq)

    def wait_for_loads(self, timeout: float) -> None:
        """Block up to `timeout` s until a disk load finishes (when nothing else can run)."""
        if self._loading:
            concurrent.futures.wait(
                [load.future for load in self._loading.values()],
                timeout=timeout,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )

    # ---- after the forward pass -------------------------------------------------------------

    def postprocess(self, out: SchedulerOutput) -> list[Sequence]:
        """Record a step's results; returns the sequences that got a new token (finished or not).

        Each record that samples carries its `token_id`. Blocks the step filled are registered
        in the prefix cache, finished sequences freed.
        """
        for s in out.scheduled:
            if s.samples and s.token_id is None and self._still_current(s):
                raise ValueError(f"no token sampled for {s.seq.request_id}, whose chunk samples")
        progressed: list[Sequence] = []
        for s in out.scheduled:
            if not self._still_current(s):  # finished, aborted or preempted meanwhile
                continue
            seq = s.seq
            seq.num_computed_tokens = s.start + s.num_new_tokens
            self.num_computed_prompt_tokens += max(
                0, min(seq.num_computed_tokens, seq.num_prompt_tokens) - s.start
            )
            self.block_manager.register_computed(seq, s.start, seq.num_computed_tokens)
            if s.prompt_logprobs and seq.prompt_logprobs is not None:
                seq.prompt_logprobs.extend(s.prompt_logprobs)
            if not s.samples or s.token_id is None:
                continue
            seq.append_token(s.token_id)
            progressed.append(seq)
            reason = self._stop_reason(seq, s.token_id)
            if reason is None and seq.grammar is not None and seq.grammar.advance(s.token_id):
                reason = "stop"  # the output is complete: its grammar terminated
            if reason is not None:
                self.finish(seq, reason)
        return progressed

    @staticmethod
    def _still_current(s: ScheduledSequence) -> bool:
        return s.seq.status is SequenceStatus.RUNNING and s.seq.num_computed_tokens == s.start

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        # EOS (unless ignore_eos) and stop_token_ids stop, from token min_tokens + 1 on (the
        # sampler keeps them out before); stop_reason names a stop token id, not EOS (vLLM).
        if seq.num_output_tokens <= params.min_tokens:
            pass
        elif not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        elif params.stop_token_ids and token in params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # ---- checks -----------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Assert the scheduler's and block manager's invariants (for tests and debugging)."""
        self.block_manager.check_integrity(self.running)
        assert len(self.running) <= self.max_num_seqs
        assert len(self._live) == len(self.running) + len(self.waiting) + len(self._loading)
        for seq in self.running:
            assert seq.status is SequenceStatus.RUNNING and self._live[seq.request_id] is seq
            assert 0 <= seq.num_computed_tokens < seq.num_tokens, seq
        for seq in self.waiting:
            assert seq.status is SequenceStatus.WAITING and self._live[seq.request_id] is seq
            assert not seq.block_table and seq.num_computed_tokens == 0, seq
        for rid, load in self._loading.items():
            seq = load.seq
            assert seq.status is SequenceStatus.WAITING and self._live[rid] is seq
            assert not seq.block_table and seq not in self.waiting, seq


class _Step:
    """The sequences chosen so far in one schedule() call and the token budget they use."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.scheduled: dict[int, ScheduledSequence] = {}  # by id(seq), in batch order
        self.preempted: list[Sequence] = []

    @property
    def budget_left(self) -> int:
        return self.budget - self.used

    def add(self, s: ScheduledSequence) -> None:
        self.scheduled[id(s.seq)] = s
        self.used += s.num_new_tokens

    def remove(self, seq: Sequence) -> None:
        s = self.scheduled.pop(id(seq), None)
        if s is not None:
            self.used -= s.num_new_tokens
