"""Long texts tokenized in a worker process, so one huge prompt cannot stall the server.

HF `tokenizers` holds the GIL while it encodes one string: a 10 MB prompt (5M tokens) kept
every other thread of the process, the event loop included, waiting ~15-20 s, and
`asyncio.to_thread` does not help. A worker process has its own GIL. It is started (spawned,
never forked from a process running an engine thread) on first use, loads the same
tokenizer.json and chat template, and imports neither torch nor the model. Ids come back as
one packed array, which the caller unpacks in milliseconds; with `max_len`, a prompt longer
than that (one the server refuses anyway) comes back as its count only (`PromptTooLong`):
turning a 16 MB prompt's 8M ids into a list took ~0.3 s of the event loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
import weakref
from array import array
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from engine.tokenizer import Tokenizer

# Texts longer than this (characters) are encoded in the worker; shorter ones take under a
# few milliseconds and are encoded in the caller's thread.
LONG_TEXT_CHARS = 20_000

WORKER_NICENESS = 10
_worker_tokenizer: Tokenizer | None = None  # in the worker process


class TokenizerWorkerDied(RuntimeError):
    """The worker process ended mid-request (e.g. killed for memory); the next call starts
    a new one."""


def _init_worker(
    source: str, template: str | None, eos: list[int], special: dict[str, str]
) -> None:
    """Load the tokenizer in the worker: from its checkpoint's tokenizer.json, or (a tokenizer
    built in memory) from its serialized JSON."""
    global _worker_tokenizer
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    # Below the server's threads: on a busy CPU the running streams come first, and a huge
    # prompt's tokenizing takes the time that is left.
    os.nice(WORKER_NICENESS)
    path = Path(source)
    backend = Backend.from_file(str(path / "tokenizer.json")) if path.is_dir() else None
    if backend is None:
        backend = Backend.from_str(source)
    _worker_tokenizer = Tokenizer(backend, template, eos, special)


def _exit_with_parent(parent: int) -> None:
    """End the worker when the server is gone: a server that exits without shutting the pool
    down (Chainlit ends the process with os._exit) would otherwise leave it waiting forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class PromptTooLong(ValueError):
    """The text encodes to more than the caller's `max_len` ids (their count is given)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__(f"{num_tokens} tokens")
        self.num_tokens = num_tokens


def _pack(ids: list[int]) -> bytes:
    return array("I", ids).tobytes()


def _pack_within(ids: list[int], max_len: int | None) -> bytes | int:
    """The ids packed, or only their count when there are more than max_len."""
    return len(ids) if max_len is not None and len(ids) > max_len else _pack(ids)


def _result(data: bytes | int) -> list[int]:
    if isinstance(data, int):
        raise PromptTooLong(data)
    return _unpack(data)


def _unpack(data: bytes) -> list[int]:
    ids = array("I")
    ids.frombytes(data)
    return ids.tolist()


def _encode(text: str, max_len: int | None = None) -> bytes | int:
    assert _worker_tokenizer is not None
    return _pack_within(_worker_tokenizer.encode(text), max_len)


def _decode(data: bytes) -> str:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.decode(_unpack(data))


def _encode_chat(
    messages: list[dict[str, Any]], options: dict[str, Any], max_len: int | None = None
) -> bytes | int:
    assert _worker_tokenizer is not None
    return _pack_within(_worker_tokenizer.encode_chat(messages, **options), max_len)


class TokenizerProcess:
    """`encode` and `encode_chat` of one Tokenizer, off the caller's process for long texts."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        # Weak: the registry's entry must not keep its own key (the tokenizer) alive.
        self._tokenizer = weakref.ref(tokenizer)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenizerProcess:
        """The one TokenizerProcess of `tokenizer` (its worker ends with the tokenizer)."""
        with _registry_lock:
            process = _registry.get(tokenizer)
            if process is None:
                process = _registry[tokenizer] = cls(tokenizer)
                weakref.finalize(tokenizer, process.close)
            return process

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                t = self.tokenizer
                # The path, not the tokenizer: serializing Qwen's (7 MB of JSON) holds the GIL.
                source = str(t.source_dir) if t.source_dir is not None else t.backend.to_str()
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                    initargs=(source, t.chat_template, t.eos_token_ids, t.special_tokens),
                )
            return self._pool

    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise RuntimeError("the tokenizer is gone")
        return tokenizer

    async def _run(self, fn: Any, *args: Any) -> Any:
        pool = self._executor()
        try:
            data = await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool as exc:  # the worker died (e.g. killed for memory): start anew
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise TokenizerWorkerDied(
                "the tokenizer worker process died; retry the request"
            ) from exc
        return data

    async def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """`Tokenizer.encode`; in the worker when `text` is long. PromptTooLong when the worker
        finds more than `max_len` ids."""
        if len(text) <= LONG_TEXT_CHARS:
            return self.tokenizer.encode(text)
        return _result(await self._run(_encode, text, max_len))

    async def decode(self, ids: Sequence[int]) -> str:
        """`Tokenizer.decode`; in the worker for a long list of ids."""
        if len(ids) <= LONG_TEXT_CHARS // 4:
            return self.tokenizer.decode(ids)
        text: str = await self._run(_decode, _pack(list(ids)))
        return text

    async def encode_chat(
        self, messages: Sequence[dict[str, Any]], max_len: int | None = None, **options: Any
    ) -> list[int]:
        """`Tokenizer.encode_chat`; in the worker when the messages' text is long.
        PromptTooLong when the worker finds more than `max_len` ids."""
        if _text_size(messages) <= LONG_TEXT_CHARS:
            return self.tokenizer.encode_chat(messages, **options)
        return _result(await self._run(_encode_chat, list(messages), options, max_len))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _text_size(value: Any) -> int:
    """Characters of every string inside `value` (message contents, tool-call arguments)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) for v in value)
    return 0


_registry: weakref.WeakKeyDictionary[Tokenizer, TokenizerProcess] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
