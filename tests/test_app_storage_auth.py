"""Local file storage stays inside its root; auth secret and password users."""

from __future__ import annotations

import os
import stat

import pytest

from app.serving.auth import PasswordUsers, ensure_auth_secret, parse_users
from app.storage.files import LocalStorageClient, UnsafeKey, safe_key


@pytest.mark.parametrize(
    "key",
    ["../evil", "a/../../evil", "/etc/passwd", "a/./b", "a\\..\\b", "", "a/\x00b", "..", "a//.."],
)
def test_storage_rejects_keys_leaving_the_root(tmp_path, key):
    storage = LocalStorageClient(tmp_path / "files")
    with pytest.raises(UnsafeKey):
        storage.path_for(key)


async def test_storage_round_trip_and_sanitized_names(tmp_path):
    root = tmp_path / "files"
    storage = LocalStorageClient(root)
    result = await storage.upload_file("user1/elem1/../../../../escape.txt", b"hello", "text/plain")
    key = result["object_key"]
    assert key == "user1/elem1/_/_/_/_/escape.txt"
    path = storage.path_for(key)
    assert path.read_bytes() == b"hello" and path.is_relative_to(root.resolve())
    assert result["url"] == "/pagechat/files/user1/elem1/_/_/_/_/escape.txt"
    assert await storage.get_read_url(key) == result["url"]
    assert not list(tmp_path.glob("escape.txt"))
    result = await storage.upload_file("user1/elem2/名前 with space.md", "text ✓")
    assert storage.path_for(result["object_key"]).read_text() == "text ✓"
    assert "%20" in result["url"]
    assert await storage.delete_file(key)
    assert not path.exists() and not (root / "user1" / "elem1").exists()
    assert (root / "user1").is_dir()  # still holds elem2
    assert not await storage.delete_file("../../x")


def test_safe_key():
    assert safe_key("u/e/a.txt") == "u/e/a.txt"
    assert safe_key("u/e/..") == "u/e/_"
    assert safe_key("u//e") == "u/_/e"


def test_auth_secret_generated_once_with_private_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    secret = ensure_auth_secret(tmp_path)
    path = tmp_path / "chainlit_auth_secret"
    assert len(secret) >= 32 and path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.environ["CHAINLIT_AUTH_SECRET"] == secret
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET")
    assert ensure_auth_secret(tmp_path) == secret  # reused, not regenerated
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "x" * 40)
    assert ensure_auth_secret(tmp_path / "other") == "x" * 40
    assert not (tmp_path / "other" / "chainlit_auth_secret").exists()


def test_password_users():
    users = PasswordUsers(parse_users(" alice:s3cret:with:colons , bob:pw "))
    assert len(users) == 2
    assert users.check("alice", "s3cret:with:colons")
    assert users.check("bob", "pw")
    assert not users.check("bob", "pw ")
    assert not users.check("alice", "pw")
    assert not users.check("carol", "pw")
    assert not users.check("", "")
    assert parse_users("") == {}
    with pytest.raises(ValueError):
        parse_users("alice")
    with pytest.raises(ValueError):
        parse_users("alice:")
