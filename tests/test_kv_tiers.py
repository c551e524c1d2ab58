"""KV cache tiers below the device pool: host memory and disk (issue 15 items 2-4).

Real engines on the tiny float32 checkpoint (torch backend, CPU). The reference for every
answer is an engine with prefix caching off, which computes every prompt from scratch: a
prefix that came from the host tier or from disk must give the same greedy tokens, bit for bit.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.kv_disk_tier import DiskKVStore
from engine.kv_keys import BlockRef, block_keys
from engine.llm_engine import LLMEngine
from engine.tokenizer import Tokenizer
from tests.engine_helpers import random_prompts

BS = 16
NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
BLOCK_BYTES = 2 * 2 * BS * 2 * 32 * 4  # k|v, layers, slots, kv heads, head_dim, float32
DOC, Q1, Q2, OTHER1, OTHER2 = random_prompts([300, 20, 21, 200, 200], seed=7)
DOC_BLOCKS = len(DOC) // BS  # full blocks the document fills (18)
KV_SHAPE = (2, 2, BS, 2, 32)  # one block of the tiny model's KV
# Three requests whose answers outgrow a 24-block pool together (11 + 15 + 15 blocks).
LONG_PROMPTS = [DOC[:100] + Q2, OTHER1, OTHER2]
LONG = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_tokenizer_load():
    """Engines here restart often; they share one tokenizer load (about 2 s each otherwise)."""
    loaded: dict[tuple, Tokenizer] = {}
    real = Tokenizer.from_dir

    def cached(path, *args):
        key = (str(path), *map(tuple, args))
        if key not in loaded:
            loaded[key] = real(path, *args)
        return loaded[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Tokenizer, "from_dir", staticmethod(cached))
        yield


@pytest.fixture(scope="module")
def written(tiny_checkpoint, tmp_path_factory):
    """A disk tier directory that an engine, now closed, left after answering DOC + Q1."""
    directory = tmp_path_factory.mktemp("kv-written")
    llm = LLM(str(tiny_checkpoint), kv_disk_dir=directory, num_kv_blocks=64)
    llm.generate(DOC + Q1, GREEDY)
    llm.engine.close()  # what AsyncLLM.shutdown does: the writer's queue is written
    return directory, llm.stats(), llm.engine.model_fingerprint.digest


@pytest.fixture
def kv_dir(written, tmp_path):
    """A fresh copy of `written` for one test to restart on (and damage)."""
    shutil.copytree(written[0], tmp_path / "kv")
    return tmp_path / "kv"


def restart(checkpoint: Path, directory: Path, **kwargs) -> LLM:
    return LLM(str(checkpoint), kv_disk_dir=directory, num_kv_blocks=64, **kwargs)


@pytest.fixture(scope="module")
def cold(tiny_checkpoint):
    """Answers computed with no cache at all: prompt -> greedy tokens."""
    llm = LLM(str(tiny_checkpoint), enable_prefix_caching=False, num_kv_blocks=64)
    prompts = [DOC + Q1, DOC + Q2, DOC[:100] + Q2, OTHER1, OTHER2]
    outs = llm.generate(prompts, GREEDY)
    answers = {tuple(p): o.token_ids for p, o in zip(prompts, outs)}
    longer = llm.generate(LONG_PROMPTS, LONG)
    answers.update({("long", *p): o.token_ids for p, o in zip(LONG_PROMPTS, longer)})
    return answers


def disk_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/*.kv"))


def doc_file(written: tuple, directory: Path, index: int) -> Path:
    """The file of the document's block `index` (no cache salt) in a copy of `written`."""
    key = block_keys(written[2], DOC, BS)[index]
    return directory / key.hex()[:2] / f"{key.hex()}.kv"


# ---- disk tier: restarts ---------------------------------------------------------------------


