"""Who may use the app: one local user by default, or password users from PAGECHAT_AUTH_USERS.

Chainlit only shows the chat history sidebar to a logged-in user, so even the single-user
default logs in (through a header-auth callback, without a form). Its JWTs need a secret:
CHAINLIT_AUTH_SECRET when set, otherwise one generated on first start and kept in data_dir.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

LOCAL_USER = "local"
SECRET_FILE = "chainlit_auth_secret"


def ensure_auth_secret(data_dir: Path) -> str:
    """Set CHAINLIT_AUTH_SECRET from the environment or data_dir (created once, mode 0600)."""
    if secret := os.environ.get("CHAINLIT_AUTH_SECRET"):
        return secret
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise RuntimeError(f"{path} holds no usable secret; delete it to make a new one") from None
    else:
        secret = secrets.token_urlsafe(48)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
    os.environ["CHAINLIT_AUTH_SECRET"] = secret
    return secret


def parse_users(spec: str) -> dict[str, str]:
    """'alice:pw1,bob:pw2' -> {'alice': 'pw1', 'bob': 'pw2'} (a password may contain ':')."""
    users: dict[str, str] = {}
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, password = entry.partition(":")
        name = name.strip()
        if not sep or not name or not password:
            raise ValueError(f"PAGECHAT_AUTH_USERS entries must be user:password, got {name or entry[:1]!r}...")
        users[name] = password
    return users


class PasswordUsers:
    """Checks user/password pairs in constant time (no early exit on unknown users)."""

    def __init__(self, users: dict[str, str]) -> None:
        self._digests = {name: _digest(pw) for name, pw in users.items()}
        self._dummy = _digest(secrets.token_hex(16))

    def check(self, username: str, password: str) -> bool:
        expected = self._digests.get(username, self._dummy)
        ok = hmac.compare_digest(expected, _digest(password))
        return ok and username in self._digests

    def __len__(self) -> int:
        return len(self._digests)


def _digest(password: str) -> bytes:
    return hashlib.sha256(password.encode("utf-8")).digest()
