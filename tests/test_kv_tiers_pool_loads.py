"""Disk loads straight into the KV pool's blocks (issue 15, "KV tiers": no staging on the CPU).

On the CPU the pool is host memory: a load takes its request's pool blocks when it starts (held,
unregistered), the loader reads each block file into them, and landing registers the verified
ones like computed blocks. Real engines on the tiny float32 checkpoint, stepped by hand with
`check_integrity()` after every step; every answer must equal, token for token, the greedy
answer of an engine with prefix caching off.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import struct
import threading
import time
from concurrent import futures
from pathlib import Path

import pytest
import torch
import xxhash

import engine.kv_disk_tier as disk_tier
from engine import EngineConfig, SamplingParams
from engine.kv_disk_tier import DiskKVStore
from engine.kv_keys import BlockRef, block_keys
from engine.kv_tiers import HostPool
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from tests.test_kv_tiers import (
    BLOCK_BYTES,
    BS,
    DOC,
    DOC_BLOCKS,
    GREEDY,
    OTHER1,
    OTHER2,
    Q1,
    Q2,
    doc_file,
    one_tokenizer_load,  # noqa: F401  (autouse: one tokenizer load)
)

STREAM = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
PREEMPTING = {"a": OTHER1, "b": DOC[:100] + Q2, "c": DOC[:150] + Q1}


@pytest.fixture(scope="module")
def written(tiny_checkpoint, tmp_path_factory):
    """A disk tier directory that an engine, now closed, left after answering DOC + Q1."""
    directory = tmp_path_factory.mktemp("kv-written")
    engine = engine_on(tiny_checkpoint, directory, num_kv_blocks=64)
    run(engine, [("first", DOC + Q1, GREEDY)])
    engine.close()  # what AsyncLLM.shutdown does: the writer's queue is written
    return directory, None, engine.model_fingerprint.digest


@pytest.fixture
def kv_dir(written, tmp_path):
    """A fresh copy of `written` for one test to restart on (and damage)."""
    shutil.copytree(written[0], tmp_path / "kv")
    return tmp_path / "kv"


@pytest.fixture(scope="module")
def cold(tiny_checkpoint):
    """Answers computed with no cache at all: (prompt) or (name, *prompt) -> greedy tokens."""
    engine = LLMEngine(
        EngineConfig(model=str(tiny_checkpoint), enable_prefix_caching=False, num_kv_blocks=64)
    )
    answers: dict[tuple, list[int]] = {}
    for prompt in (DOC + Q1, DOC + Q2, DOC[:100] + Q2, OTHER1, OTHER2):
        answers[tuple(prompt)] = run(engine, [("r", prompt, GREEDY)])["r"].token_ids
    for prompt in PREEMPTING.values():
        answers[("long40", *prompt)] = run(engine, [("r", prompt, LONG)])["r"].token_ids
    answers[("stream30", *OTHER1)] = run(engine, [("r", OTHER1, STREAM)])["r"].token_ids
    return answers


def engine_on(checkpoint: Path, directory: Path, **kwargs) -> LLMEngine:
    config = EngineConfig(model=str(checkpoint), kv_disk_dir=directory, **kwargs)
    engine = LLMEngine(config)
    assert engine.kv_tiers is not None and engine.kv_tiers.pool is not None  # no staging
    return engine


def no_staging(monkeypatch) -> None:
    """On the CPU nothing may go through the staging buffer and its copy into the pool."""

    def staged(*args, **kwargs):
        raise AssertionError("a CPU load went through the staging buffer")

    monkeypatch.setattr(DiskKVStore, "load", staged)


def run(
    engine: LLMEngine,
    requests: list[tuple[str, list[int], SamplingParams]],
    each_step=None,
    timeout: float = 120,
) -> dict[str, RequestOutput]:
    """Step until every request finished, checking the invariants after every step.

    After each step the loads in flight are waited for, so each lands at the next step: which
    blocks a load may take and whether requests outgrow the pool then never depend on how
    fast the loader thread runs beside the test (a busy machine made a load land steps
    later). Tests of loads held over several steps gate the reads and step by hand."""
    for rid, prompt, params in requests:
        engine.add_request(prompt, params, request_id=rid)
    finished: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + timeout
    steps = 0
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "requests did not finish"
        outs = engine.step()
        engine.scheduler.check_integrity()
        in_flight = [load.future for load in engine.scheduler._loading.values()]
        assert not futures.wait(in_flight, timeout=30).not_done, "a load never finished"
        steps += 1
        if each_step is not None:
            each_step(engine, steps)
        finished.update((o.request_id, o) for o in outs if o.finished)
    return finished


def settle(engine: LLMEngine, timeout: float = 20) -> None:
    """Step an idle engine until aborted loads gave their blocks back."""
    deadline = time.monotonic() + timeout
    while engine.scheduler._draining:
        assert time.monotonic() < deadline, "an aborted load never finished"
        engine.step()
        engine.scheduler.check_integrity()


# ---- the store: reading into a strided pool ------------------------------------------------


SHAPE = (2, 3, 4, 2, 8)  # k|v, layers, slots, kv heads, head_dim: 6 segments of 64 floats


def small_store(directory: Path) -> DiskKVStore:
    return DiskKVStore(directory, 1 << 20, b"\x03" * 32, SHAPE, torch.float32)


def small_refs(n: int) -> list[BlockRef]:
    keys = block_keys(b"\x03" * 32, list(range(4 * n)), 4, "pool")
    return [BlockRef(k, tuple(range(4 * i, 4 * i + 4))) for i, k in enumerate(keys)]


def o_direct_works(directory: Path) -> bool:
    """This file system takes O_DIRECT reads (ext4, xfs: yes; tmpfs: not everywhere)."""
    path = directory / "o-direct-probe"
    path.write_bytes(b"x" * 4096)
    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [buf], 0) == 4096
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        buf.close()
        path.unlink()


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def refuse_o_direct(monkeypatch) -> None:
    """As on a file system without O_DIRECT: setting the flag with fcntl raises EINVAL."""
    real_fcntl = disk_tier.fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(disk_tier.fcntl, "fcntl", no_direct)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_LIBC = ctypes.CDLL(None, use_errno=True)
SYS_CACHESTAT = 451  # the same number on x86-64 and arm64 (Linux 6.5)


def page_cached(path: Path) -> bool:
    """The page cache holds the whole file. Asked with cachestat(2), which counts the cached
    pages without reading: a RWF_NOWAIT read, the probe before it, starts readahead of an
    uncached file, and on a fast disk that can finish within the call and answer yes (it
    did once in a full-suite run). Kernels without cachestat fall back to that probe."""
    pages = -(-path.stat().st_size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _Cachestat()
        if (
            _LIBC.syscall(
                SYS_CACHESTAT, fd, ctypes.byref(_CachestatRange(0, 0)), ctypes.byref(stat), 0
            )
            == 0
        ):
            return stat.nr_cache == pages
        if ctypes.get_errno() != errno.ENOSYS:
            raise OSError(ctypes.get_errno(), "cachestat failed")
        buf = bytearray(path.stat().st_size)
        try:
            return os.preadv(fd, [buf], 0, os.RWF_NOWAIT) == len(buf)
        except BlockingIOError:
            return False
    finally:
        os.close(fd)


def test_fully_cached_asks_the_page_cache_without_reading(tmp_path):
    """The loader's residency check: a file just written is in the page cache, the same file
    after its pages are dropped is not, and asking does not bring it back (no readahead)."""
    path = tmp_path / "block"
    path.write_bytes(os.urandom(3 * 4096 + 100))
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert disk_tier._fully_cached(fd, size)
        drop_page_cache(path)
        assert not disk_tier._fully_cached(fd, size)
        assert not disk_tier._fully_cached(fd, size)
        assert not page_cached(path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("read", ["page-cache", "o-direct", "buffered"])
def test_load_into_fills_pool_blocks_segment_by_segment(tmp_path, monkeypatch, read):
    """Files written in format 2 land in the pool blocks asked for, every (k|v, layer) segment
    in its place, checked before they are copied; other blocks are untouched. Each way a file
    is read: from the page cache that holds it whole, with O_DIRECT when it does not (the
    cache dropped first), through the page cache where O_DIRECT is refused."""
    store = small_store(tmp_path)
    refs, kv = small_refs(3), torch.randn(3, *SHAPE)
    store.save(refs, kv)
    assert store.flush(5)
    used = {"cached": 0, "direct": 0, "buffered": 0}
    real = {
        "cached": disk_tier._read_cached,
        "direct": disk_tier._read_direct,
        "buffered": disk_tier._read_buffered,
    }

    def counting(name):
        def read_file(*args):
            got = real[name](*args)
            used[name] += got is not None
            return got

        return read_file

    for name in real:
        monkeypatch.setattr(disk_tier, f"_read_{name}", counting(name))
    if read == "o-direct":
        if not o_direct_works(tmp_path):
            pytest.skip(f"the file system of {tmp_path} takes no O_DIRECT reads")
    if read == "buffered":  # as where O_DIRECT is refused: fcntl raises EINVAL
        refuse_o_direct(monkeypatch)
        monkeypatch.setattr(disk_tier, "_read_cached", lambda *args: None)
    data = store.path_of(refs[1].key).read_bytes()  # the format is unchanged
    assert struct.unpack_from("<I", data, 8) == (2,)
    assert struct.unpack("<Q", data[-8:])[0] == xxhash.xxh3_64_intdigest(data[:-8])

    pool = torch.full((2, 3, 7, 4, 2, 8), -1.0)  # (k|v, layer, block, slot, head, dim)
    host = HostPool(pool)
    assert len(host.segments(0)) == 6 and host.segments(0)[0].nbytes == 4 * 2 * 8 * 4
    targets = [5, 0, 3]
    if read == "o-direct":
        for ref in refs:
            drop_page_cache(store.path_of(ref.key))
    loaded = store.load_into(refs, lambda i: host.segments(targets[i])).result()
    assert loaded == 3 and store.blocks_read == 3
    want = {"page-cache": "cached", "o-direct": "direct", "buffered": "buffered"}[read]
    assert used[want] == 3 and sum(used.values()) == 3, used
    if read == "o-direct":  # a cold load leaves the files out of the page cache (no readahead)
        # The old RWF_NOWAIT residency probe's readahead put every file there. (One of these
        # files was once seen cached after the load: page_cached's own RWF_NOWAIT read then,
        # which can bring a small file in within the call; it asks cachestat now.)
        assert not any(page_cached(store.path_of(ref.key)) for ref in refs)
    for i, block in enumerate(targets):
        assert torch.equal(pool[:, :, block], kv[i])
    for block in set(range(7)) - set(targets):
        assert pool[:, :, block].eq(-1.0).all()
    # A damaged middle file: the load stops before it. Its pool block may hold part of it
    # where the file came straight from the page cache; read into the loader's buffer (O_DIRECT
    # or not), it is checked there and never copied.
    path = store.path_of(refs[1].key)
    damaged = bytearray(path.read_bytes())
    damaged[-9] ^= 0x10
    path.write_bytes(damaged)
    if read == "o-direct":
        drop_page_cache(path)
    pool.fill_(-1.0)
    assert store.load_into(refs, lambda i: host.segments(targets[i])).result() == 1
    assert torch.equal(pool[:, :, 5], kv[0]) and store.bad_files == 1 and refs[1].key not in store
    if read != "page-cache":
        assert pool[:, :, 0].eq(-1.0).all()
    assert pool[:, :, 3].eq(-1.0).all()  # never reached
    # A stop before the first file reads nothing.
    stop = threading.Event()
    stop.set()
    assert store.load_into(refs[:1], lambda i: host.segments(6), stop).result() == 0
    assert pool[:, :, 6].eq(-1.0).all()
    # A destination of the wrong size is a bug, not a bad file: the future raises.
    with pytest.raises(ValueError):
        store.load_into(refs[:1], lambda i: host.segments(6)[:-1]).result()
    assert refs[0].key in store
    store.close()


@pytest.mark.parametrize("write", ["o-direct", "buffered"])
def test_block_files_are_written_with_o_direct_where_the_file_system_takes_it(
    tmp_path, monkeypatch, write
):
    """The writer writes a block file's whole 4 KiB units with O_DIRECT and its last partial unit
    through the page cache (a buffered write of a 64 MiB block cost ~330 ms of kernel CPU beside
    the engine's steps); where O_DIRECT is refused, the whole file through the page cache.
    Either way the file holds the same format-2 bytes, and it loads."""
    shape = (2, 3, 4, 2, 40)  # 7,680 bytes of float32 KV: the file is one 4 KiB unit and a tail
    fingerprint = b"\x03" * 32
    store = DiskKVStore(tmp_path, 1 << 20, fingerprint, shape, torch.float32)
    direct_bytes: list[int] = []
    real_write_direct = disk_tier._write_direct

    def counting(fd, view):
        written = real_write_direct(fd, view)
        direct_bytes.append(written)
        return written

    monkeypatch.setattr(disk_tier, "_write_direct", counting)
    if write == "o-direct" and not o_direct_works(tmp_path):
        pytest.skip(f"the file system of {tmp_path} takes no O_DIRECT")
    if write == "buffered":  # as where O_DIRECT is refused: fcntl raises EINVAL
        refuse_o_direct(monkeypatch)
    refs, kv = small_refs(2), torch.randn(2, *shape)
    store.save(refs, kv)
    assert store.flush(5) and store.blocks_written == 2
    sizes = []
    for ref, block in zip(refs, kv):
        header = disk_tier.encode_header(fingerprint, ref, store.payload_bytes)
        body = header + block.numpy().tobytes()
        data = store.path_of(ref.key).read_bytes()
        assert data == body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        sizes.append(len(data))
    expected = [size // 4096 * 4096 if write == "o-direct" else 0 for size in sizes]
    assert direct_bytes == expected and (write == "buffered" or min(expected) >= 4096)
    assert not list(tmp_path.rglob(f"*{disk_tier.TMP_MARK}*"))
    loaded = store.load(refs).result()
    assert len(loaded) == 2 and all(torch.equal(a, b) for a, b in zip(loaded, kv))
    store.close()


def test_pool_in_host_memory_only_where_it_is(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError):
        HostPool(torch.zeros(2, 3, 4, 5).transpose(0, 1))
    engine = engine_on(tiny_checkpoint, tmp_path, num_kv_blocks=16)
    assert engine.runner.host_kv_pool is engine.runner.kv_cache
    engine.close()


# ---- restarts: the answers ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [2048, 40], ids=["whole-prefill", "chunked-40"])
def test_restart_loads_into_the_pool(tiny_checkpoint, kv_dir, cold, monkeypatch, chunk):
    no_staging(monkeypatch)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=64, max_num_batched_tokens=chunk)
    seen_loading = []
    copies: list[str] = []
    copy_kv = engine.runner.copy_kv
    monkeypatch.setattr(
        engine.runner,
        "copy_kv",
        lambda cs, host: (copies.extend(c.kind for c in cs), copy_kv(cs, host)),
    )

    def watch(engine: LLMEngine, step: int) -> None:
        s = engine.scheduler
        for load in s._loading.values():  # the request holds its blocks while they load
            seen_loading.append(len(load.seq.block_table))
            assert engine.stats().kv_blocks_used >= DOC_BLOCKS

    out = run(engine, [("doc", DOC + Q2, GREEDY)], watch)["doc"]
    assert out.token_ids == cold[tuple(DOC + Q2)]
    assert out.num_cached_tokens == DOC_BLOCKS * BS
    assert out.cached_prefix.disk_tokens == DOC_BLOCKS * BS and out.cached_prefix.device_tokens == 0
    assert out.cached_prefix.disk_load_seconds > 0
    assert seen_loading and set(seen_loading) == {DOC_BLOCKS}
    tiers = engine.stats().kv_tiers
    assert tiers.disk_hit_tokens == DOC_BLOCKS * BS
    assert tiers.disk_bytes_in == DOC_BLOCKS * BLOCK_BYTES
    assert copies == []  # no copy of the loaded blocks into the pool
    # The loaded blocks are registered like computed ones: the next request hits the device.
    again = run(engine, [("again", DOC + Q1, GREEDY)])["again"]
    assert again.token_ids == cold[tuple(DOC + Q1)]
    assert again.cached_prefix.device_tokens == DOC_BLOCKS * BS
    assert engine.stats().kv_blocks_used == 0
    engine.close()


def test_device_hits_then_disk_blocks(tiny_checkpoint, kv_dir, cold, monkeypatch):
    no_staging(monkeypatch)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=64)
    first = run(engine, [("short", DOC[:100] + Q2, GREEDY)])["short"]
    assert first.token_ids == cold[tuple(DOC[:100] + Q2)]
    assert first.cached_prefix.disk_tokens == 6 * BS
    out = run(engine, [("doc", DOC + Q2, GREEDY)])["doc"]
    assert out.token_ids == cold[tuple(DOC + Q2)]
    prefix = out.cached_prefix
    assert (prefix.device_tokens, prefix.disk_tokens) == (6 * BS, (DOC_BLOCKS - 6) * BS)
    tiers = engine.stats().kv_tiers
    assert tiers.device_hit_tokens == 6 * BS and tiers.disk_hit_tokens == DOC_BLOCKS * BS
    engine.close()


def test_host_hits_then_disk_blocks(tiny_checkpoint, kv_dir, cold, monkeypatch):
    """Host tier hits in front of the disk blocks are copied in when the load starts."""
    no_staging(monkeypatch)
    engine = engine_on(
        tiny_checkpoint, kv_dir, num_kv_blocks=24, kv_host_gb=64 * BLOCK_BYTES / 2**30
    )
    run(engine, [("short", DOC[:100] + Q2, GREEDY)])  # 6 blocks from disk into the pool
    for i, other in enumerate((OTHER1, OTHER2)):  # ... and out of it, into the host tier
        run(engine, [(f"other{i}", other, GREEDY)])
    out = run(engine, [("doc", DOC + Q2, GREEDY)])["doc"]
    assert out.token_ids == cold[tuple(DOC + Q2)]
    prefix = out.cached_prefix
    assert (prefix.device_tokens, prefix.host_tokens, prefix.disk_tokens) == (
        0,
        6 * BS,
        (DOC_BLOCKS - 6) * BS,
    )
    assert engine.stats().kv_tiers.host_bytes_in == 6 * BLOCK_BYTES
    assert engine.stats().kv_blocks_used == 0
    engine.close()


def test_corrupt_file_in_the_middle(tiny_checkpoint, written, kv_dir, cold, monkeypatch):
    """Blocks 0-8 load, block 9's file is damaged: 9 onwards are recomputed (and rewritten)."""
    no_staging(monkeypatch)
    bad = doc_file(written, kv_dir, 9)
    data = bytearray(bad.read_bytes())
    data[200] ^= 0x04  # a bit of its KV
    bad.write_bytes(data)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=64, max_num_batched_tokens=40)
    out = run(engine, [("doc", DOC + Q2, GREEDY)])["doc"]
    assert out.token_ids == cold[tuple(DOC + Q2)]
    assert out.num_cached_tokens == out.cached_prefix.disk_tokens == 9 * BS
    tiers = engine.stats().kv_tiers
    assert tiers.disk_bad_files == 1 and tiers.disk_bytes_in == 9 * BLOCK_BYTES
    engine.close()
    assert bad.exists() and bad.read_bytes() != bytes(data)  # rewritten from the recomputed KV


