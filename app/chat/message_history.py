"""Chat history as OpenAI messages, for PAGECHAT_ENGINE_URL mode (`MessageHistory`).

With a remote engine there is no local tokenizer, so the history cannot be token ids: each
turn is kept as text and the whole conversation travels as messages (the upstream's own prefix
cache then does the reuse). Lengths are estimated from characters, conservatively, so the
oldest turns are dropped before the upstream would refuse the request. Documents enter the
user's turn as the same `<document>` blocks as in app.chat.token_history (file names escaped).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.chat.history import Answer, DocumentRead, NewDocument, TurnSummary, document_block

if TYPE_CHECKING:
    from app.chat.long_documents import Source
    from engine.client import ChatMessage, EngineClient
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams

# Qwen's tokenizer averages ~4 characters per token on English and ~1.5 on Chinese; 2 keeps
# the estimate on the safe side for mixed text.
CHARS_PER_TOKEN = 2
MESSAGE_OVERHEAD_TOKENS = 8  # <|im_start|>role\n ... <|im_end|>\n
STORAGE_KEY = "transcript"  # a stored chat row keeps its Transcript under this key


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS


def user_content(question: str, documents: list[tuple[str, str]]) -> str:
    """A user turn carrying its documents first, so follow-ups share the document prefix."""
    parts = [document_block(name, text) for name, text in documents]
    parts.append(question)
    return "\n\n".join(parts)


@dataclass
class Transcript:
    system_prompt: str = ""
    # {"user": str, "assistant": str}, and for turns asked in the chat UI also "message_id",
    # "question" (the end of "user"; what comes before it is the documents) and "documents"
    # (their names): an edited message re-runs its turn with the same documents.
    turns: list[dict] = field(default_factory=list)

    def messages(self, content: str, max_model_len: int | None, max_tokens: int) -> tuple[list[dict], int]:
        """Messages for a new user turn, dropping the oldest turns that do not fit; (messages, dropped)."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        tail = [{"role": "user", "content": content}]
        turns = list(self.turns)
        dropped = 0
        if max_model_len:
            budget = max_model_len - max_tokens
            used = sum(estimate_tokens(m["content"]) for m in head + tail)
            cost = [estimate_tokens(t["user"]) + estimate_tokens(t["assistant"]) for t in turns]
            while turns and used + sum(cost) > budget:
                turns.pop(0)
                cost.pop(0)
                dropped += 1
        middle = []
        for turn in turns:
            middle += [
                {"role": "user", "content": turn["user"]},
                {"role": "assistant", "content": turn["assistant"]},
            ]
        return head + middle + tail, dropped

    def commit(
        self,
        content: str,
        answer: str,
        *,
        message_id: str | None = None,
        question: str | None = None,
        documents: Sequence[str] = (),
    ) -> None:
        turn: dict[str, Any] = {"user": content, "assistant": answer}
        if message_id:
            turn.update(message_id=message_id, question=question or "", documents=list(documents))
        self.turns.append(turn)

    def to_dict(self) -> dict:
        return {"system_prompt": self.system_prompt, "turns": list(self.turns)}

    @classmethod
    def from_dict(cls, data: dict) -> Transcript:
        return cls(str(data.get("system_prompt", "")), [dict(t) for t in data.get("turns", [])])


def _documents_part(turn: dict) -> str:
    """The documents that lead a kept turn's user content (with their separating blank line)."""
    user, question = str(turn["user"]), str(turn.get("question") or "")
    return user[: len(user) - len(question)] if question and user.endswith(question) else ""


@dataclass
class MessageTurn:
    """A prepared turn of a MessageHistory: its messages, and the transcript they extend."""

    history: MessageHistory
    base: Transcript  # the history's transcript, cut before an edited turn
    messages: list[ChatMessage]
    content: str  # the new user message
    question: str
    message_id: str
    document_names: list[str]
    summary: TurnSummary

    def stream(
        self, engine: EngineClient, params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        return engine.chat(self.messages, params, request_id=request_id)

    def with_summaries(self, summaries: dict[str, list[Source]]) -> MessageTurn:
        return self  # documents travel whole to a remote engine: nothing is summarized

    def commit(self, answer: Answer) -> None:
        self.base.commit(
            self.content, answer.text, message_id=self.message_id, question=self.question,
            documents=self.document_names,
        )
        self.history.transcript = self.base


class MessageHistory:
    """`ChatHistory` as messages (a `Transcript`), for a remote engine."""

    def __init__(self, transcript: Transcript | None = None) -> None:
        self.transcript = transcript if transcript is not None else Transcript()

    def __len__(self) -> int:
        return len(self.transcript.turns)

    def set_system_prompt(self, prompt: str) -> None:
        self.transcript.system_prompt = prompt

    @property
    def thinking_switch(self) -> bool:
        return False  # the remote model's template is not known here

    def set_thinking(self, enabled: bool) -> None:
        """No switch for a remote engine (`thinking_switch` is False): nothing to change."""

    def _turn_of(self, message_id: str) -> int | None:
        for index, turn in enumerate(self.transcript.turns):
            if turn.get("message_id") and turn.get("message_id") == message_id:
                return index
        return None

    def document_names(self) -> list[str]:
        names = [n for turn in self.transcript.turns for n in turn.get("documents") or []]
        return list(dict.fromkeys(names))

    def documents_of(self, message_id: str) -> list[str]:
        index = self._turn_of(message_id)
        return [] if index is None else list(self.transcript.turns[index].get("documents") or [])

    def prepare(
        self,
        question: str,
        documents: Sequence[NewDocument],
        message_id: str,
        max_model_len: int,
        max_tokens: int,
    ) -> MessageTurn:
        kept = self.transcript
        index = self._turn_of(message_id)
        base = Transcript(kept.system_prompt, list(kept.turns[:index] if index is not None else kept.turns))
        names = list(kept.turns[index].get("documents") or []) if index is not None else []
        reused = _documents_part(kept.turns[index]) if index is not None else ""
        content = reused + user_content(question, [(d.name, d.text) for d in documents])
        names += [d.name for d in documents]
        messages, dropped = base.messages(content, max_model_len, max_tokens)
        summary = TurnSummary(
            max_tokens=max_tokens,
            documents=[DocumentRead(name) for name in names],
            dropped_turns=dropped,
        )
        return MessageTurn(self, base, messages, content, question, message_id, names, summary)

    def to_dict(self) -> dict[str, Any]:
        return {STORAGE_KEY: self.transcript.to_dict()}

    def restore(self, saved: dict[str, Any]) -> None:
        data = saved[STORAGE_KEY]
        if not isinstance(data, dict):
            raise TypeError(f"{STORAGE_KEY} is {type(data).__name__}, not a dict")
        self.transcript = Transcript.from_dict(data)
