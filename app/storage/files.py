"""Uploaded files kept on local disk next to the database, and the route that reads them back.

Chainlit only ships cloud storage clients; without one, attachments vanish from resumed chats.
Object keys come from Chainlit (`<user id>/<element id>/<file name>`) and file names come from
users, so every key is checked to stay inside the storage root.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from chainlit.data.storage_clients.base import BaseStorageClient
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

FILES_ROUTE = "/pagechat/files"
# Served with their own type; anything else (HTML, SVG, scripts...) is served as bytes.
MAX_NAME_BYTES = 255  # a file name's limit on ext4, XFS, btrfs, APFS, NTFS (in UTF-16 units)
INLINE_TYPES = {"application/pdf", "text/plain", "image/png", "image/jpeg", "image/gif", "image/webp"}


class UnsafeKey(ValueError):
    pass


class LocalStorageClient(BaseStorageClient):
    """Chainlit storage client writing under `root` (data_dir/files)."""

    def __init__(self, root: Path, url_prefix: str = FILES_ROUTE) -> None:
        self.root = Path(root).resolve()
        self.url_prefix = url_prefix.rstrip("/")

    def path_for(self, object_key: str) -> Path:
        """The file of an object key; UnsafeKey for anything that could leave the root."""
        if not object_key or "\x00" in object_key or "\\" in object_key:
            raise UnsafeKey(f"bad object key {object_key!r}")
        parts = object_key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafeKey(f"bad object key {object_key!r}")
        path = (self.root / Path(*parts)).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise UnsafeKey(f"object key {object_key!r} leaves the storage root")
        return path

    def url_for(self, object_key: str) -> str:
        return f"{self.url_prefix}/{quote(object_key)}"

    async def upload_file(
        self,
        object_key: str,
        data: bytes | str,
        mime: str = "application/octet-stream",
        overwrite: bool = True,
        content_disposition: str | None = None,
    ) -> dict[str, Any]:
        object_key = safe_key(object_key)
        path = self.path_for(object_key)
        if path.exists() and not overwrite:
            return {"object_key": object_key, "url": self.url_for(object_key)}
        payload = data.encode() if isinstance(data, str) else data
        await asyncio.to_thread(_write, path, payload)
        return {"object_key": object_key, "url": self.url_for(object_key)}

    async def delete_file(self, object_key: str) -> bool:
        try:
            path = self.path_for(object_key)
        except UnsafeKey:
            return False
        if not path.exists():
            return False
        await asyncio.to_thread(_remove, path, self.root)
        return True

    async def get_read_url(self, object_key: str) -> str:
        return self.url_for(object_key)

    async def close(self) -> None:
        return None


def safe_key(object_key: str) -> str:
    """A key whose parts are plain names (user-chosen file names may be anything)."""
    parts = []
    for part in object_key.replace("\\", "/").replace("\x00", "").split("/"):
        part = display_name(part)
        if part in ("", ".", ".."):
            part = "_"
        parts.append(part)
    return "/".join(parts)


# Characters that reorder text (a right-to-left override turns "report\u202efdp.exe" into what
# reads as "reportexe.pdf") or are invisible controls: removed from every shown or stored name.
_BIDI_AND_CONTROLS = dict.fromkeys(
    [*range(0x00, 0x20), 0x7F, 0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)


def display_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file name as it is shown and stored: no bidi or control characters, at most
    `max_bytes` of UTF-8 (what file systems allow), cut on a character boundary with the
    extension kept."""
    name = name.translate(_BIDI_AND_CONTROLS).strip()
    if len(name.encode("utf-8")) <= max_bytes:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode("utf-8")) > 16:
        stem, dot, ext = name, "", ""
    room = max_bytes - len((dot + ext).encode("utf-8"))
    cut = stem.encode("utf-8")[:room].decode("utf-8", errors="ignore")
    return cut + dot + ext


def file_response(path: Path, filename: str) -> FileResponse:
    """A stored upload sent back to its owner: a few harmless types inline, everything else
    (HTML, SVG, scripts...) as bytes to download; never sniffed, never run in our origin."""
    mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if mime not in INLINE_TYPES:
        mime = "application/octet-stream"
    return FileResponse(
        path,
        media_type=mime,
        filename=filename,
        content_disposition_type="attachment" if mime == "application/octet-stream" else "inline",
        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
    )


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.part")  # path's own name may use all 255 bytes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _remove(path: Path, root: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    parent = path.parent
    while parent != root and parent.is_relative_to(root):  # drop emptied <user>/<element> dirs
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def files_router(storage: LocalStorageClient, owner_of: Callable[[str], Awaitable[str | None]]) -> APIRouter:
    """GET /pagechat/files/<key>: a stored upload, for the owner of the chat that holds it.

    `owner_of(key)` gives the identifier of that user (None if no chat holds the key).
    """
    from chainlit.auth import get_current_user

    router = APIRouter()

    @router.get(FILES_ROUTE + "/{object_key:path}")
    async def read_file(object_key: str, user: Any = Depends(get_current_user)) -> FileResponse:  # noqa: B008
        if user is None:
            raise HTTPException(status_code=401, detail="Unauthorized")
        if await owner_of(object_key) != user.identifier:
            raise HTTPException(status_code=404, detail="Not found")
        try:
            path = storage.path_for(object_key)
        except UnsafeKey:
            raise HTTPException(status_code=404, detail="Not found") from None
        if not path.is_file():
            raise HTTPException(status_code=404, detail="Not found")
        return file_response(path, path.name)

    return router
