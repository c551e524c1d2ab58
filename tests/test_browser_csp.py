"""The page under its Content-Security-Policy in a real browser (headless Chromium through
Playwright, like tests/test_browser.py): the chat still works (an answer streams, the settings
panel, a file upload, the copy button) without a single CSP violation, while an image pointing
at another host (a markdown image in a message, or one a script adds) is never fetched, and a
reopened chat shows such an image as a link.

Needs /usr/bin/chromium (`apt-get install -y chromium`); skipped without it.
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from tests.app_client import Server, free_port
from tests.test_browser import ANSWER, browser, send, wait_answer  # noqa: F401  (browser: fixture)

pytestmark = pytest.mark.browser

RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
    e => window.__csp.push(e.effectiveDirective + ' ' + e.blockedURI));
"""


class Beacon:
    """An HTTP server on another port (another origin) that records every request it gets."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def csp_server(tiny_checkpoint, tmp_path_factory):
    srv = Server(
        tiny_checkpoint, tmp_path_factory.mktemp("browser-csp") / "data", PAGECHAT_DEMO="1"
    )
    try:
        srv.wait_ready(timeout=180)  # one start took over 60 s on a loaded 2-core machine
        yield srv
    finally:
        srv.stop()


def test_the_chat_works_under_its_csp_and_other_hosts_get_nothing(csp_server, browser, tmp_path):  # noqa: F811
    beacon = Beacon()
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=csp_server.url)
    page = context.new_page()
    page.add_init_script(RECORD_VIOLATIONS)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        response = page.goto(csp_server.url)
        assert "img-src 'self' data: blob:" in response.headers["content-security-policy"]
        page.wait_for_selector("#chat-settings-open-modal", timeout=30_000)

        # an answer streams over the websocket
        send(page, "Hello there")
        first = wait_answer(page, 1)
        assert "prompt tokens" in first

        # the settings panel opens and applies
        page.click("#chat-settings-open-modal")
        page.fill("#max_tokens", "12")
        page.click("#chat-settings >> text=Confirm")
        page.wait_for_selector("#chat-settings", state="detached", timeout=5_000)

        # a file upload, asked about
        doc = tmp_path / "notes.md"
        doc.write_text("# Notes\n\nThe meeting is on Tuesday at nine.")
        page.set_input_files("#upload-button-input", str(doc))
        page.wait_for_selector("#attachments >> text=notes.md", timeout=15_000)
        send(page, "When is the meeting?")
        wait_answer(page, 2)
        page.wait_for_selector(".step >> text=notes.md", timeout=5_000)

        # the copy button puts the answer on the clipboard
        answer = page.locator(ANSWER).last
        answer.hover()
        answer.locator("button:has(svg.lucide-copy)").first.click()
        time.sleep(0.3)
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied.strip() and copied.strip()[:20] in answer.inner_text()

        assert page.evaluate("window.__csp") == []  # nothing the chat does was blocked
        assert not [e for e in errors if "Content Security Policy" in e]

        # a markdown image to another host in a message, and one a script adds: not fetched
        send(page, f"![pixel]({beacon.url('/markdown.gif?secret=31-41-59')})")
        wait_answer(page, 3)
        page.evaluate(f"""() => {{ const img = document.createElement('img');
            img.src = '{beacon.url("/script.gif?secret=31-41-59")}'; document.body.appendChild(img); }}""")
        deadline = time.monotonic() + 5
        while not page.evaluate("window.__csp.some(v => v.startsWith('img-src'))"):
            assert time.monotonic() < deadline, page.evaluate("window.__csp")
            time.sleep(0.1)
        time.sleep(0.5)
        assert beacon.hits == []

        # reopened from the history, the message shows the image as a link to click
        page.reload()
        page.wait_for_selector("#thread-history", timeout=30_000)
        page.locator("#thread-history li", has_text="Hello there").first.locator("a").click()
        link = page.locator(f"a[href^='{beacon.url('/markdown.gif')}']")
        link.first.wait_for(timeout=30_000)
        assert "image: pixel" in link.first.inner_text()
        assert page.locator(f"img[src^='{beacon.url('')}']").count() == 0
        assert beacon.hits == []
    finally:
        context.close()
        beacon.close()
