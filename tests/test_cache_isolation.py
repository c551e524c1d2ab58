"""Prefix-cache isolation between tenants (issue 19 item 1; app/serving/tenancy.py).

The attack: Alice sends a confidential memo; Bob sends a prompt that starts the same way. With a
shared cache Bob's `cached_tokens` (and his time to first token) would tell him that someone
sent that memo. Here Bob sees 0 cached tokens while Alice's own follow-up is served from the
cache: through the API (API keys), through the chat (two logged-in users of the real server),
and through a remote engine (the salt travels in vLLM's `cache_salt` field). With no keys and
the one local user, everything is cached as before; PAGECHAT_SHARED_CACHE opts back in.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from fastapi import FastAPI

from app.serving.tenancy import api_tenant, cache_salt, chat_tenant
from app.settings import AppSettings
from tests.api_helpers import LiveServer, UpstreamLog, api_server, fake_upstream
from tests.app_client import ChatClient, Server

KEY_ALICE, KEY_BOB = "sk-alice-0c7d21f9", "sk-bob-5e1a88b3"
USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}
BLOCK = 16


def memo() -> str:
    """A confidential memo nobody sent before (unique words: no earlier request caches it)."""
    words = " ".join(f"m{uuid.uuid4().hex[:8]}" for _ in range(60))
    return f"CONFIDENTIAL merger memo: {words}."


# ---- who is a tenant (no server) --------------------------------------------------------------


def test_tenants_are_derived_from_keys_and_users_never_holding_the_key():
    keyed = AppSettings(api_keys=f"{KEY_ALICE},{KEY_BOB}", auth_users="alice:x,bob:y")
    alice, bob = api_tenant(keyed, KEY_ALICE), api_tenant(keyed, KEY_BOB)
    assert alice and bob and alice != bob and alice == api_tenant(keyed, KEY_ALICE)
    assert KEY_ALICE not in alice and "0c7d21f9" not in alice  # a digest, not the key
    assert chat_tenant(keyed, "alice") != chat_tenant(keyed, "bob")
    assert chat_tenant(keyed, "alice") not in (alice, bob)
    # The default: no keys, one local user: one tenant, no salt (nothing changes).
    default = AppSettings(api_keys="", auth_users="")
    assert api_tenant(default, None) is None and api_tenant(default, "anything") is None
    assert chat_tenant(default, "local") is None and cache_salt(None, None) is None
    # Opted in to one shared cache.
    shared = keyed.model_copy(update={"shared_cache": True})
    assert api_tenant(shared, KEY_ALICE) is None and chat_tenant(shared, "alice") is None


def test_a_requested_salt_never_yields_another_tenants_salt():
    settings = AppSettings(api_keys=f"{KEY_ALICE},{KEY_BOB}")
    alice, bob = api_tenant(settings, KEY_ALICE), api_tenant(settings, KEY_BOB)
    salts = {
        cache_salt(alice, None), cache_salt(bob, None), cache_salt(None, "x"),
        cache_salt(alice, "x"), cache_salt(bob, "x"), cache_salt(None, alice), cache_salt(bob, alice),
    }
    assert None not in salts and len(salts) == 7
    # Bob choosing any salt gets [bob, salt]: never [alice, ...] nor [alice, None].
    assert json.loads(cache_salt(bob, alice) or "")[0] == bob


# ---- the API ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with api_server(tiny_checkpoint) as live:
        yield live


@pytest.fixture
def use_settings(server):
    runtime = server.app.state.runtime
    before = runtime.settings

    def use(**values) -> None:
        runtime.settings = AppSettings(**values)

    yield use
    runtime.settings = before


def cached_tokens(server, prompt: str, key: str | None = None, salt: str | None = None,
                  chat: bool = False) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict = {"model": str(server.engine.config.model), "max_tokens": 1, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    response = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_bob_gets_no_cache_hit_on_alices_memo_while_alice_does(server, use_settings, chat):
    use_settings(api_keys=f"{KEY_ALICE},{KEY_BOB}")
    text = memo()
    assert cached_tokens(server, text + " Summarise it.", KEY_ALICE, chat=chat) == 0
    assert cached_tokens(server, text + " Who signed?", KEY_BOB, chat=chat) == 0
    alice_again = cached_tokens(server, text + " List the risks.", KEY_ALICE, chat=chat)
    assert alice_again >= 4 * BLOCK and alice_again % BLOCK == 0  # the memo's blocks, reused
    # Bob's own copy is cached for Bob.
    assert cached_tokens(server, text + " Who else?", KEY_BOB, chat=chat) >= 4 * BLOCK


def test_cache_salt_isolates_further_but_never_joins_another_tenant(server, use_settings):
    use_settings(api_keys=f"{KEY_ALICE},{KEY_BOB}")
    text = memo()
    assert cached_tokens(server, text + " A", KEY_ALICE) == 0
    assert cached_tokens(server, text + " B", KEY_ALICE, salt="project-x") == 0  # isolated further
    assert cached_tokens(server, text + " C", KEY_ALICE, salt="project-x") >= 4 * BLOCK
    assert cached_tokens(server, text + " D", KEY_BOB, salt="project-x") == 0  # same salt, other key
    # Without keys, the field alone separates namespaces (vLLM's semantics).
    use_settings(api_keys="")
    other = memo()
    assert cached_tokens(server, other + " A", salt="s1") == 0
    assert cached_tokens(server, other + " B", salt="s1") >= 4 * BLOCK
    assert cached_tokens(server, other + " C", salt="s2") == 0
    assert cached_tokens(server, other + " D") == 0


def test_without_keys_everything_is_one_tenant_as_before(server, use_settings):
    use_settings(api_keys="")
    text = memo()
    assert cached_tokens(server, text + " A") == 0
    assert cached_tokens(server, text + " B", key="whatever-is-sent") >= 4 * BLOCK


def test_shared_cache_setting_opts_every_tenant_into_one_cache(server, use_settings):
    use_settings(api_keys=f"{KEY_ALICE},{KEY_BOB}", shared_cache=True)
    text = memo()
    assert cached_tokens(server, text + " A", KEY_ALICE) == 0
    assert cached_tokens(server, text + " B", KEY_BOB) >= 4 * BLOCK


def test_an_empty_cache_salt_is_refused(server, use_settings):
    use_settings(api_keys="")
    body = {"model": str(server.engine.config.model), "prompt": "hi", "max_tokens": 1,
            "cache_salt": ""}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and "cache_salt" in response.text


# ---- a remote engine: the salt travels as vLLM's cache_salt -----------------------------------


async def test_a_remote_engine_gets_the_tenant_salt_and_never_the_key():
    from app.api.routes import router
    from app.serving.remote_engine import RemoteEngine
    from app.serving.runtime import Runtime

    log = UpstreamLog()
    with LiveServer(fake_upstream(log)) as upstream:
        app = FastAPI()
        app.include_router(router)
        settings = AppSettings(engine_url=upstream.url + "/v1", api_keys=f"{KEY_ALICE},{KEY_BOB}")
        runtime = Runtime(settings=settings)
        app.state.runtime = runtime
        with LiveServer(app) as front:
            runtime.engine = RemoteEngine.from_settings(settings)
            try:
                async with httpx.AsyncClient(base_url=front.url, timeout=30) as http:
                    for key, salt in [(KEY_ALICE, None), (KEY_BOB, None), (KEY_BOB, "mine")]:
                        body = {"model": "upstream/qwen3", "prompt": "alpha beta", "max_tokens": 2}
                        if salt:
                            body["cache_salt"] = salt
                        response = await http.post(
                            "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                        )
                        assert response.status_code == 200, response.text
            finally:
                front.call(runtime.engine.aclose())
    sent = [b.get("cache_salt") for b in log.bodies]
    assert len(sent) == 3 and len(set(sent)) == 3 and all(sent)
    assert not any(KEY_ALICE in s or KEY_BOB in s for s in sent)
    assert sent[0] == cache_salt(api_tenant(settings, KEY_ALICE))
    assert sent[2] == cache_salt(api_tenant(settings, KEY_BOB), "mine")


# ---- the chat: two logged-in users of the real server -----------------------------------------


def cached_of(client: ChatClient, start: int) -> int:
    """The cached-token count from the answer's stats line ("*N prompt tokens · M cached · ...*")."""
    for message in client.assistant_messages(start):
        output = message.get("output") or ""
        if " prompt tokens · " in output:
            return int(output.split(" prompt tokens · ")[1].split(" cached")[0].replace(",", ""))
    raise AssertionError(f"no stats line in {client.assistant_messages(start)}")


