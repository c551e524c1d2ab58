"""The Qwen3 forward's CPU logits, bit for bit, as a saved run pins them down.

Two checks on the same paged run (tiny shape, and the Qwen3-0.6B shape with 4 layers, in
float32): a prefill of
two packed sequences, then a chunk that reads a cached prefix back beside a decode, then decode
steps, through the torch attention backend and the paged KV cache (blocks from a shuffled free
list, as tests/test_model_parity.py drives it).

1. In the same run, on any machine: the engine's forward against `reference_forward`, a frozen
   copy of the decoder as it stood before the single residual-carrying forward (plain
   `x + attn(norm(x))`, `x + mlp(norm(x))`, with its own copies of the norm, rotary and SiLU
   math). The logits must be equal bit for bit (`torch.equal`), not merely close.
2. Against the saved run in tests/fixtures/forward_golden.json: per CPU kind, the sha256 of
   the float32 logits' bytes and a few logits for a readable diff. The kind is torch's
   capability (`torch.backends.cpu.get_cpu_capability()`: AVX512 and AVX2 machines round
   differently) and what oneDNN sizes its float32 kernels by (the CPU vendor, its L2 size, AMX):
   an Intel Xeon with AMX and 2 MiB of L2 and an AMD EPYC with 1 MiB, both "AVX512", sum in
   different orders. The digest is
   checked when the CPU kind, torch version and thread count match the saved entry; otherwise
   the test records this machine's digest as a warning (and writes it into the fixture when
   PAGECHAT_UPDATE_GOLDEN=1) and still does check 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.layers.attention import AttentionMetadata, TorchAttentionBackend
from engine.model_config import ModelConfig
from engine.models.loader import load_model
from engine.models.qwen3 import Qwen3ForCausalLM

FIXTURE = Path(__file__).parent / "fixtures" / "forward_golden.json"
UPDATE_ENV = "PAGECHAT_UPDATE_GOLDEN"
SAMPLE_ROWS = (0, 5, -1)  # rows of the concatenated logits saved for a readable diff
SAMPLE_COLS = 8

Forward = Callable[[Qwen3ForCausalLM, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


# ---------------------------------------------------------------- the frozen reference decoder


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def ref_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def ref_attention(
    attn: torch.nn.Module,
    config: ModelConfig,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    num_tokens, heads, kv_heads, dim = (
        hidden.shape[0],
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    qkv = attn.qkv_proj(hidden)
    q, k, v = qkv.split([config.q_size, config.kv_size, config.kv_size], dim=-1)
    q = ref_rms_norm(q.reshape(num_tokens, heads, dim), attn.q_norm.weight, attn.q_norm.eps)
    k = ref_rms_norm(k.reshape(num_tokens, kv_heads, dim), attn.k_norm.weight, attn.k_norm.eps)
    q = ref_rotary(q, cos, sin)
    k = ref_rotary(k, cos, sin)
    v = v.reshape(num_tokens, kv_heads, dim)
    out = attn.backend.forward(q, k, v, attn.k_cache, attn.v_cache, meta, dim**-0.5)
    return attn.o_proj(out.reshape(num_tokens, heads * dim))


def reference_forward(
    model: Qwen3ForCausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """The torch path of Qwen3Model.forward as it was (two decoder forwards, commit b7196e2)."""
    m, config = model.model, model.config
    hidden = m.embed_tokens(input_ids)
    cos, sin = m.rotary_emb.cos_sin(positions)
    for layer in m.layers:
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        attn_in = ref_rms_norm(hidden, norm1.weight, norm1.eps)
        hidden = hidden + ref_attention(layer.self_attn, config, attn_in, cos, sin, meta)
        mlp_in = ref_rms_norm(hidden, norm2.weight, norm2.eps)
        mlp = layer.mlp
        hidden = hidden + mlp.down_proj(ref_silu_and_mul(mlp.gate_up_proj(mlp_in)))
    return ref_rms_norm(hidden, m.norm.weight, m.norm.eps)


def engine_forward(
    model: Qwen3ForCausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    return model(input_ids, positions, meta)


# ---------------------------------------------------------------- a paged run


class PagedRun:
    """Block tables over a NaN-filled paged cache, one packed forward per step."""

    def __init__(self, model: Qwen3ForCausalLM, num_blocks: int, block_size: int, seed: int):
        config = model.config
        dtype = model.model.embed_tokens.weight.dtype
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        self.k = [torch.full(shape, float("nan"), dtype=dtype) for _ in layers]
        self.v = [torch.full(shape, float("nan"), dtype=dtype) for _ in layers]
        model.bind_kv_cache(self.k, self.v)
        self.model = model
        self.block_size = block_size
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @torch.inference_mode()
    def step(self, forward: Forward, work: list[tuple[int, list[int]]]) -> torch.Tensor:
        """New tokens of each (sequence, token ids), packed; float32 logits [tokens, vocab]."""
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for seq, tokens in work:
            table = self.tables.setdefault(seq, [])
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            slots += [
                table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)
            ]
            input_ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            self.lengths[seq] = end
        width = max(len(self.tables[seq]) for seq, _ in work)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in work]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64)
        hidden = forward(self.model, ids, torch.tensor(positions, dtype=torch.int64), meta)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return logits


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_script(model: Qwen3ForCausalLM, forward: Forward, block_size: int) -> torch.Tensor:
    """Prefill A's prefix and all of B; A's next chunk over its cached prefix beside B's first
    decode; two decode steps of both. Every new token's logits, concatenated in step order."""
    vocab = model.config.vocab_size
    prompt_a, prompt_b = tokens(29, seed=1, vocab=vocab), tokens(13, seed=2, vocab=vocab)
    decodes = tokens(5, seed=3, vocab=vocab)
    run = PagedRun(model, num_blocks=16, block_size=block_size, seed=4)
    steps = [
        [(0, prompt_a[:18]), (1, prompt_b)],
        [(0, prompt_a[18:]), (1, decodes[:1])],
        [(0, decodes[1:2]), (1, decodes[2:3])],
        [(1, decodes[3:4]), (0, decodes[4:5])],
    ]
    logits = torch.cat([run.step(forward, work) for work in steps])
    assert logits.shape[0] == 29 + 13 + 1 + 4 and not logits.isnan().any()
    return logits


