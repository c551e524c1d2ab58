"""Issue 17: agents written with LangChain work against the API, on random weights.

`ChatOpenAI(...).bind_tools(..., tool_choice=...)` and `with_structured_output(Model)` (both of
its methods: OpenAI's json_schema response_format and a forced function call) are decoded
under xgrammar, so what LangChain parses is well-formed and validates, whatever the weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from tests.api_helpers import api_server

langchain_openai = pytest.importorskip("langchain_openai")


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(description="the city's name", max_length=20)
    celsius: int = Field(ge=-50, le=60)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with api_server(tiny_checkpoint, dtype="float32", max_num_seqs=4) as live:
        yield live


@pytest.fixture
def llm(server):
    return langchain_openai.ChatOpenAI(
        model=Path(str(server.engine.config.model)).name,
        base_url=server.url + "/v1",
        api_key="none",
        temperature=0.7,
        max_tokens=200,
        max_retries=0,
    )


class get_weather(BaseModel):  # noqa: N801 (a tool is named by its class)
    """Get the weather in a city."""

    city: str = Field(max_length=20)


@pytest.mark.parametrize("seed", range(3))
def test_bind_tools_forced_call_is_parsed_by_langchain(llm, seed):
    bound = llm.bind_tools([get_weather], tool_choice="get_weather").bind(seed=seed)
    message = bound.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) >= 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert call["id"].startswith("call_")
    assert message.invalid_tool_calls == []


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("seed", range(3))
def test_with_structured_output_validates(llm, method, seed):
    structured = llm.bind(seed=seed).with_structured_output(Weather, method=method)
    answer = structured.invoke("Describe the weather in Rome.")
    assert isinstance(answer, Weather)
    assert -50 <= answer.celsius <= 60