def test_every_full_block_is_written_once(written):
    directory, stats, _ = written
    files = disk_files(directory)
    assert len(files) == (len(DOC) + len(Q1)) // BS
    assert stats.kv_tiers.disk_blocks == len(files)
    assert stats.kv_tiers.disk_bytes == sum(f.stat().st_size for f in files)
    assert not list(directory.glob("*/*.tmp-*"))


@pytest.mark.parametrize("chunk", [2048, 40], ids=["whole-prefill", "chunked-40"])
def test_restart_answers_follow_up_from_disk(tiny_checkpoint, kv_dir, cold, chunk):
    llm = restart(tiny_checkpoint, kv_dir, max_num_batched_tokens=chunk)
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == DOC_BLOCKS * BS  # the whole document's full blocks
    assert out.token_ids == cold[tuple(DOC + Q2)]
    stats = llm.stats()
    assert stats.kv_tiers.disk_hit_tokens == stats.prefix_cache_hits == DOC_BLOCKS * BS
    assert stats.kv_tiers.disk_bytes_read >= DOC_BLOCKS * BLOCK_BYTES
    assert stats.kv_tiers.disk_bytes_in == DOC_BLOCKS * BLOCK_BYTES
    assert stats.kv_blocks_used == 0 and stats.num_waiting == 0
    llm.engine.scheduler.check_integrity()
    llm.engine.close()


def test_blocks_reach_disk_without_close(tiny_checkpoint, tmp_path):
    """A SIGKILL after an answer finished finds its blocks: they are written in the background."""
    llm = restart(tiny_checkpoint, tmp_path)
    llm.generate(DOC + Q1, GREEDY)
    disk = llm.engine.kv_tiers.disk
    assert disk.flush(timeout=10)  # no close(): the writer thread did it on its own
    assert len(disk_files(tmp_path)) == (len(DOC) + len(Q1)) // BS
    llm.engine.close()


def test_device_and_disk_hits_mix(tiny_checkpoint, kv_dir, cold):
    """The first blocks come from the device pool, the rest of the document from disk."""
    llm = restart(tiny_checkpoint, kv_dir)
    llm.generate(DOC[:100] + Q2, GREEDY)  # 6 full blocks read from disk, now on the device
    tiers = llm.stats().kv_tiers
    assert tiers.disk_hit_tokens == 6 * BS and tiers.device_hit_tokens == 0
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == DOC_BLOCKS * BS
    assert out.token_ids == cold[tuple(DOC + Q2)]
    tiers = llm.stats().kv_tiers
    assert tiers.device_hit_tokens == 6 * BS
    assert tiers.disk_hit_tokens == DOC_BLOCKS * BS  # 6 before, 12 now
    llm.engine.close()


def test_another_salt_never_reads_the_files(tiny_checkpoint, kv_dir, cold):
    """Tenants' keys are salted (SamplingParams.cache_salt): the disk tier uses the same keys."""
    llm = restart(tiny_checkpoint, kv_dir)
    other = llm.generate(DOC + Q2, replace(GREEDY, cache_salt="tenant-b"))[0]
    assert other.num_cached_tokens == 0 and llm.stats().kv_tiers.disk_bytes_read == 0
    assert other.token_ids == cold[tuple(DOC + Q2)]
    llm.engine.close()
    # Its blocks were written under its own keys, beside the unsalted ones.
    assert len(disk_files(kv_dir)) == (len(DOC) + len(Q1)) // BS + (len(DOC) + len(Q2)) // BS


# ---- disk tier: bad files --------------------------------------------------------------------


