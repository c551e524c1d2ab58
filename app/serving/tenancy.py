"""Prefix-cache isolation between tenants (issue 19 item 1).

A prompt whose prefix is cached is answered faster and reports `cached_tokens`, so a shared cache
tells one user whether another sent a prompt starting the same way (a confidential memo, a
document). Each request therefore carries a cache salt (`SamplingParams.cache_salt`, vLLM's
name), and the engine roots its block-key chain in it (engine.kv_keys.chain_root): requests
share cached KV only with requests of the same salt.

Who is a tenant:
- API requests: the API key, when PAGECHAT_API_KEYS is set (a digest of the key, never the key);
  without keys, one default tenant.
- The chat: the logged-in user when PAGECHAT_AUTH_USERS is set; the one local user otherwise.
- The default set-up (no keys, the local user) is one tenant, with no salt at all: the chat and
  the API share one cache, exactly as before.

An API request may also send `cache_salt`: it is combined with the tenant, so a caller can
isolate further (e.g. per end user of its own) but never join another tenant's cache.

PAGECHAT_SHARED_CACHE=true turns tenant salting off: every tenant shares one cache (a shared
system prompt or document is computed once), and each can then learn, from `cached_tokens` or
timing, whether some other tenant sent a given prefix. Only for tenants who trust each other.
"""

from __future__ import annotations

import hashlib
import json

from app.settings import AppSettings

_PERSON = b"pagechat.tenant"


def _digest(kind: str, value: str) -> str:
    data = f"{kind}\0{value}".encode()
    return kind + ":" + hashlib.blake2b(data, digest_size=16, person=_PERSON).hexdigest()


def api_tenant(settings: AppSettings, api_key: str | None) -> str | None:
    """The tenant of an API request made with `api_key` (already checked); None: the default."""
    if settings.shared_cache or not settings.api_key_list() or not api_key:
        return None
    return _digest("api-key", api_key)


def chat_tenant(settings: AppSettings, user: str | None) -> str | None:
    """The tenant of the chat user `user` (Chainlit's identifier); None: the default."""
    if settings.shared_cache or not settings.auth_users.strip() or not user:
        return None
    return _digest("user", user)


def cache_salt(tenant: str | None, requested: str | None = None) -> str | None:
    """The engine's cache salt for a tenant and the salt a caller asked for (either may be None).

    An injective encoding: no (tenant, requested) pair gives another pair's salt, so a caller
    choosing `requested` cannot produce another tenant's salt.
    """
    if tenant is None and requested is None:
        return None
    return json.dumps([tenant, requested], separators=(",", ":"), ensure_ascii=False)
