"""Rate limits per API key and per chat user: requests and tokens per minute, as OpenAI's are.

PAGECHAT_RATE_LIMIT_RPM and PAGECHAT_RATE_LIMIT_TPM (0, the default: off) give every caller
(each API key, each chat user) two buckets that refill continuously: RPM requests and TPM
tokens per minute, each holding at most one minute's worth. This is the model OpenAI documents:
a caller who has been idle may spend a full minute's quota at once, and the quota comes back
gradually rather than all at a minute boundary.

- Requests: admission takes one request from the bucket per answer asked for, so a list of
  prompts and `n > 1` count as that many requests. An empty bucket refuses the request at once
  (429 under /v1, a line in the chat) with the time after which it would be admitted.
- Tokens (prompt + generated) are counted as the engine processes them (`RateTicket.meter`),
  because the length of an answer is not known in advance: a request is admitted while its
  caller has tokens left, and a long answer can take the bucket below zero; the caller's next
  request then waits until the deficit has refilled.

Fair by construction: a refused request is answered at once and never queued, so a caller at
its limit takes nothing from anyone else; each caller's buckets are its own.

Who is a caller: `api_caller` (a digest of the API key, never the key; without
PAGECHAT_API_KEYS, all API callers share one bucket) and `chat_caller` (the chat login, or the
one local user).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from app.settings import AppSettings
from engine.outputs import RequestOutput

WINDOW_S = 60.0  # the limits are per minute
MAX_IDLE_BUCKETS = 4096  # beyond this many callers, full (idle) buckets are forgotten

Clock = Callable[[], float]


@dataclass
class Bucket:
    """A token bucket: holds up to `capacity`, refills at `capacity` per minute, may go negative."""

    capacity: float
    level: float
    stamp: float

    @property
    def rate(self) -> float:
        return self.capacity / WINDOW_S

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def seconds_until(self, level: float) -> float:
        """How long until the bucket holds `level` (0 if it does already)."""
        return max(0.0, (level - self.level) / self.rate)

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


class RateLimited(Exception):
    """A request refused by a limit: what to tell the caller, and when to come back."""

    def __init__(
        self, kind: str, message: str, retry_after: float | None, headers: dict[str, str]
    ) -> None:
        super().__init__(message)
        self.kind = kind  # "requests" or "tokens" (OpenAI's error `type` for rate limits)
        self.message = message
        self.retry_after = retry_after  # seconds; None: this request can never be admitted
        self.headers = headers

    def response_headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers plus Retry-After (whole seconds) and retry-after-ms."""
        out = dict(self.headers)
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
            out["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        return out


class RateTicket:
    """An admitted request: its caller's headers, and the meter for the tokens it uses."""

    def __init__(self, limits: RateLimits | None, caller: str, headers: dict[str, str]) -> None:
        self._limits = limits
        self._caller = caller
        self.headers = headers  # x-ratelimit-* as of admission (empty when limits are off)

    def charge(self, tokens: int) -> None:
        if self._limits is not None and tokens > 0:
            self._limits.charge(self._caller, tokens)

    async def meter(
        self, outputs: AsyncGenerator[RequestOutput, None]
    ) -> AsyncGenerator[RequestOutput, None]:
        """Pass outputs through, charging prompt and generated tokens as they are reported."""
        charged = 0
        try:
            async for out in outputs:
                used = out.num_prompt_tokens + out.num_generated_tokens
                if used > charged:
                    self.charge(used - charged)
                    charged = used
                yield out
        finally:
            await outputs.aclose()


class RateLimits:
    """Every caller's buckets. Limits are read from the settings at each admission."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self.refused: dict[str, int] = {"requests": 0, "tokens": 0}  # for /metrics

    def check(self, settings: AppSettings, caller: str) -> None:
        """Raise RateLimited if the caller could not be admitted for one request now; takes
        nothing. Run before a request is validated and tokenized, so that a caller over its
        limit costs the server little."""
        self._admit(settings, caller, 1, take=False)

    def admit(self, settings: AppSettings, caller: str, requests: int = 1) -> RateTicket:
        """Take `requests` from the caller's request bucket, or raise RateLimited.

        With both limits off this does nothing and the ticket meters nothing.
        """
        return self._admit(settings, caller, requests, take=True)

    def _admit(self, settings: AppSettings, caller: str, requests: int, take: bool) -> RateTicket:
        rpm, tpm = settings.rate_limit_rpm, settings.rate_limit_tpm
        if not rpm and not tpm:
            return RateTicket(None, caller, {})
        now = self._clock()
        self._forget_idle(now)
        req = self._bucket(self._requests, caller, rpm, now) if rpm else None
        tok = self._bucket(self._tokens, caller, tpm, now) if tpm else None
        if req is not None and requests > req.capacity:
            self.refused["requests"] += 1
            raise RateLimited(
                "requests",
                f"This request counts as {requests} requests (prompts x n), more than the limit of "
                f"{rpm} requests per minute (RPM); send fewer prompts or a smaller n.",
                None,
                _headers(req, tok, now),
            )
        if req is not None and req.level < requests:
            self.refused["requests"] += 1
            wait = req.seconds_until(requests)
            raise RateLimited(
                "requests",
                f"Rate limit reached for requests per minute (RPM): limit {rpm}, used "
                f"{rpm - max(0, math.floor(req.level))}, requested {requests}. "
                f"Please try again in {_duration(wait)}.",
                wait,
                _headers(req, tok, now),
            )
        if tok is not None and tok.level <= 0:
            self.refused["tokens"] += 1
            wait = tok.seconds_until(1)
            raise RateLimited(
                "tokens",
                f"Rate limit reached for tokens per minute (TPM): limit {tpm}, used "
                f"{tpm - math.floor(tok.level)}. Please try again in {_duration(wait)}.",
                wait,
                _headers(req, tok, now),
            )
        if req is not None and take:
            req.level -= requests
        return RateTicket(self, caller, _headers(req, tok, now))

    def charge(self, caller: str, tokens: int) -> None:
        bucket = self._tokens.get(caller)
        if bucket is not None:
            bucket.refill(self._clock())
            bucket.level -= tokens

    def _bucket(self, buckets: dict[str, Bucket], caller: str, limit: int, now: float) -> Bucket:
        bucket = buckets.get(caller)
        if bucket is None or bucket.capacity != limit:  # new caller, or the limit changed
            bucket = buckets[caller] = Bucket(float(limit), float(limit), now)
        bucket.refill(now)
        return bucket

    def _forget_idle(self, now: float) -> None:
        """A full bucket is the same as none: drop them when many callers have come by."""
        for buckets in (self._requests, self._tokens):
            if len(buckets) > MAX_IDLE_BUCKETS:
                for caller, bucket in list(buckets.items()):
                    bucket.refill(now)
                    if bucket.full:
                        del buckets[caller]


def _headers(req: Bucket | None, tok: Bucket | None, now: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers; reset = time until the bucket is full again."""
    out: dict[str, str] = {}
    for name, bucket in (("requests", req), ("tokens", tok)):
        if bucket is None:
            continue
        out[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
        out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
        out[f"x-ratelimit-reset-{name}"] = _duration(bucket.seconds_until(bucket.capacity))
    return out


def _duration(seconds: float) -> str:
    """A duration the way OpenAI's headers write it (Go's format): "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _digest(kind: str, value: str) -> str:
    data = f"{kind}\0{value}".encode()
    return (
        kind + ":" + hashlib.blake2b(data, digest_size=16, person=b"pagechat.ratelim").hexdigest()
    )


def api_caller(settings: AppSettings, api_key: str | None) -> str:
    """The rate-limit identity of an API request whose key (if any) was already checked."""
    if settings.api_key_list() and api_key:
        return _digest("api-key", api_key)
    return "api"


def chat_caller(user: str | None) -> str:
    """The rate-limit identity of a chat user (Chainlit's identifier; the local user included)."""
    return _digest("user", user or "")
