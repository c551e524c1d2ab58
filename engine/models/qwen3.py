"""Qwen3 dense decoder, attending through the paged KV cache.

Tokens of all sequences in a step are packed into one [T, hidden] batch: every op except
attention is a single batched call, and attention goes through the engine's backend, which
first stores the new K/V into the paged cache and then attends over each sequence's blocks
(`engine.layers.attention`). Prefill chunks, prefills with a cached prefix and decodes are one
code path. The forward never reads device values on the host, so CUDA graphs can capture it.

One decoder forward, carrying the residual stream as vLLM and nano-vllm do: each layer takes and
returns (hidden, residual), and every residual add happens inside the next RMSNorm
(`norm(x, residual)` -> `(norm(x + residual), x + residual)`). The sum is the textbook pre-norm
block, `x + attn(norm(x))` then `x + mlp(norm(x))`, with the same operations in the same order.

The elementwise layers (RMSNorm, q/k norm + rotary, SiLU-and-mul) run on the kernels the model
is built with: the fused Triton kernels of engine/kernels with the triton attention backend on
CUDA (a few launches instead of dozens per layer), plain torch ops everywhere else (the CPU
path). `Qwen3ForCausalLM(..., kernels=...)` overrides the choice, e.g. to run the Triton
kernels on CPU tensors in Triton's interpreter in tests.

Projections are fused (q/k/v in one matmul, gate/up in one matmul); `load_weights` takes
Hugging Face tensor names and copies each tensor into its slice of the fused parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from engine.cpu_kernels import elementwise, packed_bf16
from engine.cpu_kernels.decoder_step import DecoderShape, DecoderStep, LayerTensors, eligible
from engine.layers.activation import SiluAndMul
from engine.layers.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from engine.layers.embedding import VocabEmbedding
from engine.layers.linear import (
    Linear,
    MergedLinear,
    can_prepack,
    copy_checked,
    linear,
    prepack_weight,
)
from engine.layers.norm import Kernels, RMSNorm, check_kernels
from engine.layers.rotary import QKNormRotary, RotaryEmbedding
from engine.model_config import ModelConfig

# Hugging Face projection name -> (fused module name, shard index inside it).
PACKED_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def default_kernels(backend: AttentionBackend, device: torch.device) -> Kernels:
    """The fused Triton layer kernels go with the Triton attention kernels on CUDA: same
    toolchain, same devices. On the CPU the engine's C kernels serve bfloat16 activations
    (torch ops for float32, bit for bit); elsewhere plain torch ops."""
    if backend.name == "triton" and device.type == "cuda":
        return "triton"
    return "cpu" if device.type == "cpu" else "torch"


class Qwen3Attention(nn.Module):
    """Fused QKV -> per-head q/k RMSNorm -> RoPE -> paged attention (GQA) -> o_proj."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, kernels: Kernels) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            [config.q_size, config.kv_size, config.kv_size],
            bias=config.attention_bias,
        )
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=config.attention_bias)
        # Their weights, under the checkpoint's names; the norm itself runs in qk_norm_rotary.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, kernels)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, kernels)
        self.qk_norm_rotary = QKNormRotary(kernels)
        self.backend = backend
        # This layer's slice of the paged cache, [num_blocks, block_size, Hkv, D]; set by bind_kv_cache.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("no KV cache bound: call Qwen3ForCausalLM.bind_kv_cache first")
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q, k = self.qk_norm_rotary(
            q.reshape(num_tokens, self.num_heads, self.head_dim),
            k.reshape(num_tokens, self.num_kv_heads, self.head_dim),
            cos,
            sin,
            self.q_norm.weight,
            self.k_norm.weight,
            self.q_norm.eps,  # q_norm and k_norm share rms_norm_eps
        )
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size])
        self.down_proj = Linear(size, config.hidden_size)
        self.act_fn = SiluAndMul(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if (
            self.act_fn.kernels == "cpu"
            and gate_up.bias is None
            and packed_bf16.is_packed(gate_up.weight)
            and x.dtype == torch.bfloat16
        ):
            # the matmul applies the SiLU to its own tiles where the CPU has AVX512-BF16
            flat = x.reshape(-1, x.shape[-1])
            act = packed_bf16.linear_swiglu(flat, gate_up.weight)
            if act is not None:
                return self.down_proj(act.view(*x.shape[:-1], act.shape[-1]))
        if self.act_fn.kernels == "cpu" and elementwise.serves_float32((x,), (gate_up.weight,)):
            # bf16 weights, float32 math: the C SiLU the one-call decode step also uses
            return self.down_proj(elementwise.silu_and_mul(gate_up(x)))
        return self.down_proj(self.act_fn(gate_up(x)))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block, Hugging Face's order: x + attn(norm(x)), then x + mlp(norm(x)).

    Takes and returns (hidden, residual): the residual stream so far and the last block's
    output, still to be added (by this layer's first norm, or the model's final norm). The
    first layer gets residual None: the embedding output is the whole stream.
    """

    def __init__(self, config: ModelConfig, backend: AttentionBackend, kernels: Kernels) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, backend, kernels)
        self.mlp = Qwen3MLP(config, kernels)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, kernels: Kernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, backend, kernels) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self._step: DecoderStep | None = None
        self._step_key: tuple[int, ...] | None = None
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions)  # once per step, shared by all layers
        if self.kernels == "cpu" and DecoderStep.serves_step(
            hidden, meta.query_lens_cpu, meta.seq_lens_cpu
        ):
            step = self._decoder_step()
            if step is not None and step.dtype == hidden.dtype:  # the same kernels, one C call
                return step.run(
                    hidden, cos, sin, meta.slot_mapping, meta.block_tables, meta.seq_lens
                )
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, meta)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]

    def _decoder_step(self) -> DecoderStep | None:
        """The C decode step over these layers' current tensors (rebuilt when a weight, a cache
        or a backend changes), or None where it does not serve them: another attention
        backend, float32 weights, weights not packed."""
        layers = [cast(Qwen3DecoderLayer, layer) for layer in self.layers]
        backends = [layer.self_attn.backend for layer in layers]
        if not all(isinstance(b, TorchAttentionBackend) and not b.native_decode for b in backends):
            return None
        tensors = [_layer_tensors(layer) for layer in layers]
        if any(t is None for t in tensors):
            return None
        key = tuple(id(x) for t in tensors for x in vars(t).values()) + (id(self.norm.weight),)
        if self._step_key != key:
            ready = [t for t in tensors if t is not None]
            self._step = (
                DecoderStep(self._shape(layers[0]), ready, self.norm.weight)
                if layers and eligible(ready, self.norm.weight)
                else None
            )
            self._step_key = key
        return self._step

    def _shape(self, layer: Qwen3DecoderLayer) -> DecoderShape:
        attn = layer.self_attn
        return DecoderShape(
            hidden_size=self.norm.weight.shape[0],
            q_heads=attn.num_heads,
            kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            intermediate_size=layer.mlp.down_proj.in_features,
            eps=self.norm.eps,
            scale=attn.scale,
        )


def _layer_tensors(layer: Qwen3DecoderLayer) -> LayerTensors | None:
    """The tensors the C decode step reads, or None if the layer has biases or no cache."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if attn.k_cache is None or attn.v_cache is None or any(m.bias is not None for m in linears):
        return None
    if attn.q_norm.eps != layer.input_layernorm.eps:
        return None
    return LayerTensors(
        input_norm=layer.input_layernorm.weight,
        qkv=attn.qkv_proj.weight,
        q_norm=attn.q_norm.weight,
        k_norm=attn.k_norm.weight,
        o=attn.o_proj.weight,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up=mlp.gate_up_proj.weight,
        down=mlp.down_proj.weight,
        k_cache=attn.k_cache,
        v_cache=attn.v_cache,
    )


