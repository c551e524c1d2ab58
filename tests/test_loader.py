"""Checkpoint discovery, config validation, dtypes and the loader's error messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3Config
from transformers import Qwen3ForCausalLM as HFQwen3ForCausalLM

from engine.cpu_capability import Precision
from engine.layers.attention import TorchAttentionBackend
from engine.model_config import ModelConfig
from engine.models.loader import (
    ModelNotFoundError,
    find_weight_files,
    load_model,
    resolve_dtype,
    resolve_model_path,
    resolve_precision,
)
from tests.engine_helpers import torch_reports_native_bf16

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A small float32 checkpoint in several shards, with eos ids in generation_config.json."""
    path = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    model = HFQwen3ForCausalLM(Qwen3Config(**SMALL))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.save_pretrained(path, max_shard_size="40KB")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 3]}))
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_all_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in find_weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensors[name] = f.get_tensor(name)
    return tensors


# ---- locating a checkpoint --------------------------------------------------------------------


def test_local_directory_resolves(sharded):
    assert resolve_model_path(str(sharded)) == sharded.resolve()
    assert len(find_weight_files(sharded)) > 1


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path(str(missing))
    message = str(err.value)
    assert str(missing) in message and "does not exist" in message
    assert "PAGECHAT_MODEL" in message and "hf download" in message


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        ModelConfig.from_dir(tmp_path)


def test_missing_shard_is_named_before_loading(sharded, tmp_path):
    broken = copy_checkpoint(sharded, tmp_path / "broken")
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ModelNotFoundError) as err:
        load_model(broken, ModelConfig.from_dir(broken), "float32", "cpu", TorchAttentionBackend())
    message = str(err.value)
    assert shards[1].name in message
    assert f"1 of the {len(shards)} weight shards" in message
    assert "model.safetensors.index.json" in message and "download" in message


def test_no_weights_mentions_bin_files(sharded, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sharded / "config.json", bare / "config.json")
    (bare / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as err:
        find_weight_files(bare)
    assert "model.safetensors" in str(err.value) and "pytorch_model.bin" in str(err.value)


def test_hub_id_offline_and_from_cache(tmp_path):
    """In a fresh interpreter (huggingface_hub reads HF_* at import): an uncached hub id with
    HF_HUB_OFFLINE=1 fails clearly, a cached snapshot resolves offline, and with the hub
    unreachable (offline flag unset) the error says the download failed."""
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--acme--cached-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(snapshot / "model.safetensors"))
    partial = hub / "models--acme--partial" / "snapshots" / commit
    partial.mkdir(parents=True)
    (hub / "models--acme--partial" / "refs").mkdir()
    (hub / "models--acme--partial" / "refs" / "main").write_text(commit)
    (partial / "config.json").write_text("{}")

    script = textwrap.dedent(
        """
        import json, sys
        from engine.models.loader import resolve_model_path
        results = {}
        for name in sys.argv[1:]:
            try:
                results[name] = "ok " + str(resolve_model_path(name))
            except Exception as err:
                results[name] = type(err).__name__ + " " + str(err)
        print(json.dumps(results))
        """
    )
    names = ["Qwen/Qwen3-4B-Instruct-2507", "acme/cached-qwen3", "acme/partial"]

    def run(**env_overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", **env_overrides)
        proc = subprocess.run(
            [sys.executable, "-c", script, *names],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    offline = run(HF_HUB_OFFLINE="1")
    missing = offline["Qwen/Qwen3-4B-Instruct-2507"]
    assert missing.startswith("ModelNotFoundError")
    assert "not in the Hugging Face cache" in missing and "HF_HUB_OFFLINE=1" in missing
    assert "hf download Qwen/Qwen3-4B-Instruct-2507" in missing and "PAGECHAT_MODEL" in missing
    assert offline["acme/cached-qwen3"] == f"ok {snapshot}"
    assert "partly in the Hugging Face cache" in offline["acme/partial"]
    assert "model.safetensors" in offline["acme/partial"]

    unreachable = run(HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    message = unreachable["Qwen/Qwen3-4B-Instruct-2507"]
    assert message.startswith("ModelNotFoundError")
    assert "downloading it failed" in message and "could not be reached" in message
    assert "hf download Qwen/Qwen3-4B-Instruct-2507" in message
    assert unreachable["acme/cached-qwen3"] == f"ok {snapshot}"


# ---- config validation ------------------------------------------------------------------------


def write_config(path: Path, **changes) -> Path:
    raw = json.loads(Qwen3Config(**SMALL).to_json_string())
    raw.update(changes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return path


def test_wrong_architecture_fails_before_weights(tmp_path):
    path = write_config(tmp_path / "llama", architectures=["LlamaForCausalLM"], model_type="llama")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dir(path)
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message
    assert "safetensors" not in message  # refused on config.json alone


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (
            {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"},
            "Qwen3MoeForCausalLM",
        ),
        ({"model_type": "qwen2"}, "model_type 'qwen2'"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}},
            "'dynamic'",
        ),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}}, "'longrope'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6}}, "needs a 'factor'"),
        ({"use_sliding_window": True, "sliding_window": 128}, "use_sliding_window"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantized"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": None}, "hidden_size"),
        ({"dtype": "float8_e4m3fn"}, "float8_e4m3fn"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, changes, needle):
    path = write_config(tmp_path / "cfg", **changes)
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dir(path)
    assert needle in str(err.value)
    assert str(path / "config.json") in str(err.value)


