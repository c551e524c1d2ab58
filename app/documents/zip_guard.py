"""Unpack an Office (zip) file under a size limit counted while inflating.

A zip's headers state each member's size, but a crafted file can state anything, and even an
honest 2 MB DOCX can hold 245 MiB of XML. So the limit is enforced on the bytes actually
inflated, chunk by chunk: the first byte over it stops the work. Media members (images,
embedded files) carry no text: they are not inflated at all, only kept as empty entries so the
package's relationships still resolve. The result is an uncompressed zip the parser can open
with nothing left to inflate.
"""

from __future__ import annotations

import io
import zipfile

from app.documents.document import DocumentError

CHUNK = 1024 * 1024
MAX_MEMBERS = 10_000
TEXT_SUFFIXES = (".xml", ".rels")


def unpack_office(name: str, data: bytes, max_unpacked: int) -> bytes:
    """The XML parts of an Office file re-packed uncompressed; raises DocumentError when the
    archive is damaged ("corrupt") or its XML inflates beyond `max_unpacked` bytes
    ("too_much_unpacked")."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _corrupt(name) from exc
    if len(infos) > MAX_MEMBERS:
        raise DocumentError(
            "too_many_members",
            f"{name}: {len(infos):,} parts is more than the {MAX_MEMBERS:,} allowed",
            name=name,
            count=len(infos),
            limit=MAX_MEMBERS,
        )
    out = io.BytesIO()
    total = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as packed:
        for info in infos:
            if info.is_dir():
                continue
            if not info.filename.lower().endswith(TEXT_SUFFIXES):
                packed.writestr(info.filename, b"")
                continue
            parts = []
            try:
                with archive.open(info) as member:
                    while chunk := member.read(CHUNK):
                        total += len(chunk)
                        if total > max_unpacked:
                            raise too_much_unpacked(name, max_unpacked)
                        parts.append(chunk)
            except DocumentError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
                raise _corrupt(name) from exc
            packed.writestr(info.filename, b"".join(parts))
    return out.getvalue()


def too_much_unpacked(name: str, limit: int) -> DocumentError:
    limit_mb = round(limit / (1024 * 1024))
    return DocumentError(
        "too_much_unpacked",
        f"{name}: its contents unpack to more than the {limit_mb:,} MB limit "
        "(PAGECHAT_MAX_UNPACKED_MB); refused",
        name=name,
        limit_mb=limit_mb,
    )


def _corrupt(name: str) -> DocumentError:
    return DocumentError(
        "corrupt", f"{name}: this file is damaged or is not a real DOCX", name=name, kind="DOCX"
    )