def test_foreign_file_is_ignored_deleted_and_logged(tiny_checkpoint, written, kv_dir, cold, caplog):
    # A well-formed file of another model fingerprint under the name of the doc's block 4.
    foreign = doc_file(written, kv_dir, 4)
    alien = DiskKVStore(kv_dir.parent / "alien", 1 << 30, b"\x01" * 32, KV_SHAPE, torch.float32)
    ref = BlockRef(bytes.fromhex(foreign.name[:-3]), tuple(DOC[4 * BS : 5 * BS]))
    alien.save([ref], torch.randn(1, *KV_SHAPE))
    alien.close()
    os.replace(alien.path_of(ref.key), foreign)

    caplog.set_level(logging.WARNING, logger="engine.kv_disk_tier")
    llm = restart(tiny_checkpoint, kv_dir)
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.token_ids == cold[tuple(DOC + Q2)]
    assert out.num_cached_tokens == 4 * BS  # blocks 0-3; block 4 is foreign
    assert "another model fingerprint" in caplog.text
    assert llm.stats().kv_tiers.disk_bad_files == 1
    llm.engine.close()
    # The recomputed block 4 took the bad file's place: a restart reads the whole prompt.
    again = restart(tiny_checkpoint, kv_dir)
    out = again.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == (len(DOC + Q2) - 1) // BS * BS
    assert out.token_ids == cold[tuple(DOC + Q2)]
    assert again.stats().kv_tiers.disk_bad_files == 0
    again.engine.close()


def test_truncated_and_flipped_files_detected(tiny_checkpoint, written, kv_dir, cold, caplog):
    truncated, flipped = doc_file(written, kv_dir, 8), doc_file(written, kv_dir, 12)
    good_size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-20] ^= 0x01  # one bit of the KV payload
    flipped.write_bytes(data)
    caplog.set_level(logging.WARNING, logger="engine.kv_disk_tier")

    llm = restart(tiny_checkpoint, kv_dir)
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == 8 * BS
    assert "truncated" in caplog.text and llm.stats().kv_tiers.disk_bad_files == 1
    assert out.token_ids == cold[tuple(DOC + Q2)]
    llm.engine.close()
    # Block 8 was deleted, then rewritten from the recomputed KV; block 12's file is not (a
    # block on disk is never written twice), so the next load that reaches it finds the damage.
    assert truncated.stat().st_size == good_size
    again = restart(tiny_checkpoint, kv_dir)
    out = again.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == 12 * BS
    assert "checksum mismatch" in caplog.text
    assert out.token_ids == cold[tuple(DOC + Q2)]
    assert again.stats().kv_tiers.disk_bad_files == 1
    again.engine.close()


# ---- disk tier: the store itself -------------------------------------------------------------

SHAPE = (2, 1, 4, 1, 8)  # a small block: 256 bytes of float32


def make_store(directory: Path, cap_blocks: float) -> DiskKVStore:
    file_bytes = 88 + 4 * 4 + 256 + 8  # header, token ids, KV, XXH3-64 checksum
    return DiskKVStore(directory, int(cap_blocks * file_bytes), b"\x02" * 32, SHAPE, torch.float32)


def refs_for(n: int, salt: str = "s") -> list[BlockRef]:
    keys = block_keys(b"\x02" * 32, list(range(4 * n)), 4, salt)
    return [BlockRef(k, tuple(range(4 * i, 4 * i + 4))) for i, k in enumerate(keys)]


