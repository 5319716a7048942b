"""Pieces of llguidance Lark grammars that force a model's native tool-call format.

Argument objects are `%json{...}` sub-grammars built from each tool's parameter schema, with JSON's
whitespace fixed to `json.dumps`' separators: a model left free to add whitespace inside JSON can loop
on it, and the fixed form is the one the models saw in training (their templates render `tojson`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from api.tools.types import function_of, parameters_of

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def marker(text: str, specials: Mapping[str, int]) -> str:
    """A call marker: the special token itself when the tokenizer has one (`<[id]>`), else its text."""
    tid = specials.get(text)
    return f"<[{tid}]>" if tid is not None else lit(text)


def json_args(tool: dict[str, Any]) -> str:
    """`%json{...}` for a tool's arguments (the schema is the root, so its `$ref`s still resolve)."""
    schema = dict(parameters_of(tool))
    schema["x-guidance"] = {**JSON_STYLE, "lenient": True}  # keywords it cannot enforce are not a 400
    return "%json " + json.dumps(schema, ensure_ascii=False)


def selected(tools: list[dict[str, Any]], choice: str) -> list[dict[str, Any]]:
    """The tools a `tool_choice` allows: all for "required", else the one named (ValueError if absent)."""
    if choice == "required":
        chosen = [t for t in tools if function_of(t).get("name")]
    else:
        chosen = [t for t in tools if function_of(t).get("name") == choice]
    if not chosen:
        raise ValueError(f"tool_choice names {choice!r}, which is not among the tools")
    return chosen


def rule_name(index: int) -> str:
    return f"call_{index}"


def repeat(first: str, sep: str, parallel: bool) -> str:
    """`first` once, or one or more times separated by `sep` when parallel."""
    return f"{first} ({sep} {first})*" if parallel else first


_THINK_TEXT = "think_text[lazy]: /(?s:.*)<\\/think>/\n"
THINK_OPTIONAL = 'think: "<think>" think_text ("\\n" | "\\n\\n")?\n' + _THINK_TEXT
THINK_OPEN = 'think: think_text ("\\n" | "\\n\\n")?\n' + _THINK_TEXT


def with_thinking(body: str, thinking: str) -> str:
    """`start:` around `body` (a rule expression): "none" forces the calls at once, "optional" lets a
    thinking model write its `<think>...</think>` block first, "open" is for a prompt that opened the
    block itself (the answer starts inside it)."""
    if thinking == "optional":
        return f"start: think? {body}\n{THINK_OPTIONAL}"
    if thinking == "open":
        return f"start: think {body}\n{THINK_OPEN}"
    return f"start: {body}\n"
