"""Issue 17 item 6 in a real browser: a hybrid thinking model's answer in the chat, its thinking
in a collapsible step that streams, the answer in its own message, and the settings switch.

Random weights never write `<think>` or `</think>`, and the chat has no logit_bias: the
checkpoint is made to. Its tied embedding row of `<think>` is 1.5x the row of the token the
model writes first, so `<think>` wins there; then the row of `</think>` becomes 1.5x the row of
a token the model writes some 30 tokens into its thinking. Greedy decoding (temperature 0 in
generation_config.json, the chat's default) then thinks, closes the block and answers: real
tokens from a real engine, split by the chat's own code. The path is checked with the engine
before the server starts.

Needs /usr/bin/chromium like tests/test_browser.py; skipped without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.app_client import Server
from tests.test_browser import ANSWER, browser, send, wait_answer  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser

QUESTION = "What is two plus two?"
STEP = ".step[data-step-type='llm']"


def greedy(path: Path, prompt_ids: list[int]) -> tuple[list[int], str]:
    from engine import LLM, SamplingParams

    out = LLM(str(path)).generate([prompt_ids], SamplingParams(temperature=0, max_tokens=60))[0]
    return out.token_ids, out.text


def thinking_checkpoint(path: Path) -> tuple[Path, str, str]:
    """A tiny hybrid checkpoint whose greedy answer to QUESTION thinks, then answers; returns
    it, the thinking's text and the answer's first 60 tokens' text."""
    from safetensors.torch import load_file, save_file

    from engine.tiny import write_checkpoint
    from engine.tokenizer import Tokenizer

    path = write_checkpoint(path, template="hybrid")
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.0}))
    tok = Tokenizer.from_dir(path)
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}])  # the chat's ids
    weights = load_file(path / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]

    def rewrite(token: int, like: int) -> tuple[list[int], str]:
        embed[token] = 1.5 * embed[like]
        save_file(weights, path / "model.safetensors")
        return greedy(path, prompt)

    ids, _ = greedy(path, prompt)
    ids, _ = rewrite(think, ids[0])
    assert ids[0] == think
    for k in range(30, 45):  # a token first written there ends the thinking
        if ids[k] in ids[:k]:
            continue
        got, text = rewrite(end, ids[k])
        if got[0] == think and end in got[20:40]:
            match = re.match(r"<think>(.*?)</think>(.*)", text, re.S)
            assert match
            return path, match.group(1), match.group(2)
    raise AssertionError("no token of the thinking could be made to close it")


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    path, reasoning, content = thinking_checkpoint(tmp_path_factory.mktemp("thinking"))
    srv = Server(path, tmp_path_factory.mktemp("thinking-browser") / "data", PAGECHAT_DEMO="1")
    try:
        srv.wait_ready()
        yield srv, reasoning, content
    finally:
        srv.stop()


def test_the_thinking_streams_into_a_collapsible_step_above_the_answer(thinking_server, browser):  # noqa: F811
    srv, reasoning, content = thinking_server
    words = re.findall(r"[A-Za-z]{4,}", reasoning)
    # The answer's first words, none of them in the thinking.
    opening = [w for w in re.findall(r"[A-Za-z]{4,}", content)[:8] if w not in reasoning][:3]
    assert words and opening, (reasoning, content)
    page = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US").new_page()
    page.goto(srv.url)
    page.wait_for_selector("#chat-settings-open-modal", timeout=30_000)

    # The hybrid model's settings have the thinking switch, on by default.
    page.click("#chat-settings-open-modal")
    switch = page.locator("#chat-settings [role='switch']#enable_thinking")
    switch.wait_for(timeout=5_000)
    assert switch.get_attribute("aria-checked") == "true"
    assert page.locator("#chat-settings label[for='enable_thinking']").inner_text() == "Thinking"
    page.keyboard.press("Escape")
    page.wait_for_selector("#chat-settings", state="detached", timeout=5_000)

    # While it thinks: the step is open and its text grows before any answer text shows. Every
    # change of the page is recorded by a MutationObserver (polling from here missed the
    # stream once the engine wrote the ~35 thinking tokens faster than a poll round trip).
    page.evaluate(
        """([stepSel, answerSel]) => {
            window.__seen = [];
            const record = () => {
                const steps = document.querySelectorAll(stepSel);
                if (!steps.length) return;
                const region = steps[steps.length - 1]
                    .querySelector("[role='region'] .message-content");
                const answered = document.querySelectorAll(answerSel).length > 1;  // 1: notice
                window.__seen.push([region ? region.innerText.length : 0, answered]);
            };
            new MutationObserver(record).observe(
                document.body, {subtree: true, childList: true, characterData: true});
        }""",
        [STEP, ANSWER],
    )
    send(page, QUESTION)
    page.locator(ANSWER, has_text="prompt tokens").first.wait_for(timeout=30_000)
    seen = [tuple(x) for x in page.evaluate("window.__seen")]
    before_answer = {n for n, answered in seen if n and not answered}
    assert len(before_answer) >= 2, seen  # streamed: at least two lengths before the answer

    answer = wait_answer(page, 1)
    step = page.locator(STEP).last
    toggle = step.locator("button[aria-expanded]").first
    assert "Thought for" in toggle.inner_text()
    # Folded once the answer started; it opens and closes.
    assert toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    page.wait_for_selector(f"{STEP} [role='region'][data-state='open']", timeout=5_000)
    shown = step.locator("[role='region'] .message-content").inner_text()
    assert all(w in shown for w in words), (shown, reasoning)
    assert not any(w in shown for w in opening), (shown, content)
    toggle.click()
    page.wait_for_selector(f"{STEP} [role='region'][data-state='closed']", state="attached")
    assert toggle.get_attribute("aria-expanded") == "false"

    # The answer is its own message, after the step, and starts where the thinking ended
    # (the random model may write <think> again later: then that is answer text).
    head = answer[: len(content) // 2]
    assert all(w in head for w in opening) and not head.startswith(reasoning.strip()), answer
    order = page.evaluate(
        """([step, answer]) => {
            const s = document.querySelectorAll(step), a = document.querySelectorAll(answer);
            const last = a[a.length - 1];
            return !s[s.length - 1].contains(last) &&
                Boolean(s[s.length - 1].compareDocumentPosition(last) & Node.DOCUMENT_POSITION_FOLLOWING);
        }""",
        [STEP, ANSWER],
    )
    assert order
