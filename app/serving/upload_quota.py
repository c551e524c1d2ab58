"""How much one user may upload: files and bytes per chat and per day, and files per message.

The browser stops at 10 files per message, but nothing stopped a script from uploading a
dozen 45 MB files into one session. The server now counts, per user:

- files waiting to be sent with the next message (Chainlit's `max_files`, 10): a message with
  more, or an 11th upload before sending, is refused;
- files and bytes per chat (PAGECHAT_UPLOAD_FILES_PER_CHAT, PAGECHAT_UPLOAD_MB_PER_CHAT);
- files and bytes per user over the last 24 hours (PAGECHAT_UPLOAD_FILES_PER_DAY,
  PAGECHAT_UPLOAD_MB_PER_DAY).

A refused upload gets a `QuotaExceeded` whose message names the limit (413 for a chat's or a
message's limits, 429 with Retry-After for the daily one). Counts live in memory: a restart
starts them afresh. A limit of 0 means none.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

DAY_S = 24 * 3600.0
MB = 1024 * 1024


class QuotaExceeded(Exception):
    def __init__(self, message: str, status: int = 413, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


@dataclass
class QuotaLimits:
    files_per_message: int = 10
    files_per_chat: int = 50
    bytes_per_chat: int = 500 * MB
    files_per_day: int = 500
    bytes_per_day: int = 2000 * MB


@dataclass
class _Chat:
    files: int = 0
    bytes: int = 0
    pending: int = 0  # uploaded, not yet sent with a message
    touched: float = 0.0


@dataclass
class _Day:
    uploads: deque[tuple[float, int]] = field(default_factory=deque)  # (time, bytes)


class UploadQuota:
    """The counters; `admit` before an upload is stored, `sent` when a message takes its files."""

    def __init__(self, limits: QuotaLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._chats: dict[str, _Chat] = {}
        self._days: dict[str, _Day] = {}

    def admit(self, user: str, chat: str, size: int) -> None:
        """Count an upload of `size` bytes by `user` into `chat`, or raise QuotaExceeded."""
        now = self.clock()
        self._forget(now)
        limits = self.limits
        c = self._chats.setdefault(chat, _Chat())
        d = self._days.setdefault(user, _Day())
        if limits.files_per_message and c.pending >= limits.files_per_message:
            raise QuotaExceeded(
                f"At most {limits.files_per_message} files can be attached to one message; "
                "send these first."
            )
        if limits.files_per_chat and c.files >= limits.files_per_chat:
            raise QuotaExceeded(
                f"This chat already has {c.files} uploaded files (the limit per chat); "
                "start a new chat."
            )
        if limits.bytes_per_chat and c.bytes + size > limits.bytes_per_chat:
            raise QuotaExceeded(
                f"This file would take the chat's uploads past {limits.bytes_per_chat / MB:g} MB "
                "(the limit per chat); start a new chat."
            )
        day_bytes = sum(n for _, n in d.uploads)
        over_files = limits.files_per_day and len(d.uploads) >= limits.files_per_day
        over_bytes = limits.bytes_per_day and day_bytes + size > limits.bytes_per_day
        if over_files or over_bytes:
            wait = d.uploads[0][0] + DAY_S - now if d.uploads else DAY_S
            what = (
                f"{limits.files_per_day} files"
                if over_files
                else f"{limits.bytes_per_day / MB:g} MB"
            )
            raise QuotaExceeded(
                f"Daily upload limit reached ({what} per 24 hours); try again in {_hours(wait)}.",
                status=429,
                retry_after_s=wait,
            )
        c.files += 1
        c.bytes += size
        c.pending += 1
        c.touched = now
        d.uploads.append((now, size))

    def refund(self, user: str, chat: str, size: int) -> None:
        """Undo `admit` for an upload that was not stored after all."""
        c = self._chats.get(chat)
        if c is not None:
            c.files, c.bytes, c.pending = (
                max(0, c.files - 1),
                max(0, c.bytes - size),
                max(0, c.pending - 1),
            )
        d = self._days.get(user)
        if d is not None:
            for i in range(len(d.uploads) - 1, -1, -1):
                if d.uploads[i][1] == size:
                    del d.uploads[i]
                    break

    def check_message(self, chat: str, files: int) -> None:
        """A message with `files` attachments may be sent; the waiting count starts over."""
        limit = self.limits.files_per_message
        if limit and files > limit:
            raise QuotaExceeded(
                f"At most {limit} files can be attached to one message (got {files})."
            )
        if (c := self._chats.get(chat)) is not None:
            c.pending = 0

    def _forget(self, now: float) -> None:
        for d in self._days.values():
            while d.uploads and now - d.uploads[0][0] > DAY_S:
                d.uploads.popleft()
        if len(self._chats) > 10_000:  # chats untouched for a day are over
            self._chats = {k: c for k, c in self._chats.items() if now - c.touched <= DAY_S}
        if len(self._days) > 10_000:
            self._days = {k: d for k, d in self._days.items() if d.uploads}


def _hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{max(1, round(seconds / 60))} min"
    return f"{seconds / 3600:.1f} h"
