"""Qwen3 dense decoder in plain torch ops, attending through the paged KV cache.

Tokens of all sequences in a step are packed into one [T, hidden] batch: every op except
attention is a single batched call, and attention goes through the engine's backend, which
first stores the new K/V into the paged cache and then attends over each sequence's blocks
(`engine.layers.attention`). Prefill chunks, prefills with a cached prefix and decodes are one
code path. The forward never reads device values on the host, so CUDA graphs can capture it.

Projections are fused (q/k/v in one matmul, gate/up in one matmul); `load_weights` takes
Hugging Face tensor names and copies each tensor into its slice of the fused parameter.

With the triton attention backend on CUDA the elementwise work runs as fused Triton kernels
(engine/kernels): residual add + RMSNorm, q/k RMSNorm + rotary, SiLU-and-mul. Same operations
in the same order, a few launches instead of dozens per layer. Everywhere else (the CPU path)
the plain torch ops below run unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.layers.activation import silu_and_mul, silu_and_mul_fused
from engine.layers.attention import AttentionBackend, AttentionMetadata
from engine.layers.embedding import VocabEmbedding
from engine.layers.linear import Linear, MergedLinear, copy_checked, linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_qk_fused
from engine.model_config import ModelConfig

# Hugging Face projection name -> (fused module name, shard index inside it).
PACKED_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Qwen3Attention(nn.Module):
    """Fused QKV -> per-head q/k RMSNorm -> RoPE -> paged attention (GQA) -> o_proj."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
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
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
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
        fused: bool = False,
    ) -> torch.Tensor:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("no KV cache bound: call Qwen3ForCausalLM.bind_kv_cache first")
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if fused:
            q, k = apply_rotary_qk_fused(
                q.reshape(num_tokens, self.num_heads, self.head_dim),
                k.reshape(num_tokens, self.num_kv_heads, self.head_dim),
                cos,
                sin,
                self.q_norm.weight,
                self.k_norm.weight,
                self.q_norm.eps,  # q_norm and k_norm share rms_norm_eps
            )
        else:
            q = self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size])
        self.down_proj = Linear(size, config.hidden_size)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        act = silu_and_mul_fused if fused else silu_and_mul
        return self.down_proj(act(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), in Hugging Face's order."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, backend)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward_fused(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on the Triton kernels, vLLM style: each residual add happens inside the next
        norm. Takes and returns (block output, residual); the sum of the two is `forward`'s
        result, and the first layer gets residual None. The residual is updated in place."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm.forward_fused(hidden)
        else:
            hidden, residual = self.input_layernorm.add_forward_fused(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, meta, fused=True)
        hidden, residual = self.post_attention_layernorm.add_forward_fused(hidden, residual)
        return self.mlp(hidden, fused=True), residual


class Qwen3Model(nn.Module):
    # Device types on which the fused Triton kernels run compiled. Tests add "cpu" to run them
    # in Triton's interpreter; the engine never does (the CPU path stays on torch ops).
    fused_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        # The fused kernels go with the Triton attention kernels: same toolchain, same devices.
        self.fused_ops = backend.name == "triton"
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, backend) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
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
        if self.fused_ops and hidden.device.type in self.fused_devices:
            residual: torch.Tensor | None = None
            for layer in self.layers:
                hidden, residual = layer.forward_fused(hidden, residual, cos, sin, meta)
            if residual is None:
                return self.norm.forward_fused(hidden)
            return self.norm.add_forward_fused(hidden, residual)[0]
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, meta)
        return self.norm(hidden)


class Qwen3ForCausalLM(nn.Module):
    """The Qwen3 language model: packed tokens in, final hidden states out, logits on demand.

    Parameters are allocated uninitialised in the current default dtype and device; build it
    through `engine.models.loader.load_model`, which fills them from a checkpoint.
    """

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, attention_backend)
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: int64 [T] (packed sequences). Returns hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden] -> float32 logits [N, vocab]."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight).float()

    def bind_kv_cache(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Give each layer its K and V cache, [num_blocks, block_size, num_kv_heads, head_dim]."""
        layers = self.model.layers
        if len(k_caches) != len(layers) or len(v_caches) != len(layers):
            raise ValueError(
                f"expected {len(layers)} K and V caches (one per layer), "
                f"got {len(k_caches)} and {len(v_caches)}"
            )
        heads_dim = (self.config.num_key_value_heads, self.config.head_dim)
        for layer, k, v in zip(layers, k_caches, v_caches):
            for cache in (k, v):
                if cache.dim() != 4 or tuple(cache.shape[2:]) != heads_dim:
                    raise ValueError(
                        f"KV cache must be [num_blocks, block_size, {heads_dim[0]}, "
                        f"{heads_dim[1]}], got {tuple(cache.shape)}"
                    )
            layer.self_attn.k_cache = k
            layer.self_attn.v_cache = v

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
        loaded: set[tuple[str, int, int]] = set()
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
