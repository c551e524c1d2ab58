"""A chat as token ids, so every follow-up reuses the KV blocks of everything before it.

The prompt of turn n+1 is exactly the prompt of turn n, plus the ids the model generated
(closed by `<|im_end|>`), plus the new turn's ids
`\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`. Old turns are never
re-tokenized: re-tokenized text can differ from what was generated and would miss the cache.

Documents enter inside the user's turn, before the question, so later questions share their
prefix. When the chat outgrows the context, the oldest turns are dropped but their documents
are carried into the first remaining turn while they fit. A document too large for the context
is kept as passages (`app.chat.long_documents.LongDocument`, in `Conversation.library`) and
searched for every question: the passages for a question enter that question's turn, so the
turns before it stay a cached prefix; a question about the whole document gets the engine's
summaries of its parts instead (`app.chat.summaries`).

Thinking models (app.chat.thinking): the new turn ends with the opening the checkpoint's
template gives its generation prompt (`<think>\n`, or `<think>\n\n</think>\n\n` with thinking
switched off), and earlier answers enter later prompts without their thinking, as Qwen3's
templates render them (the model card asks for it): only the last answer is computed again,
everything before it stays a cached prefix.

`Conversation` is the data (and what is stored, under "conversation"); `TokenHistory` is the
`app.chat.history.ChatHistory` a chat session holds when the engine has a tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from app.chat.history import (
    Answer,
    ContextOverflow,
    DocumentRead,
    Excerpt,
    NewDocument,
    TurnSummary,
    document_block,
)
from app.chat.long_documents import (
    DEFAULT_PASSAGE_SHARE,
    LongDocument,
    PassageBudget,
    Source,
    passage_chars,
    passage_sources,
)
from app.chat.summaries import SummaryJob, summary_body
from app.chat.thinking import THINK_END, THINK_START, opening_mode, thinking_template

if TYPE_CHECKING:
    from engine.client import EngineClient
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams

__all__ = [  # the shared pieces live in app.chat.history; tests and bench import them from here
    "ChatCodec", "ContextOverflow", "Conversation", "Excerpt", "NewDocument", "Piece", "Plan",
    "TokenHistory", "Turn", "document_block",
]

# Chat-format control tokens typed by a user must stay text, never become control tokens.
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
# A long text (a document) is encoded in chunks cut after a newline that a non-space follows:
# Qwen's pre-tokenizer never joins across such a point (a newline run ends a pre-token and no
# pre-token starts with one), so the ids are those of the whole text. `encode_batch` releases
# the GIL (one long `encode` holds it: a 500K-token document stalled every other thread,
# the event loop included, for 3 s here) and spreads the chunks over threads.
LONG_TEXT_CHARS = 20_000
CHUNK_CHARS = 8_192
_SAFE_CUT = re.compile(r"\n(?=\S)")
FORMAT_VERSION = 1
# A document with this many characters per token of room is not read whole (no tokenizer
# packs more than a few characters into a token on real text); it is cut into passages first.
SURELY_LONG_CHARS = 8


class TokenizerLike(Protocol):
    im_end_id: int
    eos_token_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class ChatCodec:
    """Token ids of the pieces of the Qwen3 chat format (ChatML)."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self.user_prefix = tokenizer.encode("<|im_start|>user\n")
        self.turn_suffix = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
        self.system_prefix = tokenizer.encode("<|im_start|>system\n")
        self.system_suffix = tokenizer.encode("<|im_end|>\n")
        self.newline = tokenizer.encode("\n")
        self.im_end = tokenizer.im_end_id
        self.eos = set(tokenizer.eos_token_ids) | {self.im_end}
        self.thinking = thinking_template(tokenizer)
        self._openings = {
            enabled: tokenizer.encode(text) if text else []
            for enabled, text in ((True, self.thinking.opening_on), (False, self.thinking.opening_off))
        }
        self.think_start = _single_id(tokenizer, THINK_START)
        # Only a template that knows thinking drops it from earlier answers (an instruct one
        # shows them as generated).
        template = getattr(tokenizer, "chat_template", None) or ""
        self.think_end = _single_id(tokenizer, THINK_END) if THINK_END in template else None

    def opening(self, enable_thinking: bool) -> list[int]:
        """Ids the template puts after `<|im_start|>assistant\\n` in a generation prompt."""
        return list(self._openings[enable_thinking])

    def past_answer(self, opening: Sequence[int], answer: Sequence[int]) -> list[int]:
        """A kept answer (after its turn's `opening`) as later prompts show it: what follows
        its last `</think>`, leading newlines dropped, as Qwen3's templates render an earlier
        assistant turn. An answer stopped while thinking shows as empty (its thinking is all
        there is); an answer without thinking stays as generated (its KV stays cached)."""
        ids = [*opening, *answer]
        if self.think_end is not None and self.think_end in ids:
            rest = ids[len(ids) - ids[::-1].index(self.think_end) :]
            while rest and rest[0] != self.im_end and _only_newlines(self.tokenizer.decode(rest[:1])):
                rest.pop(0)
            return rest
        if self.think_start is not None and ids[:1] == [self.think_start]:
            return [self.im_end]
        return ids

    def text(self, text: str) -> list[int]:
        """Ids of plain text; `<|im_start|>` and friends written in it stay plain text."""
        ids: list[int] = []
        start = 0
        for match in _CONTROL_TOKEN.finditer(text):
            cut = match.start() + 1  # split "<" from "|im_start|>": no control token survives
            ids += self._encode(text[start:cut])
            start = cut
        if start < len(text):
            ids += self._encode(text[start:])
        return ids

    def _encode(self, text: str) -> list[int]:
        if len(text) <= LONG_TEXT_CHARS:
            return self.tokenizer.encode(text)
        chunks: list[str] = []
        start = 0
        for match in _SAFE_CUT.finditer(text):
            if match.end() - start >= CHUNK_CHARS:
                chunks.append(text[start : match.end()])
                start = match.end()
        chunks.append(text[start:])
        return [i for ids in self.tokenizer.encode_batch(chunks) for i in ids]

    def system(self, prompt: str) -> list[int]:
        prompt = prompt.strip()
        if not prompt:
            return []
        return self.system_prefix + self.text(prompt) + self.system_suffix

    def document(self, name: str, body: str, note: str = "") -> list[int]:
        """A document block, followed by the blank line that separates it from what follows."""
        return self.text(document_block(name, body, note) + "\n\n")

    def close_answer(self, ids: Sequence[int]) -> list[int]:
        """Generated ids ending in `<|im_end|>`, as the chat format wants after an answer."""
        ids = list(ids)
        if ids and ids[-1] == self.im_end:
            return ids
        if ids and ids[-1] in self.eos:
            ids[-1] = self.im_end  # <|endoftext|>: its KV was never computed, replacing is free
            return ids
        return ids + [self.im_end]


