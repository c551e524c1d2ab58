"""The chat history the engine sees: one interface, two implementations, chosen once.

A `ChatSession` keeps its chat as a `ChatHistory` and never asks which kind it holds:

- `app.chat.token_history.TokenHistory`: token ids, for the in-process engine (it has a
  tokenizer). Every follow-up's prompt extends the previous request's ids, so the KV cache of
  everything before is reused.
- `app.chat.message_history.MessageHistory`: OpenAI messages, for a remote engine (no local
  tokenizer); the upstream applies its chat template and its own prefix cache does the reuse.

`new_history(tokenizer)` chooses, from whether the engine client has a tokenizer, once per chat
when its engine is known. One turn goes: `prepare` (blocking: run it in a thread) returns a
`PreparedTurn` -> `stream` the engine's outputs -> `commit` what was generated (a stopped,
partial answer too). Nothing changes before `commit`: a turn that errs or is refused leaves
the history as it was, an edited message's cut included.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from app.api.reasoning import ThinkingMode

if TYPE_CHECKING:
    from app.chat.long_documents import Source
    from app.chat.summaries import SummaryJob
    from engine.client import EngineClient
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer


class ContextOverflow(ValueError):
    """The new message cannot fit the context even alone; `params` carry the numbers."""

    def __init__(self, code: str, message: str, **params: Any) -> None:
        super().__init__(message)
        self.code = code
        self.params = params


def document_block(name: str, body: str, note: str = "") -> str:
    """A document as the model reads it; the file name cannot close the tag or add attributes."""
    safe = re.sub(r'["<>\n\r]', "_", name)[:200]
    extra = f' note="{note}"' if note else ""
    return f'<document name="{safe}"{extra}>\n{body.strip()}\n</document>'


@dataclass
class NewDocument:
    """A document attached to the new message, as extracted text."""

    name: str
    text: str


@dataclass
class Excerpt:
    """An over-context document as one question reads it: the passages retrieved for it, or
    (`summarized`) the engine's summaries of `parts_kept` of its `parts_total` parts."""

    name: str
    full_tokens: int
    kept_tokens: int
    passages_kept: int
    passages_total: int
    pages: list[int] = field(default_factory=list)  # pages the kept passages (or parts) come from
    summarized: bool = False
    parts_kept: int = 0
    parts_total: int = 0
    document_pages: int | None = None  # the document's pages (None: no page markers)
    matched: bool = True  # False: no passage matched the question (its beginning was kept)


@dataclass
class DocumentRead:
    """A document that enters the new turn, and its size when the history counts tokens."""

    name: str
    tokens: int | None = None


@dataclass
class TurnSummary:
    """What the session tells the user about a prepared turn (the prompt stays in the history)."""

    max_tokens: int  # the answer's room, the context permitting
    # Prompt tokens, and how many lead with the previous request's ids; None when the history
    # does not count tokens (messages for a remote engine): no reading progress is shown then.
    prompt_tokens: int | None = None
    reused_tokens: int = 0
    documents: list[DocumentRead] = field(default_factory=list)
    excerpts: list[Excerpt] = field(default_factory=list)
    document_room: int = 0  # tokens the new documents could take
    dropped_turns: int = 0
    dropped_documents: list[str] = field(default_factory=list)
    # Passages (or section summaries) handed to the model for this answer, shown under it.
    sources: list[Source] = field(default_factory=list)
    # Over-context documents this question is about as a whole: the engine summarizes their
    # parts first (app.chat.summaries), then `PreparedTurn.with_summaries` rebuilds the turn.
    summary_jobs: list[SummaryJob] = field(default_factory=list)
    # How the answer's text splits into thinking and answer (the prompt may open <think>).
    thinking: ThinkingMode = ThinkingMode.AUTO


@dataclass
class Answer:
    """What the engine generated for a turn (possibly partial: stopped), to keep in the history."""

    token_ids: list[int]
    text: str
    finish_reason: str | None


class PreparedTurn(Protocol):
    """The next request, ready to send; the history changes only if it is committed."""

    @property
    def summary(self) -> TurnSummary: ...

    def stream(
        self, engine: EngineClient, params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs for this turn's prompt."""
        ...

    def commit(self, answer: Answer) -> None:
        """Keep the turn and its answer (a stopped answer too) in the history it came from."""
        ...

    def with_summaries(self, summaries: dict[str, list[Source]]) -> PreparedTurn:
        """The same turn with these section summaries (by document name) in place of the
        passages of `summary.summary_jobs`; blocking (tokenizes): run it in a thread."""
        ...


class ChatHistory(Protocol):
    """One chat as its engine sees it."""

    def __len__(self) -> int:
        """Turns kept (answered or stopped)."""
        ...

    def set_system_prompt(self, prompt: str) -> None: ...

    @property
    def thinking_switch(self) -> bool:
        """Whether the model's template turns thinking on and off (a hybrid Qwen3): the
        settings panel shows the switch only then."""
        ...

    def set_thinking(self, enabled: bool) -> None:
        """Thinking on or off for the next turns (`enable_thinking` of the template)."""
        ...

    def document_names(self) -> list[str]:
        """Names of the documents the chat's kept turns read, oldest first, each once (what a
        follow-up's reading step names when its prompt came from the cache)."""
        ...

    def documents_of(self, message_id: str) -> list[str]:
        """Names of the documents of the turn `message_id` asked: an edit of that message
        reads them again. Empty when no turn came from that message."""
        ...

    def prepare(
        self,
        question: str,
        documents: Sequence[NewDocument],
        message_id: str,
        max_model_len: int,
        max_tokens: int,
    ) -> PreparedTurn:
        """The next turn fitted into the context; blocking (tokenizes): run it in a thread.

        When a kept turn came from `message_id` (an edited message), the new turn replaces it
        and what followed, and keeps its documents. Raises ContextOverflow when the question
        alone does not fit.
        """
        ...

    def to_dict(self) -> dict[str, Any]:
        """The history as JSON-ready data, under the key of its kind (merged into the stored
        row: {"conversation": ...} or {"transcript": ...})."""
        ...

    def restore(self, saved: dict[str, Any]) -> None:
        """Replace the history with the one in a stored row. Raises KeyError, TypeError or
        ValueError when the row has none of this kind or it is unreadable."""
        ...


def new_history(tokenizer: Tokenizer | None, passage_share: float | None = None) -> ChatHistory:
    """An empty history of the kind the engine needs: token ids when it has a tokenizer (the
    in-process engine), messages when it has none (a remote engine). `passage_share`: the
    share of the context passages of over-context documents may take (token ids only)."""
    from app.chat.long_documents import PassageBudget
    from app.chat.message_history import MessageHistory
    from app.chat.token_history import ChatCodec, TokenHistory

    if tokenizer is None:
        return MessageHistory()
    budget = PassageBudget(passage_share) if passage_share is not None else None
    return TokenHistory(ChatCodec(tokenizer), passage_budget=budget)