def test_a_failed_load_frees_its_blocks_and_recomputes(tiny_checkpoint, kv_dir, cold, monkeypatch):
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=64)

    def broken(*args):
        raise RuntimeError("the loader broke")

    monkeypatch.setattr(engine.kv_tiers.disk, "_read_block", broken)
    out = run(engine, [("doc", DOC + Q2, GREEDY)])["doc"]
    assert out.token_ids == cold[tuple(DOC + Q2)]
    assert out.num_cached_tokens == 0 and engine.stats().kv_tiers.disk_bytes_in == 0
    assert engine.stats().kv_blocks_used == 0
    engine.close()


# ---- loads beside running requests ---------------------------------------------------------------


def test_preemption_beside_loads(tiny_checkpoint, kv_dir, cold, monkeypatch):
    """Three requests outgrow a 24-block pool while two of them load their prefix from disk."""
    no_staging(monkeypatch)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=24, max_num_batched_tokens=64)
    outs = run(engine, [(rid, p, LONG) for rid, p in PREEMPTING.items()])
    for rid, prompt in PREEMPTING.items():
        assert outs[rid].token_ids == cold[("long40", *prompt)], rid
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().kv_tiers.disk_hit_tokens > 0
    assert engine.stats().kv_blocks_used == 0
    engine.close()


