"""The synchronous engine core: requests in, one scheduled step at a time, RequestOutputs out.

`LLM` drives it in a loop; `AsyncLLM` drives it from its own thread. Everything here runs on
one thread, so the scheduler and block manager need no locks. The KV tiers below the device
pool (engine.kv_tiers: host memory, disk) do their slow work on their own threads; `close()`
writes the blocks still queued for disk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_keys import ModelFingerprint, kv_layout
from engine.kv_tiers import build_kv_tiers
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner
from engine.models.loader import resolve_model_path
from engine.outputs import CachedPrefix, EngineStats, RequestOutput
from engine.sampler import make_generator
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.stop_strings import StopStringMatcher
from engine.structured_output import StructuredOutputManager
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


MODEL_ERROR = "internal error while running the model"
IDLE_LOAD_WAIT_S = 0.01  # how long an idle step waits for a disk load before returning


@dataclass
class RequestState:
    """Engine-side bookkeeping of one request beyond its Sequence."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    text: str = ""
    num_sent_tokens: int = 0
    first_token_time: float | None = None
    logprobs: list[dict[int, float]] | None = None  # all so far, when the request asked for them
    reported_prompt_progress: int = 0
    cached_prefix: CachedPrefix | None = None  # by tier, once admitted


@dataclass
class _PendingOutputs:
    """A step's results whose outputs are not emitted yet (with async output: until the next
    step's forward pass is queued on the device)."""

    out: SchedulerOutput
    progressed: list[Sequence]


