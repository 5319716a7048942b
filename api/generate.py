"""Running one API request: its choices submitted to the engine (n per prompt, siblings sharing the first
one's prompt KV), their events merged into one response, whole or streamed, with SSE keep-alive comments
while nothing else is sent (queued, prefilling), an `x-request-id` header and one log line per request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.errors import APIError, error_body
from api.front import arrived
from api.render import ChatOutput, ChatRender, TextRender
from api.service import Service
from cluster.requests import (
    Admission,
    FinishReason,
    GenerationRequest,
    RequestEvent,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger("orchard.api")
KEEPALIVE = ": keep-alive\n\n"


@dataclass(slots=True, frozen=True)
class Choice:
    """One sequence to generate: choice `index` of the response."""

    index: int
    request_id: str
    prompt: tuple[int, ...]
    sampling: SamplingParams
    prompt_index: int = 0  # which prompt of the request (usage counts each prompt once)
    fork_of: str = ""  # a sibling with the same prompt whose prompt KV this one shares
    echo: str = ""  # completions' echo: the prompt's text, sent before the output
    constraint: Any = None  # cluster.constraints.Constraint, or None


@dataclass(slots=True)
class Run:
    """A request's settings for `run`."""

    kind: str  # "chat" or "text"
    rid: str
    choices: list[Choice]
    stream: bool = False
    include_usage: bool = False
    as_ids: bool = False
    adapter: str = ""
    outputs: Callable[[], ChatOutput] = ChatOutput  # a fresh chat output (parser) per choice
    started: float = field(default_factory=time.monotonic)
    speculative: bool = True  # the body's "speculative": false opts out of speculative decoding


@dataclass(slots=True)
class _State:
    """What the API side gathered of one choice."""

    choice: Choice
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    last: RequestEvent | None = None
    sent: int = 0  # characters streamed so far (text_offset of the next logprobs)
    opened: bool = False  # its echo was streamed

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished


def _generation_request(
    c: Choice, sink: Callable[[RequestEvent], None], client: str, adapter: str, speculative: bool = True
) -> GenerationRequest:
    return GenerationRequest(
        c.request_id,
        c.prompt,
        c.sampling,
        sink,
        client=client,
        adapter_name=adapter,
        fork_of=c.fork_of,
        constraint=c.constraint,
        speculative=speculative,
    )


