"""The chat app end to end, without a browser: the real server (tiny checkpoint, real engine)
in a subprocess, driven through Chainlit's socket.io protocol as the frontend drives it."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time

import httpx
import pytest

from tests.app_client import ChatClient, Server
from tests.app_helpers import encrypt_pdf, make_pdf

STATS = re.compile(
    r"\*([\d,]+) prompt tokens · ([\d,]+) cached · first token ([\d.]+) s · ([\d.]+) tokens/s(.*)\*$"
)
TEMPLATE_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def stats_of(message: dict) -> dict:
    match = STATS.search(message["output"])
    assert match, message["output"]
    prompt, cached, ttft, tps, rest = match.groups()
    return {"prompt": int(prompt.replace(",", "")), "cached": int(cached.replace(",", "")),
            "ttft": float(ttft), "tps": float(tps), "rest": rest}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(tiny_checkpoint)


class Servers:
    """The module's server; the restart test (the last one) replaces it with a successor."""

    def __init__(self, checkpoint, data_dir):
        self.checkpoint, self.data_dir = checkpoint, data_dir
        self.current = Server(checkpoint, data_dir)
        self.current.wait_ready()

    def restart(self) -> Server:
        self.current.stop()
        self.current = Server(self.checkpoint, self.data_dir)
        self.current.wait_ready()
        return self.current


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    holder = Servers(tiny_checkpoint, tmp_path_factory.mktemp("chat") / "data")
    try:
        yield holder
    finally:
        holder.current.stop()


@pytest.fixture
def server(servers):
    return servers.current


async def _client(server, language="en-US", max_tokens=12, temperature=0.0) -> ChatClient:
    client = ChatClient(server.url, language=language)
    await client.login()
    await client.connect()
    await client.wait_event("chat_settings")  # on_chat_start has shown the settings panel
    await client.settings({"max_tokens": max_tokens, "temperature": temperature})
    return client


async def _status(server) -> dict:
    async with httpx.AsyncClient() as http:
        return (await http.get(server.url + "/pagechat/status")).json()


async def test_streamed_answer_with_stats_line(server, tokenizer):
    client = await _client(server)
    try:
        start = await client.send("Hello")
        events = [e for e, _ in client.events[start:]]
        assert "stream_start" in events and events[-1] == "task_end"
        [answer] = client.assistant_messages(start)
        streamed = next(d["output"] for e, d in client.events[start:] if e == "stream_start")
        streamed += "".join(client.tokens(start))
        assert answer["output"].startswith(streamed) and streamed.strip()
        stats = stats_of(answer)
        expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
        assert stats["prompt"] == len(expected)  # the exact chat-template prompt
        assert stats["cached"] == 0 and stats["ttft"] > 0 and stats["tps"] > 0
        assert "max tokens" in stats["rest"]  # 12 tokens, cut by the limit
    finally:
        await client.close()


