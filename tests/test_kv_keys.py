"""Prefix-cache keys that mean the same in every process (engine.kv_keys, issue 15 item 1).

A second Python process (another PYTHONHASHSEED) computes the fingerprint and block keys of the
same checkpoint and tokens: the bytes must be equal. Another dtype, block size, KV layout,
checkpoint or cache salt must give other keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.kv_keys import (
    KV_KEY_FORMAT_VERSION,
    ModelFingerprint,
    block_key,
    block_keys,
    chain_root,
    kv_layout,
)
from engine.model_config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [151644, 872, 198, *range(1000, 1061), 151645]  # 65 ids: 4 full blocks of 16
BASE = {"weight_dtype": "float32", "kv_dtype": "bfloat16", "block_size": 16}

# Run in the second process: the same computations, printed as hex.
CHILD = """
import json, sys
from engine.kv_keys import ModelFingerprint, block_keys, kv_layout
from engine.model_config import ModelConfig

path, tokens, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
layout = kv_layout(ModelConfig.from_dir(path))
out = {}
for name, case in cases.items():
    salt = case.pop("cache_salt", None)
    where = case.pop("path", path)
    fp = ModelFingerprint.of_checkpoint(where, kv_layout=layout, **case)
    out[name] = [fp.digest.hex()] + [
        k.hex() for k in block_keys(fp.digest, tokens, case["block_size"], salt)
    ]
print(json.dumps(out))
"""


def fingerprint(path: Path, **changes) -> ModelFingerprint:
    args = {**BASE, "kv_layout": kv_layout(ModelConfig.from_dir(path)), **changes}
    return ModelFingerprint.of_checkpoint(path, **args)


def keys_here(path: Path, cache_salt: str | None = None, **changes) -> list[str]:
    fp = fingerprint(path, **changes)
    bs = changes.get("block_size", BASE["block_size"])
    return [fp.digest.hex()] + [k.hex() for k in block_keys(fp.digest, TOKENS, bs, cache_salt)]


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """Another checkpoint of the same shape (a fine-tune's situation): other weight values."""
    from engine.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("other") / "tiny", shape="tiny", seed=1)


def test_a_second_process_computes_the_same_keys(tiny_checkpoint, other_checkpoint):
    cases = {
        "base": dict(BASE),
        "salted": {**BASE, "cache_salt": "tenant-a"},
        "float16": {**BASE, "kv_dtype": "float16"},
        "bs32": {**BASE, "block_size": 32},
        "other": {**BASE, "path": str(other_checkpoint)},
    }
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_checkpoint), json.dumps(TOKENS), json.dumps(cases)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=True,
    )
    theirs = json.loads(result.stdout)
    assert theirs["base"] == keys_here(tiny_checkpoint)
    assert theirs["salted"] == keys_here(tiny_checkpoint, cache_salt="tenant-a")
    assert theirs["float16"] == keys_here(tiny_checkpoint, kv_dtype="float16")
    assert theirs["bs32"] == keys_here(tiny_checkpoint, block_size=32)
    assert theirs["other"] == keys_here(other_checkpoint)
    assert len(theirs["base"]) == 1 + len(TOKENS) // 16
    assert len(theirs["bs32"]) == 1 + len(TOKENS) // 32
    # Every variant names other KV: no block key of one is a block key of another (the salt
    # changes the keys, not the fingerprint).
    assert theirs["salted"][0] == theirs["base"][0]
    variants = [set(v[1:]) for v in theirs.values()]
    for i, a in enumerate(variants):
        for b in variants[i + 1 :]:
            assert not a & b


def test_another_checkpoint_dtype_layout_or_format_never_shares_a_key(
    tiny_checkpoint, other_checkpoint, tmp_path
):
    base = fingerprint(tiny_checkpoint)
    assert base.digest == fingerprint(tiny_checkpoint).digest  # deterministic
    changed = [
        fingerprint(tiny_checkpoint, weight_dtype="bfloat16"),
        fingerprint(tiny_checkpoint, kv_dtype="float32"),
        fingerprint(tiny_checkpoint, block_size=32),
        fingerprint(tiny_checkpoint, kv_layout=base.kv_layout + ";v2"),
        fingerprint(other_checkpoint),
    ]
    # A copy that keeps the files' modification times (cp -p) is the same checkpoint; one that
    # does not is fingerprinted anew: a cold cache, never a wrong hit.
    kept = Path(shutil.copytree(tiny_checkpoint, tmp_path / "kept"))
    assert fingerprint(kept).digest == base.digest
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for file in tiny_checkpoint.iterdir():
        shutil.copyfile(file, fresh / file.name)
    changed.append(fingerprint(fresh))
    # One config value changed in place (same weights, same mtimes).
    config = json.loads((kept / "config.json").read_text())
    (kept / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}, indent=1))
    changed.append(fingerprint(kept))
    assert len({fp.digest for fp in changed} | {base.digest}) == len(changed) + 1
    # The fingerprint follows config.json's contents, not its formatting.
    (kept / "config.json").write_text(json.dumps(config, indent=7, sort_keys=True))
    assert fingerprint(kept).digest == base.digest


def test_the_fingerprint_is_the_documented_canonical_json(tiny_checkpoint):
    fp = fingerprint(tiny_checkpoint)
    data = json.loads(fp.canonical())
    weights = tiny_checkpoint / "model.safetensors"
    stat = weights.stat()
    raw = weights.read_bytes()
    header = raw[: 8 + int.from_bytes(raw[:8], "little")]
    assert data == {
        "format": KV_KEY_FORMAT_VERSION,
        "config": json.loads((tiny_checkpoint / "config.json").read_text()),
        "weights": [
            ["model.safetensors", stat.st_size, stat.st_mtime_ns,
             hashlib.blake2b(header, digest_size=32).hexdigest()]
        ],
        "weight_dtype": "float32",
        "kv_dtype": "bfloat16",
        "block_size": 16,
        "kv_layout": fp.kv_layout,
    }
    assert fp.digest == hashlib.blake2b(
        fp.canonical(), digest_size=32, person=b"pagechat.model"
    ).digest()
    # torch dtypes are named as strings
    import torch

    assert fingerprint(tiny_checkpoint, kv_dtype=torch.bfloat16).digest == fp.digest


def test_salts_and_roots():
    digest = b"\x01" * 32
    roots = {chain_root(digest, s) for s in (None, "", "a", "b")}
    assert len(roots) == 4  # None and "" differ too
    assert chain_root(digest, "a") == hashlib.blake2b(
        digest + b"\x01a", digest_size=32, person=b"pagechat.root"
    ).digest()
    assert block_keys(digest, TOKENS[:15], 16) == []  # no full block, no key
    keys = block_keys(digest, TOKENS, 16, "a")
    assert keys[0] == block_key(chain_root(digest, "a"), TOKENS[:16])
    assert keys[1] == block_key(keys[0], TOKENS[16:32])


def test_the_engine_keys_its_cache_with_the_checkpoint_fingerprint(tiny_checkpoint):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(model=str(tiny_checkpoint), dtype="float32", num_kv_blocks=16, max_model_len=256)
    )
    fp = engine.model_fingerprint
    assert (fp.weight_dtype, fp.kv_dtype, fp.block_size) == ("float32", "float32", 16)
    assert engine.scheduler.block_manager.model_digest == fingerprint(
        tiny_checkpoint, kv_dtype="float32"
    ).digest