def test_a_pool_too_small_for_the_whole_load(tiny_checkpoint, kv_dir, cold, monkeypatch):
    """A running stream holds 13 of 24 blocks: the load takes what is left but one block."""
    no_staging(monkeypatch)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=24)
    engine.add_request(OTHER1, STREAM, request_id="stream")
    engine.step()  # the stream's prompt: 13 blocks
    taken = []

    def watch(engine: LLMEngine, step: int) -> None:
        for load in engine.scheduler._loading.values():
            taken.append(len(load.seq.block_table))
        assert engine.scheduler.block_manager.num_free_blocks >= 0

    outs = run(engine, [("doc", DOC + Q2, GREEDY)], watch)
    assert outs["stream"].token_ids == cold[("stream30", *OTHER1)]
    assert outs["doc"].token_ids == cold[tuple(DOC + Q2)]
    assert taken and taken[0] == 24 - 13 - 1  # what the pool could give: 10 of 18 blocks
    assert outs["doc"].cached_prefix.disk_tokens == 10 * BS
    assert engine.stats().kv_blocks_used == 0
    engine.close()


def test_a_load_leaves_the_block_a_running_stream_needs_next(
    tiny_checkpoint, kv_dir, cold, monkeypatch
):
    """The load starts in the step where the stream computes position 207, the last slot of
    its 13th block: its next token needs a 14th. Of the 11 free blocks the load takes 9 (one
    kept for that token, one for the request's own new tokens), and the stream's next step
    gets its block without anyone being preempted."""
    no_staging(monkeypatch)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=24)
    engine.add_request(OTHER1, STREAM, request_id="stream")
    stream = engine.requests["stream"].seq
    while stream.num_tokens < 13 * BS:  # prompt 200, then decodes up to 208 tokens known
        engine.step()
        engine.scheduler.check_integrity()
    assert stream.num_tokens == 13 * BS and len(stream.block_table) == 13
    taken: list[int] = []
    after: list[tuple[int, int]] = []  # the stream's blocks and the preemptions, step by step

    def watch(engine: LLMEngine, step: int) -> None:
        for load in engine.scheduler._loading.values():
            taken.append(len(load.seq.block_table))
        after.append((len(stream.block_table), engine.scheduler.num_preemptions))

    outs = run(engine, [("doc", DOC + Q2, GREEDY)], watch)
    assert taken and taken[0] == 24 - 13 - 1 - 1
    # The step that started the load computed slot 207; the next one gave the stream its 14th
    # block from the one the load left (later the two requests contend as any two do).
    assert after[:2] == [(13, 0), (14, 0)]
    assert outs["stream"].token_ids == cold[("stream30", *OTHER1)]
    assert outs["doc"].token_ids == cold[tuple(DOC + Q2)]
    assert outs["doc"].cached_prefix.disk_tokens == 9 * BS
    assert engine.stats().kv_blocks_used == 0
    engine.close()


