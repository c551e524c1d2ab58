"""The peers a chat benchmark compares, and the driver that plays conversations through them.

Every peer answers one chat turn at a time, `await peer.turn(conversation, prompt_ids,
max_tokens)`, greedy and forced to exactly `max_tokens` tokens (EOS ignored), and reports when
the turn was submitted, when its first token arrived and when it ended, all on the caller's
clock (time.perf_counter), so time to first token includes any wait for a busy model.
Conversations run concurrently (one asyncio task each), the way chat users arrive.

  pagechat                    AsyncLLM, prefix caching on (what the app runs)
  pagechat-no-prefix-cache    AsyncLLM, prefix caching off: every turn recomputes its history
  hf-generate                 transformers `generate`, history recomputed every turn; requests
                              waiting while the model is busy are left-padded into one batch
  hf-generate-cache           transformers `generate` with each chat's DynamicCache carried
                              across turns (only new tokens are computed); one request at a time
  hf-continuous               transformers' continuous batching (paged KV) with its prefix
                              block sharing, one manager for the whole run, streaming
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.chat_workload import Conversation, next_prompt
from bench.common import kv_bytes_per_token

if TYPE_CHECKING:
    from transformers import DynamicCache, Qwen3ForCausalLM
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    from app.chat.token_history import ChatCodec

WARMUP_IDS = list(range(20_000, 20_064))  # never appears in a workload (contents are < 10,000)


@dataclass
class PeerContext:
    """What every peer needs to size itself for one workload."""

    model_dir: Path
    device: str
    dtype: str
    max_concurrency: int  # conversations in flight at once
    kv_tokens: int  # KV the whole workload can hold at once (sizes CPU pools)
    max_num_batched_tokens: int | None = None  # per-step token budget (chunked prefill)
    hf_page_size: int = 16


@dataclass
class TurnResult:
    token_ids: list[int]
    submitted: float
    first_token: float
    finished: float
    cached_tokens: int | None  # prompt tokens served from a cache; None if the peer cannot say

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.submitted

    @property
    def decode_tokens_per_s(self) -> float | None:
        span = self.finished - self.first_token
        return (len(self.token_ids) - 1) / span if len(self.token_ids) > 1 and span > 0 else None


class ChatPeer:
    """One way of serving chat turns. Subclasses set `description` (stored in the JSON)."""

    description = ""

    async def turn(self, key: int, prompt: list[int], max_tokens: int) -> TurnResult:
        raise NotImplementedError

    async def warmup(self) -> None:
        await self.turn(-1, WARMUP_IDS, 4)
        self.forget(-1)

    def forget(self, key: int) -> None:
        """The conversation is over: drop whatever the peer keeps for it."""

    def close(self) -> None:
        pass


# ---- pagechat ---------------------------------------------------------------------------------


class PagechatPeer(ChatPeer):
    def __init__(self, ctx: PeerContext, prefix_caching: bool) -> None:
        from engine import AsyncLLM, EngineConfig

        self.description = (
            "pagechat AsyncLLM (continuous batching, paged KV), prefix caching "
            + ("on: each turn reuses the KV blocks of the chat's history"
               if prefix_caching else "off: each turn recomputes the whole history")
        )
        options: dict = dict(
            model=str(ctx.model_dir), device=ctx.device, dtype=ctx.dtype,
            max_num_seqs=max(ctx.max_concurrency, 1), enable_prefix_caching=prefix_caching,
        )
        if not ctx.device.startswith("cuda"):
            need = ctx.kv_tokens * kv_bytes_per_token(ctx.model_dir, ctx.dtype)
            options["kv_cache_memory_gb"] = round(need * 1.25 / 1e9 + 0.05, 3)
        if ctx.max_num_batched_tokens:
            options["max_num_batched_tokens"] = ctx.max_num_batched_tokens
        self.engine = AsyncLLM(EngineConfig(**options))

    async def turn(self, key: int, prompt: list[int], max_tokens: int) -> TurnResult:
        from engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        submitted = time.perf_counter()
        first = None
        final = None
        async for out in self.engine.generate(prompt, params):
            if first is None and out.delta_token_ids:
                first = time.perf_counter()
            if out.finished:
                final = out
        finished = time.perf_counter()
        if final is None or final.finish_reason != "length":
            raise RuntimeError(f"pagechat ended a turn with {final and final.finish_reason}")
        return TurnResult(final.token_ids, submitted, first or finished, finished,
                          final.num_cached_tokens)

    def close(self) -> None:
        self.engine.shutdown()
        del self.engine


# ---- transformers generate --------------------------------------------------------------------


def load_hf_model(model_dir: Path, device: str, dtype: str) -> Qwen3ForCausalLM:
    from transformers import Qwen3ForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # transformers wraps .to with functools.wraps(nn.Module.to): typed unbound, `self` expected first
    return Qwen3ForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(device).eval()  # type: ignore[arg-type]


class _FirstTokenClock:
    """A transformers streamer that only notes when the first generated token came out."""

    def __init__(self) -> None:
        self.calls = 0
        self.time: float | None = None

    def put(self, value: object) -> None:  # first call: the prompt; second: the first new tokens
        self.calls += 1
        if self.calls == 2:
            self.time = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class _Pending:
    key: int
    prompt: list[int]
    max_tokens: int
    submitted: float
    future: asyncio.Future


class _QueuedGenerate(ChatPeer):
    """`generate` behind a queue: while the model is busy, requests wait; up to `max_batch`
    of the waiting ones run together next (what a plain transformers server can do)."""

    max_batch = 1

    def __init__(self, ctx: PeerContext) -> None:
        self.model = load_hf_model(ctx.model_dir, ctx.device, ctx.dtype)
        self.device = ctx.device
        self.pending: list[_Pending] = []
        self.worker: asyncio.Task | None = None
        self.wakeup: asyncio.Event | None = None

    async def turn(self, key: int, prompt: list[int], max_tokens: int) -> TurnResult:
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.get_loop() is not loop or self.worker.done():
            self.wakeup = asyncio.Event()
            self.worker = loop.create_task(self._work())
        item = _Pending(key, list(prompt), max_tokens, time.perf_counter(), loop.create_future())
        self.pending.append(item)
        assert self.wakeup is not None  # created with the worker, just above or earlier
        self.wakeup.set()
        return await item.future

    async def _work(self) -> None:
        while True:
            assert self.wakeup is not None  # set before turn() starts this task
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
                try:
                    results = await asyncio.to_thread(self._generate, batch)
                except Exception as exc:  # hand the error to the waiting callers
                    for item in batch:
                        item.future.set_exception(exc)
                    continue
                for item, result in zip(batch, results):
                    item.future.set_result(result)

    def _generate(self, batch: list[_Pending]) -> list[TurnResult]:
        raise NotImplementedError

    def close(self) -> None:
        if self.worker is not None and not self.worker.done():
            self.worker.cancel()
        del self.model


class HFGenerate(_QueuedGenerate):
    description = (
        "transformers generate (DynamicCache within a call), SDPA attention; every turn "
        "recomputes the whole history; requests that wait while the model is busy are "
        "left-padded into one batch (static batching)"
    )

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        self.max_batch = max(ctx.max_concurrency, 1)

    def _generate(self, batch: list[_Pending]) -> list[TurnResult]:
        width = max(len(item.prompt) for item in batch)
        new = max(item.max_tokens for item in batch)
        ids = torch.tensor([[0] * (width - len(i.prompt)) + i.prompt for i in batch], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(i.prompt)) + [1] * len(i.prompt) for i in batch], device=self.device
        )
        clock = _FirstTokenClock()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0, streamer=clock,
            )
        finished = time.perf_counter()
        return [
            TurnResult(out[row, width : width + item.max_tokens].tolist(), item.submitted,
                       clock.time or finished, finished, 0)
            for row, item in enumerate(batch)
        ]


class HFGenerateCache(_QueuedGenerate):
    description = (
        "transformers generate with the chat's DynamicCache carried from turn to turn, so a "
        "turn computes only its new tokens; one request at a time (a DynamicCache holds one "
        "sequence), the others wait"
    )

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        self.caches: dict[int, tuple[list[int], DynamicCache]] = {}

    def _generate(self, batch: list[_Pending]) -> list[TurnResult]:
        from transformers import DynamicCache

        (item,) = batch
        history, cache = self.caches.get(item.key, ([], None))
        cached = cache.get_seq_length() if cache is not None else 0
        if cache is None or item.prompt[:cached] != history[:cached]:
            cache, cached = DynamicCache(), 0
        clock = _FirstTokenClock()
        ids = torch.tensor([item.prompt], device=self.device)
        with torch.inference_mode(), warnings.catch_warnings():
            # `past_key_values` works on every transformers >= 4.51; newer ones call it `cache`.
            warnings.simplefilter("ignore", FutureWarning)
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                max_new_tokens=item.max_tokens, min_new_tokens=item.max_tokens,
                do_sample=False, pad_token_id=0, streamer=clock,
            )
        finished = time.perf_counter()
        self.caches[item.key] = (out[0].tolist(), cache)
        tokens = out[0, len(item.prompt) :].tolist()
        return [TurnResult(tokens, item.submitted, clock.time or finished, finished, cached)]

    def forget(self, key: int) -> None:
        self.caches.pop(key, None)


# ---- transformers continuous batching ---------------------------------------------------------


class HFContinuous(ChatPeer):
    description = (
        "transformers continuous batching (init_continuous_batching: paged KV, SDPA, chunked "
        "prefill) with prefix block sharing on, one manager kept for the whole run, "
        "streaming results to asyncio"
    )

    def __init__(self, ctx: PeerContext) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.cache import PagedAttentionCache

        self.model = load_hf_model(ctx.model_dir, ctx.device, ctx.dtype)
        options: dict = dict(allow_block_sharing=True, page_size=ctx.hf_page_size)
        if not ctx.device.startswith("cuda"):
            options["num_blocks"] = math.ceil(ctx.kv_tokens * 1.25 / ctx.hf_page_size) + 16
            options["max_batch_tokens"] = ctx.max_num_batched_tokens or 2048
        self.description += f", page size {ctx.hf_page_size}"
        config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=16)
        self.cached: dict[str, int] = {}
        # The manager does not report prefix hits; record what its cache finds per request.
        self._patched = (PagedAttentionCache, PagedAttentionCache.search_prefix_match)
        original, cached = PagedAttentionCache.search_prefix_match, self.cached

        def search_prefix_match(cache: PagedAttentionCache, request_id: str,
                                prompt_ids: list[int]) -> int:
            found = original(cache, request_id, prompt_ids)
            cached[request_id] = cached.get(request_id, 0) + found
            return found

        # Patched on purpose (close() restores it); mypy also mistypes the class attribute
        # (an extra `self`), hence `assignment` besides `method-assign`.
        PagedAttentionCache.search_prefix_match = search_prefix_match  # type: ignore[method-assign, assignment]
        self.manager = self.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(**options)
        )
        self.manager.start()
        self.count = 0

    async def turn(self, key: int, prompt: list[int], max_tokens: int) -> TurnResult:
        self.count += 1
        request_id = f"c{key}-{self.count}"
        queue: asyncio.Queue = asyncio.Queue()
        self.manager.register_result_handler(request_id, queue.put_nowait)
        submitted = time.perf_counter()
        self.manager.add_request(list(prompt), request_id=request_id, max_new_tokens=max_tokens,
                                 streaming=True, eos_token_id=-1)
        first = None
        while True:
            out = await queue.get()
            if first is None and out.generated_tokens:
                first = time.perf_counter()
            if out.error is not None:
                raise RuntimeError(f"transformers continuous batching failed: {out.error}")
            if out.is_finished():
                break
        finished = time.perf_counter()
        return TurnResult(list(out.generated_tokens), submitted, first or finished, finished,
                          self.cached.pop(request_id, 0))

    def close(self) -> None:
        try:
            self.manager.stop(block=True, timeout=30)
        finally:
            cls, original = self._patched
            cls.search_prefix_match = original  # type: ignore[method-assign]  # undoes __init__'s patch
            del self.manager, self.model


PEERS: dict[str, Callable[[PeerContext], ChatPeer]] = {
    "pagechat": lambda ctx: PagechatPeer(ctx, prefix_caching=True),
    "pagechat-no-prefix-cache": lambda ctx: PagechatPeer(ctx, prefix_caching=False),
    "hf-generate": HFGenerate,
    "hf-generate-cache": HFGenerateCache,
    "hf-continuous": HFContinuous,
}


# ---- the driver -------------------------------------------------------------------------------


@dataclass
class TurnRecord:
    conversation: int
    turn: int  # 1-based
    prompt_tokens: int
    previous_history_tokens: int  # previous turn's prompt + its answer (0 on the first turn)
    result: TurnResult

    def to_dict(self, t0: float) -> dict:
        r = self.result
        c = r.cached_tokens
        return {
            "conversation": self.conversation,
            "turn": self.turn,
            "prompt_tokens": self.prompt_tokens,
            "previous_history_tokens": self.previous_history_tokens,
            "cached_tokens": c,
            "hit_rate_of_previous_history": (
                c / self.previous_history_tokens if c is not None and self.previous_history_tokens else None
            ),
            "hit_rate_of_prompt": c / self.prompt_tokens if c is not None else None,
            "output_tokens": len(r.token_ids),
            "ttft_s": round(r.ttft_s, 4),
            "decode_tokens_per_s": r.decode_tokens_per_s,
            "submitted_s": round(r.submitted - t0, 4),
            "finished_s": round(r.finished - t0, 4),
        }


async def _converse(peer: ChatPeer, codec: ChatCodec, key: int,
                    conversation: Conversation) -> list[TurnRecord]:
    records: list[TurnRecord] = []
    prompt = conversation.first_prompt()
    previous = 0
    result: TurnResult | None = None
    for turn in range(conversation.num_turns):
        if result is not None:
            prompt = next_prompt(codec, prompt, result.token_ids, conversation.user_turns[turn])
        want = conversation.answer_lens[turn]
        result = await peer.turn(key, prompt, want)
        if len(result.token_ids) != want:
            raise RuntimeError(f"{type(peer).__name__} gave {len(result.token_ids)} tokens, not {want}")
        records.append(TurnRecord(key, turn + 1, len(prompt), previous, result))
        previous = len(prompt) + len(result.token_ids)
    peer.forget(key)
    return records


@dataclass
class PlayResult:
    records: list[dict]  # one per turn, TurnRecord.to_dict
    wall_s: float
    answers_digest: str  # sha256 of every answer's token ids: equal digests = same workload


async def play(peer: ChatPeer, codec: ChatCodec, conversations: list[Conversation]) -> PlayResult:
    """Warm the peer up, then run every conversation concurrently."""
    await peer.warmup()
    t0 = time.perf_counter()
    per_conversation = await asyncio.gather(
        *(_converse(peer, codec, i, c) for i, c in enumerate(conversations))
    )
    wall = time.perf_counter() - t0
    records = [r for rs in per_conversation for r in rs]
    answers = json.dumps([[r.conversation, r.turn, r.result.token_ids] for r in records])
    return PlayResult([r.to_dict(t0) for r in records], wall,
                      hashlib.sha256(answers.encode()).hexdigest()[:16])
