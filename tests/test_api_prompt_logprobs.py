"""vLLM's `prompt_logprobs` (issue 17): every prompt token's log-probability and the top N at
each position, checked against transformers' Qwen3 on the same float32 weights within 1e-4,
for a text completion and for a chat, with and without a cached prefix.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from tests.api_helpers import api_server

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with api_server(tiny_checkpoint, dtype="float32", max_num_seqs=4) as live:
        yield live


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def check(values, ids: list[int], hf, top_n: int) -> None:
    assert len(values) == len(ids) and values[0] is None
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    for p in range(1, len(ids)):
        row = log_probs[p - 1]
        want_top = row.topk(top_n)
        position = {int(k): v for k, v in values[p].items()}
        got = position[ids[p]]
        assert abs(got["logprob"] - row[ids[p]].item()) < TOLERANCE
        rank = int((row > row[ids[p]]).sum()) + 1
        assert got["rank"] == (rank if rank <= top_n else None)
        for r, (token, value) in enumerate(
            zip(want_top.indices.tolist(), want_top.values.tolist())
        ):
            assert abs(position[token]["logprob"] - value) < TOLERANCE
            assert position[token]["rank"] == r + 1
        assert set(position) <= set(want_top.indices.tolist()) | {ids[p]}


@pytest.mark.parametrize("cached", [False, True])
def test_completion_prompt_logprobs_match_transformers(client, server, hf, cached):
    model = Path(str(server.engine.config.model)).name
    ids = server.engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    if cached:  # the same prompt once before: its blocks are in the prefix cache
        client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0)
    done = client.completions.create(
        model=model, prompt=ids, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 3}
    )
    choice = done.choices[0].model_dump()
    check(choice["prompt_logprobs"], ids, hf, 3)


def test_chat_prompt_logprobs_are_on_the_response(client, server, hf):
    model = Path(str(server.engine.config.model)).name
    messages = [{"role": "user", "content": "Name a colour."}]
    done = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=1,
        temperature=0,
        extra_body={"prompt_logprobs": 0},
    )
    ids = server.engine.tokenizer.encode_chat(messages)
    check(done.model_dump()["prompt_logprobs"], ids, hf, 0)


@pytest.mark.parametrize(
    "extra",
    [
        {"prompt_logprobs": 2, "stream": True},
        {"prompt_logprobs": 21},
        {"prompt_logprobs": 2, "echo": True, "logprobs": 1},
    ],
)
def test_prompt_logprobs_refusals_name_the_field(client, server, extra):
    model = Path(str(server.engine.config.model)).name
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hi", max_tokens=1, extra_body=extra)
    assert err.value.body["param"] == "prompt_logprobs"