def test_store_cap_lru_and_round_trip(tmp_path):
    store = make_store(tmp_path, 10)  # room for 10 files
    refs = refs_for(18)
    kv = torch.randn(18, *SHAPE)
    store.save(refs[0:5], kv[0:5])  # as two steps would queue them
    store.save(refs[5:10], kv[5:10])
    assert store.flush(5) and store.num_files == 10
    assert len(store.load(refs[:2]).result()) == 2  # blocks 0-1 become the most recently used
    store.save(refs[10:14], kv[10:14])
    store.save(refs[14:18], kv[14:18])
    assert store.flush(5)
    files = disk_files(tmp_path)
    assert len(files) == store.num_files == 10
    assert sum(f.stat().st_size for f in files) == store.num_bytes <= store.capacity_bytes
    kept = {bytes.fromhex(f.name[:-3]) for f in files}
    assert kept == {r.key for r in refs[:2] + refs[10:]}  # 2-9 were the least recently used
    got = store.load(refs[10:]).result()
    assert len(got) == 8 and all(torch.equal(g, kv[10 + i]) for i, g in enumerate(got))
    assert store.load(refs[1:]).result()[0].equal(kv[1])  # block 2 is gone: stops after 1
    assert len(store.load(refs[1:]).result()) == 1
    store.close()
    # A restart takes the LRU order from the files' mtimes and deletes torn temporary files.
    for age, ref in enumerate(reversed(refs[:2] + refs[10:])):
        t = time.time() - 100 * (age + 1)
        os.utime(store.path_of(ref.key), (t, t))  # refs[0] the oldest, refs[17] the newest
    torn = tmp_path / refs[3].key.hex()[:2] / f"{refs[3].key.hex()}.kv.tmp-1-2"
    torn.parent.mkdir(exist_ok=True)
    torn.write_bytes(b"torn")
    again = make_store(tmp_path, 10)
    assert again.num_files == 10 and not torn.exists()
    again.save(refs_for(1, "new"), torch.randn(1, *SHAPE))
    assert again.flush(5)
    assert refs[0].key not in again and refs[1].key in again and again.num_files == 10
    assert not store.path_of(refs[0].key).exists()
    again.close()


def test_file_layout_checksum_and_old_or_padded_files(tmp_path, caplog):
    """The documented layout, checked with xxhash itself; a format-1 (CRC-32) file and a padded
    one are rejected and deleted, never loaded; a load's blocks share one buffer."""
    import struct

    import xxhash

    store = make_store(tmp_path, 10)
    refs, kv = refs_for(3), torch.randn(3, *SHAPE)
    store.save(refs, kv)
    assert store.flush(5)
    data = store.path_of(refs[0].key).read_bytes()
    assert len(data) == 88 + 4 * 4 + 256 + 8
    assert data[:8] == b"PCKVBLK\0" and struct.unpack_from("<I", data, 8) == (2,)
    assert struct.unpack_from("<4i", data, 88) == refs[0].token_ids
    assert data[104:-8] == kv[0].numpy().tobytes()
    assert struct.unpack("<Q", data[-8:])[0] == xxhash.xxh3_64_intdigest(data[:-8])
    got = store.load(refs).result()
    assert all(torch.equal(g, kv[i]) for i, g in enumerate(got))
    assert got[1].data_ptr() == got[0].data_ptr() + got[0].nbytes  # rows of one buffer
    # A format-1 file: version 1, CRC-32 in 4 bytes (what version 1 wrote).
    import zlib

    old = bytearray(data[:-8])
    struct.pack_into("<I", old, 8, 1)
    old += struct.pack("<I", zlib.crc32(old))
    store.path_of(refs[1].key).write_bytes(old)
    store.path_of(refs[2].key).write_bytes(store.path_of(refs[2].key).read_bytes() + b"\0")
    caplog.set_level(logging.WARNING, logger="engine.kv_disk_tier")
    assert len(store.load(refs).result()) == 1
    assert "format version 1, expected 2" in caplog.text
    assert not store.path_of(refs[1].key).exists() and refs[1].key not in store
    assert len(store.load(refs[2:]).result()) == 0 and "padded" in caplog.text
    assert not store.path_of(refs[2].key).exists() and store.bad_files == 2
    store.close()


