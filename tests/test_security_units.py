"""The pieces behind issue 19's server tests, on their own (no server, a fake clock): the login
throttle, the cross-site check, revocable session tokens, upload quotas, file names, the CSP's
script hashes and Secure cookies."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import time

import jwt
import pytest

from app.serving.login_guard import LoginThrottle, is_cross_site
from app.serving.security_headers import SecurityHeaders, inline_script_hashes, page_policy
from app.serving.sessions import RevokedToken, SessionTokens, credential_version
from app.serving.upload_quota import MB, QuotaExceeded, QuotaLimits, UploadQuota
from app.storage.files import display_name


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # tokens' iat is checked against the real clock too

    def __call__(self) -> float:
        return self.now


# ---- login throttle and cross-site check ------------------------------------------------------


def test_throttle_doubles_the_lock_and_keeps_accounts_apart():
    clock = Clock()
    throttle = LoginThrottle(account_free=3, address_free=100, clock=clock)
    for _ in range(3):
        throttle.failed("alice", "10.0.0.1")
    assert throttle.retry_after("alice", "10.0.0.1") == 0  # the free failures
    locks = []
    for _ in range(4):
        throttle.failed("alice", "10.0.0.1")
        locks.append(throttle.retry_after("alice", "10.0.0.9"))
    assert locks == [1.0, 2.0, 4.0, 8.0]  # per account, from any address
    assert throttle.retry_after("bob", "10.0.0.1") == 0  # others are not locked out
    clock.now += 8.0
    assert throttle.retry_after("alice", "10.0.0.1") == 0
    throttle.succeeded("alice")
    throttle.failed("alice", "10.0.0.1")
    assert throttle.retry_after("alice", "10.0.0.1") == 0  # a success starts the count over


def test_throttle_per_address_and_its_ceiling():
    clock = Clock()
    throttle = LoginThrottle(account_free=100, address_free=2, max_delay_s=60, clock=clock)
    for i in range(40):
        throttle.failed(f"user{i}", "10.0.0.2")
    assert throttle.retry_after("bob", "10.0.0.2") == 60  # capped
    assert throttle.retry_after("bob", "10.0.0.3") == 0


@pytest.mark.parametrize(
    ("headers", "cross"),
    [
        ({"host": "chat.example", "origin": "https://chat.example"}, False),
        ({"host": "chat.example", "origin": "https://evil.example"}, True),
        ({"host": "chat.example", "origin": "null"}, True),
        ({"host": "chat.example", "referer": "https://chat.example/login"}, False),
        ({"host": "chat.example", "referer": "https://evil.example/page"}, True),
        ({"host": "chat.example", "sec-fetch-site": "cross-site"}, True),
        ({"host": "chat.example", "sec-fetch-site": "same-origin"}, False),
        ({"host": "chat.example"}, False),  # no browser headers: not a browser
        (
            {
                "host": "10.0.0.5:8000",
                "x-forwarded-host": "chat.example",
                "origin": "https://chat.example",
            },
            False,
        ),
        ({"host": "chat.example", "origin": "https://app.example"}, False),  # in the allow list
    ],
)
def test_cross_site_check(headers, cross):
    assert is_cross_site(headers, ["https://app.example"]) is cross


# ---- session tokens ------------------------------------------------------------------------


def tokens_for(
    tmp_path, users: dict[str, str], clock: Clock, lifetime_s: float = 3600
) -> SessionTokens:
    versions = {u: credential_version("s" * 48, u, p) for u, p in users.items()}
    return SessionTokens("s" * 48, versions.get, tmp_path, lifetime_s, clock=clock)


async def test_tokens_are_revoked_by_logout_password_change_and_removal(tmp_path):
    clock = Clock()
    tokens = tokens_for(tmp_path, {"alice": "pw1", "bob": "pw2"}, clock)
    alice, alice2, bob = (
        tokens.encode({"identifier": u, "metadata": {}}) for u in ("alice", "alice", "bob")
    )
    assert tokens.decode(alice) == {"identifier": "alice", "metadata": {}}
    assert await tokens.revoke(alice)
    with pytest.raises(RevokedToken):
        tokens.decode(alice)
    assert tokens.decode(alice2)["identifier"] == "alice"  # only that session ended
    saved = tmp_path / "revoked_sessions.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and len(json.loads(saved.read_text())) == 1

    after = tokens_for(tmp_path, {"alice": "new password"}, clock)  # a restart with new users
    for token in (alice, alice2, bob):
        with pytest.raises(RevokedToken):
            after.decode(token)
    with pytest.raises(RevokedToken):
        after.encode({"identifier": "bob"})  # no token for a user who is gone

    clock.now += 3601
    with pytest.raises(jwt.ExpiredSignatureError):
        tokens.decode(alice2)
    assert not await tokens.revoke(alice2)  # nothing to keep for an expired token
    legacy = jwt.encode({"identifier": "alice", "exp": clock.now + 60}, "s" * 48, algorithm="HS256")
    with pytest.raises(jwt.MissingRequiredClaimError):
        tokens.decode(legacy)  # a token from before (15 days, no session) is not accepted
    with pytest.raises(jwt.InvalidSignatureError):
        tokens.decode(jwt.encode({"identifier": "alice"}, "other" * 10, algorithm="HS256"))


# ---- upload quotas ---------------------------------------------------------------------------


def test_upload_quota_counts_per_message_chat_and_day():
    clock = Clock()
    quota = UploadQuota(
        QuotaLimits(
            files_per_message=2,
            files_per_chat=3,
            bytes_per_chat=10 * MB,
            files_per_day=4,
            bytes_per_day=12 * MB,
        ),
        clock=clock,
    )
    quota.admit("bob", "chat1", MB)
    quota.admit("bob", "chat1", MB)
    with pytest.raises(QuotaExceeded, match="At most 2 files"):
        quota.admit("bob", "chat1", MB)
    with pytest.raises(QuotaExceeded, match="got 3"):
        quota.check_message("chat1", 3)
    quota.check_message("chat1", 2)
    quota.admit("bob", "chat1", MB)
    with pytest.raises(QuotaExceeded, match="limit per chat") as per_chat:
        quota.admit("bob", "chat1", MB)
    assert per_chat.value.status == 413
    with pytest.raises(QuotaExceeded, match="past 10 MB"):
        quota.admit("bob", "chat2", 11 * MB)
    quota.admit("bob", "chat2", MB)
    with pytest.raises(QuotaExceeded, match="Daily upload limit") as daily:
        quota.admit("bob", "chat3", MB)
    assert daily.value.status == 429 and daily.value.retry_after_s == pytest.approx(24 * 3600)
    quota.admit("alice", "chat4", MB)  # her own day
    quota.refund("bob", "chat2", MB)
    quota.admit("bob", "chat3", MB)  # a refused store gives its place back
    clock.now += 24 * 3600 + 1
    quota.admit("bob", "chat3", MB)  # a new day


# ---- names, CSP, cookies ---------------------------------------------------------------------


def test_display_names_fit_file_systems_and_cannot_spoof():
    emoji = "😀" * 150 + ".txt"
    cut = display_name(emoji)
    assert len(cut.encode()) <= 255 and cut.endswith(".txt") and set(cut[:-4]) == {"😀"}
    assert display_name("中" * 90) == "中" * 85  # 3 bytes each: cut on a character boundary
    assert display_name("invoice\u202efdp.exe") == "invoicefdp.exe"
    assert display_name("a\u2066b\u2069c\u200fd\x00e\n.txt") == "abcde.txt"
    assert display_name("short name.pdf") == "short name.pdf"


def test_csp_hashes_the_pages_own_inline_scripts():
    html = b'<script>window.a = 1</script><script type="module" src="/assets/x.js"></script>'
    digest = base64.b64encode(hashlib.sha256(b"window.a = 1").digest()).decode()
    assert inline_script_hashes(html) == [f"'sha256-{digest}'"]
    assert f"script-src 'self' 'sha256-{digest}';" in page_policy(html)


async def test_cookies_get_secure_over_https_only():
    async def app(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"set-cookie", b"access_token=abc; HttpOnly; Path=/; SameSite=lax"),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})

    async def headers_for(scheme: str, forced: bool = False) -> dict[bytes, bytes]:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/login", "scheme": scheme, "headers": []}
        await SecurityHeaders(app, cookie_secure=forced)(scope, None, send)
        return dict(sent[0]["headers"])

    assert b"Secure" not in (await headers_for("http"))[b"set-cookie"]
    assert (await headers_for("https"))[b"set-cookie"].endswith(b"; Secure")
    assert (await headers_for("http", forced=True))[b"set-cookie"].endswith(b"; Secure")


def test_external_markdown_images_become_links():
    from app.serving.chainlit_patches import images_as_links

    text = 'a ![pixel](https://evil.example/p.gif?q=secret "t") b ![](//evil.example/x.png)'
    assert images_as_links(text) == (
        "a [image: pixel](https://evil.example/p.gif?q=secret) b "
        "[image: //evil.example/x.png](//evil.example/x.png)"
    )
    kept = "![logo](/public/logo.png) ![dot](data:image/png;base64,AAAA) `![code](http://x)`"
    assert images_as_links(kept).startswith("![logo](/public/logo.png) ![dot](data:")
