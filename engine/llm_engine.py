"""The synchronous engine core: requests in, one scheduled step at a time, RequestOutputs out.

`LLM` drives it in a loop; `AsyncLLM` drives it from its own thread. Everything here runs on
one thread, so the scheduler and block manager need no locks.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.layers.rotary import rope_max_positions
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, StepResult
from engine.models.loader import resolve_model_path
from engine.outputs import EngineStats, RequestOutput
from engine.sampler import SamplingRow, make_generator
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.stop_strings import StopStringMatcher
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_generation_defaults(model_path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (empty if it has none)."""
    path = model_path / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in SAMPLING_DEFAULT_KEYS if k in data}


@dataclass
class RequestState:
    """Engine-side bookkeeping of one request beyond its Sequence."""

    seq: Sequence
    prompt_ids: list[int]
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    text: str = ""
    num_sent_tokens: int = 0
    first_token_time: float | None = None
    logprobs: list[dict[int, float]] | None = None
    reported_prompt_progress: int = 0


@dataclass
class _Throughput:
    """Generated tokens per second over a sliding window of recent steps."""

    window_s: float = 5.0
    events: deque = field(default_factory=deque)

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.events.append((now, n))
        while self.events and now - self.events[0][0] > self.window_s:
            self.events.popleft()

    def rate(self) -> float:
        if len(self.events) < 2:
            return 0.0
        span = self.events[-1][0] - self.events[0][0]
        return sum(n for _, n in list(self.events)[1:]) / span if span > 0 else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = ModelConfig.from_dir(self.model_path)
        self.tokenizer = Tokenizer.from_dir(self.model_path)
        self.generation_defaults = read_generation_defaults(self.model_path)
        self.runner = ModelRunner(config, self.model_config, self.model_path)
        pool_tokens = self.runner.num_blocks * config.block_size
        mc = self.model_config
        positions = rope_max_positions(mc.rope_scaling, mc.max_position_embeddings)
        if config.max_model_len is not None and config.max_model_len > positions:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the {positions} positions this "
                "checkpoint's rotary embedding supports"
            )
        max_len = config.max_model_len or positions
        if max_len > pool_tokens:
            logger.warning(
                "max_model_len %d does not fit the KV cache (%d tokens); serving %d tokens per "
                "request. Give the cache more memory to serve the full context.",
                max_len, pool_tokens, pool_tokens,
            )
            max_len = pool_tokens
        self.max_model_len = max_len
        self.eos_token_ids = list(self.model_config.eos_token_ids or self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(config, self.runner.num_blocks, max_len, self.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self._next_id = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_total = 0
        self._throughput = _Throughput()
        logger.info(
            "engine ready: %s, max_model_len %d, KV pool %d tokens", self.model_path, max_len, pool_tokens
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
        seq = Sequence(request_id, ids, params, arrival_time=arrival_time)
        self.scheduler.add(seq)
        generator = None
        if params.seed is not None:
            generator = make_generator(params.seed, self.runner.device)
        self.requests[request_id] = RequestState(
            seq=seq,
            prompt_ids=ids,
            generator=generator,
            detokenizer=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True),
            stops=StopStringMatcher(params.stop),
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
        return self.scheduler.has_unfinished()

    # ---- stepping -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; return an output for every request that progressed."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        result, failed = self._run_isolating_failures(out)
        outputs = [o for rid, err in failed.items() if (o := self.fail(rid, err))]
        if failed:
            keep = [i for i, s in enumerate(out.scheduled) if s.seq.request_id not in failed]
            out = SchedulerOutput(
                scheduled=[out.scheduled[i] for i in keep], preempted=out.preempted
            )
            result = StepResult([result.sampled[i] for i in keep], [result.logprobs[i] for i in keep])
        progressed = self.scheduler.postprocess(out, result.sampled)
        logprobs_by_id = {
            s.seq.request_id: lp for s, lp in zip(out.scheduled, result.logprobs) if lp is not None
        }
        outputs.extend(self._collect_outputs(out, progressed, logprobs_by_id))
        return outputs

    def _sampling_rows(self, out: SchedulerOutput) -> list[SamplingRow | None]:
        rows: list[SamplingRow | None] = []
        for s in out.scheduled:
            if not s.samples:
                rows.append(None)
                continue
            state = self.requests[s.seq.request_id]
            rows.append(
                SamplingRow(s.seq.params, state.prompt_ids, s.seq.output_token_ids, state.generator)
            )
        return rows

    def _run_isolating_failures(self, out: SchedulerOutput) -> tuple[StepResult, dict[str, str]]:
        """Run the batch; if it raises, rerun each sequence alone so one bad request fails alone."""
        try:
            return self.runner.run(out, self._sampling_rows(out)), {}
        except Exception:
            if len(out.scheduled) == 1:
                logger.exception("step failed for request %s", out.scheduled[0].seq.request_id)
                return StepResult([None], [None]), {
                    out.scheduled[0].seq.request_id: "internal error while running the model"
                }
            logger.exception("batched step failed; retrying its %d sequences one by one", len(out.scheduled))
        sampled: list[int | None] = []
        logprobs: list[dict[int, float] | None] = []
        failed: dict[str, str] = {}
        for s in out.scheduled:
            single = SchedulerOutput(scheduled=[s], preempted=[])
            try:
                r = self.runner.run(single, self._sampling_rows(single))
                sampled.append(r.sampled[0])
                logprobs.append(r.logprobs[0])
            except Exception:
                logger.exception("step failed for request %s", s.seq.request_id)
                failed[s.seq.request_id] = "internal error while running the model"
                sampled.append(None)
                logprobs.append(None)
        return StepResult(sampled, logprobs), failed

    def _collect_outputs(
        self,
        out: SchedulerOutput,
        progressed: list[Sequence],
        logprobs_by_id: dict[str, dict[int, float]],
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        progressed_ids = {seq.request_id for seq in progressed}
        new_tokens = 0
        for scheduled in out.scheduled:
            seq = scheduled.seq
            state = self.requests.get(seq.request_id)
            if state is None:
                continue
            if seq.request_id not in progressed_ids:
                # A prefill chunk that did not sample yet: report progress for long prompts.
                done = min(seq.num_computed_tokens, seq.num_prompt_tokens)
                if done > state.reported_prompt_progress:
                    state.reported_prompt_progress = done
                    outputs.append(self._output(state, finished=False, reason=None))
                continue
            if state.first_token_time is None:
                state.first_token_time = now
            new_ids = seq.output_token_ids[state.num_sent_tokens :]
            new_tokens += len(new_ids)
            if state.logprobs is not None and seq.request_id in logprobs_by_id:
                state.logprobs.append(logprobs_by_id[seq.request_id])
            delta, stopped = state.stops.feed(state.detokenizer.push(new_ids))
            finished = seq.is_finished
            reason = seq.finish_reason
            if stopped and not finished:
                self.scheduler.finish(seq, "stop")
                finished, reason = True, "stop"
            elif finished and not stopped:
                delta += state.stops.feed(state.detokenizer.flush())[0] + state.stops.flush()
            state.text += delta
            outputs.append(
                self._output(state, finished=finished, reason=reason, delta_text=delta, delta_ids=new_ids)
            )
            state.num_sent_tokens = len(seq.output_token_ids)
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
        error: str | None = None,
    ) -> RequestOutput:
        seq = state.seq
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=state.prompt_ids,
            text=state.text,
            token_ids=list(seq.output_token_ids),
            delta_text=delta_text,
            delta_token_ids=list(delta_ids or []),
            finished=finished,
            finish_reason=reason,
            num_cached_tokens=seq.num_cached_tokens,
            error=error,
            arrival_time=seq.arrival_time,
            first_token_time=state.first_token_time,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            num_computed_prompt_tokens=min(seq.num_computed_tokens, seq.num_prompt_tokens),
        )

    # ---- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
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
        )
