"""The OpenAPI document as the server behaves: the statuses each route sends (400 for every invalid body,
never FastAPI's 422), OpenAI's error object, the response bodies, and `text/event-stream` for streams.
A schemathesis run against a live server checks it (tests/test_openapi.py). These models only describe
responses; the routes build their dicts (api/render.py)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorObject(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Open):
    """OpenAI's error shape, for every status other than 200."""

    error: ErrorObject


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(_Open):
    name: str
    arguments: str  # JSON text


class ToolCall(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls"] | str | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_EVENT_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}
_STREAMED = (
    "the completion; with stream: true, server-sent events: `data: <chunk JSON>`, `: keep-alive` comments "
    "while the request waits, then `data: [DONE]`"
)
_COMMON: dict[int | str, dict[str, Any]] = {
    401: _error("missing or wrong API key (servers started with --api-key)"),
    403: _error("Host not allowed (a loopback server without API keys answers loopback names only)"),
}
_GENERATE: dict[int | str, dict[str, Any]] = {
    **_COMMON,
    400: _error("invalid request: a field's value, a limit of this server, or an unsupported feature"),
    404: _error("no such model (or adapter)"),
    408: _error("the request body was not sent in time"),
    413: _error("request body over --max-body-bytes"),
    429: _error("the queue is full (Retry-After)"),
    503: _error("the server is draining, starting or failed, or has too many connections (Retry-After)"),
    504: _error("the request did not finish within --request-timeout"),
}
_REQUEST_ID = {
    "x-request-id": {
        "description": "the response's id (as in its body and the request log)",
        "schema": {"type": "string"},
    }
}
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ChatCompletion,
        "content": _EVENT_STREAM,
        "description": _STREAMED,
        "headers": _REQUEST_ID,
    },
    **_GENERATE,
}
COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Completion, "content": _EVENT_STREAM, "description": _STREAMED, "headers": _REQUEST_ID},
    **_GENERATE,
}
MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"model": ModelList}, **_COMMON}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ModelCard},
    404: _error("no such model"),
    **_COMMON,
}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"description": "the engine failed (/health) or does not admit requests (/health/ready)"}
}


def install_openapi(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers those with 400 (OpenAI's
    status), documented per route above, so the 422 and its schemas are dropped from the document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema.get("paths", {}).values():
            for op in path.values():
                if isinstance(op, dict):
                    op.get("responses", {}).pop("422", None)
        comps = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
