"""Documents parsed in a worker process, so no upload can stall or exhaust the server.

Each document gets a fresh `python -m app.documents.worker` process: nothing a parser leaks or
corrupts survives it, and a kill ends everything it started (OCR threads included). The
process lowers its CPU priority, caps its own data memory (RLIMIT_DATA) before importing any
parser, and is watched from here: over `memory_mb` of resident memory or past `timeout_s` it
is killed and the user told which limit it hit. At most `workers` documents are parsed at
once; more wait their turn. The server's event loop only awaits pipes.

Protocol, child to parent on the original stdout (the child's fd 1 is pointed at stderr so a
library's print cannot corrupt it): messages of an 8-byte big-endian length and a JSON object,
`{"type": "progress", ...}` any number of times, then one `done` (the Document) or `error`
(a DocumentError's code, message and params). JSON, not pickle: the parent never unpickles
what a process that parsed untrusted bytes produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import signal
import struct
import sys
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light modules (stdlib only): the parsers are imported after the memory limit is set.
from app.documents.document import Document, DocumentError, DocumentNote, ExtractionProgress
from app.documents.limits import ParseLimits

if TYPE_CHECKING:
    from app.documents.extraction import AsyncProgress

logger = logging.getLogger("pagechat.documents")

MEMORY_POLL_S = 0.05
STDERR_TAIL = 4  # chunks (64 KiB at most each) of the worker's stderr kept for the log
NICENESS = 10
_LENGTH = struct.Struct(">Q")
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "API_KEY", "DATABASE_URL", "CREDENTIAL")
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


# ---- parent side ---------------------------------------------------------------------------


async def parse_in_worker(
    path: str | Path, name: str, max_bytes: int, limits: ParseLimits, progress: AsyncProgress | None
) -> Document:
    """Parse one file in a worker process under `limits`; DocumentError on any failure."""
    async with _slot(limits.workers):
        return await _run(Path(path), name, max_bytes, limits, progress)


def _slot(workers: int) -> asyncio.Semaphore:
    """One semaphore per event loop and worker count (the settings name one count)."""
    slots = _slots.setdefault(asyncio.get_running_loop(), {})
    if workers not in slots:
        slots[workers] = asyncio.Semaphore(workers)
    return slots[workers]


async def _run(
    path: Path, name: str, max_bytes: int, limits: ParseLimits, progress: AsyncProgress | None
) -> Document:
    request = {
        "path": str(path.resolve()),
        "name": name,
        "max_bytes": max_bytes,
        "limits": dataclasses.asdict(limits),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.documents.worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
        limit=1024 * 1024,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pidfd = _open_pidfd(proc.pid)
    proc.stdin.write(json.dumps(request).encode())
    proc.stdin.close()
    tail: deque[str] = deque(maxlen=STDERR_TAIL)
    stderr = asyncio.create_task(_drain(proc.stderr, tail))
    over_memory = asyncio.Event()
    watcher = asyncio.create_task(_watch_memory(proc.pid, limits.memory_bytes, over_memory))
    try:
        async with asyncio.timeout(limits.timeout_s):
            while True:
                message = await _receive(proc.stdout)
                if message is None:
                    break
                if message["type"] == "progress":
                    await _report(progress, message["progress"])
                elif message["type"] == "done":
                    return _document(message["document"])
                elif message["type"] == "error":
                    raise DocumentError(message["code"], message["message"], **message["params"])
    except TimeoutError:
        raise DocumentError(
            "parse_timeout",
            f"{name}: reading it took longer than the {limits.timeout_s:g} s limit "
            "(PAGECHAT_PARSE_TIMEOUT_S); stopped",
            name=name,
            limit_s=limits.timeout_s,
        ) from None
    finally:
        watcher.cancel()
        if proc.returncode is None:
            _kill(proc.pid, pidfd)
        await proc.wait()
        if pidfd is not None:
            os.close(pidfd)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stderr, 1.0)
    if over_memory.is_set():
        raise memory_error(name, limits.memory_mb)
    logger.warning(
        "parsing %s: the worker ended (exit %s) without an answer:\n%s",
        name,
        proc.returncode,
        "".join(tail)[-4000:],
    )
    raise DocumentError(
        "parse_failed",
        f"{name}: the document reader stopped unexpectedly (exit {proc.returncode})",
        name=name,
        exit_code=proc.returncode,
    )


def memory_error(name: str, limit_mb: int) -> DocumentError:
    return DocumentError(
        "parse_memory",
        f"{name}: reading it needed more than the {limit_mb:,} MB memory limit "
        "(PAGECHAT_PARSE_MEMORY_MB); stopped",
        name=name,
        limit_mb=limit_mb,
    )


def _child_env() -> dict[str, str]:
    """The server's environment without its settings and secrets (the worker parses untrusted
    bytes and needs none of them), with this checkout importable (`-m app.documents.worker`)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PAGECHAT_", "CHAINLIT_"))
        and not any(word in key.upper() for word in _SECRET_WORDS)
    }
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return env


