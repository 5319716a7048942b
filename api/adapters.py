"""LoRA adapters on the admin API: list, load from a folder on rank 0's host (and the same path on every
host), unload. The registry (`cluster.adapters`) decides; the engine carries each load and unload to
every rank in its next plan. A load answers once the adapter serves (or 202 if that takes longer than
`LOAD_WAIT_S`); an unload is refused with 409 while requests use the adapter, unless `?drain=true`, which
stops new requests for it and unloads it when the last one ends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from api.admin import require_admin
from api.errors import APIError
from api.service import Service
from cluster.adapters import NAME, AdapterRegistry, AdapterSpec, AdapterState, Reserve, Unload
from cluster.engine_client import EngineState
from cluster.messages import MAX_ADAPTER_PATH_BYTES

LOAD_WAIT_S = 60.0  # a load waits this long for the plan that loads it to have run on every rank
UNLOAD_WAIT_S = 10.0
POLL_S = 0.02

router = APIRouter(dependencies=[Depends(require_admin)])


class LoadAdapterBody(BaseModel):
    """vLLM's field names (`lora_name`, `lora_path`) are accepted too."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, validation_alias=AliasChoices("name", "lora_name"))
    path: str = Field(
        min_length=1, max_length=MAX_ADAPTER_PATH_BYTES, validation_alias=AliasChoices("path", "lora_path")
    )


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def _registry(svc: Service) -> AdapterRegistry:
    reg = svc.client.adapters
    if reg is None or reg.max_loras < 1:
        raise APIError(
            400, "this server holds no LoRA adapters: start it with --max-loras N", code="adapters_off"
        )
    return reg


def _listing(svc: Service, reg: AdapterRegistry) -> dict[str, Any]:
    return {
        "base": svc.config.model_name,
        "max_loras": reg.max_loras,
        "adapters": [a.to_json() for a in reg.rows()],
    }


def _row(reg: AdapterRegistry, name: str) -> dict[str, Any] | None:
    return next((a.to_json() for a in reg.rows() if a.name == name), None)


@router.get("/admin/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    reg = svc.client.adapters
    if reg is None:
        return {"base": svc.config.model_name, "max_loras": 0, "adapters": []}
    return _listing(svc, reg)


@router.post("/admin/adapters")
async def load_adapter(body: LoadAdapterBody, request: Request) -> JSONResponse:
    svc = _svc(request)
    reg = _registry(svc)
    name = body.name
    if not NAME.fullmatch(name):
        raise APIError(
            400,
            f"adapter name {name!r}: use letters, digits and . _ : / @ + - (starting with a letter or digit)",
            param="name",
            code="invalid_adapter_name",
        )
    if name == svc.config.model_name or reg.state_of(name) is not None:
        raise APIError(409, f"the model name {name!r} is taken", param="name", code="adapter_exists")
    if svc.inspect_adapter is None:
        raise APIError(400, "this server cannot load adapters at run time", code="adapters_off")
    path = Path(body.path).expanduser()
    if not path.is_absolute():
        message = f"adapter path {body.path!r} is not absolute: every rank reads it"
        raise APIError(400, message, param="path", code="invalid_value")
    check = await asyncio.to_thread(svc.inspect_adapter, str(path))  # reads files: off the event loop
    if check.spec is None:
        raise APIError(
            400, f"invalid adapter {str(path)!r}: {check.error}", param="path", code="invalid_adapter"
        )
    outcome, slot = reg.reserve(name, AdapterSpec(str(path), check.spec.digest, check.spec.rank))
    if outcome is Reserve.NAME_TAKEN:
        raise APIError(409, f"the model name {name!r} is taken", param="name", code="adapter_exists")
    if outcome is Reserve.FULL:
        raise APIError(
            507,
            f"all {reg.max_loras} adapter slots are taken (--max-loras): unload one first",
            code="adapter_slots_full",
        )
    if outcome is not Reserve.RESERVED:
        raise APIError(400, f"adapter {name!r} cannot be loaded ({outcome.value})", code="invalid_adapter")
    svc.client.wake()
    deadline = time.monotonic() + LOAD_WAIT_S
    while reg.state_of(name) is AdapterState.LOADING and time.monotonic() < deadline:
        if svc.client.state in (EngineState.FAILED, EngineState.STOPPED):
            raise APIError(503, "the engine stopped before the adapter was loaded", code="unavailable")
        await asyncio.sleep(POLL_S)
    row = _row(reg, name) or {"name": name, "slot": slot, "state": "gone"}
    return JSONResponse(row, status_code=200 if row["state"] == AdapterState.READY.value else 202)


@router.delete("/admin/adapters/{name:path}")
async def unload_adapter(name: str, request: Request, drain: bool = False) -> JSONResponse:
    svc = _svc(request)
    reg = _registry(svc)
    outcome, requests = reg.unload(name, drain)
    if outcome is Unload.UNKNOWN:
        raise APIError(404, f"no adapter {name!r}", param="name", code="adapter_not_found")
    if outcome is Unload.IN_USE:
        raise APIError(
            409,
            f"{requests} request(s) use adapter {name!r}: retry when they end, or unload with ?drain=true "
            "(no new requests, unloaded after the last one)",
            code="adapter_in_use",
        )
    if outcome is Unload.LOADING:
        raise APIError(
            409, f"adapter {name!r} is still loading: unload it once it serves", code="adapter_loading"
        )
    svc.client.wake()
    if outcome is Unload.DRAINING:
        return JSONResponse({"name": name, "state": "draining", "requests": requests}, status_code=202)
    deadline = time.monotonic() + UNLOAD_WAIT_S
    while reg.state_of(name) is not None and time.monotonic() < deadline:
        if svc.client.state in (EngineState.FAILED, EngineState.STOPPED):
            break
        await asyncio.sleep(POLL_S)
    gone = reg.state_of(name) is None
    return JSONResponse(
        {"name": name, "state": "unloaded" if gone else "unloading"}, status_code=200 if gone else 202
    )
