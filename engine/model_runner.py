"""Runs one scheduled batch: builds the packed tensors, runs the model, samples on the device.

Owns the weights, the paged KV cache and (on CUDA) the decode CUDA graphs. The batch layout is
the one `engine.layers.attention.AttentionMetadata` documents: every sequence contributes its
new tokens, decodes and prefill chunks alike, and only rows that end a sequence's known tokens
produce logits.

Set-up runs in two stages because max_model_len depends on the KV pool: the constructor loads
the weights and sizes the pool (profiling on CUDA), the engine then fixes max_model_len, and
`allocate(max_model_len)` allocates the KV cache and captures the CUDA graphs for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.cpu_malloc import keep_freed_memory
from engine.cuda_graphs import DecodeGraphs
from engine.kv_host_tier import HostKVCache
from engine.kv_tiers import KVCopy
from engine.layers.attention import AttentionMetadata, get_attention_backend
from engine.model_config import ModelConfig
from engine.models.loader import load_model, resolve_precision
from engine.sampler import Sampler, SamplingRow, has_penalty
from engine.scheduler import ScheduledSequence
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

# Blocks a disk load staged (CUDA) move into the pool in copies of at most this many bytes (each
# is also a temporary on the device).
LOADED_COPY_BYTES = 256 << 20

GiB = 1 << 30
PROMPT_LOGPROB_ROWS = 256  # prompt positions whose logits are computed at once


@dataclass
class BatchInputs:
    """Host-built inputs of one forward pass, already on the model's device."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the packed batch whose next token is sampled


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_path: Path) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.resolved_device())
        # Weights in precision.weight_dtype; activations and the KV cache in self.dtype.
        self.precision = resolve_precision(config.dtype, model_config, str(self.device))
        self.dtype = self.precision.compute_dtype
        self.block_size = config.block_size
        if self.device.type == "cpu":
            keep_freed_memory()
        backend_name = config.resolved_attention_backend()
        self.attention_backend = get_attention_backend(backend_name, config.cpu_attention)
        # What this process held on the GPU before this engine (another engine's weights and KV
        # cache): not part of this engine's share, which is per engine as vLLM's is per instance.
        self._gpu_baseline = (
            torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        )
        torch.manual_seed(config.seed)
        self.model = load_model(
            model_path, model_config, self.precision, str(self.device), self.attention_backend
        )
        self.sampler = Sampler(model_config.vocab_size, self.device)
        self.num_blocks = self._count_kv_blocks()
        self.kv_cache: torch.Tensor | None = None
        self.max_model_len: int | None = None  # fixed by the engine, given to allocate()
        self.graphs: DecodeGraphs | None = None
        self._copy_stream: torch.cuda.Stream | None = None  # KV tier copies on CUDA

    def allocate(self, max_model_len: int) -> None:
        """Allocate the KV cache and capture the decode graphs for sequences of max_model_len."""
        self.max_model_len = max_model_len
        self._allocate_kv_cache()
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.graphs = self.decode_graphs()
            self.graphs.capture()
        assert self.kv_cache is not None
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s, %s attention)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / GiB,
            self.dtype,
            self.attention_backend.name,
        )

    def decode_graphs(self) -> DecodeGraphs:
        """The decode graphs' buffers for this runner's batch and length limits (not captured)."""
        if self.max_model_len is None:
            raise RuntimeError("allocate(max_model_len) first: the graphs are sized by it")
        return DecodeGraphs(
            self.model,
            max_num_seqs=self.config.max_num_seqs,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            hidden_size=self.model_config.hidden_size,
            dtype=self.dtype,
            device=self.device,
            enabled=self.attention_backend.name == "triton",
        )

    # ---- memory -------------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize
        return per_token * self.block_size

    def _count_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, int(self.config.kv_cache_memory_gb * GiB) // self.block_bytes)
        peak = self._profile_activation_peak() - self._gpu_baseline
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_for_kv = total * self.config.gpu_memory_utilization - peak
        blocks = int(free_for_kv // self.block_bytes)
        if blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {total / GiB:.1f} GiB total, "
                f"utilization {self.config.gpu_memory_utilization}, weights and activations "
                f"peak at {peak / GiB:.1f} GiB; raise PAGECHAT_GPU_MEMORY_UTILIZATION or lower "
                "PAGECHAT_MAX_NUM_BATCHED_TOKENS"
            )
        free, _ = torch.cuda.mem_get_info(self.device)
        if blocks * self.block_bytes > free:
            raise RuntimeError(
                f"the KV cache's share of the GPU ({blocks * self.block_bytes / GiB:.1f} GiB of "
                f"utilization {self.config.gpu_memory_utilization}) is more than is free "
                f"({free / GiB:.1f} GiB; other engines or processes hold the rest): lower "
                "PAGECHAT_GPU_MEMORY_UTILIZATION"
            )
        return blocks

    def _profile_activation_peak(self) -> int:
        """Run the largest prefill a step can hold on a scratch cache; return peak bytes in use."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        mc = self.model_config
        num_tokens = self.config.max_num_batched_tokens
        scratch_blocks = (num_tokens + self.block_size - 1) // self.block_size
        shape = (scratch_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
        k = [
            torch.empty(shape, dtype=self.dtype, device=self.device)
            for _ in range(mc.num_hidden_layers)
        ]
        v = [
            torch.empty(shape, dtype=self.dtype, device=self.device)
            for _ in range(mc.num_hidden_layers)
        ]
        self.model.bind_kv_cache(k, v)
        inputs = self._build_inputs(
            token_ids=[[0] * num_tokens],
            starts=[0],
            block_tables=[list(range(scratch_blocks))],
            samples=[True],
        )
        with torch.inference_mode():
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
            self.model.compute_logits(hidden[inputs.logits_indices])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del k, v, hidden
        torch.cuda.empty_cache()
        return peak

    def _allocate_kv_cache(self) -> None:
        mc = self.model_config
        shape = (
            2,
            mc.num_hidden_layers,
            self.num_blocks,
            self.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
        )
        # Attention only ever reads slots that were written, so the values do not matter. On the
        # CPU the pool is touched once here (zeros) so its pages exist before the first request:
        # otherwise the first writes into each page, such as a restarted engine's disk loader
        # reading a document's blocks into the pool, pay the page faults (0.5 s of an 8K
        # document's 1 s follow-up after a restart, and stalls of the steps running beside the
        # load). On CUDA the memory is there already.
        allocate = torch.zeros if self.device.type == "cpu" else torch.empty
        self.kv_cache = allocate(shape, dtype=self.dtype, device=self.device)
        layers = range(mc.num_hidden_layers)
        self.model.bind_kv_cache(
            [self.kv_cache[0, i] for i in layers], [self.kv_cache[1, i] for i in layers]
        )

    # ---- copies between KV tiers ---------------------------------------------------------------

    @property
    def kv_block_shape(self) -> tuple[int, ...]:
        """One block's KV as the lower tiers hold it: (k|v, layer, slot, kv_head, head_dim)."""
        mc = self.model_config
        return (2, mc.num_hidden_layers, self.block_size, mc.num_key_value_heads, mc.head_dim)

    @property
    def host_kv_pool(self) -> torch.Tensor | None:
        """The KV pool when it is host memory (on the CPU): the disk tier's loader reads block
        files straight into its blocks. None on CUDA, where loads are staged and copied in."""
        return self.kv_cache if self.device.type == "cpu" else None

    def _side_stream(self) -> torch.cuda.Stream | None:
        """On CUDA, the stream the tier copies run on, after the work already queued."""
        if self.device.type != "cuda":
            return None
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._copy_stream

    @torch.inference_mode()
    def copy_kv(self, copies: list[KVCopy], host: HostKVCache | None) -> None:
        """Run a step's block copies in order (device <-> host slots, blocks staged by a disk
        load -> device (CUDA only: on the CPU loads read into the pool), a shared prompt's
        partial block within the device).

        On CUDA they run on a side stream (asynchronously from pinned host memory) that the
        step's forward pass then waits for: the step waits for its own copies only.
        """
        assert self.kv_cache is not None
        kv = self.kv_cache
        stream = self._side_stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            loaded: list[KVCopy] = []  # consecutive blocks loaded from disk: copied together
            for c in copies:
                if c.kind == "from_cpu":
                    loaded.append(c)
                    continue
                if loaded:
                    self._copy_loaded(loaded, non_blocking=stream is not None)
                    loaded = []
                if c.kind == "to_host":
                    assert host is not None
                    host.block(c.host_slot).copy_(kv[:, :, c.block_id], non_blocking=True)
                elif c.kind == "from_host":
                    assert host is not None
                    kv[:, :, c.block_id].copy_(host.block(c.host_slot), non_blocking=True)
                elif c.kind == "on_device":
                    m = c.num_slots
                    kv[:, :, c.block_id, :m].copy_(kv[:, :, c.src_block, :m])
            if loaded:
                self._copy_loaded(loaded, non_blocking=stream is not None)
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)

    def _copy_loaded(self, copies: list[KVCopy], non_blocking: bool) -> None:
        """Blocks a disk load staged into their device blocks: one copy per LOADED_COPY_BYTES.

        A load's blocks are consecutive rows of one buffer (engine.kv_disk_tier), taken as one
        tensor without a copy; one index_copy_ then moves them all (a copy per block cost 4.6x
        as much on the CPU: 351 vs 76 ms for 257 blocks of Qwen3-0.6B in bf16). Only CUDA
        stages loads now."""
        assert self.kv_cache is not None
        per_copy = max(1, LOADED_COPY_BYTES // max(1, self.kv_cache[:, :, 0].nbytes))
        for i in range(0, len(copies), per_copy):
            part = copies[i : i + per_copy]
            tensors = [c.tensor for c in part if c.tensor is not None]
            assert len(tensors) == len(part)
            src = _as_one_tensor(tensors).to(self.device, non_blocking=non_blocking)
            index = torch.tensor([c.block_id for c in part], dtype=torch.int64)
            self.kv_cache.index_copy_(2, index.to(self.device), src.movedim(0, 2))

    @torch.inference_mode()
    def gather_kv(self, block_ids: list[int]) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """These blocks' KV on the CPU, shaped (block, *kv_block_shape), and a wait for it.

        On CUDA the copy is asynchronous into pinned memory: call the returned function (the
        disk writer does, on its thread) before reading the tensor.
        """
        assert self.kv_cache is not None
        stream = self._side_stream()
        if stream is None:  # one copy, straight into the (block, ...) layout
            return torch.stack([self.kv_cache.select(2, b) for b in block_ids]), None
        index = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        with torch.cuda.stream(stream):
            on_device = self.kv_cache.index_select(2, index).movedim(2, 0).contiguous()
            out = torch.empty(on_device.shape, dtype=on_device.dtype, pin_memory=True)
            out.copy_(on_device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done.synchronize

    # ---- one step -----------------------------------------------------------------------------

    def _build_inputs(
        self,
        token_ids: list[list[int]],
        starts: list[int],
        block_tables: list[list[int]],
        samples: list[bool],
    ) -> BatchInputs:
        """Pack sequences' new tokens into one batch. token_ids[i] are the tokens run for seq i."""
        bs = self.block_size
        flat_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        logits_rows: list[int] = []
        for ids, start, table, sample in zip(token_ids, starts, block_tables, samples):
            n = len(ids)
            flat_ids.extend(ids)
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_start.append(query_start[-1] + n)
            query_lens.append(n)
            seq_lens.append(start + n)
            if sample:
                logits_rows.append(query_start[-1] - 1)
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        pin = self.device.type == "cuda"

        def to_device(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            tensor = torch.tensor(values, dtype=dtype)
            if pin:
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=to_device(slots, torch.int64),
            query_start_loc=to_device(query_start, torch.int32),
            seq_lens=to_device(seq_lens, torch.int32),
            block_tables=to_device(tables, torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            all_slots_stored=True,  # the runner stores every token it runs
        )
        return BatchInputs(
            input_ids=to_device(flat_ids, torch.int64),
            positions=to_device(positions, torch.int64),
            meta=meta,
            logits_indices=to_device(logits_rows, torch.int64),
        )

    def run(self, batch: list[ScheduledSequence]) -> None:
        """Forward the batch and fill `token_id` (and `logprobs`) of every record that samples."""
        self.start(batch)()

    @torch.inference_mode()
    def start(self, batch: list[ScheduledSequence]) -> Callable[[], None]:
        """Queue the batch's forward pass and sampling on the device; the returned function
        waits for the sampled ids and fills `token_id` (and `logprobs`) of every record that
        samples. On CUDA the host is free in between: the engine emits the previous step's
        outputs meanwhile. On the CPU the work is done before this returns."""
        inputs = self._build_inputs(
            token_ids=[s.seq.token_ids[s.start : s.start + s.num_new_tokens] for s in batch],
            starts=[s.start for s in batch],
            block_tables=[s.seq.block_table for s in batch],
            samples=[s.samples for s in batch],
        )
        sampling = [s for s in batch if s.samples]
        hidden = self._forward(inputs)
        self._prompt_logprobs(batch, hidden)
        if not sampling:
            return _nothing_to_read
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        rows = [sampling_row(s.seq) for s in sampling]
        for row, s in zip(rows, sampling):
            row.grammar = s.seq.grammar  # its bitmask masks this row's logits in the sampler
        sampled = self.sampler.sample_on_device(logits, rows)

        def read() -> None:
            token_ids, logprobs = sampled.read()
            for s, token_id, entry in zip(sampling, token_ids, logprobs):
                s.token_id, s.logprobs = token_id, entry

        return read

    def _forward(self, inputs: BatchInputs) -> torch.Tensor:
        """Hidden states of every row of the packed batch."""
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    def _prompt_logprobs(self, batch: list[ScheduledSequence], hidden: torch.Tensor) -> None:
        """Fill `prompt_logprobs` of the records whose chunk covers prompt positions that need them."""
        offset = 0
        for s in batch:
            positions = s.prompt_logprob_rows()
            if len(positions):
                k = s.seq.params.prompt_logprobs or 0
                rows = range(offset + positions.start - s.start, offset + positions.stop - s.start)
                targets = s.seq.token_ids[positions.start + 1 : positions.stop + 1]
                s.prompt_logprobs = []
                # A few hundred rows at a time: full-vocabulary logits are large.
                for lo in range(0, len(rows), PROMPT_LOGPROB_ROWS):
                    part = rows[lo : lo + PROMPT_LOGPROB_ROWS]
                    logits = self.model.compute_logits(hidden[part.start : part.stop])
                    s.prompt_logprobs += self.sampler.logprobs_of(
                        logits, targets[lo : lo + PROMPT_LOGPROB_ROWS], k
                    )
            offset += s.num_new_tokens


def _nothing_to_read() -> None:
    """The read of a step that samples nothing (every chunk was a prompt's middle)."""


def sampling_row(seq: Sequence) -> SamplingRow:
    """What the sampler needs of a sequence; its token ids are copied only for penalties."""
    banned = seq.min_tokens_banned if seq.num_output_tokens < seq.params.min_tokens else ()
    if not has_penalty(seq.params):
        return SamplingRow(seq.params, (), (), seq.generator, banned)
    return SamplingRow(
        seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator, banned
    )


def _as_one_tensor(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Equally shaped tensors stacked on a new first dimension: a view when they are the
    consecutive rows of one buffer (a disk load's blocks), else a stacked copy."""
    first = tensors[0]
    step = first.numel()
    base = first.untyped_storage().data_ptr()
    if first.is_contiguous() and all(
        t.is_contiguous()
        and t.shape == first.shape
        and t.untyped_storage().data_ptr() == base
        and t.storage_offset() == first.storage_offset() + i * step
        for i, t in enumerate(tensors)
    ):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()))
    return torch.stack(tensors)
