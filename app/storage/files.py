"""Uploaded files kept on local disk next to the database, and the route that reads them back.

Chainlit only ships cloud storage clients; without one, attachments vanish from resumed chats.
Object keys come from Chainlit (`<user id>/<element id>/<file name>`) and file names come from
users, so every key is checked to stay inside the storage root.
"""

from __future__ import annotations

import asyncio
import mimetypes
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from chainlit.data.storage_clients.base import BaseStorageClient
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

FILES_ROUTE = "/pagechat/files"
# Served with their own type; anything else (HTML, SVG, scripts...) is served as bytes.
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
        part = part.strip()
        if part in ("", ".", ".."):
            part = "_"
        parts.append(part[:200])
    return "/".join(parts)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
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
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if mime not in INLINE_TYPES:
            mime = "application/octet-stream"
        return FileResponse(
            path,
            media_type=mime,
            filename=path.name,
            content_disposition_type="attachment" if mime == "application/octet-stream" else "inline",
            headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
        )

    return router
