"""Structured output and forced tool calls on the random-weight tiny checkpoint: the grammar
(xgrammar) decides the shape, whatever the weights. Engine level (the mask in the batched
step, per request) and through the API with the official `openai` client."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine.structured_output import StructuredOutputParams, apply_grammar_bitmasks
from tests.api_helpers import api_server

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast of a city.",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a timezone.",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


# ---- engine -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=256, max_model_len=1024)


def test_batched_step_masks_only_the_constrained_rows(llm):
    prompts = ["Hello", "The weather", "One two", "Colours:"]
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(prompts, plain)
    choice = StructuredOutputParams(choice=["yes", "no", "maybe so"])
    mixed = [plain, SamplingParams(temperature=0.0, max_tokens=8, structured_output=choice)] * 2
    together = llm.generate(prompts, mixed)
    # Rows without a grammar are untouched by their constrained batch mates.
    assert [together[0].token_ids, together[2].token_ids] == [
        alone[0].token_ids,
        alone[2].token_ids,
    ]
    for out in (together[1], together[3]):
        assert out.text in choice.choice and out.finish_reason == "stop"


def test_schema_output_validates_and_the_request_ends_with_its_grammar(llm):
    params = SamplingParams(
        temperature=1.0, seed=7, max_tokens=64, structured_output=StructuredOutputParams(json=WEATHER_SCHEMA)
    )
    for out in llm.generate(["a", "b", "c"], params):
        jsonschema.validate(json.loads(out.text), WEATHER_SCHEMA)
        assert out.finish_reason == "stop"


def test_padded_vocabulary_ids_are_masked(llm):
    engine = llm.engine
    state = engine.structured_output.new_state(StructuredOutputParams(json_object=True))
    vocab = engine.model_config.vocab_size
    assert vocab > engine.tokenizer.vocab_size  # Qwen3 pads its embedding
    logits = torch.zeros(2, vocab)
    masked = apply_grammar_bitmasks(logits, [None, state])
    assert torch.equal(masked[0], logits[0]) and torch.equal(logits, torch.zeros(2, vocab))
    allowed = torch.isfinite(masked[1]).nonzero().view(-1).tolist()
    assert allowed and all(t < engine.tokenizer.vocab_size for t in allowed)
    assert {engine.tokenizer.decode([t]).strip()[:1] for t in allowed} <= {"{", ""}


def test_invalid_grammars_are_refused_naming_the_problem(llm):
    manager = llm.engine.structured_output
    with pytest.raises(ValueError, match="minimum"):
        manager.compile(StructuredOutputParams(json={"type": "integer", "minimum": "zero"}))
    with pytest.raises(ValueError, match="regex"):
        manager.compile(StructuredOutputParams(regex="(unclosed"))


def test_compiled_grammars_are_cached(llm):
    manager = llm.engine.structured_output
    params = StructuredOutputParams(regex=r"[0-9]{4}")
    assert manager.compile(params) is manager.compile(StructuredOutputParams(regex=r"[0-9]{4}"))


# ---- API ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with api_server(tiny_checkpoint) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture
def model(server) -> str:
    return str(server.engine.config.model)


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_gives_a_valid_call(client, model, seed):
    done = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=1.0,
        seed=seed,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1 and not choice.message.content
    check_call(choice.message.tool_calls[0])


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_function_is_called_with_valid_arguments(client, model, name):
    done = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": name}},
        max_tokens=80,
        temperature=1.0,
        seed=5,
    )
    calls = done.choices[0].message.tool_calls
    assert done.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == [name]
    check_call(calls[0])


def test_streamed_tool_call_reassembles_to_the_same_call(client, model):
    kwargs = dict(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
        logprobs=True,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons = []
    logprobs = 0
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        logprobs += len(choice.logprobs.content) if choice.logprobs else 0
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
    assert reasons[-1] == "tool_calls"
    assert logprobs > 0  # the calls' tokens keep their logprobs when streamed
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (
        whole.function.name,
        whole.function.arguments,
    )
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_SCHEMA)


def test_tool_results_in_the_history_are_rendered(client, server, model):
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "days": 3, "metric": true}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."},
    ]
    done = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, max_tokens=5, temperature=0
    )
    tokenizer = server.engine.tokenizer
    text = tokenizer.render_chat_template(history, tools=TOOLS)
    assert "<tool_response>\nSunny, 21 C.\n</tool_response>" in text
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert done.usage.prompt_tokens == len(tokenizer.encode(text))
    assert done.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_tool_choice_on_plain_text_keeps_it_as_content(client, model):
    done = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, max_tokens=6, temperature=0
    )
    message = done.choices[0].message
    assert message.tool_calls in (None, []) and isinstance(message.content, str)


def test_response_format_json_schema(client, model):
    for strict in (True, False):
        done = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "forecast", "schema": WEATHER_SCHEMA, "strict": strict},
            },
            max_tokens=64,
            temperature=1.0,
            seed=11,
        )
        jsonschema.validate(json.loads(done.choices[0].message.content), WEATHER_SCHEMA)
        assert done.choices[0].finish_reason == "stop"


def test_response_format_json_object_streams_an_object(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("{")


def test_guided_choice_and_regex(client, model):
    colours = ["red", "green", "light blue"]
    for seed in range(3):
        done = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_choice": colours},
        )
        assert done.choices[0].message.content in colours
    text = client.completions.create(
        model=model,
        prompt="A date:",
        max_tokens=20,
        temperature=1.0,
        seed=3,
        extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"},
    )
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", text.choices[0].text)
    grammar = client.completions.create(
        model=model,
        prompt="Say",
        max_tokens=10,
        temperature=0,
        extra_body={"guided_grammar": 'root ::= "ab" | "cd" [0-9]'},
    )
    assert re.fullmatch(r"ab|cd[0-9]", grammar.choices[0].text)


def test_guided_json_matches_its_schema(client, model):
    done = client.completions.create(
        model=model,
        prompt="JSON:",
        max_tokens=64,
        temperature=0.7,
        seed=1,
        extra_body={"guided_json": WEATHER_SCHEMA},
    )
    jsonschema.validate(json.loads(done.choices[0].text), WEATHER_SCHEMA)


@pytest.mark.parametrize(
    "extra, param, words",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format.json_schema.schema",
            "objekt",
        ),
        (
            {"guided_json": {"type": "object", "properties": {"n": {"minimum": "zero"}}}},
            "guided_json",
            "minimum",
        ),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_regex": "x", "guided_choice": ["a"]}, "guided_regex", "at most one"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
            "nope",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
    ],
)
def test_invalid_requests_get_400_naming_the_problem(client, model, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=4, extra_body=extra
        )
    assert info.value.body["param"] == param
    assert words in info.value.message


def test_uncompilable_regex_gets_400(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=model, prompt="x", max_tokens=4, extra_body={"guided_regex": "(unclosed"}
        )
    assert "regex" in info.value.message
