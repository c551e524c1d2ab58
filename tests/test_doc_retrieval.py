"""Over-context documents: searched for every question, earlier turns kept as a cached prefix,
whole-document questions answered map-reduce; passages cut on sentence, row and page
boundaries; notes and sources with their numbers.

The prompts are assembled by the real code (TokenHistory with the real Qwen3 tokenizer of the
tiny checkpoint); the engine is a fake `EngineClient` that records the ids it is handed and
reports as cached the leading 16-token blocks it saw before (what a prefix cache reuses).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncGenerator

import pytest

from app.chat.history import Answer, NewDocument
from app.chat.long_documents import PassageBudget
from app.chat.sources import excerpt_note, source_texts
from app.chat.summaries import MapProgress, Summarizer
from app.chat.token_history import ChatCodec, TokenHistory
from app.documents import retrieval
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

MAX_MODEL_LEN = 32_768
BLOCK = 16
FACTS = {  # question -> the planted sentence that answers it
    "Where did the lighthouse keeper hide the emerald?": (
        "The lighthouse keeper hid the emerald beneath the ninth stair of the copper tower."
    ),
    "When does the ferry to Kesselbrook depart?": (
        "The ferry to Kesselbrook departs at 06:45 every Tuesday from pier eleven."
    ),
    "How deep did Professor Quimby measure the glacier?": (
        "Professor Quimby measured the Vostrand glacier at 412 metres deep."
    ),
}


class FakeEngine:
    """An EngineClient that answers a fixed text, records every prompt, and reports as cached
    the whole 16-token blocks a previous prompt (+ answer) shares with the new one."""

    def __init__(self, tokenizer, answer: str = "Here is what the document says.") -> None:
        self._tokenizer = tokenizer
        self.answer = answer
        self.prompts: list[list[int]] = []
        self.seen: list[list[int]] = []

    @property
    def model_id(self) -> str:
        return "fake"

    @property
    def max_model_len(self) -> int:
        return MAX_MODEL_LEN

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def generation_defaults(self) -> dict:
        return {}

    def _cached(self, prompt: list[int]) -> int:
        best = 0
        for old in self.seen:
            n = 0
            for a, b in zip(old, prompt):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(prompt) - 1) // BLOCK * BLOCK

    async def generate(
        self, prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        assert isinstance(prompt, list)
        self.prompts.append(list(prompt))
        cached = self._cached(prompt)
        answer = self.answer.format(n=len(self.prompts))
        ids = self._tokenizer.encode(answer) + [self._tokenizer.im_end_id]
        if params is not None and params.max_tokens:
            ids = ids[: params.max_tokens]
        self.seen.append(list(prompt) + ids)
        now = time.monotonic()
        yield RequestOutput(
            request_id or "r", list(prompt), text=answer, token_ids=ids, delta_text=answer,
            delta_token_ids=ids, finished=True, finish_reason="stop", num_cached_tokens=cached,
            arrival_time=now, first_token_time=now, num_computed_prompt_tokens=len(prompt),
            num_generated_tokens=len(ids),
        )

    def chat(self, messages, params=None, request_id=None):
        raise NotImplementedError("the token history sends ids")

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        raise NotImplementedError

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def codec(tokenizer):
    return ChatCodec(tokenizer)


def _filler_paragraph(rng: random.Random, vocabulary: list[str]) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(8, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def big_document() -> tuple[str, dict[str, int]]:
    """~400K tokens of paged filler text with the three facts planted on known pages."""
    rng = random.Random(7)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "dun", "pel", "sor", "ith", "ban", "cu"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(900)]
    vocabulary += "the of and report quarterly budget meeting river system network".split()
    pages: list[str] = []
    fact_pages = {}
    planted = dict(zip(FACTS.values(), (137, 512, 861)))
    for page in range(1, 1001):
        paragraphs = [_filler_paragraph(rng, vocabulary) for _ in range(4)]
        for fact, where in planted.items():
            if page == where:
                paragraphs.insert(2, paragraphs[2][:120] + " " + fact + " " + paragraphs[2][120:])
                fact_pages[fact] = page
        pages.append(f"[page {page}]\n" + "\n\n".join(paragraphs))
    return "\n\n".join(pages), fact_pages


def _starts_with(ids: list[int], prefix: list[int]) -> bool:
    return ids[: len(prefix)] == prefix


async def _ask(history: TokenHistory, engine: FakeEngine, question: str, docs=(), message_id="m"):
    turn = await asyncio.to_thread(history.prepare, question, list(docs), message_id, MAX_MODEL_LEN, 256)
    outputs = [out async for out in turn.stream(engine, SamplingParams(max_tokens=256), "r")]
    final = outputs[-1]
    turn.commit(Answer(list(final.token_ids), final.text, final.finish_reason))
    return turn, final


async def test_each_question_gets_its_passages_and_keeps_the_whole_history_cached(codec, tokenizer, big_document):
    text, fact_pages = big_document
    engine = FakeEngine(tokenizer)
    history = TokenHistory(codec)
    questions = list(FACTS)
    started = time.monotonic()
    first, out = await _ask(history, engine, questions[0], [NewDocument("atlas.txt", text)], "m0")
    prepare_s = time.monotonic() - started
    excerpt = first.summary.excerpts[0]
    assert excerpt.full_tokens >= 400_000, "the generated document is the 400K-token case"
    assert prepare_s < 30

    previous_full = engine.prompts[0] + list(out.token_ids)
    for i, question in enumerate(questions):
        if i:
            turn, out = await _ask(history, engine, question, (), f"m{i}")
        else:
            turn = first
        prompt = engine.prompts[i]
        fact = FACTS[question]
        page = fact_pages[fact]
        if i:
            # the follow-up extends the previous request's ids (prompt + answer): all cached
            assert _starts_with(prompt, previous_full)
            assert out.num_cached_tokens == len(previous_full) // BLOCK * BLOCK
            assert turn.summary.reused_tokens == len(previous_full)
            assert turn.summary.dropped_turns == 0
            earlier = tokenizer.decode(prompt[: len(previous_full)])
            assert all(q in earlier and FACTS[q] in earlier for q in questions[:i])  # earlier turns stay
        new_part = tokenizer.decode(prompt[len(previous_full) if i else 0 :])
        assert fact in new_part and f"[page {page}]" in new_part  # this question's passage, with its page
        assert question in new_part
        # the sources are the passages handed to the engine, with their pages
        assert page in {p for s in turn.summary.sources for p in s.pages}
        assert any(fact in s.text for s in turn.summary.sources)
        # passages of this question within its budget; all passages within the share
        passages = sum(len(p.ids) for p in turn.plan.turn.pieces if p.kind == "passages")
        budget = PassageBudget(0.6)
        in_prompt_before = sum(t.passage_tokens for t in history.conversation.turns[:i])
        assert passages <= budget.for_question(MAX_MODEL_LEN, in_prompt_before)
        assert in_prompt_before + passages <= budget.cap(MAX_MODEL_LEN)
        assert len(prompt) + turn.summary.max_tokens <= MAX_MODEL_LEN
        previous_full = prompt + list(out.token_ids)

    # Stored and restored (a restart): the document is still searched, the prefix still holds.
    saved = history.to_dict()
    restored = TokenHistory(codec)
    restored.restore(saved)
    assert [d.name for d in restored.conversation.library] == ["atlas.txt"]
    turn, out = await _ask(restored, engine, questions[0].replace("Where", "Tell me again where"), (), "m9")
    assert _starts_with(engine.prompts[-1], previous_full)
    assert FACTS[questions[0]] in tokenizer.decode(engine.prompts[-1][len(previous_full) :])


async def test_whole_document_question_is_answered_from_summaries_of_every_part(codec, tokenizer, big_document):
    text, fact_pages = big_document
    text = text[: len(text) // 4]  # ~100K tokens: the map step's requests stay few
    engine = FakeEngine(tokenizer, answer="Summary {n}: people, places and numbers.")
    history = TokenHistory(codec)
    turn = await asyncio.to_thread(
        history.prepare, "Summarize this document", [NewDocument("atlas.txt", text)], "m0", MAX_MODEL_LEN, 256
    )
    assert len(turn.summary.summary_jobs) == 1
    job = turn.summary.summary_jobs[0]
    seen: list[tuple[int, int]] = []

    async def on_progress(p: MapProgress) -> None:
        seen.append((p.done, p.total))

    tracked: list[str] = []
    summarizer = Summarizer(engine, codec, SamplingParams(max_tokens=64), tracked.append, tracked.remove, on_progress)
    parts = await summarizer.run(job, "Summarize this document")
    assert not tracked  # every map request was untracked once done
    assert len(parts) == len(job.parts) > 1
    assert seen[0] == (0, len(job.parts)) and seen[-1] == (len(job.parts), len(job.parts))
    # the map step read the whole document: the first planted fact is in one of its prompts
    maps = [tokenizer.decode(p) for p in engine.prompts]
    assert sum(FACTS[next(iter(FACTS))] in m for m in maps) == 1
    assert all("Summarize this part of the document" in m for m in maps)
    assert {p for s in parts for p in s.pages} == set(range(1, max(s.pages[-1] for s in parts) + 1))

    final = await asyncio.to_thread(turn.with_summaries, {"atlas.txt": parts})
    assert not final.summary.summary_jobs
    excerpt = final.summary.excerpts[0]
    assert excerpt.summarized and excerpt.parts_kept == excerpt.parts_total == len(parts)
    prompt_text = tokenizer.decode(final.plan.prompt_ids)
    assert all(f"Summary {n}:" in prompt_text for n in range(1, len(parts) + 1))
    assert f"[part 1 of {len(parts)}, pages 1-" in prompt_text
    note = excerpt_note(excerpt, "en-US")
    assert f"each of its {len(parts)} parts" in note and "(pages 1-" in note
    assert "个部分" in excerpt_note(excerpt, "zh-CN")
    line, texts = source_texts(final.summary.sources, "en-US")
    assert line.startswith("**Sources:**") and "part 1" in line and len(texts) == len(parts)
    assert texts["part 1"].startswith("**atlas.txt**, part 1 (pp. 1-") and "Summary " in texts["part 1"]


def test_specific_and_whole_document_questions_are_told_apart():
    passages = [retrieval.Passage(i, f"Chapter {i}. The council met and talked about the harvest.") for i in range(40)]
    passages[17] = retrieval.Passage(17, "Chapter 17. The vault code is PLATYPUS-42.")
    index = retrieval.PassageIndex(passages)
    assert not retrieval.wants_whole_document("What is the vault code?", index)
    assert retrieval.wants_whole_document("Summarize the document", index)
    assert retrieval.wants_whole_document("请总结这份文件", index)
    assert retrieval.wants_whole_document("What is this about?", index)  # names nothing particular
    assert retrieval.wants_whole_document("What did the council talk about?", index)  # in every chapter


def test_passages_cut_on_sentences_rows_and_pages_with_the_table_header_repeated():
    sentences = [f"Sentence number {i} says something about topic {i % 7}." for i in range(200)]
    header = "id,city,population"
    rows = [f"{i},City{i},{1000 + i}" for i in range(3000)]
    text = "[page 1]\n" + " ".join(sentences) + "\n\n[page 2]\n" + "\n".join([header, *rows])
    passages = retrieval.split_passages(text, target_chars=1500)
    assert all(p.text.startswith("[page ") for p in passages)
    prose = [p for p in passages if p.page == 1]
    assert len(prose) > 3
    for p in prose:  # whole sentences only
        body = p.text.split("\n", 1)[1]
        assert body.startswith("Sentence number") and body.endswith(".")
    table = [p for p in passages if p.page == 2]
    assert len(table) > 20
    seen = []
    for p in table:
        lines = p.text.split("\n")
        assert lines[1] == header  # every passage of the table repeats its header
        for line in lines[2:]:
            assert re.fullmatch(r"\d+,City\d+,\d+", line)  # no row is cut
            seen.append(line)
    assert seen == rows


def test_markdown_table_keeps_its_header_and_separator():
    table = "| name | value |\n| --- | --- |\n" + "\n".join(f"| item {i} | {i * 3} |" for i in range(400))
    passages = retrieval.split_passages(table, target_chars=800)
    assert len(passages) > 5
    assert all(p.text.startswith("| name | value |\n| --- | --- |\n| item ") for p in passages)


def test_notes_and_sources_name_pages_in_english_and_chinese(codec, tokenizer):
    paragraphs = [f"[page {i}]\nDay {i}: the weather was mild and the harbour quiet." for i in range(1, 400)]
    paragraphs[41] = "[page 42]\nThe harbour master logged the whale sighting at dawn."
    paragraphs[42] = "[page 43]\nA second whale sighting followed at noon."
    history = TokenHistory(codec)
    turn = history.prepare("When was the whale sighting?", [NewDocument("log.pdf", "\n\n".join(paragraphs))], "m", 2048, 64)
    excerpt = turn.summary.excerpts[0]
    assert excerpt.pages == [42, 43]
    note = excerpt_note(excerpt, "en-US")
    assert f"read 2 of its {excerpt.passages_total} passages" in note and "from pages 42-43" in note
    zh = excerpt_note(excerpt, "zh-CN")
    assert "来自第 42-43 页" in zh and f"其 {excerpt.passages_total} 段中的 2 段" in zh
    line, texts = source_texts(turn.summary.sources, "zh-CN")
    assert line == "**来源：** p. 42 · p. 43"
    assert list(texts) == ["p. 42", "p. 43"]
    assert "whale sighting at dawn" in texts["p. 42"] and "at noon" in texts["p. 43"]
    nothing = history.prepare("zzqx?", [NewDocument("log.pdf", "\n\n".join(paragraphs))], "m2", 2048, 64)
    unmatched = nothing.summary.excerpts[0]
    assert not unmatched.matched and unmatched.pages[0] == 1
    assert nothing.summary.summary_jobs  # matching nothing: a whole-document question
    assert "none of its 399 passages matches this question, so this answer read its first" in excerpt_note(unmatched, "en-US")
    assert "没有与本问题匹配的内容" in excerpt_note(unmatched, "zh-CN")


def test_an_edited_message_keeps_its_long_document_and_forgets_later_ones(codec):
    def doc(word: str) -> str:
        return "\n\n".join(f"[page {i}]\nRoutine entry {i} about {word} shipments." for i in range(1, 300))

    history = TokenHistory(codec)
    for i, (question, docs) in enumerate([
        ("Which routine entry mentions barley?", [NewDocument("barley.txt", doc("barley"))]),
        ("And oats?", [NewDocument("oats.txt", doc("oats"))]),
    ]):
        turn = history.prepare(question, docs, f"m{i}", 2048, 32)
        assert turn.summary.excerpts  # too large for 2,048 tokens: searched, not read whole
        turn.commit(Answer(codec.tokenizer.encode("ok") + [codec.im_end], "ok", "stop"))
    assert history.documents_of("m0") == ["barley.txt"] and history.documents_of("m1") == ["oats.txt"]
    edited = history.prepare("Which routine entry is number 12 about barley?", [], "m0", 2048, 32)
    assert [e.name for e in edited.summary.excerpts] == ["barley.txt"]  # oats.txt came later
    assert "[page 12]" in codec.tokenizer.decode(edited.plan.prompt_ids)
    edited.commit(Answer(codec.tokenizer.encode("ok") + [codec.im_end], "ok", "stop"))
    assert len(history) == 1 and [d.name for d in history.conversation.library] == ["barley.txt"]


def _max_gap_while(fn) -> float:
    """Longest pause of a 10 ms ticker thread while `fn` runs (GIL held that long)."""
    import threading

    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return max(gaps, default=0.0)


@pytest.mark.timing
def test_a_long_document_encodes_in_chunks_to_the_same_ids_without_holding_the_gil(codec, tokenizer):
    rng = random.Random(3)
    parts = []
    for i in range(6000):
        kind = i % 6
        if kind == 0:
            parts.append(f"Paragraph {i}. " + " ".join(rng.choice(["river", "Budget", "naïve", "café"]) for _ in range(30)))
        elif kind == 1:
            parts.append("合同的付款期限是三十天。" * 5 + "\n鹦鹉在树上。")
        elif kind == 2:
            parts.append("def f(x):\n    if x:\n        return x  # indented\n\n\n    return None")
        elif kind == 3:
            parts.append("| a | b |\r\n| --- | --- |\r\n| 1 | 2 |")
        elif kind == 4:
            parts.append("  leading spaces, then <|im_start|>user and <|im_end|> as text\n\t\ttabs")
        else:
            parts.append("- item one\n- item two\n\n\n\n1. numbered")
    text = "\n\n".join(parts)
    ids = codec.text(text)
    reference = []  # the whole text in one encode, control tokens kept as text the same way
    start = 0
    for match in re.finditer(r"<\|[A-Za-z0-9_]{1,40}\|>", text):
        reference += tokenizer.encode(text[start : match.start() + 1])
        start = match.start() + 1
    reference += tokenizer.encode(text[start:])
    assert ids == reference and len(ids) > 100_000
    whole_gap = _max_gap_while(lambda: tokenizer.encode(text))
    chunked_gap = _max_gap_while(lambda: codec.text(text))
    assert chunked_gap < max(0.2, whole_gap / 4), (chunked_gap, whole_gap)
