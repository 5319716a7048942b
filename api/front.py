"""The server's edge, before a route sees a request: how many connections may be open, how long a client
may take to send a request, which Host names a key-less loopback server answers, and how large a body may
be. A client that opens hundreds of connections and sends a byte a minute must cost the server nothing
but closed sockets; uvicorn alone keeps such connections open forever."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.errors import error_body
from cluster.config import HttpFront

log = logging.getLogger("orchard.api")

BODY_GRACE_S = 1.0  # the body deadline's backstop fires after the 408 a route reading its body gets
_BUSY = error_body(503, "too many open connections; try again shortly", None, "too_many_connections")


class _Throttle:
    """At most one log line per `every` seconds per message: a flood of refused connections is one line."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last: dict[str, float] = {}

    def _log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get(msg, -self.every) >= self.every:
            self.last[msg] = now
            log.log(level, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self._log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self._log(logging.INFO, msg, *args)


_throttled = _Throttle()


def _raw_response(status: int, reason: str, body: dict[str, Any]) -> bytes:
    """A whole response written before any request was read (h11 cannot answer a request it never saw)."""
    content = JSONResponse(body).body
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(content)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + content


_PHASES = {"IDLE": "head", "SEND_BODY": "body"}  # what the client owes, by h11's state of the client


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus what it lacks: a cap on open connections (one over the cap gets a 503
    and is closed unread) and deadlines on reading a request: the headers within `header_timeout` of the
    connection opening or of the previous response ending, the body within `request_read_timeout` of the
    headers (plus a grace: this is the backstop for bodies no route reads; a route that reads gets a 408
    from `BodyGuard` first). A deadline is total: trickling bytes does not extend it."""

    front: ClassVar[HttpFront] = HttpFront()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""  # "head", "body" or "" (nothing to wait for from the client)
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.front.max_connections:
            self._refused = True
            self.transport = transport
            _throttled.warning("refusing connections: %d open (--max-connections)", len(self.connections))
            transport.write(_raw_response(503, "Service Unavailable", _BUSY))
            transport.close()
            return
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _watch(self) -> None:
        """Arm the deadline of what the client owes now; entry points that move h11's state call this."""
        if self.transport.is_closing():
            self._cancel()
            return
        phase = _PHASES.get(str(self.conn.their_state), "")  # h11's states are named sentinels
        if phase == self._phase:
            return
        self._cancel()
        self._phase = phase
        if phase == "head":
            timeout = self.front.header_timeout
        elif phase == "body":
            timeout = self.front.request_read_timeout
        else:
            return
        if timeout > 0:
            timeout += BODY_GRACE_S if phase == "body" else 0.0
            self._deadline = self.loop.call_later(timeout, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = ""

    def _expired(self) -> None:
        self._deadline = None
        what = "headers" if self._phase == "head" else "body"
        _throttled.info("closing a connection: request %s not sent in time (%s)", what, self.client)
        self.transport.abort()  # not close(): a client that does not read would keep it flushing forever


class HostGuard:
    """A loopback server without API keys answers only loopback Host names (and `--allowed-hosts`): a web
    page whose DNS name a rebinding attack points at 127.0.0.1 sends its own name as Host, and is refused
    before it can read or drive the API from the user's browser."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed)

    def allows(self, name: str) -> bool:
        return name in self.allowed or is_loopback_name(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"]
            refused = [n for n in names if not self.allows(host_name(n))]
            if refused:  # no Host at all is no browser, so no rebinding: allowed
                shown = refused[0][:100]
                message = (
                    f"Host {shown!r} is not a loopback name: this server listens on loopback without API "
                    "keys, so it answers localhost, 127.x.x.x and [::1] only (DNS rebinding guard); start "
                    "it with --allowed-hosts NAME to accept this name, or set --api-key"
                )
                resp = JSONResponse(error_body(403, message, None, "host_not_allowed"), status_code=403)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(value: str) -> str:
    """The name part of a Host header or a listen address, lower case, without port or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        value = name
    return value.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_ARRIVING = "orchard.arriving"


class ArrivalCount:
    """Generation requests between their first byte and their submission to the engine (body, checks,
    template, tokenizer): an idle engine waits briefly while there are any, so that a burst starts in
    one prefill step (rank/engine.py). `count` is read from the engine thread (an int: no lock)."""

    def __init__(self) -> None:
        self.count = 0


class Arrivals:
    """Counts generation requests into an `ArrivalCount` until `arrived` (or their end)."""

    def __init__(self, app: ASGIApp, counter: ArrivalCount) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        self.counter.count += 1
        scope.setdefault("state", {})[_ARRIVING] = self.counter
        try:
            await self.app(scope, receive, send)
        finally:
            arrived(scope)  # refused before submission, or failed


def arrived(scope: Scope) -> None:
    """The request reached the engine (or never will): it no longer counts as arriving. Idempotent."""
    state = scope.get("state")
    arrivals = state.pop(_ARRIVING, None) if state is not None else None
    if arrivals is not None:
        arrivals.count -= 1


class BodyGuard:
    """413 for bodies over the limit, by Content-Length or by counting what arrives (chunked bodies have no
    length); 408 for a body not sent within `request_read_timeout` of the headers. Both answer at once,
    with `connection: close` so the rest of the body is never read, and the route sees a disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, 413, self._too_large(), "request_too_large")
            return
        deadline = time.monotonic() + self.read_timeout if self.read_timeout > 0 else None
        seen = 0
        body_done = False
        started = False  # the route began its response: ours can no longer be sent
        answered = False  # we answered: whatever the route sends is dropped

        async def guarded_receive() -> Message:
            nonlocal seen, body_done, answered
            if answered:
                return {"type": "http.disconnect"}
            if body_done:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                if not started:
                    answered = True
                    reason = f"request body not sent within {self.read_timeout:g} s"
                    await send_error(send, 408, reason, "request_timeout")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    if not started:
                        answered = True
                        await send_error(send, 413, self._too_large(), "request_too_large")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = True
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)

    def _too_large(self) -> str:
        return f"request body over the limit of {self.max_bytes} bytes"


async def send_error(send: Send, status: int, message: str, code: str) -> None:
    resp = JSONResponse(error_body(status, message, None, code), status_code=status)
    resp.headers["connection"] = "close"
    await resp({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def protocol_for(front: HttpFront, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to this server's settings."""
    bound = dataclasses.replace(front, max_connections=max_connections, metrics_token=None)
    return type("OrchardH11Protocol", (GuardedH11Protocol,), {"front": bound})


def connection_room(wanted: int, reserve: int = 256) -> int:
    """Connections the open-file limit leaves room for (raising the soft limit when the hard one allows):
    a server at the limit fails accept() and, worse, the engine's own file opens. macOS starts at 256."""
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + reserve
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft < need:
        target = need if hard == infinite else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    room = wanted if soft == infinite else min(wanted, max(soft - reserve, 16))
    if room < wanted:
        log.warning(
            "open-file limit %d leaves room for %d HTTP connections, not %d (--max-connections); "
            "raise it with ulimit -n",
            soft,
            room,
            wanted,
        )
    return room
