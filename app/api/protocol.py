"""Request and response bodies of the OpenAI-compatible API, as pydantic models (the OpenAPI schema).

Field names and shapes follow OpenAI's API; `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`, `min_tokens`, ... are the usual vLLM extras. A field this server
does not know is refused (400 naming it), except OpenAI's bookkeeping fields (`user`,
`metadata`, `store`, `service_tier`), which are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.errors import APIError

MAX_N = 16  # most choices one request may ask for


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` is served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(
        extra="allow"
    )  # name, tool_calls, tool_call_id travel to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the chat template wants them: content joined into one string."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"Content part type `{part.type}` is not supported; only text parts are.",
                        param=f"messages.{i}.content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        item = message.model_dump(exclude_none=True)
        item["role"] = "system" if message.role == "developer" else message.role
        item["content"] = content or ""
        out.append(item)
    return out


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions. None means the model's default."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=0, description="0: completions with echo only")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # OpenAI's bookkeeping fields: accepted and ignored.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Extras (vLLM's names).
    top_k: int | None = Field(None, description="-1 or 0 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's: the prompt tokens' log-probabilities and their top N (app/api/logprobs.py).
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's prefix-cache salt, combined with the caller's tenant (app/serving/tenancy.py).
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    # Structured output (vLLM's guided decoding; at most one; engine/structured_output.py).
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | a named function
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    include_reasoning: bool = True  # vLLM's: false drops reasoning_content (app/api/reasoning.py)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is tool calls only
    reasoning_content: str | None = None  # a thinking model's <think> block (vLLM's field)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None  # vLLM's


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None  # vLLM's


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagechat"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