def test_a_full_disk_costs_the_cache_not_the_answer(tiny_checkpoint, tmp_path, cold, caplog):
    """Every write fails as on a full disk (ENOSPC at fsync): right answers, a warning, no files."""
    import errno

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    caplog.set_level(logging.WARNING, logger="engine.kv_disk_tier")
    llm = restart(tiny_checkpoint, tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", no_space)
        assert llm.generate(DOC + Q1, GREEDY)[0].token_ids == cold[tuple(DOC + Q1)]
        assert llm.engine.kv_tiers.disk.flush(10)
    tiers = llm.stats().kv_tiers
    assert tiers.disk_write_errors == (len(DOC) + len(Q1)) // BS and tiers.disk_blocks == 0
    assert "No space left on device" in caplog.text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # temporary files removed too
    llm.engine.close()


# ---- host tier -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [{}, {"max_num_batched_tokens": 40}],
    ids=["whole-prefill", "chunked-40"],
)
def test_evicted_blocks_come_back_from_host(tiny_checkpoint, cold, variant):
    # 24 device blocks hold one 320-token prompt and its answer, not two: every new prompt
    # evicts the last one's blocks, which the host tier (64 blocks) keeps.
    host_gb = 64 * BLOCK_BYTES / 2**30
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=24, kv_host_gb=host_gb, **variant)
    assert llm.generate(DOC + Q1, GREEDY)[0].token_ids == cold[tuple(DOC + Q1)]
    for other in (OTHER1, OTHER2):
        assert llm.generate(other, GREEDY)[0].token_ids == cold[tuple(other)]
    tiers = llm.stats().kv_tiers
    assert tiers.host_bytes_out > 0 and tiers.host_blocks_used > DOC_BLOCKS
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == DOC_BLOCKS * BS
    assert out.token_ids == cold[tuple(DOC + Q2)]
    tiers = llm.stats().kv_tiers
    assert tiers.host_hit_tokens == DOC_BLOCKS * BS and tiers.device_hit_tokens == 0
    assert tiers.host_bytes_in == DOC_BLOCKS * BLOCK_BYTES
    llm.engine.scheduler.check_integrity()
    assert llm.stats().kv_blocks_used == 0


def test_host_cache_slots_lru_and_pins():
    """HostKVCache alone: memory in chunks as it fills, LRU eviction, pinned slots kept."""
    from engine.kv_host_tier import CHUNK_BLOCKS, HostKVCache

    host = HostKVCache(CHUNK_BLOCKS + 6, SHAPE, torch.float32, pin=False)
    assert host.allocated_bytes == 0
    refs = refs_for(CHUNK_BLOCKS + 8)
    slots = [host.slot_for(r.key, r.token_ids) for r in refs[: CHUNK_BLOCKS + 6]]
    assert sorted(slots) == list(range(CHUNK_BLOCKS + 6))
    for slot in slots:
        host.block(slot).fill_(float(slot))
    assert host.allocated_bytes == (CHUNK_BLOCKS + 6) * 256  # the second chunk holds 6 blocks
    assert host.block(CHUNK_BLOCKS + 5).shape == SHAPE
    assert host.slot_for(refs[0].key, refs[0].token_ids) is None  # there already: now the MRU
    assert host.lookup(refs[1].key, (1, 2, 3, 4)) is None  # other tokens under the key: no hit
    slot1 = host.lookup(refs[1].key, refs[1].token_ids)
    assert slot1 is not None and host.block(slot1).eq(float(slot1)).all()
    host.pin(slots[2])
    # Full: the next block evicts the least recently used unpinned entry, refs[3] (not 0, 1, 2).
    assert host.slot_for(refs[-2].key, refs[-2].token_ids) == slots[3]
    assert refs[3].key not in host and refs[2].key in host
    host.release_pins()
    assert host.slot_for(refs[-1].key, refs[-1].token_ids) == slots[2]


def test_host_tier_under_preemption(tiny_checkpoint, cold):
    """Requests that outgrow the pool together: preemption, eviction and reloads mix."""
    host_gb = 64 * BLOCK_BYTES / 2**30
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=24, kv_host_gb=host_gb, max_num_batched_tokens=64)
    llm.generate(DOC + Q1, GREEDY)  # the document's prefix goes to the host tier below
    outs = llm.generate(LONG_PROMPTS, LONG)
    assert [o.token_ids for o in outs] == [cold[("long", *p)] for p in LONG_PROMPTS]
    assert llm.engine.scheduler.num_preemptions > 0
    # Preempted requests came back partly from the host tier (their own evicted blocks).
    assert llm.stats().kv_tiers.host_bytes_in > 0
    llm.engine.scheduler.check_integrity()
    assert llm.stats().kv_blocks_used == 0