async def run(request: Request, svc: Service, spec: Run) -> Any:
    queue: asyncio.Queue[RequestEvent] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(event: RequestEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    client = request.client.host if request.client else ""
    headers = {"x-request-id": spec.rid}
    queue_cap = svc.config.limits.max_waiting
    if len(spec.choices) > queue_cap:  # a 429 would be retried forever: it can never be admitted
        raise APIError(
            400,
            f"{len(spec.choices)} choices (prompts x n) are over this server's queue of {queue_cap} (--max-queue)",
            param="n",
            headers=headers,
        )
    accepted: list[str] = []
    for c in spec.choices:
        admission = svc.client.submit(_generation_request(c, sink, client, spec.adapter, spec.speculative))
        if admission is not Admission.ACCEPTED:
            for rid in accepted:
                svc.client.cancel(rid)
            err = admission_error(admission, spec.adapter, svc.snapshot().memory.waiting_for_memory > 0)
            err.headers.update(headers)
            raise err
        accepted.append(c.request_id)
    arrived(request.scope)  # in the engine's inbox: no longer arriving (api/front.py)
    states = {c.request_id: _State(c) for c in spec.choices}
    render = (ChatRender if spec.kind == "chat" else TextRender)(svc, spec.as_ids, spec.adapter)
    created = int(time.time())
    if spec.stream:
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = _stream(svc, spec, states, queue, render, created)
        return _CancellingStream(
            body, lambda: _cancel_unfinished(svc, states), media_type="text/event-stream", headers=headers
        )
    status, payload = await _collect(request, svc, spec, states, queue, render, created)
    return JSONResponse(payload, status_code=status, headers=headers)


def admission_error(admission: Admission, adapter: str = "", memory_bound: bool = False) -> APIError:
    """`memory_bound`: requests wait for KV memory (the budget is full), so a full queue is the job under
    memory pressure, a 503 with Retry-After (#17); otherwise a full queue is the client sending too much, a 429."""
    if admission is Admission.QUEUE_FULL and memory_bound:
        return APIError(
            503,
            "the server is under memory pressure (its KV budget is full and its queue too); retry shortly",
            code="memory_pressure",
            headers={"Retry-After": "2"},
        )
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
        # invalid_request_error: the scheduler's backstop for a request that can never fit the KV budget
        status = {"timeout": 504, "unavailable": 503, "invalid_request_error": 400}.get(event.error_type, 500)
        return APIError(status, event.error or "generation failed", code=event.error_type)
    if event.finish_reason is FinishReason.CANCELLED:
        return APIError(503, "the request was cancelled by an operator", code="cancelled")
    return None


def _absorb(states: dict[str, _State], event: RequestEvent) -> _State:
    st = states[event.request_id]
    st.texts.append(event.text)
    st.logprobs.extend(event.logprobs)
    if event.prompt_logprobs:
        st.prompt_logprobs = event.prompt_logprobs
    st.last = event
    return st


def usage(states: dict[str, _State]) -> dict[str, int]:
    """OpenAI's: each prompt counted once (n choices share it), every choice's completion tokens."""
    prompts: dict[int, int] = {}
    completion = 0
    for st in states.values():
        if st.last is not None:
            prompts.setdefault(st.choice.prompt_index, st.last.prompt_tokens)
            completion += st.last.completion_tokens
    prompt = sum(prompts.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _log_done(spec: Run, states: dict[str, _State], outcome: str) -> None:
    u = usage(states)
    reasons = sorted(
        {st.last.finish_reason.value for st in states.values() if st.last and st.last.finish_reason}
    )
    log.debug(  # the engine logs each request id at INFO (orchard.requests); this ties choices together
        "%s %s choices=%d prompt=%d completion=%d finish=%s %.2fs%s",
        spec.rid,
        outcome,
        len(states),
        u["prompt_tokens"],
        u["completion_tokens"],
        ",".join(reasons) or "-",
        time.monotonic() - spec.started,
        " stream" if spec.stream else "",
    )


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(
    request: Request,
    svc: Service,
    spec: Run,
    states: dict[str, _State],
    queue: asyncio.Queue[RequestEvent],
    render: ChatRender | TextRender,
    created: int,
) -> tuple[int, dict[str, Any]]:
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while not all(st.finished for st in states.values()):
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                _cancel_unfinished(svc, states)
                _log_done(spec, states, "disconnected")
                return 499, error_body(400, "client disconnected")
            event = getter.result()
            _absorb(states, event)
            err = _event_error(event) if event.finished else None
            if err is not None:
                _cancel_unfinished(svc, states)
                _log_done(spec, states, f"failed ({err.code})")
                return err.status, err.body()
    finally:
        watcher.cancel()
        _cancel_unfinished(svc, states)  # a no-op once all finished; the handler task cancelled: frees them
    choices = [_full_choice(spec, st, render) for st in sorted(states.values(), key=lambda s: s.choice.index)]
    _log_done(spec, states, "ok")
    return 200, {**render.envelope(spec.rid, created, choices, chunk=False), "usage": usage(states)}


def _full_choice(spec: Run, st: _State, render: ChatRender | TextRender) -> dict[str, Any]:
    assert st.last is not None and st.last.finish_reason is not None
    reason = st.last.finish_reason.value
    text = "".join(st.texts)
    lps = st.logprobs if st.choice.sampling.logprobs is not None else None
    if isinstance(render, ChatRender):
        out = spec.outputs()
        message = out.message(text)
        return render.full_choice(st.choice.index, message, out.reason(reason), lps)
    c = st.choice
    prompt_ids = c.prompt if c.sampling.prompt_logprobs is not None else ()
    if lps is None and prompt_ids:
        lps = []
    logprobs = render.logprobs(lps, 0, prompt_ids, st.prompt_logprobs)
    return render.choice(c.index, c.echo + text, reason, logprobs)


class _CancellingStream(StreamingResponse):
    """A stream that cancels its unfinished choices however it ends. The body generator's own `finally`
    runs only once the generator has started: a client that leaves while its request is queued or
    rendered can make Starlette stop before the first read, and the choices would run to max_tokens
    with nobody listening."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _cancel_unfinished(svc: Service, states: dict[str, _State]) -> None:
    for rid, st in states.items():
        if not st.finished:
            svc.client.cancel(rid)


def sse(payload: dict[str, Any]) -> str:
    # allow_nan=False: a NaN or infinity that slipped through is an error here, never invalid JSON sent
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False, allow_nan=False)}\n\n"


async def _stream(
    svc: Service,
    spec: Run,
    states: dict[str, _State],
    queue: asyncio.Queue[RequestEvent],
    render: ChatRender | TextRender,
    created: int,
) -> AsyncIterator[str]:
    keepalive = svc.config.front.sse_keepalive or None
    extra: dict[str, Any] = {"usage": None} if spec.include_usage else {}
    outputs: dict[str, ChatOutput] = {}
    outcome = "disconnected"

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({**render.envelope(spec.rid, created, choices, chunk=True), **extra})

    try:
        for rid, st in states.items():
            if isinstance(render, ChatRender):
                outputs[rid] = spec.outputs()
                delta = {"role": "assistant", "content": ""}
                yield chunk([render.chunk_choice(st.choice.index, delta, None, None)])
            elif st.choice.echo and st.choice.sampling.prompt_logprobs is None:
                st.opened = True
                st.sent = len(st.choice.echo)
                yield chunk([render.choice(st.choice.index, st.choice.echo, None, None)])
        while not all(st.finished for st in states.values()):
            try:
                event = await asyncio.wait_for(queue.get(), keepalive)
            except asyncio.TimeoutError:  # noqa: UP041 (Python 3.10's is not the builtin)
                yield KEEPALIVE  # a comment: clients with read timeouts see bytes while the request waits
                continue
            st = _absorb(states, event)
            err = _event_error(event) if event.finished else None
            if err is not None:
                outcome = f"failed ({err.code})"
                yield sse(err.body())
                break
            if isinstance(render, ChatRender):
                for piece in _chat_pieces(render, st, event, outputs[event.request_id]):
                    yield chunk([piece])
            else:
                for piece in _text_pieces(render, st, event):
                    yield chunk([piece])
        else:
            outcome = "ok"
            if spec.include_usage:
                yield sse({**render.envelope(spec.rid, created, [], chunk=True), "usage": usage(states)})
        yield "data: [DONE]\n\n"
    finally:
        _cancel_unfinished(svc, states)
        _log_done(spec, states, outcome)


def _chat_pieces(
    render: ChatRender, st: _State, event: RequestEvent, out: ChatOutput
) -> list[dict[str, Any]]:
    index = st.choice.index
    lps = list(event.logprobs) if st.choice.sampling.logprobs is not None else None
    deltas = out.feed(event.text) if event.text else []
    if event.finished:
        deltas += out.finish()
    pieces = [render.chunk_choice(index, d, None, lps if i == 0 else None) for i, d in enumerate(deltas)]
    if lps and not deltas:  # tokens whose text is held back (a partial stop string or marker)
        pieces.append(render.chunk_choice(index, {}, None, lps))
    if event.finished:
        reason = event.finish_reason.value if event.finish_reason else None
        pieces.append(render.chunk_choice(index, {}, out.reason(reason), None))
    return pieces


def _text_pieces(render: TextRender, st: _State, event: RequestEvent) -> list[dict[str, Any]]:
    c = st.choice
    pieces = []
    text = event.text
    lps: list[TokenLogprob] | None = list(event.logprobs) if c.sampling.logprobs is not None else None
    prompt_ids: tuple[int, ...] = ()
    if not st.opened:
        st.opened = True
        if c.echo or c.sampling.prompt_logprobs is not None:  # echo waits for the prompt's logprobs
            text = c.echo + text
            prompt_ids = c.prompt if c.sampling.prompt_logprobs is not None else ()
            lps = lps or []
    if text or lps:
        pieces.append(
            render.choice(c.index, text, None, render.logprobs(lps, st.sent, prompt_ids, st.prompt_logprobs))
        )
        st.sent += len(text)
    if event.finished:
        reason = event.finish_reason.value if event.finish_reason else None
        pieces.append(render.choice(c.index, "", reason, None))
    return pieces
