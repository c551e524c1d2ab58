"""Bearer API keys for /v1/*: PAGECHAT_API_KEYS, compared in constant time."""

from __future__ import annotations

import hmac


def key_is_valid(token: str | None, keys: list[str]) -> bool:
    """True if `token` equals one of `keys`.

    Every key is compared (no early exit) with hmac.compare_digest, so the time taken does not
    tell an attacker how much of a guess was right, nor which key it was close to.
    """
    if token is None:
        return False
    candidate = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    return matched
