"""`LLM`: the offline, blocking front end (generate / chat over a batch of prompts)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any, TypeGuard

from engine.config import EngineConfig
from engine.llm_engine import EngineStats, LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

Prompt = str | list[int]


def _is_token_ids(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(t, int) for t in value) and bool(value)


class LLM:
    """Runs prompts to completion with continuous batching; results come back in input order.

    `LLM("Qwen/Qwen3-4B-Instruct-2507")` or a local directory; keyword arguments override
    EngineConfig (and the PAGECHAT_* environment).
    """

    def __init__(
        self, model: str | None = None, config: EngineConfig | None = None, **kwargs: Any
    ) -> None:
        if config is None:
            if model is not None:
                kwargs["model"] = model
            config = EngineConfig(**kwargs)
        elif model is not None or kwargs:
            config = config.model_copy(update={**kwargs, **({"model": model} if model else {})})
        self.config = config
        self.engine = LLMEngine(config)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt (the whole answer each). A prompt is text or a list of token ids."""
        batch: list[Prompt]
        if isinstance(prompts, str) or _is_token_ids(prompts):
            batch = [prompts]
        else:
            batch = list(prompts)  # type: ignore[arg-type]  # a Seq[Prompt] here
        settings: list[SamplingParams]
        if params is None or isinstance(params, SamplingParams):
            settings = [params or SamplingParams()] * len(batch)
        else:
            settings = list(params)
        if len(settings) != len(batch):
            raise ValueError(f"got {len(batch)} prompts but {len(settings)} SamplingParams")
        ids: list[str] = []
        try:
            for prompt, p in zip(batch, settings):
                ids.append(self.engine.add_request(prompt, p))
            return self._run(ids)
        finally:
            for rid in ids:  # after an error (or KeyboardInterrupt) leave nothing queued
                self.engine.abort(rid)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        conversations: list[list[dict[str, Any]]]
        if messages and isinstance(messages[0], dict):
            conversations = [messages]  # one conversation
        else:
            conversations = messages  # type: ignore[assignment]  # a list of them
        prompts: list[Prompt] = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations
        ]
        return self.generate(prompts, params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        while len(final) < len(wanted):
            if not self.engine.has_unfinished():
                raise RuntimeError("engine stopped with requests unfinished")
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[rid] for rid in request_ids]

    def stats(self) -> EngineStats:
        return self.engine.stats()
