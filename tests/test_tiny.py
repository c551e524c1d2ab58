"""engine.tiny writes checkpoints that transformers itself loads and runs."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch
from safetensors import safe_open

from engine.tiny import build_config, main, weight_shapes, write_checkpoint


def _hf_model(path, **kwargs):
    from transformers import Qwen3ForCausalLM

    model, info = Qwen3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True, **kwargs
    )
    return model.eval(), info


def _assert_complete(info):
    # Every HF parameter came from the file and every tensor in the file was used.
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]


def test_tiny_checkpoint_files_and_configs(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    assert config["eos_token_id"] == 151645 and config["bos_token_id"] is None
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (2, 128, 32)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["vocab_size"] == 151936 and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32"
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.7, 0.8, 20)

    from transformers import GenerationConfig, Qwen3Config

    hf_config = Qwen3Config.from_pretrained(tiny_checkpoint)
    assert hf_config.intermediate_size == 384 and hf_config.max_position_embeddings == 32768
    assert GenerationConfig.from_pretrained(tiny_checkpoint).eos_token_id == [151645, 151643]

    with safe_open(tiny_checkpoint / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert "lm_head.weight" not in keys  # tied
    assert {n for n, _, _ in weight_shapes(config)} == keys
    assert 0.5 < float(norm.mean()) < 1.5 and float(norm.std()) > 0  # around 1, not all ones


def test_tiny_loads_in_transformers_and_generates_varied_text(tiny_checkpoint):
    model, info = _hf_model(tiny_checkpoint)
    _assert_complete(info)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Two prompts of equal length in one batch: no padding needed.
    prompts = torch.tensor([[9707, 11, 1246, 525, 498, 30], [104169, 109432, 750, 282, 2075, 982]])
    with torch.inference_mode():
        out = model.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=151643)
        logits = model(prompts).logits[:, -1]
    for row in out[:, prompts.shape[1] :].tolist():
        assert len(set(row)) >= 4, row  # random weights, yet greedy is not a constant token
    assert torch.isfinite(logits).all() and float(logits.std()) > 0.5


def test_config_overrides_untied_bias_and_other_head_dim(tmp_path):
    path = write_checkpoint(
        tmp_path / "untied",
        seed=1,
        vocab_size=4096,
        hidden_size=64,
        head_dim=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=96,
        num_hidden_layers=3,
        tie_word_embeddings=False,
        attention_bias=True,
    )
    config = json.loads((path / "config.json").read_text())
    assert config["max_window_layers"] == 3
    model, info = _hf_model(path)
    _assert_complete(info)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[2].self_attn.k_proj.weight.shape == (64, 64)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with safe_open(path / "model.safetensors", framework="pt") as f:
        lm_head = f.get_tensor("lm_head.weight")
    torch.testing.assert_close(model.lm_head.weight, lm_head, rtol=0, atol=0)
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 4096)


def test_seed_determines_weights_and_bf16_storage(tmp_path):
    small = {"vocab_size": 512, "num_hidden_layers": 1, "torch_dtype": "bfloat16"}
    a = write_checkpoint(tmp_path / "a", seed=7, **small)
    b = write_checkpoint(tmp_path / "b", seed=7, **small)
    c = write_checkpoint(tmp_path / "c", seed=8, **small)
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2]
    with safe_open(a / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16
    model, info = _hf_model(a)
    _assert_complete(info)


@pytest.mark.parametrize(
    ("shape", "params_billion"),
    [("qwen3-0.6b", 0.596), ("qwen3-4b", 4.02)],
)
def test_large_shapes_match_transformers_parameters(shape, params_billion):
    """The real shapes' tensor names and sizes equal what transformers builds from the config."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = build_config(shape)
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    hf_config = Qwen3Config(**{k: v for k, v in config.items() if k != "transformers_version"})
    with torch.device("meta"):
        reference = Qwen3ForCausalLM(hf_config)
    expected = {n: tuple(p.shape) for n, p in reference.state_dict().items()}
    expected.pop("lm_head.weight")  # tied: not stored, like the published checkpoints
    ours = {name: shape_ for name, shape_, _ in weight_shapes(config)}
    assert ours == expected
    total = sum(torch.Size(s).numel() for s in ours.values())
    assert abs(total / 1e9 - params_billion) < 0.01


def test_cli_writes_a_checkpoint_transformers_runs(tmp_path):
    out = tmp_path / "cli"
    main([str(out), "--shape", "tiny", "--seed", "3"])
    model, info = _hf_model(out)
    _assert_complete(info)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[9707, 1879]])).logits).all()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--shape", "huge"])


def test_module_runs_as_a_command(monkeypatch, capsys):
    """`python -m engine.tiny` reaches main() (run in-process: a new interpreter costs seconds)."""
    monkeypatch.setattr(sys, "argv", ["engine.tiny", "--help"])
    monkeypatch.delitem(sys.modules, "engine.tiny", raising=False)  # run it fresh as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("engine.tiny", run_name="__main__")
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert "--shape" in usage and "qwen3-4b" in usage and "--seed" in usage