def test_no_room_for_a_load_waits_for_it(tiny_checkpoint, kv_dir, cold, monkeypatch):
    """A 14-block pool, a stream filling it: the follow-up waits (not loading, not computing)
    until the stream ends, then loads all its 6 disk blocks."""
    no_staging(monkeypatch)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=14)
    engine.add_request(OTHER1, STREAM, request_id="stream")
    engine.step()
    engine.step()  # the stream decodes: 13 blocks held, one free, needed at its 209th token
    states = []

    def watch(engine: LLMEngine, step: int) -> None:
        s = engine.scheduler
        if "stream" in engine.requests:
            states.append((s.num_loading, s.num_waiting, s.num_running))

    outs = run(engine, [("doc", DOC[:100] + Q2, GREEDY)], watch)
    assert outs["stream"].finish_reason == "length"  # 224 tokens: the pool's length
    assert states and all(state == (0, 1, 1) for state in states)
    out = outs["doc"]
    assert out.token_ids == cold[tuple(DOC[:100] + Q2)]
    assert out.cached_prefix.disk_tokens == 6 * BS
    engine.close()


def test_abort_while_loading(tiny_checkpoint, kv_dir, cold, monkeypatch):
    """The aborted request's blocks stay held while the loader may still write them, then are
    freed (the block it verified registered); nobody else gets them meanwhile."""
    no_staging(monkeypatch)
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=64)
    disk = engine.kv_tiers.disk
    gate, reading = threading.Event(), threading.Event()
    read = disk._read_block

    def held(path, *args):
        reading.set()
        assert gate.wait(10)
        return read(path, *args)

    monkeypatch.setattr(disk, "_read_block", held)
    engine.add_request(DOC + Q2, GREEDY, request_id="doc")
    assert engine.step() == [] and engine.scheduler.num_loading == 1
    loading = list(engine.scheduler._loading["doc"].seq.block_table)
    assert len(loading) == DOC_BLOCKS and reading.wait(10)
    engine.abort("doc")
    assert engine.stats().num_waiting == 0 and not engine.has_unfinished()
    # Another request runs meanwhile: it never gets a block the loader may write.
    engine.add_request(OTHER1, GREEDY, request_id="other")
    while engine.has_unfinished():
        engine.step()
        engine.scheduler.check_integrity()
        other = engine.requests.get("other")
        if other is not None:
            assert not set(other.seq.block_table) & set(loading)
    assert engine.stats().kv_blocks_used == DOC_BLOCKS  # still the loader's
    gate.set()
    settle(engine)
    assert engine.stats().kv_blocks_used == 0
    assert engine.kv_tiers.disk.blocks_read == 1  # stopped after the file it was reading
    monkeypatch.setattr(disk, "_read_block", read)
    out = run(engine, [("again", DOC + Q2, GREEDY)])["again"]
    assert out.token_ids == cold[tuple(DOC + Q2)]
    assert (out.cached_prefix.device_tokens, out.cached_prefix.disk_tokens) == (
        BS,
        (DOC_BLOCKS - 1) * BS,
    )
    engine.close()