def _open_pidfd(pid: int) -> int | None:
    """A handle on the worker that a recycled pid cannot fool, or None (Linux before 5.3)."""
    try:
        return os.pidfd_open(pid)
    except OSError:  # an older kernel, or the worker is already gone
        return None


def _kill(pid: int, pidfd: int | None) -> None:
    """SIGKILL the worker without reaping it.

    Not `Process.kill()`: asyncio's subprocess.Popen polls (waitpid WNOHANG) before signalling,
    and when the worker has just died that poll can reap it ahead of asyncio's child watcher,
    which then reports exit 255 instead of how the worker ended. The pidfd (or, on a kernel without
    pidfds, the pid) is signalled and nothing is waited for.
    """
    with contextlib.suppress(ProcessLookupError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


async def _receive(stream: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the worker closed its end (exited or was killed)."""
    try:
        header = await stream.readexactly(_LENGTH.size)
        payload = await stream.readexactly(_LENGTH.unpack(header)[0])
    except asyncio.IncompleteReadError:
        return None
    if len(payload) > 1024 * 1024:  # a long document: decode it off the event loop
        return await asyncio.to_thread(json.loads, payload)
    message: dict[str, Any] = json.loads(payload)
    return message


async def _report(progress: AsyncProgress | None, fields: dict[str, Any]) -> None:
    if progress is None:
        return
    result = progress(ExtractionProgress(**fields))
    if inspect.isawaitable(result):
        await result


def _document(fields: dict[str, Any]) -> Document:
    fields["notes"] = [DocumentNote(**note) for note in fields.get("notes", [])]
    return Document(**fields)


async def _drain(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    """Keep reading the worker's stderr (a full pipe would block it), keeping the end."""
    while chunk := await stream.read(65536):
        tail.append(chunk.decode(errors="replace"))


async def _watch_memory(pid: int, limit: int, over: asyncio.Event) -> None:
    """Kill the worker once its resident memory passes `limit` (RLIMIT_DATA is the first line
    of defence; this catches what it does not count)."""
    import psutil

    try:
        process = psutil.Process(pid)
        while True:
            if process.memory_info().rss > limit:
                over.set()
                process.kill()
                return
            await asyncio.sleep(MEMORY_POLL_S)
    except psutil.Error:
        return


# ---- child side ----------------------------------------------------------------------------


def main() -> None:
    """Entry point of the worker process: one request on stdin, messages on stdout."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the protocol
    request = json.loads(sys.stdin.read())
    limits = request["limits"]
    _limit_memory(limits["memory_mb"] * 1024 * 1024)
    with contextlib.suppress(OSError, AttributeError):  # no os.nice on Windows
        os.nice(NICENESS)
    logging.basicConfig(level=logging.ERROR)  # pdfminer and friends warn per odd object

    def send(message: dict[str, Any]) -> None:
        # "replace": a lone surrogate from a damaged file becomes "?" rather than a crash
        payload = json.dumps(message, ensure_ascii=False).encode("utf-8", "replace")
        channel.write(_LENGTH.pack(len(payload)) + payload)
        channel.flush()

    def on_progress(step: ExtractionProgress) -> None:
        send({"type": "progress", "progress": dataclasses.asdict(step)})

    from app.documents.extraction import extract_file

    name = request["name"]
    try:
        document = extract_file(
            request["path"],
            name,
            request["max_bytes"],
            progress=on_progress,
            limits=ParseLimits(**limits),
        )
        send({"type": "done", "document": dataclasses.asdict(document)})
    except DocumentError as exc:
        send({"type": "error", "code": exc.code, "message": str(exc), "params": exc.params})
    except MemoryError:
        over = memory_error(name, limits["memory_mb"])
        send({"type": "error", "code": over.code, "message": str(over), "params": over.params})
    channel.close()


def _limit_memory(limit: int) -> None:
    try:
        import resource
    except ImportError:  # not on Windows: the parent's resident-memory watch still applies
        return
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (limit if hard < 0 else min(limit, hard), hard))


if __name__ == "__main__":
    main()
