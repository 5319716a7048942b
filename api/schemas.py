"""Request bodies of the OpenAI API, validated with pydantic (bounded: lengths and ranges checked).

Unknown fields are accepted and ignored, as OpenAI-compatible servers do for forward compatibility;
fields we know but cannot honour are rejected with a 400 that names them (see `unsupported`).

Every number has a finite range, shown in the OpenAPI schema (/docs): Python's JSON parser reads 1e400
as infinity and accepts NaN, and either would turn into NaN logprobs (invalid JSON for the client) in
the sampler's arithmetic. Integers stay within 32 bits (seeds within 64) so they fit MLX and msgpack.
Strings must be valid Unicode, and a chat holds at most --max-messages messages: `screen_body` checks
both before these models read the body (pydantic takes over a second on 250,000 small messages).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from api.errors import APIError

INT32_MAX = 2**31 - 1
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (the sampler's threshold, rank/sampler.py)
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128  # OpenAI's limit
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each with n choices)

Temperature = Annotated[
    float,
    Field(
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description=f"0 (or under {GREEDY_BELOW:g}) picks the most likely token",
    ),
]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX, description="at most the server's --max-tokens")]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = Field(default=None, max_length=16384)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: the schema under `schema` (alias: it shadows pydantic)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """Fields chat and completions share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(
        default=None, min_length=1, max_length=256, description="omitted: the base model"
    )
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX, description="-1 or 0: off")
    min_p: Probability | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0, allow_inf_nan=False)
    logit_bias: dict[str, Bias] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS_TOKENS, description="token id (a string) to a bias"
    )
    user: str | None = Field(default=None, max_length=512)
    # vLLM's extension: logprob tokens as "token_id:<id>", exact where bytes do not form characters.
    return_tokens_as_token_ids: bool = False
    # vLLM's sampling extensions (docs/api.md)
    ignore_eos: bool = Field(default=False, description="EOS does not end the output (max_tokens does)")
    min_tokens: int = Field(
        default=0, ge=0, le=INT32_MAX, description="no EOS, stop id or stop string before this many tokens"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS, description="token ids that end the output like EOS"
    )
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Orchard's: false keeps this request out of speculative decoding (its output is the same either way)
    speculative: bool = Field(default=True, description="false: never verify drafted tokens (--spec)")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="at most the server's --max-messages")
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(
        default=None, max_length=MAX_TOOLS, json_schema_extra={"deprecated": True}
    )
    function_call: str | dict[str, Any] | None = Field(default=None, json_schema_extra={"deprecated": True})
    # vLLM's: extra variables for the chat template (Qwen 3's enable_thinking), and whether the reply
    # splits the model's <think> block into reasoning_content
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"one prompt, or a list of at most {MAX_PROMPTS} (choices in order: prompt, then n)"
    )
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=INT32_MAX)


# A UTF-16 surrogate code point: JSON decoding joins valid pairs ("\ud83d\ude00"), so one left in a
# string was alone, and cannot be encoded (the tokenizer raises, a JSON response fails).
_SURROGATE = re.compile("[\ud800-\udfff]")
# Where one can come from in a body that is valid UTF-8: a \uD800-\uDFFF escape (valid pairs included).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate_at(value: Any) -> str | None:
    """The path ("messages.0.content") of a string or key of parsed JSON that holds a lone surrogate, or
    None. Keys in the path are escaped, so the path itself can go into an error message."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, sub in item.items():
                name = _printable(str(key))
                path = f"{where}.{name}" if where else name
                if _SURROGATE.search(str(key)):
                    return path
                stack.append((path, sub))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), sub) for i, sub in enumerate(item))
    return None


def _printable(text: str) -> str:
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


async def screen_body(request: Request) -> None:
    """The routes' dependency, run before pydantic: invalid Unicode anywhere in the body is a 400 (a lone
    surrogate made the tokenizer raise: a 500). FastAPI has read and parsed the body already (starlette
    keeps both), so this costs a UTF-8 check and a byte scan; the walk runs only when an escape is seen."""
    raw = await request.body()
    try:
        raw.decode("utf-8")  # json.loads lets UTF-8-encoded surrogates through ("surrogatepass")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_unicode"
        ) from None
    if SURROGATE_ESCAPE.search(raw):
        where = lone_surrogate_at(await _parsed(request))
        if where is not None:
            raise APIError(
                400,
                f"{where}: a lone UTF-16 surrogate is not valid Unicode",
                param=where,
                code="invalid_unicode",
            )


async def screen_chat_body(request: Request) -> None:
    """`screen_body`, then the number of messages, counted before any of them is validated or rendered."""
    await screen_body(request)
    data = await _parsed(request)
    messages = data.get("messages") if isinstance(data, dict) else None
    limit: int = request.app.state.service.config.limits.max_messages
    if isinstance(messages, list) and len(messages) > limit:
        raise APIError(
            400,
            f"{len(messages)} messages are over this server's limit of {limit}",
            param="messages",
            code="too_many_messages",
        )


async def _parsed(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, RecursionError):
        return None  # not JSON (sent as another content type): the model's validation says so
