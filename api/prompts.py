"""Chat templates and tokenizing, run off uvicorn's event loop.

A 4 MiB body takes from a tenth of a second to seconds to render and tokenize; on the event loop that
stalls every stream and `/health` for as long. The loop hands that work to `PromptPool` and awaits it.

Two lanes of one thread each, chosen by the size of the input: a small prompt never queues behind a
large one, and large prompts (a 4 MiB body costs seconds, often to be refused as too long) never take
more than one core from the engine thread. Jinja holds the GIL while it renders, but the interpreter hands
the GIL back to the loop every few milliseconds; the tokenizer lets go of it entirely (see
`rank.tokenizer.ChatTokenizer._encode_ids`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from fastapi import FastAPI

from api.errors import APIError
from api.schemas import ChatMessage
from api.service import TextCodec
from cluster.config import ServingLimits

T = TypeVar("T")

REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
# Characters of input from which a prompt takes the large lane: about 20 ms of work at most in the
# small lane (tokenizing runs at ~0.3 us a byte, a template at ~3 us a message).
LARGE_PROMPT_CHARS = 64 * 1024
MESSAGE_CHARS = 16  # what one message costs to render, counted in characters of content
# A rendered chat prompt may be this many times the body limit: markers and role names add some 50
# characters to a message of 16 bytes of JSON at most (Llama 3), and a template's preamble a few KiB.
TEMPLATE_BODY_RATIO = 4


def template_limit(limits: ServingLimits) -> int:
    """The longest rendered chat prompt (--max-template-chars, by default 4 x --max-body-bytes): a
    template that repeats its input cannot make the tokenizer work through a string of any length."""
    return limits.max_template_chars or TEMPLATE_BODY_RATIO * limits.max_body_bytes


@runtime_checkable
class RendersChat(Protocol):
    """A codec that renders the chat template apart from tokenizing (`rank.tokenizer.ChatTokenizer`), so
    the rendered size is checked before the tokenizer sees it; `encode_chat` takes that render back
    (it alone knows how to keep special-token text in messages apart from the template's)."""

    def render_chat(self, messages: list[dict[str, Any]], **extra: Any) -> str: ...

    def encode_chat(
        self, messages: list[dict[str, Any]], rendered: str | None = None, **extra: Any
    ) -> list[int]: ...


@dataclass(slots=True, frozen=True)
class Prompt:
    """A tokenized prompt and, when the request echoes it, its text."""

    ids: list[int]
    text: str = ""
    rendered: str = ""  # a chat prompt's text (its end says whether the template opened a <think> block)


class PromptPool:
    """The app's two prompt threads; threads start on first use and stop with `close`."""

    def __init__(self, large_chars: int = LARGE_PROMPT_CHARS) -> None:
        self.large_chars = large_chars
        self._small = ThreadPoolExecutor(1, thread_name_prefix="prompt-small")
        self._large = ThreadPoolExecutor(1, thread_name_prefix="prompt-large")
        self.in_flight = 0  # jobs handed over and not yet answered (read by tests, on the loop only)

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the lane that `size` (characters of input) picks; its exceptions are re-raised
        here, so an `APIError` from a worker becomes the same response as one raised on the loop."""
        lane = self._large if size >= self.large_chars else self._small
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(lane, fn, *args)
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        """Drop queued jobs and let the threads end (a job already running finishes in the background)."""
        for lane in (self._small, self._large):
            lane.shutdown(wait=False, cancel_futures=True)


def prompt_pool(app: FastAPI) -> PromptPool:
    """The app's pool, made on first use when the lifespan did not run (uvicorn with lifespan off,
    httpx's ASGITransport). The loop is single-threaded, so two callers cannot both make one."""
    pool: PromptPool | None = getattr(app.state, "prompt_pool", None)
    if pool is None:
        pool = app.state.prompt_pool = PromptPool()
    return pool


@asynccontextmanager
async def prompt_pool_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Merged into the app's lifespan by `include_router`: the pool ends with the app."""
    pool = prompt_pool(app)
    try:
        yield
    finally:
        pool.close()
        app.state.prompt_pool = None


# -- the jobs (run in a pool thread) --------------------------------------------------------------


def chat_size(messages: Sequence[ChatMessage]) -> int:
    size = MESSAGE_CHARS * len(messages)
    for m in messages:
        if isinstance(m.content, str):
            size += len(m.content)
        elif m.content:
            size += sum(len(p.text or "") for p in m.content)
    return size


def chat_prompt(
    codec: TextCodec,
    messages: Sequence[ChatMessage],
    max_chars: int,
    extra: dict[str, Any] | None = None,
    prepare: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> Prompt:
    """`extra`: more template arguments (`tools`, `chat_template_kwargs`' entries); `prepare`: the tool
    format's rewrite of the messages for a template without a tools section (api/chat_tools.py)."""
    dicts = [_message_dict(m, i) for i, m in enumerate(messages)]
    if prepare is not None:
        dicts = _template_call(prepare, dicts)
    kw = extra or {}
    if not isinstance(codec, RendersChat):
        if kw:
            return Prompt(_template_call(lambda d: codec.encode_chat(d, **kw), dicts))  # type: ignore[call-arg]
        return Prompt(_template_call(codec.encode_chat, dicts))
    text = _template_call(lambda d: codec.render_chat(d, **kw), dicts)
    if len(text) > max_chars:
        raise APIError(
            400,
            f"the rendered chat template has {len(text)} characters, over this server's limit of {max_chars}",
            param="messages",
            code="template_output_too_large",
        )
    return Prompt(_template_call(lambda d: codec.encode_chat(d, rendered=text, **kw), dicts), rendered=text)


def _template_call(fn: Callable[[list[dict[str, Any]]], T], dicts: list[dict[str, Any]]) -> T:
    try:
        return fn(dicts)
    except Exception as exc:  # a template that raises on this conversation (role order, ...)
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc


def text_prompt(codec: TextCodec, text: str, echo: bool) -> Prompt:
    return Prompt(codec.encode(text), text if echo else "")


def ids_prompt(codec: TextCodec, ids: list[Any], vocab: int, echo: bool) -> Prompt:
    bad = next((t for t in ids if not isinstance(t, int) or t < 0 or t >= vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return Prompt(ids, codec.decode(ids) if echo else "")


def _message_dict(m: ChatMessage, index: int) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"content part type {part.type!r} is not supported (text only)",
                    param=f"messages.{index}.content",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    out: dict[str, Any] = {"role": m.role, "content": content or ""}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    for key in REASONING_FIELDS:  # an assistant turn's thinking, for templates that render it
        value = (m.model_extra or {}).get(key)
        if isinstance(value, str):
            out[key] = value
    return out
