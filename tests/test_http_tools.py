"""Tool calls and structured output over HTTP (issue #15) against a real one-rank job on the embedded
SmolLM2 (its template has no tools section: the smollm2 format's system prompt teaches it), with the
official client: `required` and named calls always parse and validate (the grammar forces them),
streamed calls joined equal the whole answer's, response_format output validates against its schema,
and what cannot be enforced is a 400 before anything is queued."""

from __future__ import annotations

import concurrent.futures as cf
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.jobs import Job

pytestmark = pytest.mark.cluster
NAME = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def job(job_factory) -> Job:  # type: ignore[no-untyped-def]
    return job_factory.start(1, ["--max-batch", "4", "--max-tokens", "200"], "http-tools")


def client(job: Job) -> openai.OpenAI:
    return openai.OpenAI(base_url=job.url + "/v1", api_key="unused", max_retries=0, timeout=180)


def schema_of(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def test_required_and_named_calls_always_parse_and_validate(job: Job) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    cases: list[tuple[int, Any]] = [(seed, choice) for seed in range(2) for choice in ("required", named)]

    def one(case: tuple[int, Any]) -> Any:
        seed, choice = case
        return client(job).chat.completions.create(
            model=NAME,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=120,
            seed=seed,
            temperature=1.0,
        )

    with cf.ThreadPoolExecutor(4) as pool:  # --max-batch 4: one batch, the grammar per sequence
        answers = list(pool.map(one, cases))
    for (_, choice), r in zip(cases, answers, strict=True):
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        calls = c.message.tool_calls or []
        assert calls and c.message.content is None
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            if isinstance(choice, dict):
                assert call.function.name == "add"
            jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))


def test_streamed_calls_joined_equal_the_whole_answer(job: Job) -> None:
    body = {
        "model": NAME,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 120,
        "seed": 4,
    }
    whole = client(job).chat.completions.create(**body)  # type: ignore[call-overload]
    calls: dict[int, dict[str, str]] = {}
    reasons, usage, after_finish = [], None, []
    for chunk in client(job).chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    ):
        if reasons:
            after_finish.append(chunk)
        usage = chunk.usage or usage
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # the first delta of a call: index, id, type and name
                    assert d.type == "function" and d.function and d.function.name and d.index not in calls
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                elif d.function and d.function.arguments:
                    calls[d.index]["arguments"] += d.function.arguments
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["tool_calls"]
    assert [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls or []] == [
        (calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)
    ]
    assert usage is not None and len(after_finish) == 1 and not after_finish[0].choices  # then usage
    assert whole.usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_response_format_output_validates(job: Job) -> None:
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client(job).chat.completions.create(
        model=NAME,
        messages=ask,
        response_format=fmt,
        n=3,
        max_tokens=80,
        seed=1,
        temperature=1.0,  # type: ignore[arg-type]
    )
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content or ""), PERSON)
    obj = client(job).chat.completions.create(
        model=NAME, messages=ask, response_format={"type": "json_object"}, max_tokens=80, seed=2
    )
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_a_tool_history_renders_and_tool_choice_none_answers_in_text(job: Job) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "unit": "celsius"}'},
    ]
    r = client(job).chat.completions.create(
        model=NAME, messages=history, tools=TOOLS, max_tokens=40, temperature=0
    )  # type: ignore[arg-type]
    assert r.choices[0].message.content
    none = client(job).chat.completions.create(
        model=NAME, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=30, temperature=0
    )
    assert none.choices[0].finish_reason in ("stop", "length") and not none.choices[0].message.tool_calls


def test_what_cannot_be_enforced_is_a_400_before_queueing(job: Job) -> None:
    def error(extra: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(job.url + CHAT, json={"messages": ASK, **extra}, timeout=60)
        assert r.status_code == 400, r.text
        return dict(r.json()["error"])

    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    assert error({"response_format": bad_schema})["param"] == "response_format"
    assert error({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})["param"]
    assert error({"response_format": {"type": "yaml"}})["param"] == "response_format.type"
    assert error({"tool_choice": "required"})["param"] == "tool_choice"
    named = {"type": "function", "function": {"name": "nope"}}
    assert error({"tools": TOOLS, "tool_choice": named})["param"] == "tool_choice"
    bogus = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"type": "bogus"}}},
            },
        }
    ]
    assert error({"tools": bogus, "tool_choice": "required"})["param"] == "tools"
    assert error({"functions": [{"name": "f"}]})["code"] == "unsupported_parameter"
    assert error({"chat_template_kwargs": {"messages": []}})["param"] == "chat_template_kwargs"
    stats = httpx.get(job.url + "/health").json()["engine_stats"]
    assert stats["running"] == 0 and stats["waiting"] == 0


THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
    "{% endif %}"
)


def test_reasoning_content_of_a_model_whose_template_opens_thinking(
    job_factory, tiny_model, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A template that opens `<think>` for the model: the answer starts as reasoning, split out of the
    content (the tiny random model never closes the block), streamed as reasoning_content deltas, and
    dropped with include_reasoning false."""
    import shutil

    model = tmp_path / "thinker"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": THINKING_TEMPLATE}))
    job = job_factory.start(1, ["--model", str(model), "--served-model-name", "thinker"], "thinker")
    body = {"messages": ASK, "max_tokens": 12, "temperature": 0, "logit_bias": {"2": -100}}
    r = httpx.post(job.url + CHAT, json=body, timeout=60).json()
    message = r["choices"][0]["message"]
    assert message["reasoning_content"] and not message["content"]
    streamed = ""
    with httpx.stream("POST", job.url + CHAT, json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    assert not c["delta"].get("content")
                    streamed += c["delta"].get("reasoning_content") or ""
    assert streamed == message["reasoning_content"]
    hidden = httpx.post(job.url + CHAT, json={**body, "include_reasoning": False}, timeout=60).json()
    assert "reasoning_content" not in hidden["choices"][0]["message"]
    job.stop()
