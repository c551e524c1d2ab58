"""The live line of a document being read: the chat's view of extraction and OCR progress.

While a PDF is read the chat shows a step whose name carries the numbers ("Reading
report.pdf: page 120 of 300 (40%), about 6 s left"; "OCR of scan.pdf: scanned page 2 of 9
..."), visible without expanding anything. It opens only once reading takes a moment, so a
small file shows nothing; when done its name says what it took. The notes of the extraction
(pages OCR'd or empty, no main content in a page) are returned as texts for the chat to say.
Texts come from the chat's translator (`translate(key, **params)`), in the user's language.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import chainlit as cl
from chainlit.utils import utc_now

from app.documents.document import (
    Document,
    DocumentNote,
    ExtractionProgress,
    note_message,
    progress_message,
)

Translate = Callable[..., str]
OPEN_AFTER_S = 0.5  # a document read faster than this (after its worker started) shows no line
INTERVAL_S = 0.5  # the line is updated at most this often
# Notes said in the chat; the others (headers and footers dropped) go into the line's output.
SAID_NOTES = {"ocr_pages", "empty_pages", "ocr_unavailable", "ocr_skipped", "html_full_text"}


class ExtractionLine:
    """One document's progress line; pass `update` as extract_file_async's `progress`."""

    def __init__(self, translate: Translate, name: str) -> None:
        self.translate = translate
        self.name = name
        self.started = time.monotonic()
        self.last_update = 0.0
        self.first_event: float | None = None
        self.step: cl.Step | None = None

    async def update(self, step: ExtractionProgress) -> None:
        now = time.monotonic()
        if self.first_event is None:
            self.first_event = now  # the worker has started: time from here, not from the upload
        # OCR is slow: its line opens at once. A text layer opens it once reading has taken
        # OPEN_AFTER_S, or at once when the pace so far says that much is left.
        left = step.seconds_left or 0.0
        if (
            self.step is None
            and step.stage != "ocr"
            and now - self.first_event < OPEN_AFTER_S
            and left < OPEN_AFTER_S
        ):
            return
        if self.step is not None and now - self.last_update < INTERVAL_S and step.done < step.total:
            return
        self.last_update = now
        title = self.title(step)
        if self.step is None:
            parent = cl.context.current_step
            self.step = cl.Step(
                name=title, type="tool", parent_id=parent.id if parent else None, show_input=False
            )
            self.step.start = utc_now()
            await self.step.send()
        else:
            self.step.name = title
            await self.step.update()

    def title(self, step: ExtractionProgress) -> str:
        key, params = progress_message(step)
        text = self.translate(key, **params)
        left = step.seconds_left
        if left is not None and left >= 1:
            text = self.translate("doc_progress_left", text=text, seconds=round(left))
        return text

    async def close(self, document: Document | None) -> list[str]:
        """End the line (None: reading failed) and return the notes the chat should say."""
        seconds = time.monotonic() - self.started
        notes = document.notes if document is not None else []
        said = [self._note(n) for n in notes if n.code in SAID_NOTES]
        if self.step is not None:
            if document is None:
                self.step.name = self.translate("doc_read_failed", name=self.name)
                self.step.is_error = True
            else:
                self.step.name = self.translate(
                    "doc_read_done",
                    name=self.name,
                    pages=document.pages or 0,
                    ocr=len(document.ocr_pages),
                    seconds=seconds,
                )
                self.step.output = "\n\n".join(self._note(n) for n in notes)
            self.step.end = utc_now()
            await self.step.update()
        return said

    def _note(self, note: DocumentNote) -> str:
        key, params = note_message(note)
        return self.translate(key, **params)
