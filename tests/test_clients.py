"""Real agent and structured-output clients, end to end against a one-rank job serving the embedded
SmolLM2 (real uvicorn, the clients' own HTTP stacks): the OpenAI Agents SDK running a function tool over
Chat Completions, instructor in TOOLS and JSON modes, LangChain's `bind_tools` and
`with_structured_output`, and litellm with tools (whole and streamed). instructor pins rich<15 and
jiter<0.15 (which the rest of the suite's openai and textual versions do not meet), so it is not in the
test extra: `make setup` installs it with `--no-deps` (its code runs with the current ones). A 135M
model does not choose tools well on its own, so the calls are forced (`tool_choice` required or named, `response_format`
json_schema): the grammar makes its output parse, so every client gets a well-formed answer."""

from __future__ import annotations

import asyncio
import importlib
import json
import warnings
from typing import Any

import pytest
from pydantic import BaseModel

from tests.jobs import Job

pytestmark = pytest.mark.cluster
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the weather in Paris?"


class Weather(BaseModel):
    """The weather asked about."""

    city: str


@pytest.fixture(scope="module")
def job(job_factory) -> Job:  # type: ignore[no-untyped-def]
    return job_factory.start(1, ["--max-tokens", "200"], "clients")


def base_url(job: Job) -> str:
    return job.url + "/v1"


def client_library(name: str) -> Any:
    """The client, imported without its own import-time warnings (litellm's pydantic models warn)."""
    pytest.importorskip(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def test_openai_agents_sdk_function_tool(job: Job) -> None:
    agents = client_library("agents")
    from openai import AsyncOpenAI

    called: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        called.append(city)
        return f"Sunny in {city}"

    agents.set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=base_url(job), api_key="unused", max_retries=0, timeout=300)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        tools=[get_weather],
        model=agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(agents.Runner.run(agent, QUESTION, max_turns=2))
    assert len(called) == 1 and called[0]
    assert result.final_output == f"Sunny in {called[0]}"


def test_instructor_tools_and_json_schema_modes(job: Job) -> None:
    instructor = client_library("instructor")
    from openai import OpenAI

    raw = OpenAI(base_url=base_url(job), api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "Paris is sunny today. Which city is it about?"}]
    # Mode.JSON (response_format json_object, the schema only in the prompt) is left out: the grammar
    # then makes any JSON object, and a 135M model does not write this one's fields.
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(raw, mode=mode)
        got = client.chat.completions.create(
            model=MODEL,
            response_model=Weather,
            messages=messages,
            temperature=0,
            max_tokens=60,
            max_retries=2,
        )
        assert isinstance(got, Weather) and got.city, mode


def test_langchain_bind_tools_and_structured_output(job: Job) -> None:
    langchain_openai = client_library("langchain_openai")

    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=base_url(job), api_key="unused", temperature=0, max_tokens=60, max_retries=0
    )

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(QUESTION)
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"].get("city"), str)
    streamed: Any = None
    for chunk in llm.bind_tools([get_weather], tool_choice="any").stream(QUESTION):
        streamed = chunk if streamed is None else streamed + chunk
    assert [c["name"] for c in streamed.tool_calls] == ["get_weather"]
    for method in ("json_schema", "function_calling"):
        got = llm.with_structured_output(Weather, method=method).invoke(QUESTION)
        assert isinstance(got, Weather) and got.city, method


@pytest.mark.filterwarnings("ignore::UserWarning")  # litellm's pydantic models, imported lazily on use
def test_litellm_tools(job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub at import
    litellm = client_library("litellm")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    common: dict[str, Any] = {
        "model": f"openai/{MODEL}",
        "api_base": base_url(job),
        "api_key": "unused",
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": tools,
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 60,
    }
    reply = litellm.completion(**common)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(
        json.loads(call.function.arguments)["city"], str
    )
    chunks = list(litellm.completion(**common, stream=True))
    joined = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices
        for tc in (c.choices[0].delta.tool_calls or ())
    )
    assert joined == call.function.arguments  # same prompt, greedy: the same call, streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