# ---------------------------------------------------------------- checkpoints and the saved run


CASES = {
    # name: (checkpoint fixture, block size)
    "tiny": ("tiny_checkpoint", 8),
    "qwen3-0.6b": ("qwen3_06b_checkpoint", 16),
}


@pytest.fixture(scope="module")
def qwen3_06b_checkpoint(tmp_path_factory) -> Path:
    """Qwen3-0.6B's shape (hidden 1024, 16/8 heads of 128, tied 151,936-row embedding) with 4
    of its 28 layers: every layer runs the same ops, and 2 CPU cores write, load and run this
    twice in about 15 s instead of 35."""
    from engine.tiny import write_checkpoint

    return write_checkpoint(
        tmp_path_factory.mktemp("golden-0.6b"), shape="qwen3-0.6b", seed=0, num_hidden_layers=4
    )


def cpu_kind() -> str:
    """torch's capability report, then the CPU's vendor, L2 size and AMX (oneDNN picks its
    float32 kernels' blocking by them)."""
    vendor = "unknown vendor"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        l2 = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
    except OSError:
        l2 = "?"
    amx = " AMX" if torch.cpu._is_amx_tile_supported() else ""
    return f"{torch.backends.cpu.get_cpu_capability()} {vendor} L2 {l2}{amx}"


def environment() -> dict[str, str | int]:
    return {
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
    }


def digest(logits: torch.Tensor) -> str:
    return hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()


def sample(logits: torch.Tensor) -> dict[str, list[float]]:
    return {str(r): logits[r, :SAMPLE_COLS].tolist() for r in SAMPLE_ROWS}


def load_saved() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}


def record(capability: str, case: str, entry: dict) -> None:
    """Keep this machine's run: a warning always, the fixture file when asked to."""
    warnings.warn(
        f"forward golden: no saved run for {case} on {capability} {environment()}; "
        f"this machine's: {entry['sha256']} (set {UPDATE_ENV}=1 to save it)",
        stacklevel=2,
    )
    if os.environ.get(UPDATE_ENV) == "1":
        saved = load_saved()
        saved.setdefault(capability, {})[case] = entry
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")


def describe_diff(logits: torch.Tensor, saved: dict) -> str:
    lines = []
    for row, expected in saved["sample"].items():
        got = logits[int(row), :SAMPLE_COLS].tolist()
        if got != expected:
            lines.append(f"row {row}: saved {expected}\n        now   {got}")
    return "\n".join(lines) or "(the sampled logits agree; others differ)"


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_logits_bit_identical(case, request, record_property):
    fixture, block_size = CASES[case]
    path = request.getfixturevalue(fixture)
    config = ModelConfig.from_dir(path)
    model = load_model(path, config, "float32", "cpu", TorchAttentionBackend())

    logits = run_script(model, engine_forward, block_size)
    expected = run_script(model, reference_forward, block_size)
    if not torch.equal(logits, expected):
        diff = (logits - expected).abs()
        pytest.fail(
            f"{case}: logits differ from the frozen reference decoder in "
            f"{int((diff != 0).sum())} of {diff.numel()} values, max {diff.max().item():.3g}"
        )

    capability = cpu_kind()
    entry = {"sha256": digest(logits), "sample": sample(logits), **environment()}
    record_property(f"golden_{case}_{capability}", entry["sha256"])
    saved = load_saved().get(capability, {}).get(case)
    if saved is None or any(saved.get(key) != value for key, value in environment().items()):
        record(capability, case, entry)
        return
    assert entry["sha256"] == saved["sha256"], (
        f"{case} on {capability}: float32 logits differ from the saved run "
        f"(tests/fixtures/{FIXTURE.name}):\n{describe_diff(logits, saved)}"
    )


@torch.inference_mode()
def test_bf16_logits_equal_reference(tiny_checkpoint):
    """bfloat16 rounds after every op: the same operations in the same order, or it shows."""
    config = ModelConfig.from_dir(tiny_checkpoint)
    model = load_model(tiny_checkpoint, config, "bfloat16", "cpu", TorchAttentionBackend())
    logits = run_script(model, engine_forward, 8)
    assert torch.equal(logits, run_script(model, reference_forward, 8))
