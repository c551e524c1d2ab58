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
the host tier. When the disk holds more of a prompt's prefix, the request instead leaves the
queue for a loading state: it takes its device hits, fresh blocks for its host hits (copied in
this step) and fresh blocks for the disk blocks, which the disk tier's thread fills (on the CPU
straight into the pool) while the others keep stepping. Those blocks are not registered, so no
other request can see or evict them; a load takes only the free blocks that the running
sequences do not need for their known tokens and next one (fewer disk blocks, or the request
waits at the head of the queue). A load lands in the first step after it finished, after the
running sequences took their blocks: the blocks that verified are registered like computed ones,
the request's blocks are released and it goes back to the head of the queue, where admission
finds them as device hits (the blocks from the first bad or missing file on are recomputed; a
failed load's blocks all are). Aborting a loading request stops its load before the next file
and frees its blocks once the loader is done with them. Each step's block copies between tiers
travel in `SchedulerOutput.kv_copies`, in the order they were decided.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

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
    """A request waiting for its prefix's blocks from disk into `seq.block_table[first:]`.

    The seq holds its device hits, then its host hits (`host_blocks`, registered and copied in
    at the start), then the unregistered blocks the loader fills until `future` is done."""

    seq: Sequence
    first: int
    host_blocks: list[int]
    future: Future[int] | Future[list[torch.Tensor]]
    stop: threading.Event
    started: float  # time.perf_counter() before the loader thread got the load


@dataclass
class _Landed:
    """A landed load, until its request's admission: which blocks came from which tier."""

    seconds: float  # from the load's start to its landing
    host_blocks: set[int]
    disk_blocks: set[int]


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
        # Loads of finished (aborted) requests: their blocks are freed once the loader is done.
        self._draining: list[_Load] = []
        # Requests that had their disk load (one per admission: a failed one is not retried).
        self._loaded: set[str] = set()
        self._landed: dict[str, _Landed] = {}  # by request id, until its admission
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
            load = self._loading.pop(seq.request_id, None)
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self.block_manager.free(seq)
            elif load is not None:
                # The loader may be writing into its blocks: they are freed once it is done.
                load.stop.set()
                load.future.cancel()
                self._draining.append(load)
            else:
                self.waiting.remove(seq)
            self._loaded.discard(seq.request_id)
            self._landed.pop(seq.request_id, None)
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
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, step.budget_left)
            n = self._reserve(seq, n, step)
            if n > 0:
                step.add(ScheduledSequence(seq, n, seq.num_computed_tokens))
        # After the running sequences took their blocks, so nothing evicts the landed blocks
        # before their requests' admission just below.
        self._land_loads()
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
                started = self._start_load(seq, hits, lower)
                if started is None:  # the disk has more, the pool has no room for it yet
                    break
                if started:
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
            # A landed load's blocks are among the device hits: count them by where they came from.
            landed = self._landed.pop(seq.request_id, None)
            on_host, on_disk = len(lower), 0
            if landed is not None:
                on_host += sum(1 for b in hits if b in landed.host_blocks)
                on_disk = sum(1 for b in hits if b in landed.disk_blocks)
            on_device = full - on_host - on_disk
            if self.kv_tiers is not None:
                for hit, block_id in zip(lower, filled):
                    self.kv_tiers.copy_in(hit, block_id)
                if first_time:
                    self.kv_tiers.count_hits(on_device, on_host, on_disk, self.block_size)
            if first_time:
                seq.num_cached_tokens = cached
                seq.admitted_once = True
                self._cached_prefixes[seq.request_id] = CachedPrefix(
                    device_tokens=on_device * self.block_size + copied,
                    host_tokens=on_host * self.block_size,
                    disk_tokens=on_disk * self.block_size,
                    disk_load_seconds=landed.seconds if landed is not None else 0.0,
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
        """Blocks from `start` on found in the host tier."""
        assert self.kv_tiers is not None
        bm = self.block_manager
        refs = (bm.block_ref(seq, i) for i in range(start, bm.num_max_cacheable_blocks(seq)))
        return self.kv_tiers.lower_hits(refs)

    def _start_load(self, seq: Sequence, hits: list[int], lower: list[LowerHit]) -> bool | None:
        """If the disk holds seq's blocks after its device and host hits, start loading them
        into blocks of the pool that seq takes now (with its hits); True if started, None if
        the pool has no block to spare for it while others run (seq waits at the queue's head).

        A load takes only free blocks that the running sequences do not need for their known
        tokens and their next one, leaving one for seq's own new tokens: fewer than the disk
        holds means a shorter load (the rest is computed)."""
        assert self.kv_tiers is not None
        disk = self.kv_tiers.disk
        bm = self.block_manager
        first = len(hits) + len(lower)
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
        needed = sum(bm.num_new_blocks(s, s.num_tokens + 1) for s in self.running)
        room = bm.num_free_blocks - bm.num_free_among(hits) - len(lower) - needed - 1
        count = min(count, room)
        if count <= 0:
            return None if self.running else False
        bm.admit(seq, hits, False, [h.ref for h in lower])  # counted at its real admission
        host_blocks = seq.block_table[len(hits) :]
        for hit, block_id in zip(lower, host_blocks):
            self.kv_tiers.copy_in(hit, block_id)
        bm.allocate(seq, (first + count) * self.block_size)
        stop = threading.Event()
        started = time.perf_counter()  # before the thread starts: the wait covers its reads
        future = self.kv_tiers.start_load(refs[:count], seq.block_table[first:], stop)
        self._loading[seq.request_id] = _Load(seq, first, host_blocks, future, stop, started)
        self._loaded.add(seq.request_id)
        return True

    def _land_loads(self) -> None:
        """Requests whose disk load finished go back to the head of the queue, their verified
        blocks registered in the device pool; aborted requests' loads free their blocks."""
        for load in [load for load in self._draining if load.future.done()]:
            self._draining.remove(load)
            self._settle(load)
        done = [load for load in self._loading.values() if load.future.done()]
        for load in reversed(done):  # the earliest started ends up first
            rid = load.seq.request_id
            del self._loading[rid]
            disk_blocks = self._settle(load)
            seconds = time.perf_counter() - load.started
            self._landed[rid] = _Landed(seconds, set(load.host_blocks), set(disk_blocks))
            self.waiting.appendleft(load.seq)

    def _settle(self, load: _Load) -> list[int]:
        """Register a finished load's verified blocks like computed ones (device prefix hits
        from now on) and release all of its sequence's blocks; returns the registered ids."""
        seq = load.seq
        loaded = 0
        if not load.future.cancelled():
            try:
                loaded = self.kv_tiers.land_load(  # type: ignore[union-attr]
                    load.future.result(), seq.block_table[load.first :]
                )
            except Exception:
                logger.exception("KV disk cache: loading blocks for %s failed", seq.request_id)
        bm = self.block_manager
        start, end = load.first * self.block_size, (load.first + loaded) * self.block_size
        bm.register_computed(seq, start, end)  # may switch to an identical block cached since
        registered = seq.block_table[load.first : load.first + loaded]
        bm.free(seq)  # the unverified blocks first in line for reuse, the registered ones last
        seq.num_computed_tokens = 0
        return registered

    def stop_loads(self) -> None:
        """Ask every disk load in flight to stop before its next file (the engine is closing;
        should it step again, the loads land with what they read and the rest is computed)."""
        for load in [*self._loading.values(), *self._draining]:
            load.stop.set()

    def wait_for_loads(self, timeout: float) -> None:
        """Block up to `timeout` s until a disk load finishes (when nothing else can run)."""
        futures: list[Future[Any]] = [
            load.future for load in [*self._loading.values(), *self._draining]
        ]
        if futures:
            concurrent.futures.wait(
                futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
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
        loads = [*self._loading.values(), *self._draining]
        self.block_manager.check_integrity([*self.running, *(load.seq for load in loads)])
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
            assert seq not in self.waiting, seq
        bm = self.block_manager
        for load in loads:
            # Hits registered before `first`, the loader's blocks after it: unregistered, held
            # by this sequence alone (so never evicted nor handed out).
            seq = load.seq
            assert seq.num_computed_tokens == load.first * self.block_size, seq
            assert len(seq.block_table) > load.first, seq
            for i, block_id in enumerate(seq.block_table):
                block = bm.blocks[block_id]
                assert (block.hash is None) == (i >= load.first), (seq, i)
                assert i < load.first or block.ref_count == 1, (seq, i)
        for load in self._draining:
            assert load.seq.is_finished and load.seq.request_id not in self._loading


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
