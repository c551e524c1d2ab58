"""What /login checks before it looks at a password: the page that posted it, and how many
wrong passwords came before.

- Cross-site posts are refused (login CSRF: a page elsewhere must not sign the user's browser
  in as someone else). Browsers send `Origin` (or at least `Referer`, or `Sec-Fetch-Site`) on a
  form post; it must be this server's own host or an origin PAGECHAT_CORS_ALLOW_ORIGINS names.
  A client that sends none of them is not a browser, and cannot be the victim of this attack.
- Failed sign-ins are throttled per account and per client address. The first few failures
  are free; after that each one locks that key for a delay that doubles (1 s, 2 s, 4 s, ... up
  to 15 minutes), and a sign-in during the delay gets 429 with Retry-After without its password
  being checked. The account key locks only that account (others sign in as usual); the
  address key, with a higher allowance, stops one client from trying many accounts. A
  successful sign-in clears the account's count. Counts are kept in memory for a day.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

ACCOUNT_FREE_FAILURES = 5
ADDRESS_FREE_FAILURES = 20
BASE_DELAY_S = 1.0
MAX_DELAY_S = 15 * 60.0
FORGET_AFTER_S = 24 * 3600.0
MAX_KEYS = 100_000  # oldest entries are dropped beyond this (memory stays bounded)


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0


class LoginThrottle:
    """Failure counts per account and per client address, with exponential lock-out."""

    def __init__(
        self,
        account_free: int = ACCOUNT_FREE_FAILURES,
        address_free: int = ADDRESS_FREE_FAILURES,
        base_delay_s: float = BASE_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = {"account": account_free, "address": address_free}
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self.clock = clock
        self._keys: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def retry_after(self, account: str, address: str) -> float:
        """Seconds until a sign-in for `account` from `address` may be tried; 0 = now."""
        now = self.clock()
        waits = [
            entry.locked_until - now
            for key in (("account", account), ("address", address))
            if (entry := self._keys.get(key)) is not None
        ]
        return max([0.0, *waits])

    def failed(self, account: str, address: str) -> None:
        now = self.clock()
        for key in (("account", account), ("address", address)):
            entry = self._keys.pop(key, None)
            if entry is None or now - entry.last > FORGET_AFTER_S:
                entry = _Failures()
            entry.count += 1
            entry.last = now
            over = entry.count - self.free[key[0]]
            if over > 0:
                delay = min(self.max_delay_s, self.base_delay_s * 2 ** min(over - 1, 30))
                entry.locked_until = now + delay
            self._keys[key] = entry  # most recent last
        while len(self._keys) > MAX_KEYS:
            self._keys.popitem(last=False)

    def succeeded(self, account: str) -> None:
        self._keys.pop(("account", account), None)


def is_cross_site(headers: Mapping[str, str], allowed_origins: list[str]) -> bool:
    """True when a browser says the request comes from a page of another site.

    `headers` are the request's (lower-case names). Same host means the Host header (or a
    proxy's X-Forwarded-Host) equals the origin's host:port.
    """
    hosts = {headers.get("host", "").lower()}
    if forwarded := headers.get("x-forwarded-host"):
        hosts.add(forwarded.split(",")[0].strip().lower())
    hosts.discard("")

    def ours(url: str) -> bool:
        origin = url.strip().rstrip("/")
        if origin in allowed_origins:
            return True
        parts = urlsplit(origin)
        if f"{parts.scheme}://{parts.netloc}" in allowed_origins:
            return True
        return bool(parts.netloc) and parts.netloc.lower() in hosts

    if (origin := headers.get("origin")) is not None:
        return not ours(origin)  # "null" (sandboxed or privacy-stripped pages) is foreign too
    if referer := headers.get("referer"):
        return not ours(referer)
    return headers.get("sec-fetch-site", "").lower() == "cross-site"