def _single_id(tokenizer: TokenizerLike, token: str) -> int | None:
    ids = tokenizer.encode(token)
    return ids[0] if len(ids) == 1 else None


def _only_newlines(text: str) -> bool:
    return bool(text) and not text.strip("\n")


@dataclass
class Piece:
    """Part of a user turn: a whole document, the passages (or part summaries) of an
    over-context document retrieved for this turn's question, or the question."""

    kind: str  # "document" | "passages" | "question"
    ids: list[int]
    name: str = ""
    full_tokens: int | None = None  # an excerpted document: its whole size
    sources: list[Source] = field(default_factory=list)  # "passages": what they came from

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"kind": self.kind, "ids": self.ids, "name": self.name, "full_tokens": self.full_tokens}
        if self.sources:
            data["sources"] = [s.to_dict() for s in self.sources]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Piece:
        sources = [Source.from_dict(s) for s in data.get("sources") or []]
        return cls(data["kind"], list(data["ids"]), data.get("name", ""), data.get("full_tokens"), sources)


@dataclass
class Turn:
    pieces: list[Piece]
    question: str
    answer_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    message_id: str | None = None  # the chat message that asked it (to follow edits)
    # What the template put after "<|im_start|>assistant\n" when it was asked ("<think>\n"...).
    opening_ids: list[int] = field(default_factory=list)

    def shown_answer(self, codec: ChatCodec) -> list[int]:
        """The answer as the prompts after it show it (its thinking dropped)."""
        return codec.past_answer(self.opening_ids, self.answer_ids)

    @property
    def documents(self) -> list[Piece]:
        """Whole documents (carried when the turn leaves the prompt; passages are not)."""
        return [p for p in self.pieces if p.kind == "document"]

    @property
    def passage_tokens(self) -> int:
        return sum(len(p.ids) for p in self.pieces if p.kind == "passages")

    def to_dict(self) -> dict:
        return {
            "pieces": [p.to_dict() for p in self.pieces],
            "question": self.question,
            "answer_ids": self.answer_ids,
            "finish_reason": self.finish_reason,
            "message_id": self.message_id,
            "opening_ids": self.opening_ids,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Turn:
        return cls(
            [Piece.from_dict(p) for p in data["pieces"]],
            data.get("question", ""),
            list(data.get("answer_ids", [])),
            data.get("finish_reason"),
            data.get("message_id"),
            list(data.get("opening_ids", [])),
        )


@dataclass
class Plan:
    """The next request's prompt, and the history window it implies once the turn is kept."""

    prompt_ids: list[int]
    turn: Turn
    first_turn: int
    carried: list[Piece]
    max_tokens: int
    budget: int
    dropped_turns: int = 0
    dropped_documents: list[str] = field(default_factory=list)
    excerpts: list[Excerpt] = field(default_factory=list)
    reused_tokens: int = 0  # leading prompt ids identical to the previous request's ids
    document_room: int = 0  # tokens the new documents could take
    library: list[LongDocument] = field(default_factory=list)  # the chat's, with this turn's
    summary_jobs: list[SummaryJob] = field(default_factory=list)

    @property
    def sources(self) -> list[Source]:
        return [s for p in self.turn.pieces for s in p.sources]


@dataclass
class Ingested:
    """New documents, tokenized: whole pieces, and those too large as long documents."""

    whole: list[Piece] = field(default_factory=list)
    long: list[LongDocument] = field(default_factory=list)


@dataclass
class Conversation:
    """Everything needed to rebuild the exact prompt ids of a chat (and to persist it)."""

    system_prompt: str = ""
    system_ids: list[int] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    first_turn: int = 0  # turns before this one no longer enter the prompt
    carried: list[Piece] = field(default_factory=list)  # their documents that still do
    library: list[LongDocument] = field(default_factory=list)  # over-context documents

    def copy(self) -> Conversation:
        """A copy whose turn lists can change without changing this one (the turns are shared)."""
        return replace(
            self, system_ids=list(self.system_ids), turns=list(self.turns), carried=list(self.carried),
            library=list(self.library),
        )

    def set_system_prompt(self, prompt: str, codec: ChatCodec) -> None:
        if prompt.strip() != self.system_prompt:
            self.system_prompt = prompt.strip()
            self.system_ids = codec.system(prompt)

    @property
    def window(self) -> list[Turn]:
        return self.turns[self.first_turn :]

    def prompt_ids(self, codec: ChatCodec, new_turn: Turn | None = None) -> list[int]:
        """The prompt for the window plus `new_turn` (or the whole window, answers included)."""
        return build_prompt(codec, self.system_ids, self.window, self.carried, new_turn)

    def prepare(
        self,
        codec: ChatCodec,
        question: str,
        documents: Sequence[NewDocument],
        max_model_len: int,
        max_tokens: int,
        reuse_documents: Sequence[Piece] = (),
        passage_budget: PassageBudget | None = None,
        summaries: dict[str, list[Source]] | None = None,
        ingested: Ingested | None = None,
        enable_thinking: bool = True,
    ) -> Plan:
        """Tokenize the new turn and fit everything into the context. Blocking: use a thread.

        `reuse_documents` are already tokenized document pieces (an edited turn keeps its files).
        Over-context documents (new ones and the chat's library) are searched for `question`
        within `passage_budget`; `summaries` (by document name) replace the passages of a
        document the question is about as a whole. `ingested`: the new documents as an earlier
        call tokenized them (the same turn again, with summaries).
        """
        policy = passage_budget or PassageBudget(DEFAULT_PASSAGE_SHARE)
        reserve = max(1, min(max_tokens, max_model_len // 4))
        budget = max_model_len - reserve
        question_piece = Piece("question", codec.text(question.strip()))
        opening = codec.opening(enable_thinking)
        fixed = (
            len(self.system_ids) + len(codec.user_prefix) + len(codec.turn_suffix)
            + len(question_piece.ids) + len(opening)
        )
        if fixed > budget:
            raise ContextOverflow(
                "message_too_long",
                f"this message is {len(question_piece.ids):,} tokens; the context holds "
                f"{budget:,} for the prompt ({max_model_len:,} in all)",
                tokens=len(question_piece.ids),
                budget=budget,
                max_model_len=max_model_len,
            )
        reused = list(reuse_documents)
        room = budget - fixed - sum(len(p.ids) for p in reused)
        if ingested is None:
            ingested = self.ingest(codec, documents, room)
        library = self.library + ingested.long
        free = room - sum(len(p.ids) for p in ingested.whole)
        in_prompt = sum(t.passage_tokens for t in self.window)
        searched = min(free, policy.for_question(max_model_len, in_prompt))
        passage_pieces, excerpts, jobs = _search_library(
            codec, question, library, searched, summaries or {}, max_model_len
        )
        turn = Turn(
            reused + ingested.whole + passage_pieces + [question_piece], question.strip(),
            opening_ids=opening,
        )

        window = list(self.window)
        carried = list(self.carried)
        first_turn = self.first_turn
        dropped_turns = 0
        dropped_docs: list[str] = []

        def size() -> int:
            return prompt_length(codec, self.system_ids, window, carried, turn)

        while window and (size() > budget or in_prompt + turn.passage_tokens > policy.cap(max_model_len)):
            gone = window.pop(0)
            in_prompt -= gone.passage_tokens
            first_turn += 1
            dropped_turns += 1
            carried += gone.documents
        while size() > budget and carried:
            dropped_docs.append(carried.pop(0).name)
        prompt = build_prompt(codec, self.system_ids, window, carried, turn)
        unchanged = dropped_turns == 0 and not dropped_docs
        reused_tokens = 0
        if unchanged and window:
            # The previous request's prompt and what it generated, up to where the shown answer
            # (its thinking dropped) departs from it.
            last = window[-1]
            shown = last.shown_answer(codec)
            sent = [*last.opening_ids, *last.answer_ids]
            same = next((i for i, (a, b) in enumerate(zip(shown, sent)) if a != b), min(len(shown), len(sent)))
            reused_tokens = prompt_length(codec, self.system_ids, window, carried, None) - len(shown) + same
        return Plan(
            prompt_ids=prompt,
            turn=turn,
            first_turn=first_turn,
            carried=carried,
            max_tokens=max(1, min(max_tokens, max_model_len - len(prompt))),
            budget=budget,
            dropped_turns=dropped_turns,
            dropped_documents=dropped_docs,
            excerpts=excerpts,
            reused_tokens=reused_tokens,
            document_room=max(0, room),
            library=library,
            summary_jobs=jobs,
        )

    @staticmethod
    def ingest(codec: ChatCodec, documents: Sequence[NewDocument], room: int) -> Ingested:
        """Tokenize new documents: all whole when they fit `room` together; otherwise those
        larger than their share of it become long documents (searched, not read whole)."""
        # Far more characters than the room holds tokens: cut and tokenize it as passages
        # straight away (their sizes add up to its size), not whole and then again as passages.
        chars = passage_chars(room)
        built = [
            LongDocument.build(codec, d.name, d.text, 0, chars) if len(d.text) > SURELY_LONG_CHARS * room else None
            for d in documents
        ]
        pieces: list[Piece | None] = [
            None if b is not None else Piece("document", codec.document(d.name, d.text), d.name)
            for d, b in zip(documents, built)
        ]
        sizes = []
        for d, b, p in zip(documents, built, pieces):
            if b is not None:
                b.full_tokens = sum(b.sizes) + len(codec.document(d.name, ""))
                sizes.append(b.full_tokens)
            else:
                assert p is not None
                sizes.append(len(p.ids))
        total = sum(sizes)
        out = Ingested()
        for doc, long, piece, size in zip(documents, built, pieces, sizes):
            if total <= room or size <= room * size // total:
                out.whole.append(piece or Piece("document", codec.document(doc.name, doc.text), doc.name))
            else:
                out.long.append(long or LongDocument.build(codec, doc.name, doc.text, size, chars))
        return out

    def truncate(self, index: int) -> Turn:
        """Forget turn `index` and everything after it (an edited message); returns that turn.
        Long documents brought by the turns after it are forgotten too."""
        turn = self.turns[index]
        self.turns = self.turns[:index]
        self.library = [d for d in self.library if d.turn is None or d.turn <= index]
        if self.first_turn > index:
            self.first_turn = index
            kept = [d for t in self.turns for d in t.documents]
            self.carried = [p for p in self.carried if any(p.ids == d.ids for d in kept)]
        return turn

    def commit(self, plan: Plan, generated_ids: Sequence[int], finish_reason: str | None, codec: ChatCodec) -> Turn:
        """Keep the turn with what was generated (also a partial, stopped answer), thinking
        included: later prompts drop it (`Turn.shown_answer`), the stored chat keeps it."""
        turn = plan.turn
        turn.answer_ids = codec.close_answer(generated_ids)
        turn.finish_reason = finish_reason
        self.turns.append(turn)
        self.first_turn = plan.first_turn
        self.carried = list(plan.carried)
        for doc in plan.library:
            if doc.turn is None:
                doc.turn = len(self.turns) - 1
        self.library = list(plan.library)
        return turn

    # ---- persistence ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "system_prompt": self.system_prompt,
            "system_ids": self.system_ids,
            "turns": [t.to_dict() for t in self.turns],
            "first_turn": self.first_turn,
            "carried": [p.to_dict() for p in self.carried],
            "library": [d.to_dict() for d in self.library],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Conversation:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown chat history format {data.get('version')!r}")
        return cls(
            system_prompt=data.get("system_prompt", ""),
            system_ids=list(data.get("system_ids", [])),
            turns=[Turn.from_dict(t) for t in data.get("turns", [])],
            first_turn=int(data.get("first_turn", 0)),
            carried=[Piece.from_dict(p) for p in data.get("carried", [])],
            library=[LongDocument.from_dict(d) for d in data.get("library", [])],
        )


STORAGE_KEY = "conversation"  # a stored chat row keeps its Conversation under this key


@dataclass
class TurnRequest:
    """What a turn was prepared from, to prepare it again with summaries."""

    question: str
    message_id: str
    max_model_len: int
    max_tokens: int
    reused: list[Piece]
    ingested: Ingested | None = None
    enable_thinking: bool = True


@dataclass
class TokenTurn:
    """A prepared turn of a TokenHistory: its plan, and the conversation the plan extends."""

    history: TokenHistory
    base: Conversation  # the history's conversation, cut before an edited turn
    plan: Plan
    summary: TurnSummary
    request: TurnRequest

    def stream(
        self, engine: EngineClient, params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        return engine.generate(self.plan.prompt_ids, params, request_id=request_id)

    def with_summaries(self, summaries: dict[str, list[Source]]) -> TokenTurn:
        return self.history.plan_turn(self.base, self.request, summaries)

    def commit(self, answer: Answer) -> None:
        self.base.commit(self.plan, answer.token_ids, answer.finish_reason, self.history.codec)
        self.history.conversation = self.base


class TokenHistory:
    """`ChatHistory` as token ids (a `Conversation`), for the in-process engine."""

    def __init__(
        self, codec: ChatCodec, conversation: Conversation | None = None,
        passage_budget: PassageBudget | None = None,
    ) -> None:
        self.codec = codec
        self.conversation = conversation if conversation is not None else Conversation()
        self.passage_budget = passage_budget or PassageBudget(DEFAULT_PASSAGE_SHARE)
        self.enable_thinking = True  # a hybrid model's switch (chat_template_kwargs' meaning)

    def __len__(self) -> int:
        return len(self.conversation.turns)

    def set_system_prompt(self, prompt: str) -> None:
        self.conversation.set_system_prompt(prompt, self.codec)

    @property
    def thinking_switch(self) -> bool:
        return self.codec.thinking.switchable

    def set_thinking(self, enabled: bool) -> None:
        self.enable_thinking = enabled

    def _turn_of(self, message_id: str) -> int | None:
        for index, turn in enumerate(self.conversation.turns):
            if turn.message_id and turn.message_id == message_id:
                return index
        return None

    def document_names(self) -> list[str]:
        whole = [p.name for turn in self.conversation.turns for p in turn.documents]
        return list(dict.fromkeys(whole + [d.name for d in self.conversation.library]))

    def documents_of(self, message_id: str) -> list[str]:
        index = self._turn_of(message_id)
        if index is None:
            return []
        whole = [p.name for p in self.conversation.turns[index].documents]
        return whole + [d.name for d in self.conversation.library if d.turn == index]

    def prepare(
        self,
        question: str,
        documents: Sequence[NewDocument],
        message_id: str,
        max_model_len: int,
        max_tokens: int,
    ) -> TokenTurn:
        base = self.conversation.copy()
        index = self._turn_of(message_id)
        reused = base.truncate(index).documents if index is not None else []
        request = TurnRequest(
            question, message_id, max_model_len, max_tokens, reused,
            enable_thinking=self.enable_thinking,
        )
        return self.plan_turn(base, request, None, documents)

    def plan_turn(
        self, base: Conversation, request: TurnRequest, summaries: dict[str, list[Source]] | None,
        documents: Sequence[NewDocument] = (),
    ) -> TokenTurn:
        reserve = max(1, min(request.max_tokens, request.max_model_len // 4))
        if request.ingested is None:
            fixed = (
                len(base.system_ids) + len(self.codec.user_prefix) + len(self.codec.turn_suffix)
                + len(self.codec.opening(request.enable_thinking))
                + len(self.codec.text(request.question.strip()))
                + sum(len(p.ids) for p in request.reused)
            )
            request.ingested = base.ingest(self.codec, documents, request.max_model_len - reserve - fixed)
        plan = base.prepare(
            self.codec, request.question, (), request.max_model_len, request.max_tokens,
            request.reused, self.passage_budget, summaries, request.ingested,
            request.enable_thinking,
        )
        plan.turn.message_id = request.message_id
        summary = TurnSummary(
            max_tokens=plan.max_tokens,
            prompt_tokens=len(plan.prompt_ids),
            reused_tokens=plan.reused_tokens,
            documents=[DocumentRead(p.name, len(p.ids)) for p in plan.turn.documents],
            excerpts=plan.excerpts,
            document_room=plan.document_room,
            dropped_turns=plan.dropped_turns,
            dropped_documents=plan.dropped_documents,
            sources=plan.sources,
            summary_jobs=plan.summary_jobs,
            thinking=opening_mode(self.codec.thinking.opening(request.enable_thinking)),
        )
        return TokenTurn(self, base, plan, summary, request)

    def to_dict(self) -> dict[str, Any]:
        return {STORAGE_KEY: self.conversation.to_dict()}

    def restore(self, saved: dict[str, Any]) -> None:
        data = saved[STORAGE_KEY]
        if not isinstance(data, dict):
            raise TypeError(f"{STORAGE_KEY} is {type(data).__name__}, not a dict")
        self.conversation = Conversation.from_dict(data)


def _search_library(
    codec: ChatCodec,
    question: str,
    library: Sequence[LongDocument],
    budget: int,
    summaries: dict[str, list[Source]],
    max_model_len: int,
) -> tuple[list[Piece], list[Excerpt], list[SummaryJob]]:
    """The pieces this question reads from the over-context documents: for each, its passages
    for the question (or, given, the summaries of its parts), within its share of `budget`
    (shares by size). A question about a document as a whole also gets a summary job."""
    pieces: list[Piece] = []
    excerpts: list[Excerpt] = []
    jobs: list[SummaryJob] = []
    total = sum(d.full_tokens for d in library)
    for doc in library:
        share = budget * doc.full_tokens // total if total else 0
        overhead = len(codec.document(doc.name, "", _note(9999, 9999)))
        room = max(0, share - overhead)
        if doc.name in summaries:
            parts = summaries[doc.name]
            body, kept = summary_body(parts, room, codec)
            note = f"summaries of {len(kept)} of its {len(parts)} parts, written for this question"
            ids = codec.document(doc.name, body, note)
            pieces.append(Piece("passages", ids, doc.name, doc.full_tokens, kept))
            pages = sorted({p for s in kept for p in s.pages})
            excerpts.append(Excerpt(
                doc.name, doc.full_tokens, len(ids), len(kept), len(doc.passages), pages,
                summarized=True, parts_kept=sum(s.covers for s in kept),
                parts_total=sum(s.covers for s in parts),
                document_pages=doc.pages,
            ))
            continue
        if doc.wants_whole(question):
            jobs.append(SummaryJob.plan(doc, room, max_model_len, codec))
        chosen = doc.search(question, room)
        if not chosen:
            excerpts.append(Excerpt(doc.name, doc.full_tokens, 0, 0, len(doc.passages), document_pages=doc.pages))
            continue
        body = "\n\n".join(p.text for p in chosen)
        ids = codec.document(doc.name, body, _note(len(chosen), len(doc.passages)))
        pieces.append(Piece("passages", ids, doc.name, doc.full_tokens, passage_sources(doc.name, chosen)))
        pages = sorted({p.page for p in chosen if p.page is not None})
        excerpts.append(Excerpt(
            doc.name, doc.full_tokens, len(ids), len(chosen), len(doc.passages), pages,
            document_pages=doc.pages, matched=any(doc.index.scores(question)),
        ))
    return pieces, excerpts, jobs


def _note(kept: int, total: int) -> str:
    return f"{kept} of its {total} passages, retrieved for this question"


def _user_ids_length(codec: ChatCodec, turn: Turn, carried: Sequence[Piece]) -> int:
    return (
        len(codec.user_prefix) + sum(len(p.ids) for p in carried)
        + sum(len(p.ids) for p in turn.pieces) + len(codec.turn_suffix)
    )


def _after_suffix(codec: ChatCodec, turn: Turn, new_turn: Turn | None) -> list[int]:
    """What follows a turn's `<|im_start|>assistant\\n`: the new turn's opening (the model
    goes on from there), or an earlier turn's answer without its thinking."""
    return list(turn.opening_ids) if turn is new_turn else turn.shown_answer(codec)


def prompt_length(
    codec: ChatCodec, system_ids: Sequence[int], window: Sequence[Turn], carried: Sequence[Piece],
    new_turn: Turn | None,
) -> int:
    turns = list(window) + ([new_turn] if new_turn else [])
    n = len(system_ids)
    for j, turn in enumerate(turns):
        n += len(codec.newline) if j else 0
        n += _user_ids_length(codec, turn, carried if j == 0 else ())
        n += len(_after_suffix(codec, turn, new_turn))
    return n


def build_prompt(
    codec: ChatCodec, system_ids: Sequence[int], window: Sequence[Turn], carried: Sequence[Piece],
    new_turn: Turn | None,
) -> list[int]:
    """system + turns (+ carried documents inside the first one) + the new turn's user part."""
    turns = list(window) + ([new_turn] if new_turn else [])
    ids = list(system_ids)
    for j, turn in enumerate(turns):
        if j:
            ids += codec.newline
        ids += codec.user_prefix
        if j == 0:
            for piece in carried:
                ids += piece.ids
        for piece in turn.pieces:
            ids += piece.ids
        ids += codec.turn_suffix
        ids += _after_suffix(codec, turn, new_turn)
    return ids