def test_both_config_dialects_parse_alike(tmp_path):
    published = {
        **{k: v for k, v in SMALL.items()},
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "rope_theta": 5000000,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
        "eos_token_id": 151645,
    }
    transformers5 = {
        **{
            k: v
            for k, v in published.items()
            if k not in ("rope_theta", "rope_scaling", "torch_dtype")
        },
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 5000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
        "dtype": "bfloat16",
    }
    a = ModelConfig.from_dict(published, {"eos_token_id": [151645, 151643]})
    b = ModelConfig.from_dict(transformers5, {"eos_token_id": [151645, 151643]})
    assert a == b
    assert a.rope_theta == 5e6 and a.rope_scaling["rope_type"] == "yarn"
    assert a.eos_token_ids == (151645, 151643) and a.torch_dtype == "bfloat16"
    plain = ModelConfig.from_dict({**published, "rope_scaling": None})
    assert plain.rope_scaling is None and plain.eos_token_ids == (151645,)


def test_config_fields(sharded):
    config = ModelConfig.from_dir(sharded)
    assert config.architectures == ("Qwen3ForCausalLM",)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.tie_word_embeddings and not config.attention_bias
    assert config.eos_token_ids == (7, 3)


# ---- weights and dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_weights_land_in_fused_parameters(sharded, dtype):
    config = ModelConfig.from_dir(sharded)
    model = load_model(sharded, config, dtype, "cpu", TorchAttentionBackend())
    target = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {target}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    tensors = read_all_tensors(sharded)
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.dense_weight().split(attn.qkv_proj.output_sizes)
    prefix = "model.layers.1."
    assert torch.equal(q, tensors[prefix + "self_attn.q_proj.weight"].to(target))
    assert torch.equal(k, tensors[prefix + "self_attn.k_proj.weight"].to(target))
    assert torch.equal(v, tensors[prefix + "self_attn.v_proj.weight"].to(target))
    gate, up = model.model.layers[1].mlp.gate_up_proj.dense_weight().chunk(2)
    assert torch.equal(gate, tensors[prefix + "mlp.gate_proj.weight"].to(target))
    assert torch.equal(up, tensors[prefix + "mlp.up_proj.weight"].to(target))
    assert torch.equal(attn.k_norm.weight, tensors[prefix + "self_attn.k_norm.weight"].to(target))
    assert model.lm_head is None  # tied: logits use the embedding table