def test_host_then_disk_hits_in_one_prefix(tiny_checkpoint, kv_dir, cold):
    """The document's first 6 blocks come back from the host tier, the other 12 from disk."""
    host_gb = 64 * BLOCK_BYTES / 2**30
    llm = LLM(str(tiny_checkpoint), kv_disk_dir=kv_dir, num_kv_blocks=24, kv_host_gb=host_gb)
    llm.generate(DOC[:100] + Q2, GREEDY)  # 6 blocks from disk into the device pool
    for other in (OTHER1, OTHER2):  # ... and out of it, into the host tier
        llm.generate(other, GREEDY)
    before = llm.stats().kv_tiers
    assert before.disk_hit_tokens == 6 * BS and before.host_hit_tokens == 0
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == DOC_BLOCKS * BS
    assert out.token_ids == cold[tuple(DOC + Q2)]
    after = llm.stats().kv_tiers
    assert after.host_hit_tokens == 6 * BS
    assert after.disk_hit_tokens - before.disk_hit_tokens == (DOC_BLOCKS - 6) * BS
    llm.engine.scheduler.check_integrity()
    llm.engine.close()


# ---- loading off the engine thread -----------------------------------------------------------


def test_other_streams_step_while_a_load_runs(tiny_checkpoint, kv_dir, cold, monkeypatch):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_checkpoint), kv_disk_dir=kv_dir, num_kv_blocks=64)
    )
    disk = engine.kv_tiers.disk
    gate = threading.Event()
    slow_read = disk._read_block

    def read_when_allowed(path: Path, *args) -> int:
        assert threading.current_thread() is not threading.main_thread()
        gate.wait(10)  # a large, slow load: held until the other stream has stepped
        return slow_read(path, *args)

    monkeypatch.setattr(disk, "_read_block", read_when_allowed)
    long_answer = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request(OTHER1, long_answer, request_id="stream")
    engine.add_request(DOC + Q2, GREEDY, request_id="doc")
    stream_tokens = 0
    doc_out = None
    deadline = time.monotonic() + 60
    while engine.has_unfinished() and time.monotonic() < deadline:
        outs = engine.step()
        if stream_tokens >= 10:
            gate.set()
        if not gate.is_set():
            assert engine.scheduler.num_loading == 1  # the doc waits for its blocks' KV
            engine.scheduler.check_integrity()
        for out in outs:
            if out.request_id == "stream":
                stream_tokens += len(out.delta_token_ids)
            elif out.finished:
                doc_out = out
    assert gate.is_set() and stream_tokens == 30
    assert doc_out is not None and doc_out.num_cached_tokens == DOC_BLOCKS * BS
    assert doc_out.token_ids == cold[tuple(DOC + Q2)]
    engine.close()


def test_abort_while_loading_frees_everything(tiny_checkpoint, kv_dir, monkeypatch):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_checkpoint), kv_disk_dir=kv_dir, num_kv_blocks=64)
    )
    gate = threading.Event()
    read = engine.kv_tiers.disk._read_block
    monkeypatch.setattr(
        engine.kv_tiers.disk, "_read_block", lambda *a: (gate.wait(10), read(*a))[1]
    )
    engine.add_request(DOC + Q2, GREEDY, request_id="doc")
    assert engine.step() == [] and engine.scheduler.num_loading == 1
    assert engine.abort("doc").finish_reason == "abort"
    assert engine.stats().num_waiting == 0 and not engine.has_unfinished()
    assert engine.stats().kv_blocks_used == DOC_BLOCKS  # the loader may still write them
    gate.set()
    deadline = time.monotonic() + 10
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        engine.step()  # an idle step frees them once the loader is done with them
        engine.scheduler.check_integrity()
    assert engine.stats().num_waiting == 0 and engine.stats().kv_blocks_used == 0
    engine.close()


