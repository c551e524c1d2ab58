"""The server keeps a document's KV across restarts (issue 15): SIGTERM, and SIGKILL after an
answer finished. `slow`: three server starts (run with `pytest -m slow`).

A real `python -m app` on the tiny checkpoint and a data dir; the official `openai` client asks
text completions (greedy). After each restart the follow-up's `cached_tokens` must cover at
least 95% of the shared prefix's full blocks, and its answer must equal the answer of a server
with prefix caching off.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.app_client import Server

pytestmark = pytest.mark.slow

BLOCK = 16
DOC = " ".join(
    f"Clause {i}: the tenant keeps the garden tidy and pays on the {i % 28 + 1}th."
    for i in range(60)
)


def ask(server: Server, prompt: str) -> tuple[str, int, int]:
    """(answer, prompt tokens, cached tokens) of a greedy 8-token completion."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.completions.create(
        model=client.models.list().data[0].id, prompt=prompt, max_tokens=8, temperature=0
    )
    details = out.usage.prompt_tokens_details
    return out.choices[0].text, out.usage.prompt_tokens, details.cached_tokens if details else 0


def started(checkpoint, data_dir, **env) -> Server:
    server = Server(checkpoint, data_dir, **env)
    assert server.wait_ready(timeout=180)["engine"] == "ready"
    return server


def test_a_restarted_server_answers_from_its_disk_cache(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    questions = [DOC + f"\n\nQuestion {i}: who keeps the garden?" for i in range(3)]
    reference = started(tiny_checkpoint, tmp_path / "ref", PAGECHAT_ENABLE_PREFIX_CACHING="false")
    try:
        expected = [ask(reference, q)[0] for q in questions]
    finally:
        reference.stop()

    first = started(tiny_checkpoint, data)
    try:
        answer, doc_tokens, cached = ask(first, questions[0])
        assert cached == 0 and answer == expected[0]
    finally:
        first.stop()  # SIGTERM: the graceful stop writes what the disk writer still has queued
    assert list((data / "kv-cache").glob("*/*.kv"))

    second = started(tiny_checkpoint, data)
    try:
        answer, prompt_tokens, cached = ask(second, questions[1])
        shared = (doc_tokens - 8) // BLOCK * BLOCK  # the questions differ in their last tokens
        assert cached >= 0.95 * shared and answer == expected[1]
        time.sleep(2)  # the answer's blocks reach the disk in the background...
        second.proc.send_signal(signal.SIGKILL)  # ...so a crash after it loses nothing
        second.proc.wait(10)
    finally:
        second.stop()

    third = started(tiny_checkpoint, data)
    try:
        answer, _, cached = ask(third, questions[2])
        assert cached >= 0.95 * shared and answer == expected[2]
    finally:
        third.stop()