async def test_browser_chats_count_in_metrics(server):
    """A message sent as the browser sends it (socket.io -> @cl.on_message -> the session) is in
    /metrics: time to first token, end-to-end latency, finished requests, served by "chat"."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        response = httpx.get(server.url + "/metrics")
        assert response.status_code == 200
        return {
            s.name + "".join(f'{{{k}="{v}"}}' for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples
        }

    client = await _client(server)
    try:
        before = scrape()
        start = await client.send("Hello metrics")
        assert "max tokens" in stats_of(client.assistant_messages(start)[-1])["rest"]
        after = scrape()
    finally:
        await client.close()

    def change(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert change("pagechat_time_to_first_token_seconds_count") == 1
    assert change("pagechat_inter_token_latency_seconds_count") == 11  # 12 tokens
    assert change("pagechat_e2e_request_latency_seconds_count") == 1
    assert change('pagechat_requests_finished_total{finish_reason="length"}') == 1
    assert change('pagechat_requests_served_total{kind="chat"}') == 1


async def test_document_upload_and_cached_follow_up(server, tokenizer):
    client = await _client(server)
    try:
        doc = b"# Project notes\n\nThe kickoff meeting is on Friday at 10:00 in room 4.\n" * 20
        file_id = await client.upload("notes.md", doc, "application/octet-stream")  # how browsers send .md
        start = await client.send("When is the meeting?", (file_id,))
        messages = list(client.messages(start).values())
        step = next(m for m in messages if m.get("type") == "tool")
        assert "notes.md" in step["output"] and "tokens" in step["output"]
        first = stats_of(client.assistant_messages(start)[-1])
        assert first["prompt"] > 300  # the document is in the prompt
        assert "max tokens" in first["rest"]  # 12 ids generated, no <|im_end|> among them

        start = await client.send("Who should come?")
        second = stats_of(client.assistant_messages(start)[-1])
        new_turn = tokenizer.encode("\n<|im_start|>user\nWho should come?" + TEMPLATE_TAIL)
        # previous prompt + 12 generated ids + <|im_end|> + the new turn: nothing re-tokenized
        assert second["prompt"] == first["prompt"] + 12 + 1 + len(new_turn)
        assert second["cached"] >= (first["prompt"] // 16) * 16  # the document's blocks are reused
    finally:
        await client.close()


async def test_stop_aborts_the_engine_and_keeps_the_partial_answer(server, tokenizer):
    client = await _client(server, max_tokens=1500, temperature=1.0)
    try:
        start = await client.send("Tell me a very long story.", wait=False)
        deadline = time.monotonic() + 30
        while len(client.tokens(start)) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await _status(server))["running"] == 1
        await client.stop()
        await client.wait_task_end(30)
        status = await _status(server)
        assert status["running"] == 0 and status["kv_blocks_used"] == 0  # blocks freed at once
        answers = [m for m in client.assistant_messages(start) if STATS.search(m.get("output", ""))]
        stopped = stats_of(answers[-1])
        assert "stopped" in stopped["rest"]
        partial = answers[-1]["output"]
        assert any(m.get("output") == "Task manually stopped." for m in client.messages(start).values())

        await client.settings({"max_tokens": 12})
        start = await client.send("Go on.")
        follow = stats_of(client.assistant_messages(start)[-1])
        new_turn = tokenizer.encode("\n<|im_start|>user\nGo on." + TEMPLATE_TAIL)
        kept = follow["prompt"] - stopped["prompt"] - len(new_turn) - 1  # minus <|im_end|>
        assert 3 <= kept < 1500  # the partial answer's ids are in the history
        assert partial.strip()
    finally:
        await client.close()


async def test_system_prompt_from_the_settings_panel(server, tokenizer):
    client = await _client(server)
    try:
        await client.settings({"system_prompt": "Answer in French."})
        start = await client.send("Hello")
        stats = stats_of(client.assistant_messages(start)[-1])
        expected = tokenizer.apply_chat_template(
            [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}])
        assert stats["prompt"] == len(expected)
    finally:
        await client.close()


async def test_editing_a_message_reruns_from_there(server, tokenizer):
    client = await _client(server)
    try:
        await client.send("Hello")
        await client.send("Tell me more.")
        start = await client.edit(client.sent_ids[0], "Hi there")
        stats = stats_of(client.assistant_messages(start)[-1])
        # the history was cut back to the edited message: its prompt is that message alone
        assert stats["prompt"] == len(tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}]))
        start = await client.send("Next")
        follow = stats_of(client.assistant_messages(start)[-1])
        assert follow["prompt"] == stats["prompt"] + 13 + len(
            tokenizer.encode("\n<|im_start|>user\nNext" + TEMPLATE_TAIL))
    finally:
        await client.close()


async def test_closing_the_tab_aborts(server):
    client = await _client(server, max_tokens=1500, temperature=1.0)
    start = await client.send("Write a long essay.", wait=False)
    deadline = time.monotonic() + 30
    while len(client.tokens(start)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await client.close()  # the socket goes away, nothing else
    for _ in range(50):
        status = await _status(server)
        if status["running"] == 0:
            break
        await asyncio.sleep(0.1)
    assert status["running"] == 0 and status["kv_blocks_used"] == 0


async def test_bad_inputs_get_clear_messages_and_the_chat_goes_on(server):
    client = await _client(server, language="zh-CN")
    try:
        start = await client.send("")
        assert any("请输入消息" in m.get("output", "") for m in client.messages(start).values())

        broken = await client.upload("broken.pdf", b"%PDF-1.4 this is not a pdf", "application/pdf")
        locked = await client.upload("locked.pdf", encrypt_pdf(make_pdf(["secret"]), "pw"), "application/pdf")
        binary = await client.upload("data.txt", bytes(range(256)) * 4, "text/plain")
        start = await client.send("Read these", (broken, locked, binary))
        outputs = [m.get("output", "") for m in client.messages(start).values()]
        assert any("broken.pdf" in o and "已损坏" in o for o in outputs)
        assert any("locked.pdf" in o and "密码" in o for o in outputs)
        assert any("data.txt" in o and "二进制" in o for o in outputs)
        assert client.assistant_messages(start)[-1]["output"].count("token/秒") == 1  # still answered

        with pytest.raises(httpx.HTTPStatusError) as err:  # refused at upload by the config
            await client.upload("tool.exe", b"MZ\x90\x00", "application/x-msdownload")
        assert err.value.response.status_code == 400

        start = await client.send("lorem ipsum dolor " * 1200)  # ~3600 tokens, context is 2048
        outputs = [m.get("output", "") for m in client.messages(start).values()]
        assert any("上下文只能容纳" in o and f"{2048 - 12:,}" in o for o in outputs)

        pasted = "一段很长的粘贴文本。" * 40_000  # 1.2 MB of UTF-8: over the 1 MB socket default
        start = await client.send(pasted)
        outputs = [m.get("output", "") for m in client.messages(start).values()]
        assert any("上下文只能容纳" in o for o in outputs)  # a clear message, the socket lives
        start = await client.send("还在吗？")
        assert client.assistant_messages(start)[-1]["output"].count("token/秒") == 1
    finally:
        await client.close()


async def test_long_chat_is_trimmed_and_large_document_excerpted(server):
    client = await _client(server, max_tokens=16)
    try:
        text = "\n\n".join(
            f"Paragraph {i}: the archive lists item {i} as ordinary." for i in range(400)
        ).replace("item 333 as ordinary", "item 333 as the golden key")
        file_id = await client.upload("archive.txt", text.encode(), "text/plain")
        start = await client.send("Which item is the golden key?", (file_id,))
        outputs = [m.get("output", "") for m in client.messages(start).values()]
        note = next(o for o in outputs if "archive.txt" in o and "searched again for every question" in o)
        assert re.search(r"has [\d,]+ tokens", note)
        stats = stats_of(client.assistant_messages(start)[-1])
        assert stats["prompt"] <= 2048 - 16

        notes = []
        for i in range(4):  # long follow-ups: the document is searched again for each
            start = await client.send(f"Question {i}: what about item {331 + i}? " + "tell me more " * 120)
            outputs = [m.get("output", "") for m in client.messages(start).values()]
            assert any("archive.txt" in o and "searched again" in o for o in outputs)
            notes += outputs
            assert stats_of(client.assistant_messages(start)[-1])["prompt"] <= 2048 - 16
        assert any("its oldest 1 turn(s) no longer enter the prompt" in o for o in notes)
    finally:
        await client.close()


async def test_password_users_see_only_their_own_chats_and_files(tiny_checkpoint, tmp_path):
    srv = Server(tiny_checkpoint, tmp_path / "data", PAGECHAT_AUTH_USERS="alice:wonder land,bob:pw")
    try:
        srv.wait_ready()
        async with httpx.AsyncClient(base_url=srv.url) as http:
            config = (await http.get("/auth/config")).json()
            assert config["requireLogin"] and config["passwordAuth"] and not config["headerAuth"]
            assert (await http.post("/auth/header")).status_code != 200  # no silent local user
            bad = await http.post("/login", data={"username": "alice", "password": "wonder"})
            assert bad.status_code == 401

        alice = ChatClient(srv.url)
        await alice.login("alice", "wonder land")
        await alice.connect()
        await alice.wait_event("chat_settings")
        await alice.settings({"max_tokens": 4})
        file_id = await alice.upload("private.txt", b"alice's secret notes", "text/plain")
        start = await alice.send("Hi", (file_id,))
        assert STATS.search(alice.assistant_messages(start)[-1]["output"])
        thread_id = alice.thread_id()
        threads = (await alice.http.post("/project/threads", json={
            "pagination": {"first": 20, "cursor": None}, "filter": {}})).json()["data"]
        url = next(e["url"] for t in threads if t["id"] == thread_id for e in t["elements"])
        assert (await alice.http.get(url)).content == b"alice's secret notes"
        await alice.close()

        bob = ChatClient(srv.url)
        await bob.login("bob", "pw")
        threads = (await bob.http.post("/project/threads", json={
            "pagination": {"first": 20, "cursor": None}, "filter": {}})).json()["data"]
        assert threads == []
        assert (await bob.http.get(url)).status_code == 404  # not alice's file
        await bob.http.aclose()
    finally:
        srv.stop()


async def test_chats_survive_a_restart(servers, tokenizer):
    """Kept last in this module: it restarts the module's server on the same data dir."""
    import json

    from app.chat.token_history import ChatCodec, Conversation

    client = await _client(servers.current)
    file_id = await client.upload("memo.txt", b"Remember: the code word is heron.", "text/plain")
    await client.send("What is the code word?", (file_id,))
    start = await client.send("Say it again.")
    before = stats_of(client.assistant_messages(start)[-1])
    thread_id = client.thread_id()
    await client.close()

    second = servers.restart()
    client = ChatClient(second.url)
    try:
        await client.login()
        threads = (await client.http.post("/project/threads", json={
            "pagination": {"first": 20, "cursor": None}, "filter": {}})).json()["data"]
        thread = next(t for t in threads if t["id"] == thread_id)  # in the history sidebar
        assert thread["name"] == "What is the code word?"
        assert [s["type"] for s in thread["steps"]].count("user_message") == 2

        element = next(e for e in thread["elements"] if e["name"] == "memo.txt")
        response = await client.http.get(element["url"])  # the upload, kept with its thread
        assert response.status_code == 200 and response.content == b"Remember: the code word is heron."
        assert httpx.get(second.url + element["url"]).status_code == 401  # not without a login

        await client.connect(thread_id=thread_id)  # resume
        await client.wait_event("resume_thread")
        await client.wait_event("chat_settings")
        await client.settings({"max_tokens": 12, "temperature": 0.0})
        start = await client.send("And once more?")
        after = stats_of(client.assistant_messages(start)[-1])
    finally:
        await client.close()

    saved = sqlite3.connect(servers.data_dir / "pagechat.db").execute(
        'SELECT data FROM pagechat_histories WHERE "threadId" = ?', (thread_id,)).fetchone()[0]
    conversation = Conversation.from_dict(json.loads(saved)["conversation"])
    assert len(conversation.turns) == 3
    codec = ChatCodec(tokenizer)
    resumed_prompt = len(conversation.prompt_ids(codec)) - len(conversation.turns[-1].answer_ids)
    assert after["prompt"] == resumed_prompt  # rebuilt from the stored ids after the restart
    assert after["prompt"] > before["prompt"] + 12
    assert "the code word is heron" in codec.tokenizer.decode(conversation.prompt_ids(codec))
