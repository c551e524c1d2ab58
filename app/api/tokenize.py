"""vLLM's `/tokenize` and `/detokenize`, with its request and response shapes.

`/tokenize` takes a text `prompt` (encoded as /v1/completions encodes it: control tokens
written in it are the tokens) or chat `messages` (rendered by the chat template and encoded as
/v1/chat/completions does: control tokens written in messages stay plain text), and answers
`{"count", "max_model_len", "tokens", "token_strs"}`. `/detokenize` turns `tokens` back into
`{"prompt"}`. Both need the in-process engine (a remote one tokenizes on its own server) and,
when PAGECHAT_API_KEYS is set, a key. Long texts are encoded in the tokenizer's worker process.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api.errors import APIError, OpenAIRoute
from app.api.protocol import ChatMessage, template_messages
from app.api.served_model import check_model, engine_of
from app.api.structured import InvalidRequest
from app.api.tools import plan_tools
from engine.client import EngineClient
from engine.tokenizer import Tokenizer
from engine.tokenizer_process import TokenizerProcess


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=16 * 1024 * 1024)


class DetokenizeResponse(BaseModel):
    prompt: str


router = APIRouter(route_class=OpenAIRoute, tags=["vllm"])


async def _local_tokenizer(request: Request, model: str | None) -> tuple[EngineClient, Tokenizer]:
    engine = engine_of(request)
    if model is not None:
        await check_model(request, engine, model)
    if engine.tokenizer is None:
        raise APIError(
            400, "Tokenizing is not served through a remote engine: ask the engine's server."
        )
    return engine, engine.tokenizer


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    engine, tokenizer = await _local_tokenizer(request, body.model)
    process = TokenizerProcess.of(tokenizer)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Send either `prompt` or `messages`.", param="prompt")
    if body.prompt is not None:
        if body.add_special_tokens is False or not _adds_special_tokens(tokenizer):
            ids = await process.encode(body.prompt)
        else:
            ids = tokenizer.backend.encode(body.prompt, add_special_tokens=True).ids
    else:
        assert body.messages is not None
        if body.add_special_tokens and _adds_special_tokens(tokenizer):
            raise APIError(
                400,
                "add_special_tokens with messages is not served: the chat template writes the "
                "special tokens itself.",
                param="add_special_tokens",
            )
        try:
            tools = plan_tools(body.tools, None, True).tools
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param) from exc
        options = {
            **(body.chat_template_kwargs or {}),
            "add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message,
        }
        try:
            ids = await process.encode_chat(
                template_messages(body.messages), tools=tools, **options
            )
        except Exception as exc:  # the template refuses some message orders (raise_exception)
            raise APIError(
                400, f"The chat template could not render these messages: {exc}", param="messages"
            ) from exc
    strs = None
    if body.return_token_strs:
        strs = [tokenizer.id_to_token(i) or "" for i in ids]
    return TokenizeResponse(
        count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs
    )


def _adds_special_tokens(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's post-processor adds tokens (a BOS); Qwen3's adds none."""
    return bool(tokenizer.backend.encode("", add_special_tokens=True).ids)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    _, tokenizer = await _local_tokenizer(request, body.model)
    bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise APIError(
            400,
            f"Token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1}).",
            param="tokens",
        )
    return DetokenizeResponse(prompt=await TokenizerProcess.of(tokenizer).decode(body.tokens))