def test_async_shutdown_writes_what_is_queued(tiny_checkpoint, tmp_path, monkeypatch):
    """AsyncLLM.shutdown (the server's graceful stop) waits for the disk writer's queue."""
    import asyncio

    from engine import AsyncLLM

    real = DiskKVStore._write_block

    def slow_write(self, ref, kv):
        time.sleep(0.02)  # a slow disk: 20 blocks take 0.4 s, longer than the answer
        real(self, ref, kv)

    monkeypatch.setattr(DiskKVStore, "_write_block", slow_write)
    engine = AsyncLLM(model=str(tiny_checkpoint), kv_disk_dir=tmp_path, num_kv_blocks=64)

    async def answer() -> None:
        async for _ in engine.generate(DOC + Q1, GREEDY):
            pass

    asyncio.run(answer())
    assert len(disk_files(tmp_path)) < (len(DOC) + len(Q1)) // BS  # still being written
    engine.shutdown()
    assert len(disk_files(tmp_path)) == (len(DOC) + len(Q1)) // BS


@pytest.mark.gpu
def test_tiers_on_cuda(tiny_checkpoint, tmp_path):
    """Pinned host slots and side-stream copies on CUDA: evictions, reloads, a restart."""
    cuda = dict(device="cuda", dtype="float32", attention_backend="torch", num_kv_blocks=24)
    cold = LLM(str(tiny_checkpoint), enable_prefix_caching=False, **cuda)
    expected = [o.token_ids for o in cold.generate([DOC + Q2, *LONG_PROMPTS], GREEDY)]
    host_gb = 64 * BLOCK_BYTES / 2**30
    llm = LLM(str(tiny_checkpoint), kv_host_gb=host_gb, kv_disk_dir=tmp_path, **cuda)
    llm.generate(DOC + Q1, GREEDY)
    assert [o.token_ids for o in llm.generate(LONG_PROMPTS, GREEDY)] == expected[1:]
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == DOC_BLOCKS * BS and out.token_ids == expected[0]
    assert llm.stats().kv_tiers.host_hit_tokens > 0
    llm.engine.close()
    again = LLM(str(tiny_checkpoint), kv_disk_dir=tmp_path, **cuda)
    out = again.generate(DOC + Q2, GREEDY)[0]
    assert out.num_cached_tokens == (len(DOC + Q2) - 1) // BS * BS
    assert out.token_ids == expected[0]
    again.engine.close()


def test_a_slow_disk_delays_blocks_never_drops_them(tiny_checkpoint, tmp_path, monkeypatch):
    """The writer takes 3 blocks' KV at a time and writes slowly: blocks wait in the device pool
    in chain order, and close() writes every one of them (no holes in a document's chain)."""
    import engine.kv_disk_tier as disk_tier

    monkeypatch.setattr(disk_tier, "MAX_QUEUED_BYTES", 3 * BLOCK_BYTES)
    real = DiskKVStore._write_block

    def slow_write(self, ref, kv):
        time.sleep(0.05)
        real(self, ref, kv)

    monkeypatch.setattr(DiskKVStore, "_write_block", slow_write)
    llm = restart(tiny_checkpoint, tmp_path)
    llm.generate(DOC + Q1, GREEDY)
    tiers = llm.engine.kv_tiers
    assert tiers.unsaved  # still waiting for the writer when the answer is done
    llm.engine.close()
    assert not tiers.unsaved and tiers.disk.blocks_dropped == 0
    assert len(disk_files(tmp_path)) == (len(DOC) + len(Q1)) // BS
    again = restart(tiny_checkpoint, tmp_path)
    assert again.generate(DOC + Q2, GREEDY)[0].num_cached_tokens == DOC_BLOCKS * BS
    again.engine.close()
