"""BM25 passage picking, token coalescing, and the static config the page depends on."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from app.chat.streaming import Coalescer, close_open_fence
from app.documents import retrieval

ROOT = Path(__file__).resolve().parent.parent


def test_split_passages_keeps_page_markers():
    text = "[page 1]\n" + "\n\n".join(f"alpha{i} " + "filler " * 20 for i in range(6))
    text += "\n\n[page 2]\n" + "\n\n".join(f"beta{i} " + "filler " * 20 for i in range(6))
    passages = retrieval.split_passages(text, target_chars=800)
    assert len(passages) > 2
    assert all(p.text.startswith("[page ") for p in passages)
    joined = "".join(p.text for p in passages)
    assert all(joined.count(f"{w}{i} ") == 1 for w in ("alpha", "beta") for i in range(6))
    assert {p.page for p in passages if "beta" in p.text} == {2}


def test_bm25_picks_the_relevant_passages_in_document_order():
    filler = [f"Chapter {i}: the weather was mild and nothing happened." for i in range(30)]
    filler[7] = "The treasure is buried under the old oak tree near the river."
    filler[21] = "Pirates argued about the treasure map for hours."
    passages = [retrieval.Passage(i, text) for i, text in enumerate(filler)]
    scores = retrieval.bm25_scores("where is the treasure buried?", passages)
    assert max(range(30), key=scores.__getitem__) == 7
    chosen = retrieval.select_passages("where is the treasure buried?", passages, [10] * 30, budget=20)
    assert [p.index for p in chosen] == [7, 21]
    # no matching term: the beginning of the document
    chosen = retrieval.select_passages("zzz", passages, [10] * 30, budget=30)
    assert [p.index for p in chosen] == [0, 1, 2]


def test_chinese_terms_use_bigrams():
    passages = [retrieval.Passage(0, "今天天气很好，我们去公园散步。"), retrieval.Passage(1, "合同的付款期限是三十天。")]
    scores = retrieval.bm25_scores("付款期限是多少天？", passages)
    assert scores[1] > scores[0] == 0


async def test_coalescer_batches_by_time():
    now = [0.0]
    sent: list[str] = []

    async def emit(text):
        sent.append(text)

    c = Coalescer(emit, interval=0.04, clock=lambda: now[0])
    for i in range(100):  # 100 tokens over 0.5 s: ~13 flushes, not 100
        await c.add(f"t{i} ")
        now[0] += 0.005
    await c.flush()
    assert "".join(sent) == "".join(f"t{i} " for i in range(100))
    assert 10 <= len(sent) <= 16
    now[0] += 1
    await c.add("slow")  # a slow stream is not held back
    assert sent[-1] == "slow"


def test_close_open_fence():
    assert close_open_fence("a\n```py\nx = 1") == "a\n```py\nx = 1\n```"
    assert close_open_fence("```\nx\n```") == "```\nx\n```"


def test_upload_config_accepts_every_supported_extension():
    from app.documents.extraction import SUPPORTED_EXTENSIONS

    config = tomllib.loads((ROOT / ".chainlit" / "config.toml").read_text())
    upload = config["features"]["spontaneous_file_upload"]
    assert upload["enabled"] and upload["max_size_mb"] >= 1
    accept = upload["accept"]
    assert isinstance(accept, dict)  # the dict form: browsers send .md as octet-stream
    assert set(accept["application/*"]) == SUPPORTED_EXTENSIONS == set(accept["text/*"])
    assert config["features"]["unsafe_allow_html"] is False
    assert config["UI"]["name"] == "pagechat"
    theme = json.loads((ROOT / "public" / "theme.json").read_text())
    assert theme["custom_fonts"] == []


def test_translations_have_the_same_keys_and_placeholders():
    en = json.loads((ROOT / ".chainlit/translations/en-US.json").read_text())["pagechat"]
    zh = json.loads((ROOT / ".chainlit/translations/zh-CN.json").read_text())["pagechat"]
    assert en.keys() == zh.keys()
    for key in en:
        fields = lambda s: sorted(re.findall(r"\{(\w+)", s))  # noqa: E731
        assert fields(en[key]) == fields(zh[key]), key


@pytest.mark.parametrize(("language", "expected"), [("zh-CN", "演示模式"), ("zh-TW", "演示模式"), ("en-US", "Demo mode"), ("de-DE", "Demo mode"), (None, "Demo mode")])
def test_app_texts_follow_the_browser_language(language, expected):
    from app.chat.i18n import t

    assert expected in t("demo_notice", language)
    assert "1,234" in t("doc_read", language, name="a.txt", tokens=1234)


def test_offline_page_has_no_external_fetches():
    import chainlit

    from app.serving.chainlit_patches import strip_external_links

    html = (Path(chainlit.__file__).parent / "frontend" / "dist" / "index.html").read_text()
    assert "fonts.googleapis.com" in html and "cdn.jsdelivr.net" in html  # what Chainlit ships
    cleaned = strip_external_links(html)
    assert not re.search(r"(href|src)=\"https?://", cleaned)
    assert '<script type="module"' in cleaned