class Qwen3ForCausalLM(nn.Module):
    """The Qwen3 language model: packed tokens in, final hidden states out, logits on demand.

    Parameters are allocated uninitialised in the current default dtype and device; build it
    through `engine.models.loader.load_model`, which fills them from a checkpoint.
    """

    def __init__(
        self,
        config: ModelConfig,
        attention_backend: AttentionBackend,
        kernels: Kernels | None = None,
    ) -> None:
        """`kernels`: "torch" or "triton" for the elementwise layers; None picks by the
        attention backend and the device the model is built on (`default_kernels`)."""
        super().__init__()
        self.config = config
        if kernels is None:
            kernels = default_kernels(attention_backend, torch.empty(0).device)
        self.kernels = check_kernels(kernels)
        self.model = Qwen3Model(config, attention_backend, self.kernels)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        )
        # Tied embeddings, prepacked: the output projection's own oneDNN-packed copy of the
        # table (the lookup still reads the dense one). Not a parameter: never loaded or saved.
        self.packed_tied_head: torch.Tensor | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: int64 [T] (packed sequences). Returns hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden] -> float32 logits [N, vocab]."""
        weight: torch.Tensor
        if self.lm_head is not None:
            weight = self.lm_head.weight
        elif self.packed_tied_head is not None:
            weight = self.packed_tied_head
        else:
            weight = self.model.embed_tokens.weight
        return linear(hidden, weight).float()

    @torch.no_grad()
    def prepack(self, tied_head: bool = True) -> int:
        """Store every linear weight once in its CPU kernel's layout (engine.layers.linear).

        Call after loading. The dense copies are dropped. With tied embeddings and `tied_head`,
        the table serves the output projection packed too: in the engine's own layout the
        lookup reads the same packed table (no extra memory); in oneDNN's the output projection
        gets a packed copy (the lookup keeps the dense one): vocab x hidden x 2 bytes more for
        the largest GEMV of a decode step. Returns the bytes of extra memory.
        """
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()
        table = self.model.embed_tokens.weight
        if tied_head and self.lm_head is None and packed_bf16.can_pack(table):
            self.model.embed_tokens.weight = nn.Parameter(
                packed_bf16.pack(table), requires_grad=False
            )
            return 0
        if tied_head and self.lm_head is None and can_prepack(table):
            self.packed_tied_head = prepack_weight(table)
            return table.numel() * table.element_size()
        return 0

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Give each layer its K and V cache, [num_blocks, block_size, num_kv_heads, head_dim]."""
        layers = self.model.layers
        if len(k_caches) != len(layers) or len(v_caches) != len(layers):
            raise ValueError(
                f"expected {len(layers)} K and V caches (one per layer), "
                f"got {len(k_caches)} and {len(v_caches)}"
            )
        heads_dim = (self.config.num_key_value_heads, self.config.head_dim)
        for module, k, v in zip(layers, k_caches, v_caches):
            for cache in (k, v):
                if cache.dim() != 4 or tuple(cache.shape[2:]) != heads_dim:
                    raise ValueError(
                        f"KV cache must be [num_blocks, block_size, {heads_dim[0]}, "
                        f"{heads_dim[1]}], got {tuple(cache.shape)}"
                    )
            attn = cast(Qwen3DecoderLayer, module).self_attn
            attn.k_cache = k
            attn.v_cache = v

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (Hugging Face name, tensor) pairs into the parameters, one tensor at a time.

        Raises ValueError for a tensor the model has no place for, a shape mismatch, or (at the
        end) any parameter the checkpoint did not provide.
        """
        modules = dict(self.named_modules())
        expected = {
            (module_name, param_name, shard)
            for module_name, module in modules.items()
            for param_name, _ in module.named_parameters(recurse=False)
            for shard in range(getattr(module, "num_shards", 1))
        }
        loaded: set[tuple[str, str, int]] = set()
        for name, tensor in weights:
            if "rotary_emb." in name:
                continue  # inverse frequencies some exporters save; recomputed from config
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the output projection is the embedding table
            module_name, _, param_name = name.rpartition(".")
            shard = 0
            prefix, _, leaf = module_name.rpartition(".")
            if leaf in PACKED_MODULES:
                fused, shard = PACKED_MODULES[leaf]
                module_name = f"{prefix}.{fused}"
            module = modules.get(module_name)
            if module is None or param_name not in dict(module.named_parameters(recurse=False)):
                raise ValueError(
                    f"unexpected tensor {name!r} in the checkpoint: not a weight of a dense "
                    "Qwen3 model with this config.json"
                )
            if hasattr(module, "load_weight"):
                module.load_weight(param_name, tensor, shard, name)
            else:
                copy_checked(getattr(module, param_name), tensor, name)
            loaded.add((module_name, param_name, shard))
        missing = sorted(expected - loaded)
        if missing:
            names = [_hf_name(m, p, s) for m, p, s in missing]
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise ValueError(
                f"checkpoint is missing {len(names)} tensor(s): {', '.join(names[:5])}{more}"
            )


def _hf_name(module_name: str, param_name: str, shard: int) -> str:
    """The Hugging Face tensor name that fills (module, parameter, shard)."""
    prefix, _, leaf = module_name.rpartition(".")
    for hf_leaf, (fused, index) in PACKED_MODULES.items():
        if leaf == fused and index == shard:
            return f"{prefix}.{hf_leaf}.{param_name}"
    return f"{module_name}.{param_name}"
