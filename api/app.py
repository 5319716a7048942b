"""The FastAPI application of rank 0 and the uvicorn thread that serves it."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.adapters import router as adapters_router
from api.admin import metrics_registry, metrics_router
from api.admin import router as admin_router
from api.errors import error_body, install_error_handlers
from api.front import (
    ArrivalCount,
    Arrivals,
    BodyGuard,
    HostGuard,
    connection_room,
    host_name,
    is_loopback_name,
    protocol_for,
)
from api.looplag import LoopLag
from api.openai_routes import router as openai_router
from api.openapi_docs import HEALTH_RESPONSES, install_openapi
from api.service import Service
from cluster.config import ServingConfig
from cluster.errors import ConfigError
from cluster.snapshot import JobSnapshot

log = logging.getLogger("orchard.api")


class ApiKeyAuth:
    """`Authorization: Bearer <key>` on /v1 when keys are configured, compared in constant time."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in keys)

    def allowed(self, header: bytes | None) -> bool:
        if header is None or not header.lower().startswith(b"bearer "):
            return False
        given = header[7:].strip()
        ok = False
        for key in self.keys:  # no early exit: timing does not tell which key matched
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers", ())).get(b"authorization")
            if not self.allowed(header):
                message = (
                    "missing API key: send Authorization: Bearer <key>"
                    if header is None
                    else "incorrect API key"
                )
                resp = JSONResponse(error_body(401, message, None, "invalid_api_key"), status_code=401)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def engine_stats(snap: JobSnapshot) -> dict[str, object]:
    """/health's engine figures (their keys predate the snapshot; scripts and tests read them)."""
    return {
        "state": snap.engine,
        "running": snap.batch.running,
        "waiting": snap.batch.waiting,
        "max_batch": snap.batch.max_batch,
        "free_slots": snap.batch.free_slots,
        "sequences_on_ranks": snap.sequences_on_ranks,
        "steps": snap.steps,
        "chained_steps": snap.chained_steps,
        "generated_tokens": snap.totals.generated_tokens,
        "last_step_ms": snap.last_step_ms,
    }


def create_app(service: Service) -> FastAPI:
    lag = LoopLag()  # how late the event loop runs (api/looplag.py), exported in /metrics

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        lag.start()
        yield
        await lag.stop()

    app = FastAPI(
        title="Orchard",
        version="0.1.0",
        description="OpenAI-compatible API of an Orchard cluster",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.loop_lag = lag
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(adapters_router)
    app.include_router(metrics_router)
    app.state.metrics_registry = metrics_registry(service, lag)

    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health(request: Request) -> JSONResponse:
        svc: Service = request.app.state.service
        snap = svc.snapshot()
        alive = snap.engine in ("ready", "draining", "starting")  # liveness
        body: dict[str, Any] = {
            "status": "ok" if alive else "failed",
            "engine": snap.engine,
            "model": snap.model,
            "ranks": snap.tensor_parallel,
            "uptime_s": snap.uptime_s,
            "engine_stats": engine_stats(snap),
            "time": round(time.time(), 4),  # when the loop answered: a prober splits its latency in two
        }
        if snap.failure:
            body["error"] = snap.failure
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/health/ready", responses=HEALTH_RESPONSES)
    async def ready(request: Request) -> JSONResponse:
        svc: Service = request.app.state.service
        snap = svc.snapshot()
        ranks_ok = all(r.state in ("ok", "slow") for r in snap.ranks)
        admitting = snap.admission == "open"
        ok = admitting and ranks_ok
        body: dict[str, Any] = {
            "ready": ok,
            "engine": snap.engine,
            "admitting": admitting,
            "ranks_ok": ranks_ok,
        }
        if snap.failure:
            body["error"] = snap.failure
        return JSONResponse(body, status_code=200 if ok else 503)

    install_openapi(app)
    app.add_middleware(ApiKeyAuth, keys=service.config.api_keys)
    arriving = ArrivalCount()
    service.client.preparing = lambda: arriving.count
    app.add_middleware(Arrivals, counter=arriving)
    app.add_middleware(
        BodyGuard,
        max_bytes=service.config.limits.max_body_bytes,
        read_timeout=service.config.front.request_read_timeout,
    )
    return app


class ApiServer:
    """uvicorn in a background thread: rank 0's main thread belongs to the engine (MPI is single-threaded).
    The edge settings come from the app's `ServingConfig.front`: a connection cap and read deadlines (our
    h11 protocol), the Host guard of a key-less loopback server, and X-Forwarded-For believed only from
    `trusted_proxies` (uvicorn believes it from 127.0.0.1 by default: any local process could then
    pose as any client in the request log)."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
        serving: ServingConfig = app.state.service.config
        front = serving.front
        served: ASGIApp = app
        if not serving.api_keys and is_loopback_name(host_name(host)) and "*" not in front.allowed_hosts:
            served = HostGuard(app, front.allowed_hosts)
        config = uvicorn.Config(
            served,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            lifespan="on",
            interface="asgi3",
            http=protocol_for(front, connection_room(front.max_connections)),
            ws="none",
            proxy_headers=bool(front.trusted_proxies),
            forwarded_allow_ips=list(front.trusted_proxies),
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.host, self.port = host, port
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise ConfigError(
                    f"cannot serve HTTP on {self.host}:{self.port} (address in use or not available)"
                )
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"HTTP server did not start on {self.host}:{self.port} within {timeout:g} s"
                )
            time.sleep(0.02)

    @property
    def bound_port(self) -> int:
        """The port actually listened on (the one the OS picked for port 0)."""
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
