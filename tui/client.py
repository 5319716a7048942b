"""A small async client of rank 0's admin API.

The JSON is parsed once, here, into frozen dataclasses so the widgets never guess at keys, and every
failure (refused connection, timeout, refused token, error reply, unexpected JSON) becomes one
exception type, `AdminError`, that the dashboard shows instead of crashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

Scalar = int | float | str | bool


class AdminError(Exception):
    """`kind` picks how the dashboard shows it: "unreachable" (refused, DNS, timeout: keep retrying),
    "auth" (401: the token is wrong or missing), "http" (any other error reply), "protocol" (not the
    JSON an Orchard rank 0 sends)."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class QueueRow:
    request_id: str
    state: str
    age_s: float
    prompt_tokens: int
    generated_tokens: int
    tokens_per_s: float
    client: str


@dataclass(frozen=True, slots=True)
class Tier:
    """One KV cache tier. Tiers added later (ssd, ...) share these fields; whatever else a tier sends
    as a plain value lands in `extra` so the dashboard can show it without knowing it."""

    name: str
    blocks: int
    capacity_blocks: int
    bytes_used: int
    capacity_bytes: int
    query_tokens: int
    hit_tokens: int
    hit_rate: float
    evictions: int
    enabled: bool = True
    disabled_reason: str = ""
    extra: dict[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rank:
    rank: int
    host: str
    pid: int
    state: str
    report_age_s: float
    step: int
    step_ms: float
    median_step_ms: float
    active_bytes: int
    peak_bytes: int
    rss_bytes: int
    kv_blocks: int
    kv_bytes: int
    last_error: str
    liveness_age_s: float | None = None  # since the rank last answered rank 0's liveness ping

    @property
    def beat_age_s(self) -> float:
        """How long since we last heard of the rank: a liveness answer when pinged, else a report."""
        return self.report_age_s if self.liveness_age_s is None else self.liveness_age_s


@dataclass(frozen=True, slots=True)
class Snapshot:
    model: str
    tensor_parallel: int
    context_length: int
    uptime_s: float
    engine: str
    admission: str
    failure: str | None
    running: int
    waiting: int
    max_batch: int
    last_step_ms: float
    tokens_per_s: float
    history_step_s: float
    history: tuple[float, ...]
    prompt_tokens: int
    generated_tokens: int
    outcomes: dict[str, int]
    queue: tuple[QueueRow, ...]
    tiers: tuple[Tier, ...]
    ranks: tuple[Rank, ...]


_TIER_FIELDS = {
    "tier", "blocks", "capacity_blocks", "bytes_used", "capacity_bytes", "query_tokens", "hit_tokens",
    "hit_rate", "evictions", "enabled", "disabled_reason",
}  # fmt: skip


def _d(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else {}


def parse_tier(t: dict[str, Any]) -> Tier:
    extra = {k: v for k, v in t.items() if k not in _TIER_FIELDS and isinstance(v, int | float | str | bool)}
    return Tier(
        name=str(t["tier"]),
        blocks=int(t.get("blocks", 0)),
        capacity_blocks=int(t.get("capacity_blocks", 0)),
        bytes_used=int(t.get("bytes_used", 0)),
        capacity_bytes=int(t.get("capacity_bytes", 0)),
        query_tokens=int(t.get("query_tokens", 0)),
        hit_tokens=int(t.get("hit_tokens", 0)),
        hit_rate=float(t.get("hit_rate", 0.0)),
        evictions=int(t.get("evictions", 0)),
        enabled=bool(t.get("enabled", True)),
        disabled_reason=str(t.get("disabled_reason", "")),
        extra=extra,
    )


def parse_rank(r: dict[str, Any]) -> Rank:
    return Rank(
        rank=int(r["rank"]),
        host=str(r.get("host", "?")),
        pid=int(r.get("pid", 0)),
        state=str(r.get("state", "?")),
        report_age_s=float(r.get("report_age_s", 0.0)),
        step=int(r.get("step", 0)),
        step_ms=float(r.get("step_ms", 0.0)),
        median_step_ms=float(r.get("median_step_ms", 0.0)),
        active_bytes=int(r.get("active_bytes", 0)),
        peak_bytes=int(r.get("peak_bytes", 0)),
        rss_bytes=int(r.get("rss_bytes", 0)),
        kv_blocks=int(r.get("kv_blocks", 0)),
        kv_bytes=int(r.get("kv_bytes", 0)),
        liveness_age_s=None if r.get("liveness_age_s") is None else float(r["liveness_age_s"]),
        last_error=str(r.get("last_error") or ""),
    )


def parse_snapshot(j: dict[str, Any]) -> Snapshot:
    """Missing sections default to empty: an older or newer rank 0 still gives a usable picture."""
    batch, tp, totals = _d(j.get("batch")), _d(j.get("throughput")), _d(j.get("totals"))
    queue = tuple(
        QueueRow(
            q["request_id"],
            q.get("state", "?"),
            float(q.get("age_s", 0.0)),
            int(q.get("prompt_tokens", 0)),
            int(q.get("generated_tokens", 0)),
            float(q.get("tokens_per_s", 0.0)),
            str(q.get("client") or ""),
        )
        for q in j.get("queue") or ()
    )
    return Snapshot(
        model=str(j.get("model", "?")),
        tensor_parallel=int(j.get("tensor_parallel", 0)),
        context_length=int(j.get("context_length", 0)),
        uptime_s=float(j.get("uptime_s", 0.0)),
        engine=str(j.get("engine", "?")),
        admission=str(j.get("admission", "?")),
        failure=j.get("failure") or None,
        running=int(batch.get("running", 0)),
        waiting=int(batch.get("waiting", 0)),
        max_batch=int(batch.get("max_batch", 0)),
        last_step_ms=float(j.get("last_step_ms", 0.0)),
        tokens_per_s=float(tp.get("output_tokens_per_s", 0.0)),
        history_step_s=float(tp.get("history_step_s", 5)),
        history=tuple(float(x) for x in tp.get("history") or ()),
        prompt_tokens=int(totals.get("prompt_tokens", 0)),
        generated_tokens=int(totals.get("generated_tokens", 0)),
        outcomes={str(k): int(v) for k, v in _d(totals.get("requests")).items()},
        queue=queue,
        tiers=tuple(parse_tier(t) for t in _d(j.get("kv")).get("tiers") or ()),
        ranks=tuple(parse_rank(r) for r in j.get("ranks") or ()),
    )


class AdminClient:
    """One keep-alive connection to rank 0; every call raises `AdminError` or returns parsed data."""

    def __init__(self, url: str, token: str | None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.has_token = bool(token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0))
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        try:
            r = await self._http.request(method, path)
        except httpx.ConnectError as exc:
            raise AdminError("unreachable", f"cannot reach {self.url}: connection refused ({exc})") from exc
        except httpx.TimeoutException as exc:
            raise AdminError(
                "unreachable", f"cannot reach {self.url}: no answer ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            raise AdminError("unreachable", f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from exc
        try:
            body = r.json()
        except ValueError:
            body = None
        error = _d(_d(body).get("error"))
        if r.status_code == 401:
            hint = (
                "the admin token was refused"
                if self.has_token
                else "no admin token given (and none in the cache folder)"
            )
            raise AdminError("auth", f"{hint}: pass --token or set ORCHARD_ADMIN_TOKEN", status=401)
        if r.status_code >= 400:
            message = error.get("message") or f"HTTP {r.status_code} from {method} {path}"
            if r.status_code == 404 and path == "/admin/state":
                message = f"{self.url} has no /admin/state (404): is it an Orchard rank 0?"
            raise AdminError("http", str(message), status=r.status_code)
        if not isinstance(body, dict):
            raise AdminError("protocol", f"{method} {path} did not answer with a JSON object")
        return body

    async def state(self) -> Snapshot:
        body = await self._call("GET", "/admin/state")
        try:
            return parse_snapshot(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise AdminError("protocol", f"unexpected /admin/state answer: {exc!r}") from exc

    async def cancel(self, request_id: str) -> str:
        return str(
            (await self._call("DELETE", f"/admin/requests/{quote(request_id, safe='')}")).get(
                "cancelled", request_id
            )
        )

    async def drain(self) -> str:
        return str((await self._call("POST", "/admin/drain")).get("admission", "?"))

    async def resume(self) -> str:
        return str((await self._call("POST", "/admin/resume")).get("admission", "?"))

    async def clear_tier(self, tier: str) -> str:
        return str((await self._call("DELETE", f"/admin/cache/{quote(tier, safe='')}")).get("clearing", tier))
