"""The values the tool-call parsers hand to the routes: calls, a whole parsed answer, stream deltas."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal

DeltaKind = Literal["content", "reasoning", "tool_call"]
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call; `arguments` is JSON text of an object, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Parsed:
    """A whole answer split apart. `content` is None when the answer is only calls (OpenAI's shape);
    `reasoning` is None when the model did not think in `<think>...</think>`."""

    content: str | None
    reasoning: str | None
    tool_calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of a streamed answer. For `tool_call`, the first delta of call `index` carries `id` and
    `name` (and empty `text`); the deltas after it carry argument fragments in `text`."""

    kind: DeltaKind
    text: str = ""
    index: int = 0
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class FoundCall:
    """A call a format found in the text, before it gets an id."""

    name: str
    arguments: str


def openai_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Mistral's templates refuse ids that are not 9 alphanumeric characters."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def function_of(tool: Any) -> dict[str, Any]:
    """The `function` object of an OpenAI tool (or the tool itself when it is already one)."""
    if isinstance(tool, dict):
        fn = tool.get("function", tool)
        if isinstance(fn, dict):
            return fn
    return {}


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    return {str(function_of(t).get("name")) for t in tools or () if function_of(t).get("name")}


def parameters_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameter schema; a tool without one takes an empty object."""
    params = function_of(tool).get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def arguments_json(value: Any) -> str | None:
    """Arguments as JSON text of an object, or None when they are not an object. A model that writes the
    arguments as a JSON string holding an object (some do) gets that object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


def call_from_object(obj: Any, names: frozenset[str], args_keys: tuple[str, ...]) -> FoundCall | None:
    """A call out of a decoded JSON object `{"name": ..., <args key>: {...}}`, or None when it is not
    one (no name, arguments not an object, a name outside `names` when `names` is not empty)."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name or (names and name not in names):
        return None
    key = next((k for k in args_keys if k in obj), None)
    args = arguments_json(obj.get(key) if key else None)
    return None if args is None else FoundCall(name, args)
