"""Documents larger than the context, kept by a chat as passages and searched for every question.

A document that fits stays whole in the turn that brought it (its KV blocks are reused by
every follow-up). One that does not fit becomes a `LongDocument`: its passages (with their page
markers) and each passage's size in tokens, stored with the chat's history so a reopened chat
can search it too. Each question then gets its own passages in its own turn, so everything
before that turn stays a cached prefix; `PassageBudget` decides how many tokens they may take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.documents import retrieval
from app.documents.retrieval import Passage, PassageIndex

if TYPE_CHECKING:
    from app.chat.token_history import ChatCodec

# Characters per passage: ~400 tokens of English, a few sentences or table rows (fewer in a
# small context, so a question still gets several passages).
PASSAGE_CHARS = 1500
MIN_PASSAGE_CHARS = 200


def passage_chars(room: int) -> int:
    """Passage length for a context whose prompt has `room` tokens for documents."""
    return max(MIN_PASSAGE_CHARS, min(PASSAGE_CHARS, room // 2))
# Share of the context that retrieved passages may take (PAGECHAT_PASSAGE_SHARE).
DEFAULT_PASSAGE_SHARE = 0.6


@dataclass
class Source:
    """A passage (or a section summary) given to the model for one answer, shown under it."""

    document: str
    index: int  # passage (or section) number, from 0
    text: str
    pages: list[int] = field(default_factory=list)
    kind: str = "passage"  # "passage" | "section" (a section summary)
    covers: int = 1  # a section summary: how many parts of the document it summarizes

    @property
    def label(self) -> str:
        """How the answer names it: "p. 12", "pp. 3-5", or "§4" (a passage without pages)."""
        if self.pages:
            span = retrieval.page_ranges(self.pages)
            return ("pp. " if ("-" in span or "," in span) else "p. ") + span
        return f"§{self.index + 1}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "document": self.document,
            "index": self.index,
            "text": self.text,
            "pages": self.pages,
            "kind": self.kind,
            "covers": self.covers,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Source:
        return cls(
            str(data["document"]),
            int(data["index"]),
            str(data.get("text", "")),
            [int(p) for p in data.get("pages") or []],
            str(data.get("kind", "passage")),
            int(data.get("covers", 1)),
        )


@dataclass
class LongDocument:
    """An over-context document: its passages and their sizes in tokens (block separators
    included), and its whole size."""

    name: str
    passages: list[Passage]
    sizes: list[int]
    full_tokens: int
    turn: int | None = None  # the chat turn that brought it (None: not kept yet)
    _index: PassageIndex | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(
        cls, codec: ChatCodec, name: str, text: str, full_tokens: int, chars: int = PASSAGE_CHARS
    ) -> LongDocument:
        """Cut into passages of about `chars` characters and tokenize them (blocking: a worker
        thread). Passages are tokenized in one batch."""
        passages = retrieval.split_passages(text, chars)
        blocks = [p.text + "\n\n" for p in passages]
        sizes = [len(ids) for ids in codec.tokenizer.encode_batch(blocks)]
        return cls(name, passages, sizes, full_tokens)

    @property
    def index(self) -> PassageIndex:
        """The search index, built on first use (not stored: it is rebuilt from the passages)."""
        if self._index is None:
            self._index = PassageIndex(self.passages)
        return self._index

    @property
    def pages(self) -> int | None:
        numbers = [p.page for p in self.passages if p.page is not None]
        return max(numbers) if numbers else None

    def search(self, question: str, budget: int) -> list[Passage]:
        return self.index.select(question, self.sizes, budget)

    def wants_whole(self, question: str) -> bool:
        return retrieval.wants_whole_document(question, self.index)

    def sections(self, max_tokens: int) -> list[list[Passage]]:
        """Consecutive runs of passages of at most `max_tokens` each (the map step's inputs)."""
        out: list[list[Passage]] = []
        current: list[Passage] = []
        used = 0
        for passage, size in zip(self.passages, self.sizes):
            if current and used + size > max_tokens:
                out.append(current)
                current, used = [], 0
            current.append(passage)
            used += size
        if current:
            out.append(current)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passages": [[p.text, p.page] for p in self.passages],
            "sizes": self.sizes,
            "full_tokens": self.full_tokens,
            "turn": self.turn,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongDocument:
        passages = [Passage(i, str(text), page) for i, (text, page) in enumerate(data["passages"])]
        sizes = [int(s) for s in data["sizes"]]
        if len(sizes) != len(passages):
            raise ValueError("a long document's passages and sizes differ in number")
        turn = data.get("turn")
        return cls(
            str(data["name"]),
            passages,
            sizes,
            int(data["full_tokens"]),
            None if turn is None else int(turn),
        )


def passage_sources(document: str, passages: Sequence[Passage]) -> list[Source]:
    return [
        Source(document, p.index, p.text, [p.page] if p.page is not None else []) for p in passages
    ]


@dataclass
class PassageBudget:
    """How many tokens the passages of one question may take.

    Retrieved passages in the prompt (all turns in it together) stay within `share` of the
    context, so earlier turns are not pushed out by a document: each question takes half of
    what is left of that share, and at least an eighth of it (past that point the chat's
    oldest turns leave the prompt as in any chat that outgrows the context).
    """

    share: float

    def cap(self, max_model_len: int) -> int:
        return int(self.share * max_model_len)

    def for_question(self, max_model_len: int, in_prompt: int) -> int:
        cap = self.cap(max_model_len)
        return max(cap // 8, (cap - in_prompt) // 2)
