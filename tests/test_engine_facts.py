"""Checkpoint facts decided once (ModelConfig), max_model_len fixed once by the engine and read
by the scheduler and the decode graphs alike, and streamed outputs that carry only deltas."""

from __future__ import annotations

import pytest

from engine import EngineConfig, SamplingParams
from engine.cuda_graphs import DecodeGraphs
from engine.llm_engine import LLMEngine, fix_max_model_len
from engine.model_config import ModelConfig
from engine.outputs import RequestOutput
from engine.tiny import build_config, generation_config, write_checkpoint
from tests.engine_helpers import random_prompts

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}


@pytest.fixture(scope="module")
def yarn_checkpoint(tmp_path_factory):
    """The tiny checkpoint with yarn x4 over 4,096 positions: 16,384 positions after scaling."""
    path = tmp_path_factory.mktemp("tiny-yarn")
    return write_checkpoint(path, shape="tiny", seed=0, rope_scaling=YARN, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def small_vocab_checkpoint(tmp_path_factory):
    """The tiny shape with a 4,096-token vocabulary: a 2,000-step answer stays cheap on a CPU."""
    path = tmp_path_factory.mktemp("tiny-small-vocab")
    return write_checkpoint(path, shape="tiny", seed=0, vocab_size=4096)


def test_model_config_decides_the_checkpoint_facts():
    config = ModelConfig.from_dict(build_config("tiny", rope_scaling=YARN, max_position_embeddings=4096),
                                   generation_config())
    assert config.max_position_embeddings == 4096 and config.max_positions == 16_384
    assert config.eos_token_ids == (151645, 151643)
    assert config.sampling_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    plain = ModelConfig.from_dict(build_config("tiny"))
    assert plain.max_positions == plain.max_position_embeddings and plain.sampling_defaults == {}


def test_fix_max_model_len():
    assert fix_max_model_len(None, 16_384, 100_000) == 16_384  # the checkpoint's positions
    assert fix_max_model_len(None, 16_384, 10_240) == 10_240  # what the pool holds
    assert fix_max_model_len(8_000, 16_384, 10_240) == 8_000
    assert fix_max_model_len(12_000, 16_384, 10_240) == 10_240


def test_yarn_and_a_capped_pool_give_one_max_model_len(yarn_checkpoint):
    """16,384 positions after yarn, a pool of 640 blocks x 16 = 10,240 tokens: the engine fixes
    max_model_len at 10,240 once; the scheduler and the decode graphs' block tables read it."""
    engine = LLMEngine(EngineConfig(model=str(yarn_checkpoint), num_kv_blocks=640))
    assert engine.model_config.max_positions == 16_384
    assert engine.max_model_len == 10_240
    assert engine.scheduler.max_model_len == engine.runner.max_model_len == 10_240
    graphs = engine.runner.decode_graphs()  # the buffers allocate() would capture on CUDA
    assert isinstance(graphs, DecodeGraphs) and not graphs.graphs
    assert graphs.max_seq_len == 10_240
    assert graphs.max_blocks == graphs.block_tables.shape[1] == 10_240 // 16
    # The generation defaults are the ones ModelConfig read.
    assert engine.generation_defaults == engine.model_config.sampling_defaults
    assert engine.eos_token_ids == list(engine.model_config.eos_token_ids)

    # Past max_position_embeddings but within the yarn range: allowed (and served as asked).
    longer = LLMEngine(EngineConfig(model=str(yarn_checkpoint), max_model_len=6_000, num_kv_blocks=640))
    assert longer.max_model_len == longer.scheduler.max_model_len == longer.runner.max_model_len == 6_000
    assert longer.runner.decode_graphs().block_tables.shape[1] == -(-6_000 // 16)
    with pytest.raises(ValueError, match="6001 tokens, more than max_model_len 6000"):
        longer.add_request([1] * 6_001)
    with pytest.raises(ValueError, match="16384 positions"):
        LLMEngine(EngineConfig(model=str(yarn_checkpoint), max_model_len=16_385))


def test_a_2000_token_answer_streams_only_its_new_ids(small_vocab_checkpoint):
    engine = LLMEngine(EngineConfig(model=str(small_vocab_checkpoint)))
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True, logprobs=1)
    rid = engine.add_request(random_prompts([20], seed=3, vocab=4096)[0], params)
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs.extend(o for o in engine.step() if o.request_id == rid)
    *streamed, final = outputs
    assert final.finished and final.finish_reason == "length"
    assert len(streamed) >= 1999
    for i, out in enumerate(streamed):
        assert not out.finished
        assert len(out.delta_token_ids) <= 1
        assert out.token_ids == [] and out.text == "" and out.logprobs is None  # no cumulative copy
        assert out.delta_logprobs is not None and len(out.delta_logprobs) == len(out.delta_token_ids)
        assert out.num_generated_tokens == i + 1
    ids = [t for out in outputs for t in out.delta_token_ids]
    assert len(final.token_ids) == 2000 and final.token_ids == ids
    assert final.text == "".join(out.delta_text for out in outputs)
    assert final.logprobs is not None and len(final.logprobs) == 2000
    assert final.logprobs == [lp for out in outputs for lp in out.delta_logprobs or []]
    assert all(final.token_ids[i] in lp for i, lp in enumerate(final.logprobs))
    assert final.num_generated_tokens == 2000


def test_prefill_progress_outputs_carry_no_answer(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), max_num_batched_tokens=64))
    rid = engine.add_request(random_prompts([200], seed=4)[0], SamplingParams(max_tokens=3, logprobs=0))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(o for o in engine.step() if o.request_id == rid)
    progress = [o for o in outputs if o.first_token_time is None]
    assert [o.num_computed_prompt_tokens for o in progress] == [64, 128, 192]
    assert all(o.delta_token_ids == [] and o.delta_logprobs == [] and o.token_ids == [] for o in progress)
    final = outputs[-1]
    assert final.finished and len(final.token_ids) == 3 and len(final.logprobs or []) == 3
    # logprobs=0: only the sampled token's log-probability.
    assert all(list(lp) == [t] for lp, t in zip(final.logprobs or [], final.token_ids))

