"""`/v1/chat/completions`, `/v1/completions` and `/v1/models`, in OpenAI's shapes (streamed or not)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.errors import APIError, error_body
from api.prompts import (
    Prompt,
    chat_prompt,
    chat_size,
    ids_prompt,
    prompt_pool,
    prompt_pool_lifespan,
    template_limit,
    text_prompt,
)
from api.render import ChatRender, Render, TextRender
from api.schemas import (
    GREEDY_BELOW,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    screen_body,
    screen_chat_body,
)
from api.service import Service
from cluster.requests import (
    Admission,
    FinishReason,
    GenerationRequest,
    RequestEvent,
    SamplingParams,
    TokenLogprob,
)

router = APIRouter(lifespan=prompt_pool_lifespan)


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _svc(request).model_cards()}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    return svc.model_card(svc.check_model(model_id, param=None))


@router.post("/v1/chat/completions", dependencies=[Depends(screen_chat_body)])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    svc = _svc(request)
    adapter = svc.check_model(body.model)
    _reject_unsupported(body)
    if body.tools or body.functions:
        raise APIError(
            400, "tools are not supported by this server", param="tools", code="unsupported_parameter"
        )
    if body.tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice is not supported", param="tool_choice", code="unsupported_parameter")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            f"response_format {body.response_format.type!r} is not supported (only 'text')",
            param="response_format",
            code="unsupported_parameter",
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    checked = _check_sampling(svc, body, max_tokens)
    include_usage = _include_usage(body)
    pool = prompt_pool(request.app)
    max_chars = template_limit(svc.config.limits)
    prompt = await pool.run(chat_size(body.messages), chat_prompt, svc.tokenizer, body.messages, max_chars)
    sampling = _sampling(svc, body, checked, len(prompt.ids), max_tokens, logprobs)
    return await _generate(
        request,
        svc,
        "chat",
        prompt.ids,
        sampling,
        body.stream,
        include_usage,
        "",
        body.return_tokens_as_token_ids,
        adapter,
    )


@router.post("/v1/completions", dependencies=[Depends(screen_body)])
async def completions(body: CompletionRequest, request: Request) -> Any:
    svc = _svc(request)
    adapter = svc.check_model(body.model)
    _reject_unsupported(body)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_parameter")
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of > 1 is not supported", param="best_of", code="unsupported_parameter")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    checked = _check_sampling(svc, body, body.max_tokens)
    include_usage = _include_usage(body)
    prompt = await _completion_prompt(request, svc, body.prompt, body.echo)
    sampling = _sampling(svc, body, checked, len(prompt.ids), body.max_tokens, body.logprobs)
    return await _generate(
        request,
        svc,
        "text",
        prompt.ids,
        sampling,
        body.stream,
        include_usage,
        prompt.text,
        body.return_tokens_as_token_ids,
        adapter,
    )


# -- validation helpers ----------------------------------------------------------------------------


def _reject_unsupported(body: SamplingFields) -> None:
    if body.n != 1:
        raise APIError(
            400, "n > 1 is not supported: send several requests", param="n", code="unsupported_parameter"
        )


def _include_usage(body: SamplingFields) -> bool:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return bool(body.stream_options and body.stream_options.include_usage)


async def _completion_prompt(request: Request, svc: Service, prompt: Any, echo: bool) -> Prompt:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(
                400, "batched prompts are not supported: send one prompt per request", param="prompt"
            )
        prompt = prompt[0]
    pool = prompt_pool(request.app)
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return await pool.run(len(prompt), text_prompt, svc.tokenizer, prompt, echo)
    ids = list(prompt)
    if not ids:
        raise APIError(400, "prompt is empty", param="prompt")
    return await pool.run(4 * len(ids), ids_prompt, svc.tokenizer, ids, svc.vocab_size, echo)


@dataclass(slots=True, frozen=True)
class _Checked:
    """What `_check_sampling` validated before the prompt was rendered."""

    stop: tuple[str, ...]
    logit_bias: tuple[tuple[int, float], ...]


def _check_sampling(svc: Service, body: SamplingFields, max_tokens: int | None) -> _Checked:
    """The limits that need no prompt, checked before the costly render."""
    lim = svc.config.limits
    if max_tokens is not None and max_tokens > lim.max_tokens:
        raise APIError(
            400,
            f"max_tokens {max_tokens} is over this server's limit of {lim.max_tokens}",
            param="max_tokens",
        )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > lim.max_stop_strings:
        raise APIError(400, f"at most {lim.max_stop_strings} stop strings are allowed", param="stop")
    if any(not s or len(s) > 256 for s in stops):
        raise APIError(400, "stop strings must be 1 to 256 characters", param="stop")
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= tid < svc.vocab_size:
            raise APIError(400, f"logit_bias token {tid} is outside the vocabulary", param="logit_bias")
        bias.append((tid, float(value)))
    return _Checked(tuple(stops), tuple(bias))


def _sampling(
    svc: Service,
    body: SamplingFields,
    checked: _Checked,
    prompt_len: int,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """The limits that depend on the prompt's length, then the engine's sampling settings."""
    cfg, lim = svc.config, svc.config.limits
    if prompt_len > svc.config.prompt_limit:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, over this server's limit of {cfg.prompt_limit}",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    room = cfg.context_length - prompt_len
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise APIError(
            400,
            f"this model's maximum context length is {cfg.context_length} tokens; the prompt has {prompt_len} "
            f"and {max_tokens or 1} more were requested",
            param="max_tokens" if max_tokens else "messages",
            code="context_length_exceeded",
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW:
        temperature = 0.0  # greedy: the engine's fast path, and no division by a tiny number
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    return SamplingParams(
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        min_p=body.min_p or 0.0,
        seed=None if body.seed is None else body.seed % (2**63),
        max_tokens=max_tokens if max_tokens is not None else min(lim.default_max_tokens, room),
        stop=checked.stop,
        logit_bias=checked.logit_bias,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
    )


# -- running a request ----------------------------------------------------------------------------


async def _generate(
    request: Request,
    svc: Service,
    kind: str,
    prompt: list[int],
    sampling: SamplingParams,
    stream: bool,
    include_usage: bool,
    echo: str,
    as_ids: bool,
    adapter: str = "",
) -> Any:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    rid = f"{prefix}-{uuid.uuid4().hex}"
    queue: asyncio.Queue[RequestEvent] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(event: RequestEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    client = request.client.host if request.client else ""
    req = GenerationRequest(rid, tuple(prompt), sampling, sink, client=client, adapter_name=adapter)
    admission = svc.client.submit(req)
    if admission is not Admission.ACCEPTED:
        raise _admission_error(admission, adapter)
    render = (ChatRender if kind == "chat" else TextRender)(svc, as_ids, adapter)
    created = int(time.time())
    if stream:
        return StreamingResponse(
            _stream(svc, rid, queue, render, created, include_usage, echo),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(request, svc, rid, queue, render, created, echo)


def _admission_error(admission: Admission, adapter: str = "") -> APIError:
    if admission is Admission.UNKNOWN_MODEL:  # unloaded while its prompt was being rendered
        return APIError(
            404, f"the model {adapter!r} does not exist (any more)", param="model", code="model_not_found"
        )
    if admission is Admission.QUEUE_FULL:
        return APIError(
            429, "the server's queue is full; retry shortly", code="queue_full", headers={"Retry-After": "1"}
        )
    if admission in (Admission.PAUSED, Admission.SHUTTING_DOWN):  # one 503 "draining" for clients
        return APIError(
            503,
            "the server is draining and admits no new requests",
            code="draining",
            headers={"Retry-After": "5"},
        )
    return APIError(503, "the engine is not available", code="unavailable", headers={"Retry-After": "5"})


def _event_error(event: RequestEvent) -> APIError | None:
    if event.finish_reason is FinishReason.ERROR:
        status = {"timeout": 504, "unavailable": 503}.get(event.error_type, 500)
        return APIError(status, event.error or "generation failed", code=event.error_type)
    if event.finish_reason is FinishReason.CANCELLED:
        return APIError(503, "the request was cancelled by an operator", code="cancelled")
    return None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(
    request: Request,
    svc: Service,
    rid: str,
    queue: asyncio.Queue[RequestEvent],
    render: Render,
    created: int,
    echo: str,
) -> JSONResponse:
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    texts = [echo]
    logprobs: list[TokenLogprob] = []
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                svc.client.cancel(rid)
                return JSONResponse(error_body(400, "client disconnected"), status_code=499)
            event = getter.result()
            texts.append(event.text)
            logprobs.extend(event.logprobs)
            if event.finished:
                break
    finally:
        watcher.cancel()
    err = _event_error(event)
    if err is not None:
        return JSONResponse(err.body(), status_code=err.status)
    reason = event.finish_reason.value if event.finish_reason else None
    body = render.full(rid, created, "".join(texts), reason, logprobs or None)
    body["usage"] = _usage(event)
    return JSONResponse(body)


def _usage(event: RequestEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _stream(
    svc: Service,
    rid: str,
    queue: asyncio.Queue[RequestEvent],
    render: Render,
    created: int,
    include_usage: bool,
    echo: str,
) -> AsyncIterator[str]:
    finished = False
    usage_field = {"usage": None} if include_usage else {}
    try:
        if render.opening_chunk or echo:
            yield _sse({**render.chunk(rid, created, echo, None, None, first=True), **usage_field})
        while True:
            event = await queue.get()
            err = _event_error(event)
            if err is not None:
                finished = True
                yield _sse(err.body())
                break
            lps = list(event.logprobs) or None
            if event.text or lps:
                yield _sse({**render.chunk(rid, created, event.text, None, lps), **usage_field})
            if event.finished:
                finished = True
                reason = event.finish_reason.value if event.finish_reason else None
                yield _sse({**render.chunk(rid, created, "", reason, None), **usage_field})
                if include_usage:
                    yield _sse(
                        {
                            **render.chunk(rid, created, "", None, None, usage_only=True),
                            "usage": _usage(event),
                        }
                    )
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            svc.client.cancel(rid)