async def chat_user(server: Server, name: str) -> ChatClient:
    client = ChatClient(server.url)
    await client.login(name, USERS[name])
    await client.connect()
    await client.wait_event("chat_settings")
    await client.settings({"max_tokens": 2, "temperature": 0.0})
    return client


async def test_two_chat_users_do_not_share_cached_prefixes(tiny_checkpoint, tmp_path):
    server = Server(
        tiny_checkpoint, tmp_path / "data",
        PAGECHAT_AUTH_USERS=",".join(f"{u}:{p}" for u, p in USERS.items()),
    )
    try:
        server.wait_ready()
        text = memo()
        alice = await chat_user(server, "alice")
        assert cached_of(alice, await alice.send(text)) == 0
        bob = await chat_user(server, "bob")
        assert cached_of(bob, await bob.send(text)) == 0  # the same prompt, Alice's cache unseen
        # Alice, in a new chat: her own cache serves the memo.
        alice_new = await chat_user(server, "alice")
        assert cached_of(alice_new, await alice_new.send(text)) >= 4 * BLOCK
        for client in (alice, bob, alice_new):
            await client.close()
    finally:
        server.stop()


async def test_the_local_user_is_one_tenant_as_before(tiny_checkpoint, tmp_path):
    server = Server(tiny_checkpoint, tmp_path / "data")
    try:
        server.wait_ready()
        text = memo()
        first = ChatClient(server.url)
        await first.login()
        await first.connect()
        await first.wait_event("chat_settings")
        await first.settings({"max_tokens": 2, "temperature": 0.0})
        assert cached_of(first, await first.send(text)) == 0
        second = ChatClient(server.url)
        await second.login()
        await second.connect()
        await second.wait_event("chat_settings")
        await second.settings({"max_tokens": 2, "temperature": 0.0})
        assert cached_of(second, await second.send(text)) >= 4 * BLOCK
        await first.close()
        await second.close()
    finally:
        server.stop()
