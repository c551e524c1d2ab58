"""A document chat reopened after a restart answers from the disk tier and says so (issue 15
item 5). The real server (tiny checkpoint, real engine, disk tier on by default under the data
dir) in a subprocess, driven through Chainlit's socket.io protocol as the browser drives it."""

from __future__ import annotations

import re

import httpx

from app.chat.i18n import t
from tests.app_client import ChatClient, Server

FROM_DISK = re.compile(r"([\d,]+) from disk \(([\d.]+) s to load\)")
STEP_FROM_DISK = re.compile(
    r"notes\.md \(from the cache on disk: ([\d,]+) tokens loaded in ([\d.]+) s\)"
)
CACHED = re.compile(r"([\d,]+) prompt tokens · ([\d,]+) cached")


async def _ask(client: ChatClient, text: str, file_ids: tuple[str, ...] = ()) -> tuple[dict, str]:
    start = await client.send(text, file_ids)
    steps = [m for m in client.messages(start).values() if m.get("type") == "tool"]
    answer = client.assistant_messages(start)[-1]["output"]
    return (steps[-1] if steps else {}), answer


async def test_reopened_document_chat_answers_from_disk_and_says_so(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    server = Server(tiny_checkpoint, data)
    server.wait_ready()
    try:
        client = ChatClient(server.url)
        await client.login()
        await client.connect()
        await client.wait_event("chat_settings")
        await client.settings({"max_tokens": 8, "temperature": 0.0})
        doc = b"# Project notes\n\nThe kickoff meeting is on Friday at 10:00 in room 4.\n" * 20
        file_id = await client.upload("notes.md", doc, "application/octet-stream")
        _, first = await _ask(client, "When is the meeting?", (file_id,))
        assert "from disk" not in first  # read on this server: nothing came from the disk tier
        thread_id = client.thread_id()
        await client.close()
    finally:
        server.stop()  # SIGTERM: the engine writes the blocks still queued for disk
    assert list((data / "kv-cache").glob("*/*.kv")), "the disk tier kept nothing"

    server = Server(tiny_checkpoint, data)
    server.wait_ready()
    try:
        client = ChatClient(server.url)
        await client.login()
        await client.connect(thread_id=thread_id)  # reopened from the sidebar
        await client.wait_event("resume_thread")
        await client.wait_event("chat_settings")
        await client.settings({"max_tokens": 8, "temperature": 0.0})
        step, answer = await _ask(client, "Who should come?")
        await client.close()
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(server.url + "/metrics")).text
    finally:
        server.stop()

    cached = int(CACHED.search(answer).group(2).replace(",", ""))  # type: ignore[union-attr]
    stats = FROM_DISK.search(answer)
    assert stats, answer
    disk_tokens = int(stats.group(1).replace(",", ""))
    # The document's prefix came back from disk: most of what was cached, at least 300 tokens.
    assert 300 <= disk_tokens <= cached
    # The reading step names the chat's document, the cache on disk and the load time.
    match = STEP_FROM_DISK.search(step.get("name", ""))
    assert match, step
    assert int(match.group(1).replace(",", "")) == disk_tokens
    assert float(match.group(2)) == float(stats.group(2))  # one load time, rounded alike
    assert "from the cache on disk" in step["output"]
    hits = re.search(r'^pagechat_kv_tier_hit_tokens_total\{tier="disk"\} (\S+)$', metrics, re.M)
    assert hits and float(hits.group(1)) == disk_tokens


def test_the_cache_texts_exist_in_english_and_chinese():
    for lang, word in (("en-US", "disk"), ("zh-CN", "磁盘")):
        step = t("reading_from_disk", lang, what="a.pdf", tokens=4800, seconds=0.31)
        assert "a.pdf" in step and "4,800" in step and "0.31" in step and word in step
        line = t("stats_from_disk", lang, tokens=4800, seconds=0.314)
        assert "4,800" in line and "0.31" in line and word in line
        assert "4,800" in t("reading_from_disk_line", lang, tokens=4800, seconds=0.3)
        assert "1,024" in t("stats_from_host", lang, tokens=1024)