def test_bfloat16_checkpoint_loads_as_float32(sharded, tmp_path):
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    shutil.copy(sharded / "config.json", bf16 / "config.json")
    tensors = {k: v.to(torch.bfloat16) for k, v in read_all_tensors(sharded).items()}
    save_file(tensors, str(bf16 / "model.safetensors"))
    config = ModelConfig.from_dir(bf16)
    model = load_model(bf16, config, "auto", "cpu", TorchAttentionBackend())
    assert model.model.norm.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"].float())


def test_resolve_dtype():
    config = ModelConfig.from_dict(
        json.loads(Qwen3Config(**SMALL, dtype="bfloat16").to_json_string())
    )
    # auto on CPU follows what torch reports: bf16 math where the CPU has bf16 instructions
    # for oneDNN, else bf16 weights with float32 math. Named dtypes mean weights and math alike.
    native = torch_reports_native_bf16()
    auto = resolve_precision("auto", config, "cpu")
    assert auto == Precision(torch.bfloat16, torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("auto", config, "cpu") is auto.compute_dtype
    assert resolve_precision("bfloat16", config, "cpu") == Precision(torch.bfloat16, torch.bfloat16)
    assert resolve_dtype("bfloat16", config, "cpu") is torch.bfloat16
    assert resolve_dtype("float16", config, "cuda") is torch.float16
    assert resolve_dtype(torch.float32, config, "cuda") is torch.float32
    float32_config = ModelConfig.from_dict(
        json.loads(Qwen3Config(**SMALL, dtype="float32").to_json_string())
    )
    assert resolve_precision("auto", float32_config, "cpu") == Precision(
        torch.float32, torch.float32
    )
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", config, "cpu")


def test_bfloat16_weights_with_float32_math(sharded, tmp_path):
    """bf16 weights, float32 activations: parameters stay bf16, the embedding starts float32."""
    config = ModelConfig.from_dir(sharded)
    model = load_model(
        sharded, config, Precision(torch.bfloat16, torch.float32), "cpu", TorchAttentionBackend()
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    embed = model.model.embed_tokens
    hidden = embed(torch.tensor([1, 2, 3]))
    assert hidden.dtype == torch.float32
    assert torch.equal(hidden, embed.dense_weight()[1:4].float())
    assert torch.equal(
        model.model.norm.weight, read_all_tensors(sharded)["model.norm.weight"].bfloat16()
    )


def test_missing_and_unexpected_tensors_are_named(sharded, tmp_path):
    tensors = read_all_tensors(sharded)
    config = ModelConfig.from_dir(sharded)

    def write(name: str, weights: dict[str, torch.Tensor]) -> Path:
        path = tmp_path / name
        path.mkdir()
        shutil.copy(sharded / "config.json", path / "config.json")
        save_file(weights, str(path / "model.safetensors"))
        return path

    lacking = write(
        "lacking", {k: v for k, v in tensors.items() if "layers.0.mlp.up_proj" not in k}
    )
    with pytest.raises(
        ValueError, match=r"missing 1 tensor\(s\): model.layers.0.mlp.up_proj.weight"
    ):
        load_model(lacking, config, "float32", "cpu", TorchAttentionBackend())

    extra = write("extra", {**tensors, "model.layers.2.mlp.up_proj.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_model(extra, config, "float32", "cpu", TorchAttentionBackend())

    resized = write("resized", {**tensors, "model.norm.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(32,\).*\(64,\)"):
        load_model(resized, config, "float32", "cpu", TorchAttentionBackend())


def test_bind_kv_cache_checks_shapes(sharded):
    config = ModelConfig.from_dir(sharded)
    model = load_model(sharded, config, "float32", "cpu", TorchAttentionBackend())
    good = [torch.zeros(4, 16, 2, 16) for _ in range(2)]
    with pytest.raises(ValueError, match="one per layer"):
        model.bind_kv_cache(good[:1], good[:1])
    with pytest.raises(ValueError, match=r"\[num_blocks, block_size, 2, 16\]"):
        model.bind_kv_cache([torch.zeros(4, 16, 4, 16)] * 2, good)
    model.bind_kv_cache(good, good)
