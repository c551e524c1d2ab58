"""The upload size limit (PAGECHAT_MAX_UPLOAD_MB), enforced before the body is read.

Chainlit reads a whole upload into memory before checking its size, so the limit is enforced
here from the request's length (or its bytes as they arrive), answering 413. (Chainlit's own
check, and its handling of empty files, are set up in app/serving/chainlit_patches.py.)
"""

from __future__ import annotations

import json

from fastapi import FastAPI
from starlette.types import ASGIApp

from app.serving.body_limit import BodyLimit

UPLOAD_PATH = "/project/file"  # Chainlit's upload route
# Room for the multipart envelope (boundary, part headers) around the file itself.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024


class UploadLimit(BodyLimit):
    """`BodyLimit` on Chainlit's upload route: a file over `max_bytes` is refused (413)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path: str = UPLOAD_PATH) -> None:
        super().__init__(app, max_bytes, path=path)
        self.limit = max_bytes + MULTIPART_OVERHEAD_BYTES

    def refusal(self) -> bytes:
        mb = self.max_bytes / (1024 * 1024)
        return json.dumps(
            {"detail": f"File size too large: the upload limit is {mb:g} MB"}
        ).encode()


def apply_upload_limit(app: FastAPI, max_upload_mb: int) -> None:
    app.add_middleware(UploadLimit, max_bytes=max_upload_mb * 1024 * 1024)
