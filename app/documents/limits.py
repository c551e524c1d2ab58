"""The limits one document's parsing runs under (PAGECHAT_MAX_UNPACKED_MB, PAGECHAT_PARSE_*).

Parsing is the one place where a small upload can cost unbounded memory and time (a 2 MB DOCX
holding 245 MiB of XML, a 300-page scan to OCR). Each document is therefore parsed in its own
worker process (app.documents.worker) under these limits, a few processes at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import AppSettings

MB = 1024 * 1024


@dataclass(frozen=True)
class ParseLimits:
    """`max_unpacked_mb`: bytes an Office file's XML may inflate to (counted while inflating);
    `memory_mb`: memory of the parsing process; `timeout_s`: wall time per document;
    `workers`: documents parsed at once (more wait their turn)."""

    max_unpacked_mb: int = 100
    memory_mb: int = 2048
    timeout_s: float = 300.0
    workers: int = 2

    @property
    def max_unpacked_bytes(self) -> int:
        return self.max_unpacked_mb * MB

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * MB

    @classmethod
    def from_settings(cls, settings: AppSettings | None = None) -> ParseLimits:
        """The limits of `settings`, by default those in the environment (read at each call)."""
        if settings is None:
            from app.settings import AppSettings

            settings = AppSettings()
        return cls(
            max_unpacked_mb=settings.max_unpacked_mb,
            memory_mb=settings.parse_memory_mb,
            timeout_s=settings.parse_timeout_s,
            workers=settings.parse_workers,
        )