def test_abort_before_the_loader_starts(tiny_checkpoint, kv_dir, monkeypatch):
    """A load still queued behind another is cancelled: its blocks are freed at the next step."""
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=64)
    disk = engine.kv_tiers.disk
    gate = threading.Event()
    read = disk._read_block
    monkeypatch.setattr(disk, "_read_block", lambda *a: (gate.wait(10), read(*a))[1])
    engine.add_request(DOC + Q2, GREEDY, request_id="first")
    engine.add_request(DOC[:100] + Q1, GREEDY, request_id="second")
    engine.step()
    assert engine.scheduler.num_loading in (1, 2)
    engine.abort("first")
    engine.abort("second")
    gate.set()
    settle(engine)
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
    engine.close()


def test_close_stops_a_load(tiny_checkpoint, kv_dir, monkeypatch):
    engine = engine_on(tiny_checkpoint, kv_dir, num_kv_blocks=64)
    disk = engine.kv_tiers.disk
    read = disk._read_block

    def slow(path, *args):
        time.sleep(0.05)
        return read(path, *args)

    monkeypatch.setattr(disk, "_read_block", slow)
    engine.add_request(DOC + Q2, GREEDY, request_id="doc")
    engine.step()
    assert engine.scheduler.num_loading == 1
    engine.close()  # returns once the loader stopped, after the file it was reading
    assert disk.blocks_read < DOC_BLOCKS
