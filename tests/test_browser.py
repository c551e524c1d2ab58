"""The page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright
against the demo server (`make demo`'s command: tiny random checkpoint, PAGECHAT_DEMO=1).

Needs /usr/bin/chromium (`apt-get install -y chromium`); skipped without it. Set
PAGECHAT_SCREENSHOT=docs/screenshot.png to refresh the README's screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.app_client import Server

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PAGECHAT_CHROMIUM", "/usr/bin/chromium")
STATS = re.compile(r"([\d,]+) prompt tokens · ([\d,]+) cached · first token [\d.]+ s · [\d.]+ tokens/s")
ANSWER = ".step[data-step-type='assistant_message']"
HOSTILE = "<b>bold?</b><script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"


@pytest.fixture(scope="module")
def demo_server(tiny_checkpoint, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("browser") / "data",
                 PAGECHAT_DEMO="1", PAGECHAT_MAX_MODEL_LEN="8192")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"],
        )
        yield browser
        browser.close()


def send(page, text: str) -> None:
    """Type and send once the page's socket is up (text typed earlier is dropped by the UI)."""
    for _ in range(50):
        page.fill("#chat-input", text)
        try:
            page.wait_for_selector("#chat-submit:not([disabled])", timeout=500)
            break
        except Exception:
            continue
    page.click("#chat-submit")


def wait_answer(page, count: int, timeout_s: float = 60) -> str:
    """Wait until `count` answers carry their stats line; returns the last one's text."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answers = page.locator(ANSWER, has_text="prompt tokens")
        if answers.count() >= count and page.locator("#chat-submit").count():
            return answers.nth(count - 1).inner_text()
        time.sleep(0.1)
    raise TimeoutError(f"no answer #{count}: {page.inner_text('body')[-1500:]}")


def test_chat_in_a_real_browser(demo_server, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    page = context.new_page()
    outside = []
    page.on("request", lambda r: None if r.url.startswith(demo_server.url) else outside.append(r.url))
    page.goto(demo_server.url)
    page.wait_for_selector("#chat-settings-open-modal", timeout=30_000)
    assert "answers are random text" in page.inner_text("body")  # the demo says so

    # 1. a streamed answer with its stats line; HTML in a message stays text
    send(page, "Hello! " + HOSTILE)
    page.wait_for_selector("#stop-button", timeout=15_000)
    lengths = set()
    while page.locator("#stop-button").count():
        last = page.locator(ANSWER).last.inner_text()
        lengths.add(len(last))
        time.sleep(0.05)
    first = wait_answer(page, 1)
    assert len(lengths) >= 3  # the text grew while it streamed
    match = STATS.search(first)
    assert match and int(match.group(1).replace(",", "")) > 0
    user = page.locator(".step[data-step-type='user_message']").last
    assert "<script>window.__pwned = 1</script>" in user.inner_text()
    assert user.locator("b, script, img").count() == 0
    assert page.evaluate("window.__pwned") is None

    # 2. stop mid-answer: the partial answer stays, marked as stopped
    answers_before = page.locator(ANSWER).count()
    send(page, "Tell me a very long story.")
    page.wait_for_selector("#stop-button", timeout=15_000)
    # The stop button shows before the answer's message exists: wait for the new message
    # itself to hold some text (`.last` alone would still be the first answer).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answers = page.locator(ANSWER)
        if answers.count() > answers_before and len(answers.last.inner_text()) >= 20:
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"the second answer never streamed: {page.inner_text('body')[-1500:]}")
    page.click("#stop-button")
    stopped = wait_answer(page, 2, timeout_s=20)
    assert "stopped" in stopped and STATS.search(stopped)

    # 3. the settings panel: shorter answers from now on
    page.click("#chat-settings-open-modal")
    page.fill("#max_tokens", "40")
    page.click("#chat-settings >> text=Confirm")
    page.wait_for_selector("#chat-settings", state="detached", timeout=5_000)

    # 4. upload a text file, ask twice: the second prompt reuses the cached document
    doc = tmp_path / "handbook.md"
    doc.write_text("# Team handbook\n\n" + "\n\n".join(
        f"Rule {i}: meetings on day {i} start at {8 + i % 4}:00 sharp." for i in range(60)))
    page.set_input_files("#upload-button-input", str(doc))
    page.wait_for_selector("#attachments >> text=handbook.md", timeout=15_000)
    send(page, "When do meetings start?")
    wait_answer(page, 3)
    page.wait_for_selector(".step >> text=handbook.md", timeout=5_000)  # the reading step
    send(page, "And on day 7?")
    fourth = wait_answer(page, 4)
    prompt, cached = (int(g.replace(",", "")) for g in STATS.search(fourth).groups())
    assert cached > 500 and cached < prompt  # the document's KV blocks were reused
    page.locator(".step[data-step-type='user_message']", has_text="When do meetings start?").evaluate(
        "e => e.scrollIntoView({block: 'start'})")
    time.sleep(0.3)
    screenshot = tmp_path / "chat.png"
    page.screenshot(path=str(screenshot))
    if target := os.environ.get("PAGECHAT_SCREENSHOT"):
        shutil.copy(screenshot, target)

    # 5. reload: the chat is in the history sidebar and opens with its messages
    page.reload()
    page.wait_for_selector("#thread-history", timeout=30_000)
    entry = page.locator("#thread-history li", has_text="Hello!").first
    entry.wait_for(timeout=15_000)
    entry.locator("a").click()
    page.wait_for_selector(f"{ANSWER} >> text=stopped", timeout=30_000)
    assert page.locator(ANSWER, has_text="prompt tokens").count() == 4
    assert outside == []  # no fonts, CDNs or anything else outside the server
    context.close()