@dataclass
class _Throughput:
    """Generated tokens per second over a sliding window of recent steps.

    The window's token count is kept as events come and go: `AsyncLLM` reads the rate after
    every step, and a GPU's window holds ~1,000 steps (summing them cost 32 us a step)."""

    window_s: float = 5.0
    events: deque = field(default_factory=deque)
    total: int = 0  # tokens of the events in the window

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.events.append((now, n))
        self.total += n
        while self.events and now - self.events[0][0] > self.window_s:
            self.total -= self.events.popleft()[1]

    def rate(self) -> float:
        """Tokens after the window's first event over the time since it."""
        if len(self.events) < 2:
            return 0.0
        span = self.events[-1][0] - self.events[0][0]
        return (self.total - self.events[0][1]) / span if span > 0 else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = mc = ModelConfig.from_dir(self.model_path)
        if config.max_model_len is not None and config.max_model_len > mc.max_positions:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the {mc.max_positions} positions "
                "this checkpoint's rotary embedding supports"
            )
        self.tokenizer = Tokenizer.from_dir(self.model_path, mc.eos_token_ids)
        self.generation_defaults = dict(mc.sampling_defaults)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        # Grammars of structured-output requests (xgrammar is set up on the first one).
        self.structured_output = StructuredOutputManager(
            self.tokenizer, mc.vocab_size, self.eos_token_ids
        )
        # Load the weights and size the KV pool, fix the longest sequence from both, then
        # allocate the cache and capture graphs for exactly that length.
        self.runner = ModelRunner(config, mc, self.model_path)
        pool_tokens = self.runner.num_blocks * config.block_size
        self.max_model_len = fix_max_model_len(config.max_model_len, mc.max_positions, pool_tokens)
        self.runner.allocate(self.max_model_len)
        # Names the KV this engine computes: the root of every prefix-cache key (engine.kv_keys).
        self.model_fingerprint = ModelFingerprint.of_checkpoint(
            self.model_path,
            weight_dtype=str(self.runner.precision.weight_dtype),
            kv_dtype=str(self.runner.dtype),
            block_size=config.block_size,
            kv_layout=kv_layout(mc),
        )
        # Host-memory and disk tiers below the device pool (None when both are off).
        self.kv_tiers = build_kv_tiers(
            config,
            self.runner.device,
            self.runner.kv_block_shape,
            self.runner.dtype,
            self.model_fingerprint.digest,
            host_pool=self.runner.host_kv_pool,
        )
        self.scheduler = Scheduler(
            config,
            self.runner.num_blocks,
            self.max_model_len,
            self.eos_token_ids,
            self.model_fingerprint.digest,
            self.kv_tiers,
        )
        self.requests: dict[str, RequestState] = {}
        self._next_id = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_total = 0
        self._throughput = _Throughput()
        self.async_output = config.resolved_async_output()
        self._pending: _PendingOutputs | None = None  # the last step's, until emitted
        logger.info(
            "engine ready: %s, max_model_len %d, KV pool %d tokens, async output %s, "
            "model fingerprint %s",
            self.model_path,
            self.max_model_len,
            pool_tokens,
            "on" if self.async_output else "off",
            self.model_fingerprint.digest.hex()[:16],
        )

    # ---- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or ids; ValueError for empty or out-of-vocab ids."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        return ids

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; ValueError (stating the numbers) if it can never be served."""
        params = params or SamplingParams()
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.encode_prompt(prompt)
        vocab = self.model_config.vocab_size
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise ValueError(
                f"SamplingParams.logit_bias token ids must be below the vocabulary size {vocab}"
            )
        seq = Sequence(request_id, ids, params, arrival_time=arrival_time)
        if params.min_tokens:
            eos = [] if params.ignore_eos else self.eos_token_ids
            seq.min_tokens_banned = tuple(dict.fromkeys([*eos, *(params.stop_token_ids or [])]))
        if params.structured_output is not None:  # AsyncLLM compiled it already (cached)
            seq.grammar = self.structured_output.new_state(params.structured_output)
        self.scheduler.add(seq)
        if params.seed is not None:
            seq.generator = make_generator(params.seed, self.runner.device)
        self.requests[request_id] = RequestState(
            seq=seq,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=params.skip_special_tokens
            ),
            stops=StopStringMatcher(params.stop, include=params.include_stop_str_in_output),
            logprobs=[] if params.logprobs is not None else None,
        )
        self._prompt_tokens_total += len(ids)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output if it was live."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.abort(request_id)
        state.seq.finish_reason = "abort"
        self._finished_total += 1
        return self._output(state, finished=True, reason="abort")

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        """Finish a request with an error output (the others keep running)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        if not state.seq.is_finished:
            self.scheduler.finish(state.seq, "error")
        self._finished_total += 1
        return self._output(state, finished=True, reason="error", error=error)

    def has_unfinished(self) -> bool:
        """Requests still running or waiting, or outputs not emitted yet (async output)."""
        return self.scheduler.has_unfinished() or self._pending is not None

    # ---- stepping -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; return an output for every request that progressed.

        Each scheduled sequence is one `ScheduledSequence` record from the scheduler through
        the runner (which fills its sampled token and logprobs) to the outputs; records whose
        model step failed are failed alone and filtered out before the scheduler sees results.

        With async output (on CUDA), a step's outputs are emitted by the next step, while its
        forward pass runs on the device: detokenizing, stop strings and building the outputs
        then cost the GPU no idle time. A request that a stop string ends meanwhile has run one
        step too many; `Scheduler.postprocess` drops that token (as vLLM does).
        """
        out = self.scheduler.schedule()
        if out.kv_copies:
            self.runner.copy_kv(
                out.kv_copies, self.kv_tiers.host if self.kv_tiers is not None else None
            )
        if not out.scheduled:
            if self._pending is not None:
                return self._emit_pending()
            # Nothing can run until a disk load lands: wait for it a little instead of spinning.
            self.scheduler.wait_for_loads(IDLE_LOAD_WAIT_S)
            return []
        with self._cores_beside_loads():
            outputs = self._run_isolating_failures(out.scheduled, meanwhile=self._emit_pending)
        failed = [s for s in out.scheduled if s.error is not None]
        outputs.extend(
            o for s in failed if (o := self.fail(s.seq.request_id, s.error or MODEL_ERROR))
        )
        if failed:
            out = SchedulerOutput(
                scheduled=[s for s in out.scheduled if s.error is None], preempted=out.preempted
            )
        progressed = self.scheduler.postprocess(out)
        self._save_new_blocks()
        self._pending = _PendingOutputs(out, progressed)
        if not self.async_output:
            outputs.extend(self._emit_pending())
        return outputs

    def _emit_pending(self) -> list[RequestOutput]:
        """The outputs of the last step run, if not emitted yet."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        return self._collect_outputs(pending.out, pending.progressed)

    def _finished_not_emitted(self) -> int:
        """Requests the scheduler has finished whose final output the next step emits (async
        output): still running for whoever watches the stats, until their callers hear."""
        pending = self._pending
        if pending is None:
            return 0
        return sum(s.is_finished and s.request_id in self.requests for s in pending.progressed)

    def _save_new_blocks(self) -> int:
        """Hand registered blocks to the disk tier's writer, oldest first, as many as it has
        room for; returns how many (their KV is gathered now, written on its thread)."""
        tiers = self.kv_tiers
        if tiers is None or tiers.disk is None or not tiers.unsaved:
            return 0
        blocks = self.scheduler.block_manager.blocks
        new = tiers.take_unsaved(
            tiers.disk.room_blocks(), lambda block_id, key: blocks[block_id].hash == key
        )
        if new:
            kv, ready = self.runner.gather_kv([block_id for block_id, _ in new])
            tiers.disk.save([ref for _, ref in new], kv, ready)
        return len(new)

    def close(self, timeout: float = 60.0) -> None:
        """Write every registered block still in the pool to disk (up to `timeout` s), then stop
        the KV tiers' threads. Call it on the engine's thread, or after that thread has stopped."""
        tiers = self.kv_tiers
        if tiers is None:
            return
        deadline = time.monotonic() + timeout
        self.scheduler.stop_loads()  # the loader's queue then ends soon
        if tiers.disk is not None:
            while tiers.unsaved and time.monotonic() < deadline:
                if not self._save_new_blocks():  # the writer is full: let it catch up
                    tiers.disk.flush(max(0.0, min(1.0, deadline - time.monotonic())))
        tiers.close()

    @contextlib.contextmanager
    def _cores_beside_loads(self) -> Iterator[None]:
        """On the CPU, while a disk load is in flight, the step leaves one core to it.

        Reading gigabytes from disk keeps a core busy in the kernel (page cache, copies); a step
        whose OpenMP team wants every core then waits at each barrier for the thread that lost
        its core, and other streams' gaps grew 3-8x during a 2 GiB load on 2 cores. One thread
        fewer costs a memory-bound step far less. The kernels' results do not depend on the
        thread count."""
        threads = torch.get_num_threads()
        if self.runner.device.type != "cpu" or threads < 2 or not self.scheduler.num_loading:
            yield
            return
        torch.set_num_threads(threads - 1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _run_isolating_failures(
        self,
        batch: list[ScheduledSequence],
        meanwhile: Callable[[], list[RequestOutput]],
    ) -> list[RequestOutput]:
        """Run the batch, calling `meanwhile` (once) while the device works; if the batch
        raises, rerun each sequence alone so one bad request fails alone. Returns what
        `meanwhile` returned.

        A record whose run raised gets `error` set.
        """
        read: Callable[[], None] | None = None
        try:
            read = self.runner.start(batch)
        except Exception:
            self._log_failure(batch)
        outputs = meanwhile()
        if read is not None:
            try:
                read()
                return outputs
            except Exception:
                self._log_failure(batch)
        if len(batch) == 1:
            batch[0].error = MODEL_ERROR
            return outputs
        for s in batch:
            s.token_id, s.logprobs = None, None
            try:
                self.runner.run([s])
            except Exception:
                logger.exception("step failed for request %s", s.seq.request_id)
                s.error = MODEL_ERROR
        return outputs

    @staticmethod
    def _log_failure(batch: list[ScheduledSequence]) -> None:
        if len(batch) == 1:
            logger.exception("step failed for request %s", batch[0].seq.request_id)
        else:
            logger.exception(
                "batched step failed; retrying its %d sequences one by one", len(batch)
            )

    def _collect_outputs(
        self, out: SchedulerOutput, progressed: list[Sequence]
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        progressed_ids = {id(seq) for seq in progressed}
        new_tokens = 0
        for scheduled in out.scheduled:
            seq = scheduled.seq
            state = self.requests.get(seq.request_id)
            if state is None:
                continue
            if id(seq) not in progressed_ids:
                # A prefill chunk that did not sample yet: report progress for long prompts.
                done = min(seq.num_computed_tokens, seq.num_prompt_tokens)
                if done > state.reported_prompt_progress:
                    state.reported_prompt_progress = done
                    outputs.append(self._output(state, finished=False, reason=None))
                continue
            if state.first_token_time is None:
                state.first_token_time = now
            new_ids = seq.output_token_ids_from(state.num_sent_tokens)
            new_tokens += len(new_ids)
            new_logprobs = None
            if state.logprobs is not None:
                new_logprobs = [scheduled.logprobs] if scheduled.logprobs is not None else []
                state.logprobs.extend(new_logprobs)
            shown_ids = new_ids
            if (
                seq.is_finished
                and isinstance(seq.stop_reason, int)
                and not seq.params.include_stop_str_in_output
            ):
                shown_ids = new_ids[:-1]  # the stop token's text is not part of the answer
            delta, stopped = state.stops.feed(state.detokenizer.push(shown_ids))
            finished = seq.is_finished
            reason = seq.finish_reason
            if stopped:
                seq.stop_reason = state.stops.matched_stop
            if stopped and not finished:
                self.scheduler.finish(seq, "stop")
                finished, reason = True, "stop"
            elif finished and not stopped:
                delta += state.stops.feed(state.detokenizer.flush())[0] + state.stops.flush()
            state.text += delta
            state.num_sent_tokens += len(new_ids)
            outputs.append(
                self._output(
                    state,
                    finished=finished,
                    reason=reason,
                    delta_text=delta,
                    delta_ids=new_ids,
                    delta_logprobs=new_logprobs,
                )
            )
            if finished:
                self.requests.pop(seq.request_id, None)
                self._finished_total += 1
        self._generation_tokens_total += new_tokens
        if new_tokens:
            self._throughput.add(new_tokens)
        return outputs

    def _output(
        self,
        state: RequestState,
        finished: bool,
        reason: str | None,
        delta_text: str = "",
        delta_ids: list[int] | None = None,
        delta_logprobs: list[dict[int, float]] | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        """This step's deltas; the whole answer too when the request is finished (once)."""
        seq = state.seq
        if state.cached_prefix is None:
            state.cached_prefix = self.scheduler.take_cached_prefix(seq.request_id)
        if delta_logprobs is None and state.logprobs is not None:
            delta_logprobs = []
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=state.text if finished else "",
            token_ids=seq.output_token_ids if finished else [],
            delta_text=delta_text,
            delta_token_ids=delta_ids if delta_ids is not None else [],
            finished=finished,
            finish_reason=reason,
            num_cached_tokens=seq.num_cached_tokens,
            cached_prefix=state.cached_prefix,
            error=error,
            arrival_time=seq.arrival_time,
            first_token_time=state.first_token_time,
            logprobs=state.logprobs if finished else None,
            delta_logprobs=delta_logprobs,
            num_computed_prompt_tokens=min(seq.num_computed_tokens, seq.num_prompt_tokens),
            num_generated_tokens=seq.num_output_tokens,
            stop_reason=seq.stop_reason if finished else None,
            prompt_logprobs=(
                seq.prompt_logprobs
                if seq.prompt_logprobs is not None and not seq.wants_prompt_logprobs
                else None
            ),
        )

    # ---- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running + self._finished_not_emitted(),
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            block_size=bm.block_size,
            prefix_cache_queries=bm.prefix_cache_queries * bm.block_size,
            prefix_cache_hits=bm.prefix_cache_hits * bm.block_size,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            requests_finished_total=self._finished_total,
            generation_tokens_per_s=self._throughput.rate(),
            prompt_tokens_computed=self.scheduler.num_computed_prompt_tokens,
            kv_tiers=(
                self.kv_tiers.snapshot(self.scheduler.num_loading)
                if self.kv_tiers is not None
                else None
            ),
        )


def fix_max_model_len(requested: int | None, max_positions: int, pool_tokens: int) -> int:
    """The longest sequence the engine serves, decided once for the scheduler and the runner.

    The configured max_model_len (default: every position the checkpoint supports), capped at
    what the KV pool can hold: a longer sequence could never be served.
    """
    max_len = requested or max_positions
    if max_len > pool_tokens:
        logger.warning(
            "max_model_len %d does not fit the KV cache (%d tokens); serving %d tokens per "
            "request. Give the cache more memory to serve the full context.",
            max_len,
            pool_tokens,
            pool_tokens,
        )
        max_len = pool_tokens
    return max_len
