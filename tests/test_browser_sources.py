"""Long documents in a real browser (headless Chromium driven by Playwright, as
tests/test_browser.py): the live reading line seen without expanding anything, sources under
an answer with page numbers that open the passage text, and after a server restart the
reopened chat keeps its sources and shows the re-read of its history.

Needs /usr/bin/chromium (`apt-get install -y chromium`); skipped without it.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.app_client import Server
from tests.test_browser import ANSWER, browser, send, wait_answer  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser

# The reading line: "<what>: 1,234 / 12,345 tokens (10%, about 3 s left)".
LIVE = re.compile(r"[\d,]+ / [\d,]+ tokens \(\d+%")
ENV = {
    "PAGECHAT_DEMO": "1",
    "PAGECHAT_MAX_MODEL_LEN": "32768",
    "PAGECHAT_MAX_NUM_BATCHED_TOKENS": "256",  # a long read takes many steps: the line is seen
    "PAGECHAT_KV_DISK_GB": "0",  # after the restart nothing is cached: the history is re-read
}


def _ledger(pages: int) -> str:
    out = []
    for page in range(1, pages + 1):
        body = "\n\n".join(
            f"Entry {page}.{i}: the ledger records ordinary deliveries of grain, timber and salt "
            f"to the warehouses of the northern district." for i in range(6)
        )
        if page == 57:
            body += "\n\nThe auditor found the missing sapphire brooch in the east granary."
        if page == 211:
            body += "\n\nThe harbour toll was raised to nine florins in spring."
        out.append(f"[page {page}]\n{body}")
    return "\n\n".join(out)


def _short_answers(page) -> None:
    """16-token answers: the random demo model would otherwise write 200 (slow on a CPU)."""
    page.click("#chat-settings-open-modal")
    page.fill("#max_tokens", "16")
    page.click("#chat-settings >> text=Confirm")
    page.wait_for_selector("#chat-settings", state="detached", timeout=5_000)


def _live_lines(page, seconds: float) -> list[str]:
    """Texts of the page's visible steps matching the live line, polled while an answer runs."""
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for text in page.locator(".step").all_inner_texts():
            for line in text.splitlines():
                if LIVE.search(line) and line not in seen:
                    seen.append(line)
        if seen and not page.locator("#stop-button").count():
            break
        time.sleep(0.1)
    return seen


def test_reading_line_sources_and_a_restart(tiny_checkpoint, tmp_path, browser):  # noqa: F811
    data = tmp_path / "data"
    srv = Server(tiny_checkpoint, data, **ENV)
    try:
        srv.wait_ready()
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
        page = context.new_page()
        page.goto(srv.url)
        page.wait_for_selector("#chat-settings-open-modal", timeout=30_000)
        _short_answers(page)

        # 1. a ~10K-token document that fits: the reading line with its numbers, not expanded
        manual = tmp_path / "manual.txt"
        manual.write_text("\n\n".join(
            f"Section {i}: valve {i} of the pump house is checked every {i % 9 + 1} days "
            f"by the night crew, who log pressure, temperature and flow." for i in range(300)))
        page.set_input_files("#upload-button-input", str(manual))
        page.wait_for_selector("#attachments >> text=manual.txt", timeout=15_000)
        send(page, "How often is valve 7 checked?")
        lines = _live_lines(page, 120)
        assert any("manual.txt: " in line for line in lines), lines
        wait_answer(page, 1, timeout_s=120)

        # 2. an over-context document: searched for the question, sources under the answer
        ledger = tmp_path / "ledger.txt"
        ledger.write_text(_ledger(300))
        page.set_input_files("#upload-button-input", str(ledger))
        page.wait_for_selector("#attachments >> text=ledger.txt", timeout=15_000)
        send(page, "Where was the sapphire brooch found?")
        wait_answer(page, 2, timeout_s=120)
        assert "searched again for every question" in page.inner_text("body")
        answer = page.locator(ANSWER, has_text="prompt tokens").nth(1)
        assert "Sources:" in answer.text_content()
        link = answer.locator(".element-link", has_text="p. 57")
        assert link.count() == 1
        link.click()
        page.wait_for_selector("#side-view-content >> text=sapphire brooch", timeout=10_000)
        thread_path = "/thread/" + page.url.split("/thread/", 1)[1]
        context.close()
    finally:
        srv.stop()

    # 3. restart: the reopened chat keeps its sources, and the follow-up re-reads the history
    srv = Server(tiny_checkpoint, data, **ENV)
    try:
        srv.wait_ready()
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
        page = context.new_page()
        page.goto(srv.url)  # the local user logs in on the chat page, then opens the thread
        page.wait_for_selector("#chat-settings-open-modal", timeout=30_000)
        page.goto(srv.url + thread_path)
        page.wait_for_selector(f"{ANSWER} .element-link >> text=/p\\. 57/i", timeout=30_000)
        send(page, "And how much was the harbour toll?")
        lines = _live_lines(page, 120)
        assert any("the conversation: " in line for line in lines), lines
        third = wait_answer(page, 3, timeout_s=120)
        assert "Sources:" in page.locator(ANSWER, has_text="prompt tokens").nth(2).text_content()
        assert "P. 211" in third.upper()
        context.close()
    finally:
        srv.stop()
