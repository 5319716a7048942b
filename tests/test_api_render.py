"""A chat choice's text as OpenAI's message and stream deltas (api/render.ChatOutput) over TOOLS' real
OutputParser, no model: calls become `tool_calls` (first delta: index, id, type, name, empty arguments;
then argument fragments), a choice with calls finishes "tool_calls", and parallel_tool_calls false keeps
the first call only."""

from __future__ import annotations

import json
from typing import Any

from api.render import ChatOutput
from api.tools import OutputParser, SmolLM2

TEXT = '<tool_call>[\n{"name": "a", "arguments": {"x": 1}},\n{"name": "b", "arguments": {}}\n]</tool_call>'


def output(max_calls: int | None = None) -> ChatOutput:
    return ChatOutput(OutputParser(SmolLM2(), True, False, {"a", "b"}), max_calls=max_calls)


def streamed(out: ChatOutput, text: str, step: int) -> list[dict[str, Any]]:
    deltas = []
    for i in range(0, len(text), step):
        deltas += out.feed(text[i : i + step])
    return deltas + out.finish()


def test_calls_whole_and_streamed_agree_for_any_chunking() -> None:
    whole = output()
    message = whole.message(TEXT)
    assert message["content"] is None and whole.reason("stop") == "tool_calls"
    expected = [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
    ]
    assert expected == [("a", {"x": 1}), ("b", {})]
    for step in (1, 2, 5, len(TEXT)):
        out = output()
        calls: dict[int, dict[str, str]] = {}
        for delta in streamed(out, TEXT, step):
            assert set(delta) == {"tool_calls"}
            (call,) = delta["tool_calls"]
            if "id" in call:
                assert call["type"] == "function" and call["function"]["arguments"] == ""
                calls[call["index"]] = {"name": call["function"]["name"], "arguments": ""}
            else:
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected
        assert out.reason("stop") == "tool_calls" and out.reason("length") == "length"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    assert len(output(max_calls=1).message(TEXT)["tool_calls"]) == 1
    indexes = {d["tool_calls"][0]["index"] for d in streamed(output(max_calls=1), TEXT, 3)}
    assert indexes == {0}


def test_text_without_a_parser_is_the_content() -> None:
    out = ChatOutput()
    assert out.feed("hi") == [{"content": "hi"}] and out.feed("") == [] and out.finish() == []
    assert out.message("hi")["content"] == "hi" and out.reason("stop") == "stop"
    broken = output()
    assert broken.message("<tool_call>[{oops")["content"] == "<tool_call>[{oops"  # never dropped
    assert broken.reason("stop") == "stop"
