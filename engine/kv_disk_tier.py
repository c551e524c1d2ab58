"""Disk tier of the KV cache: full blocks in files that outlive the process.

Every block the engine registers is written soon after by a background writer thread, so a
restart (even a SIGKILL once an answer has finished) finds a document's KV. Loads run on a
loader thread; the engine thread only consults the in-memory index. Nothing outside
`directory` is ever touched.

One file per block, named by its key (engine.kv_keys): `<dir>/<key[:2] hex>/<key hex>.kv`:

    offset  size  field
    0       8     magic b"PCKVBLK\\0"
    8       4     format version (FILE_FORMAT_VERSION), uint32 little-endian
    12      32    model fingerprint digest (ModelFingerprint.digest)
    44      32    block key (must equal the file's name)
    76      4     number of token ids n, uint32
    80      8     payload bytes p, uint64
    88      4n    the block's token ids, int32 little-endian
    88+4n   p     the block's KV, the device cache's block (k|v, layer, slot, kv_head, head_dim)
                  in the engine's KV dtype, native byte order of this machine's torch
    end-8   8     XXH3-64 (xxhash) of everything before it, uint64 little-endian

A write goes to a temporary file in the same directory, is fsynced, then renamed over the final
name (and the directory fsynced), so a crash leaves either the whole file or none. The file is
written with O_DIRECT from the writer's own buffer (its last partial 4 KiB through the page
cache), so saving blocks costs the cores beside the engine's steps almost nothing. On a load
every field is checked (magic, version, fingerprint, key, token ids, sizes, checksum); a torn,
truncated, foreign or corrupt file is logged, deleted and never loaded, and the load stops
there (it brings the longest valid prefix of the blocks asked for). A file the page cache holds
whole (written or read moments ago, as after a restart on a warm machine) is read with one
system call (`preadv`, RWF_NOWAIT, after mincore says it is all there: no readahead of
files that are not) straight into its destination and checked with XXH3 streamed
over the same buffers in file order (~10 GB/s here; format 1's CRC-32 ran ~2 GB/s). Any other
file is read with O_DIRECT, from the disk into the loader's one page-aligned buffer, checked
there and then copied (GIL released) into its destination, so a load of gigabytes neither fills
the page cache nor makes the kernel allocate and reclaim pages beside the engine's steps (where
the file system refuses O_DIRECT, that read goes through the page cache). The destination is
either the device pool's own block (`load_into`, on the CPU, where the pool is host memory: one
buffer per (k|v, layer) segment of the pool block, so no fresh memory is faulted in while other
requests step) or one row of a staging buffer for all the blocks (`load`, on CUDA: the model
runner then copies the rows to the device). A load can be told to stop before its next file
(`stop`). Leftover temporary files are deleted at start. The directory is kept under its byte
cap by deleting the least recently used files (file mtimes carry the order across restarts: a
load touches them).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import queue
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from engine.kv_keys import BlockRef

logger = logging.getLogger(__name__)

FILE_FORMAT_VERSION = 2  # 1: CRC-32 checksum (such files are deleted as foreign)
MAGIC = b"PCKVBLK\0"
HEADER = struct.Struct("<8sI32s32sIQ")
CHECKSUM = struct.Struct("<Q")
SUFFIX = ".kv"
# KV waiting for the writer beyond this is not queued (a disk slower than the prefill would
# otherwise pile up the KV of a long document in memory); those blocks are not saved.
MAX_QUEUED_BYTES = 2 << 30
TMP_MARK = ".tmp-"
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in these units
IOV_MAX = 1024  # buffers one preadv fills on Linux (a block of a model up to 511 layers)


class BadBlockFile(Exception):
    """A block file that must not be loaded (the message says why)."""


def encode_header(fingerprint: bytes, ref: BlockRef, payload_bytes: int) -> bytes:
    n = len(ref.token_ids)
    return HEADER.pack(
        MAGIC, FILE_FORMAT_VERSION, fingerprint, ref.key, n, payload_bytes
    ) + struct.pack(f"<{n}i", *ref.token_ids)


def checksum(header: bytes | bytearray | memoryview, *payload: memoryview) -> int:
    """XXH3-64 of a block file's bytes before the checksum field: the header, then the payload
    (given whole, or as the consecutive pieces a load read it into: the same digest)."""
    h = xxhash.xxh3_64(header)
    for part in payload:
        h.update(part)
    return h.intdigest()


class DiskKVStore:
    """The files of one KV cache directory: index, background writer, loader, LRU cap."""

    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int,
        fingerprint: bytes,
        block_shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.fingerprint = fingerprint
        self.block_shape = block_shape
        self.dtype = dtype
        numel = 1
        for dim in block_shape:
            numel *= dim
        self.payload_bytes = numel * torch.empty((), dtype=dtype).element_size()
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file bytes, LRU first
        self._bytes = 0
        # Counters (read by stats(); written under the lock).
        self.bytes_written = 0
        self.blocks_written = 0
        self.bytes_read = 0
        self.blocks_read = 0
        self.load_seconds = 0.0
        self.bad_files = 0
        self.write_errors = 0
        self.files_evicted = 0
        self.blocks_dropped = 0  # not queued: the writer was MAX_QUEUED_BYTES behind
        self._bounce: mmap.mmap | None = None  # the loader thread's read buffer
        self._write_bounce: mmap.mmap | None = None  # the writer thread's file buffer
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._writer = _Writer(self)
        self._loader = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pagechat-kv-load", initializer=_yield_to_steps
        )
        # Normal interpreter exit writes what is queued (LLMEngine.close does it earlier). The
        # writer thread holds the store, so this runs at close() or at exit, never mid-run.
        self._finalizer = weakref.finalize(self, _Writer.stop, self._writer, 30.0)

    # ---- index ---------------------------------------------------------------------------------

    def path_of(self, key: bytes) -> Path:
        name = key.hex()
        return self.directory / name[:2] / f"{name}{SUFFIX}"

    def _scan(self) -> None:
        """Index the directory's block files, oldest first; delete torn temporary files."""
        found: list[tuple[int, bytes, int]] = []
        for sub in self.directory.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub):
                if TMP_MARK in entry.name:
                    logger.warning(
                        "KV disk cache: deleting %s, left by an interrupted write", entry.path
                    )
                    _unlink(entry.path)
                    continue
                if not entry.name.endswith(SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(entry.name[: -len(SUFFIX)])
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._bytes += size
        logger.info(
            "KV disk cache %s: %d blocks, %.1f MiB of %.1f MiB",
            self.directory,
            len(self._index),
            self._bytes / 2**20,
            self.capacity_bytes / 2**20,
        )
        with self._lock:
            self._evict_over_cap(0)

    @property
    def num_files(self) -> int:
        return len(self._index)

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def count_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, have a file (the prefix a load could bring)."""
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._index:
                    break
                n += 1
        return n

    def _forget(self, key: bytes) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._bytes -= size

    def _evict_over_cap(self, incoming: int) -> None:
        """Delete least recently used files until `incoming` more bytes fit (lock held)."""
        while self._index and self._bytes + incoming > self.capacity_bytes:
            key, _ = next(iter(self._index.items()))
            self._forget(key)
            _unlink(self.path_of(key))
            self.files_evicted += 1

    # ---- writing -------------------------------------------------------------------------------

    def save(
        self, refs: Sequence[BlockRef], kv: torch.Tensor, ready: Callable[[], None] | None = None
    ) -> None:
        """Queue blocks for writing; `kv[i]` is block i's KV on the CPU (after `ready()` returns).

        Returns at once: the writer thread writes them. Blocks already on disk are skipped.
        """
        fresh = [i for i, ref in enumerate(refs) if ref.key not in self._index]
        if fresh and not self._writer.put(
            [refs[i] for i in fresh], kv, fresh, ready, len(fresh) * self.payload_bytes
        ):
            with self._lock:
                self.blocks_dropped += len(fresh)

    def room_blocks(self) -> int:
        """How many more blocks the writer takes now (MAX_QUEUED_BYTES of KV waiting at most)."""
        return max(0, (MAX_QUEUED_BYTES - self._writer.queued_bytes) // self.payload_bytes)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued block is written; False on timeout."""
        return self._writer.wait_idle(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to `timeout` s), then stop the threads."""
        if self._finalizer.detach() is not None:
            self._writer.stop(timeout)
        self._loader.shutdown(wait=True, cancel_futures=True)

    def _write_block(self, ref: BlockRef, kv: torch.Tensor) -> None:
        """Write one block crash-safely: temporary file, fsync, rename, directory fsync."""
        path = self.path_of(ref.key)
        header = encode_header(self.fingerprint, ref, self.payload_bytes)
        payload = kv.contiguous().view(torch.uint8).reshape(-1).numpy().data
        if len(payload) != self.payload_bytes:
            raise ValueError(f"block of {len(payload)} bytes, expected {self.payload_bytes}")
        size = len(header) + len(payload) + CHECKSUM.size
        if size > self.capacity_bytes:
            return
        with self._lock:
            if ref.key in self._index:
                return
            self._evict_over_cap(size)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
        try:
            self._write_file(tmp, header, payload)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        _fsync_dir(path.parent)
        with self._lock:
            if ref.key not in self._index:
                self._index[ref.key] = size
                self._bytes += size
                self._evict_over_cap(0)
            self.bytes_written += size
            self.blocks_written += 1

    def _write_file(self, path: Path, header: bytes, payload: memoryview) -> None:
        """Write header, payload and checksum to a new file `path` and fsync it.

        The file is assembled in the writer's page-aligned buffer and its whole 4 KiB units are
        written with O_DIRECT, from that buffer to the disk, the last partial unit through the
        page cache. A buffered write of a block made the kernel allocate, copy and write back
        page cache beside the engine's steps: ~330 ms of CPU for 64 MiB on a 2-core machine
        (with O_DIRECT 2-4 ms, and the assembling copy and checksum ~15 ms, GIL released), so
        a stream stepping while its blocks were saved stalled for about that long each time.
        Where the file system refuses O_DIRECT the whole file goes through the page cache."""
        size = len(header) + payload.nbytes + CHECKSUM.size
        want = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        self._write_bounce = _aligned_buffer(self._write_bounce, want)
        with memoryview(self._write_bounce)[:size] as data:
            data[: len(header)] = header
            body = data[len(header) : size - CHECKSUM.size]
            _copy(body, payload)
            data[size - CHECKSUM.size :] = CHECKSUM.pack(checksum(data[: len(header)], body))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                done = _write_direct(fd, data[: size // DIRECT_ALIGN * DIRECT_ALIGN])
                _write_buffered(fd, data[done:], done)
                os.fsync(fd)
            finally:
                os.close(fd)

    # ---- loading -------------------------------------------------------------------------------

    def load(
        self, refs: Sequence[BlockRef], stop: threading.Event | None = None
    ) -> Future[list[torch.Tensor]]:
        """Read blocks on the loader thread into one new staging buffer: the KV of the longest
        valid prefix of `refs`, one tensor of `block_shape` per block (consecutive rows)."""
        return self._loader.submit(self._load_staged, list(refs), stop)

    def load_into(
        self,
        refs: Sequence[BlockRef],
        destinations: Callable[[int], list[memoryview]],
        stop: threading.Event | None = None,
    ) -> Future[int]:
        """Read blocks on the loader thread straight into their destinations; the future gives
        how many of `refs`, from the first, verified (their destinations hold their KV).

        `destinations(i)` (called on the loader thread) is where block i's payload goes: writable
        byte buffers, `payload_bytes` in all, in the file's order. A destination after the last
        verified block may hold anything. Once the future is done the loader never touches
        them again; `stop`, once set, ends the load before its next file."""
        return self._loader.submit(self._load, list(refs), destinations, stop)

    def _load_staged(
        self, refs: list[BlockRef], stop: threading.Event | None
    ) -> list[torch.Tensor]:
        # One uninitialized buffer for every block: each file's KV is read straight into its row
        # (the model runner then copies the rows into the pool in one operation).
        out = torch.empty((len(refs), *self.block_shape), dtype=self.dtype)
        rows = out.view(len(refs), -1).view(torch.uint8)
        loaded = self._load(refs, lambda i: [rows[i].numpy().data], stop)
        return list(out[:loaded].unbind(0))

    def _load(
        self,
        refs: list[BlockRef],
        destinations: Callable[[int], list[memoryview]],
        stop: threading.Event | None,
    ) -> int:
        start = time.perf_counter()
        loaded = 0
        nbytes = 0
        try:
            for ref in refs:
                if stop is not None and stop.is_set():
                    break
                path = self.path_of(ref.key)
                try:
                    nbytes += self._read_block(path, ref, destinations(loaded))
                except FileNotFoundError:
                    with self._lock:
                        self._forget(ref.key)
                    break
                except (BadBlockFile, OSError) as exc:
                    logger.warning(
                        "KV disk cache: %s is unusable (%s); deleted, not loaded", path, exc
                    )
                    with self._lock:
                        self._forget(ref.key)
                        self.bad_files += 1
                    _unlink(path)
                    break
                loaded += 1
                with self._lock:
                    if ref.key in self._index:
                        self._index.move_to_end(ref.key)
                try:
                    os.utime(path)  # the LRU order survives a restart
                except OSError:
                    pass
        finally:
            with self._lock:
                self.bytes_read += nbytes
                self.blocks_read += loaded
                self.load_seconds += time.perf_counter() - start
        return loaded

    def _read_block(self, path: Path, ref: BlockRef, payload: list[memoryview]) -> int:
        """Read the block file `path` (its KV into the byte buffers `payload`, in order) after
        checking every field against `ref`; returns the file's size. Raises BadBlockFile for a
        file not to load (`payload` may then hold part of it).

        A file the page cache holds whole is copied from it straight into `payload`
        (RWF_NOWAIT: a file written or read moments ago, as after a restart on a warm
        machine). Anything else is read with O_DIRECT, from the disk into the loader's
        page-aligned buffer, checked there and copied into `payload`: a load of gigabytes
        neither fills the page cache nor makes the kernel allocate and reclaim pages beside
        the engine's steps. Where O_DIRECT is refused (tmpfs, some network file systems) that
        read goes through the page cache."""
        if sum(p.nbytes for p in payload) != self.payload_bytes:
            raise ValueError(f"destination of {sum(p.nbytes for p in payload)} bytes for a block")
        head_len = HEADER.size + 4 * len(ref.token_ids)
        expected = head_len + self.payload_bytes + CHECKSUM.size
        head, tail = bytearray(head_len), bytearray(CHECKSUM.size + 1)  # +1: a longer file shows
        fd = os.open(path, os.O_RDONLY)
        try:
            size = _read_cached(fd, [head, *payload, tail], os.fstat(fd).st_size)
            if size is None:
                data = self._read_uncached(fd, expected)
        finally:
            os.close(fd)
        if size is not None:
            self._verify(ref, size, memoryview(head), payload, memoryview(tail))
            return size
        body = data[head_len : head_len + self.payload_bytes]
        self._verify(ref, len(data), data[:head_len], [body], data[head_len + self.payload_bytes :])
        offset = 0
        for dest in payload:
            _copy(dest, body[offset : offset + dest.nbytes])
            offset += dest.nbytes
        return len(data)

    def _read_uncached(self, fd: int, expected: int) -> memoryview:
        """The file's bytes (up to a little more than `expected`, so a longer file shows) in
        the loader's reusable page-aligned buffer: O_DIRECT, else through the page cache."""
        want = -(-(expected + 1) // DIRECT_ALIGN) * DIRECT_ALIGN
        self._bounce = _aligned_buffer(self._bounce, want)
        with memoryview(self._bounce)[:want] as view:
            got = _read_direct(fd, view)
            if got is None:
                got = _read_buffered(fd, view)
        return memoryview(self._bounce)[:got]

    def _verify(
        self,
        ref: BlockRef,
        size: int,
        head: memoryview,
        payload: list[memoryview],
        tail: memoryview,
    ) -> None:
        """Raise BadBlockFile unless a file of `size` bytes read as `head`, `payload` (in order)
        and `tail` is `ref`'s block, written for this store."""
        if size < HEADER.size:
            raise BadBlockFile(f"truncated: {size} bytes")
        magic, version, fingerprint, key, n, payload_bytes = HEADER.unpack_from(head)
        if magic != MAGIC:
            raise BadBlockFile("not a KV block file")
        if version != FILE_FORMAT_VERSION:
            raise BadBlockFile(f"format version {version}, expected {FILE_FORMAT_VERSION}")
        if fingerprint != self.fingerprint:
            raise BadBlockFile("written for another model fingerprint")
        if key != ref.key:
            raise BadBlockFile("holds another block key")
        if payload_bytes != self.payload_bytes:
            raise BadBlockFile(f"payload of {payload_bytes} bytes, expected {self.payload_bytes}")
        if n != len(ref.token_ids):
            raise BadBlockFile(f"holds {n} token ids, expected {len(ref.token_ids)}")
        expected = head.nbytes + payload_bytes + CHECKSUM.size
        if size != expected:
            # A file longer than expected fills the read's spare byte: size says so too.
            raise BadBlockFile(f"truncated or padded: {size}+ bytes, header says {expected}")
        (stored,) = CHECKSUM.unpack_from(tail)
        if checksum(head, *payload) != stored:
            raise BadBlockFile("checksum mismatch")
        if struct.unpack_from(f"<{n}i", head, HEADER.size) != ref.token_ids:
            raise BadBlockFile("holds other token ids")


class _Writer:
    """The background thread that writes queued blocks; errors are logged, never raised."""

    def __init__(self, store: DiskKVStore) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._pending = 0
        self._queued_bytes = 0
        self._idle = threading.Condition()
        self._warned = False
        self._warned_behind = False
        self._thread = threading.Thread(target=self._run, name="pagechat-kv-write", daemon=True)
        self._thread.start()

    def put(
        self,
        refs: list[BlockRef],
        kv: torch.Tensor,
        rows: list[int],
        ready: Callable[[], None] | None,
        nbytes: int,
    ) -> bool:
        """Queue a batch; False (nothing queued) when the writer is too far behind."""
        with self._idle:
            if self._queued_bytes and self._queued_bytes + nbytes > MAX_QUEUED_BYTES:
                if not self._warned_behind:
                    logger.warning(
                        "KV disk cache: the disk is slower than the prefill; blocks beyond "
                        "%d MiB of queued KV are not saved",
                        MAX_QUEUED_BYTES >> 20,
                    )
                    self._warned_behind = True
                return False
            self._pending += 1
            self._queued_bytes += nbytes
        self._queue.put((refs, kv, rows, ready, nbytes))
        return True

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def wait_idle(self, timeout: float | None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float) -> None:
        if not self.wait_idle(timeout):
            logger.warning(
                "KV disk cache: blocks still unwritten after %.0f s at shutdown", timeout
            )
        self._queue.put(None)
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            refs, kv, rows, ready, nbytes = item
            try:
                if ready is not None:
                    ready()
                store = self._store
                for ref, row in zip(refs, rows):
                    try:
                        store._write_block(ref, kv[row])
                    except OSError as exc:
                        with store._lock:
                            store.write_errors += 1
                        if not self._warned:  # a full or read-only disk: say it once
                            logger.warning(
                                "KV disk cache: cannot write to %s (%s); blocks not saved",
                                store.directory,
                                exc,
                            )
                            self._warned = True
            except Exception:
                logger.exception("KV disk cache: writing blocks failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._queued_bytes -= nbytes
                    self._idle.notify_all()


def _yield_to_steps() -> None:
    """The loader thread runs only when a core is otherwise idle (Linux SCHED_IDLE).

    A thread reading gigabytes competed with the engine's OpenMP workers for the cores: a
    running stream's step then waited at its barriers for a worker that got no core, once for
    about the whole load (0.4-0.6 s for 2 GiB on 2 cores). At idle priority the load fills the
    gaps between steps instead (and takes every core when nothing else runs, as after a
    restart). Elsewhere, or where the policy is refused, the thread keeps the default."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:
        logger.info("KV disk cache: loader stays at normal priority (%s)", exc)


def _aligned_buffer(buffer: mmap.mmap | None, size: int) -> mmap.mmap:
    """`buffer` if it holds `size` bytes, else a new page-aligned one (as O_DIRECT wants)."""
    if buffer is not None and len(buffer) >= size:
        return buffer
    if buffer is not None:
        buffer.close()
    return mmap.mmap(-1, size)


def _read_cached(fd: int, buffers: list, size: int) -> int | None:
    """Bytes read into `buffers` (in order) from the page cache alone, or None where it does
    not hold the whole file of `size` bytes (or cannot say).

    Residency is asked of mincore first: a read with RWF_NOWAIT alone answers EAGAIN for a file
    not cached, but only after starting readahead of it (up to the device's read_ahead_kb,
    8 MiB here: a whole block file), so every cold file was read twice, once into the page
    cache and once with O_DIRECT: a 945 MB load took 2.1 s instead of 1.05."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None or len(buffers) > IOV_MAX or size > sum(memoryview(b).nbytes for b in buffers):
        return None
    if not _fully_cached(fd, size):
        return None
    try:
        got = os.preadv(fd, buffers, 0, nowait)
    except OSError:  # EAGAIN: evicted meanwhile; EOPNOTSUPP: this file system cannot tell
        return None
    return got if got == size else None


def _libc() -> ctypes.CDLL | None:
    """The C library's mmap, munmap and mincore with their types; None where there are none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        size_t, c_int = ctypes.c_size_t, ctypes.c_int
        libc.mmap.argtypes = [ctypes.c_void_p, size_t, c_int, c_int, c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def _fully_cached(fd: int, size: int) -> bool:
    """Whether the page cache holds every page of the file's first `size` bytes: mincore on a
    read-only mapping of it (neither reads nor starts readahead)."""
    if _LIBC is None or size <= 0:
        return False
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        return False
    try:
        pages = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
        if _LIBC.mincore(addr, size, pages) != 0:
            return False
        return all(resident & 1 for resident in pages)  # bit 0: in the page cache
    finally:
        _LIBC.munmap(addr, size)


def _read_direct(fd: int, view: memoryview) -> int | None:
    """Bytes read with O_DIRECT into the aligned `view`, or None where O_DIRECT is refused."""
    direct = getattr(os, "O_DIRECT", None)
    if direct is None:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | direct)
        total = 0
        while total < len(view):  # short reads stop at the end of the file
            got = os.preadv(fd, [view[total:]], total)
            if got == 0:
                break
            total += got
            if total % DIRECT_ALIGN:
                break
        return total
    except OSError:  # EINVAL: this file system or alignment takes no O_DIRECT
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
        except OSError:
            pass
        return None


def _write_direct(fd: int, view: memoryview) -> int:
    """Bytes of the aligned `view` written from offset 0 with O_DIRECT: all of them, or 0
    where this file system refuses O_DIRECT (nothing written then). O_DIRECT is off again
    on return. Other errors (a full disk) raise."""
    direct = getattr(os, "O_DIRECT", None)
    if direct is None or not view.nbytes:
        return 0
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct)
    except OSError:  # EINVAL: no O_DIRECT on this file system
        return 0
    try:
        total = 0
        while total < view.nbytes:
            try:
                total += os.pwrite(fd, view[total:], total)
            except OSError as exc:
                if exc.errno == errno.EINVAL and total == 0:
                    return 0  # the file system took the flag but not the write
                raise
        return total
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _write_buffered(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at `offset` through the page cache."""
    total = 0
    while total < view.nbytes:
        total += os.pwrite(fd, view[total:], offset + total)


def _copy(dest: memoryview, src: memoryview) -> None:
    """dest[:] = src through ctypes.memmove, which releases the GIL (a block is megabytes)."""
    n = src.nbytes
    if n != dest.nbytes:
        raise ValueError(f"copy of {n} bytes into {dest.nbytes}")
    dst_addr = ctypes.addressof(ctypes.c_char.from_buffer(dest))
    src_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
    ctypes.memmove(dst_addr, src_addr, n)


def _read_buffered(fd: int, view: memoryview) -> int:
    """Bytes read through the page cache into `view` (up to its length or the end of file)."""
    total = 0
    while total < len(view):
        got = os.preadv(fd, [view[total:]], total)
        if got == 0:
            break
        total += got
    return total


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
