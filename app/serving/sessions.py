"""Login tokens the server can take back.

Chainlit's JWTs alone live until they expire (15 days by default) whatever happens: logout only
clears the browser's cookie, and a removed user or a changed password leaves every token valid.
Here each token carries two claims checked on every request and socket connection:

- `sid`, a random session id. Logout puts it on a revocation list kept in the data directory
  (`revoked_sessions.json`, mode 0600, entries dropped once their token has expired anyway), so a
  copied token stops working at once and after a restart too.
- `ver`, the user's credential version: an HMAC of the user's name and password under the JWT
  secret. A password changed in PAGECHAT_AUTH_USERS gives a new version and a removed user none,
  so their old tokens are refused from the next start on, without any state.

Tokens live `PAGECHAT_SESSION_HOURS` (default 24).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt

REVOKED_FILE = "revoked_sessions.json"
ALGORITHM = "HS256"


class RevokedToken(jwt.InvalidTokenError):
    """A well-signed token whose session was ended or whose user's credentials changed."""


def credential_version(secret: str, identifier: str, password: str) -> str:
    """What a token must carry for `identifier` while its password is `password`."""
    message = f"{identifier}\x00{password}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:24]


class SessionTokens:
    """Issues and checks the app's JWTs (Chainlit's create_jwt / decode_jwt are routed here)."""

    def __init__(
        self,
        secret: str,
        versions: Callable[[str], str | None],
        data_dir: Path,
        lifetime_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.versions = versions  # identifier -> its current version, None for no such user
        self.path = data_dir / REVOKED_FILE
        self.lifetime_s = lifetime_s
        self.clock = clock
        self.revoked: dict[str, float] = self._load()  # sid -> the token's expiry (epoch s)
        self._write_lock = asyncio.Lock()

    # ---- issuing and checking -----------------------------------------------------------

    def encode(self, claims: dict[str, Any]) -> str:
        """A token for the user described by `claims` (Chainlit's User.to_dict())."""
        identifier = str(claims.get("identifier", ""))
        version = self.versions(identifier)
        if version is None:
            raise RevokedToken(f"no such user: {identifier!r}")
        now = datetime.fromtimestamp(self.clock(), UTC)
        payload = {
            **claims,
            "iat": now,
            "exp": now + timedelta(seconds=self.lifetime_s),
            "sid": secrets.token_urlsafe(16),
            "ver": version,
        }
        return jwt.encode(payload, self.secret, algorithm=ALGORITHM)

    def decode(self, token: str) -> dict[str, Any]:
        """The token's user claims (without iat/exp/sid/ver); jwt.InvalidTokenError if not valid now."""
        payload = self.claims(token)
        for key in ("iat", "exp", "sid", "ver"):
            payload.pop(key, None)
        return payload

    def claims(self, token: str) -> dict[str, Any]:
        """Every claim of a token that is valid now."""
        payload: dict[str, Any] = jwt.decode(
            token,
            self.secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sid", "ver"], "verify_exp": False},  # checked on our clock
        )
        if not isinstance(payload["exp"], int | float) or payload["exp"] <= self.clock():
            raise jwt.ExpiredSignatureError("Signature has expired")
        if payload["sid"] in self.revoked:
            raise RevokedToken("this session was ended (logout)")
        version = self.versions(str(payload.get("identifier", "")))
        if version is None or not hmac.compare_digest(version, str(payload["ver"])):
            raise RevokedToken("the user was removed or their password changed")
        return payload

    # ---- logout -------------------------------------------------------------------------

    async def revoke(self, token: str) -> bool:
        """End the session of `token` (if it is one of ours and still valid); True if ended."""
        try:
            payload = self.claims(token)
        except jwt.InvalidTokenError:
            return False
        async with self._write_lock:
            now = self.clock()
            self.revoked = {sid: exp for sid, exp in self.revoked.items() if exp >= now}
            self.revoked[payload["sid"]] = float(payload["exp"])
            await asyncio.to_thread(_write_private, self.path, json.dumps(self.revoked))
        return True

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"{self.path} is unreadable ({exc}); delete it to start over"
            ) from None
        now = self.clock()
        return {str(sid): float(exp) for sid, exp in data.items() if float(exp) >= now}


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with a file only this user may read."""
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
