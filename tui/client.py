"""A small async client of rank 0's admin API.

/admin/state is decoded once, here, by the schema the server writes it with (`cluster.snapshot`):
strictly, so a field the server renamed is an error on screen, never a column of zeros. Every failure
(refused connection, timeout, refused token, error reply, JSON that does not decode) becomes one
exception type, `AdminError`, that the dashboard shows instead of crashing.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from cluster.snapshot import JobSnapshot, SnapshotDecodeError


class AdminError(Exception):
    """`kind` picks how the dashboard shows it: "unreachable" (refused, DNS, timeout: keep retrying),
    "auth" (401: the token is wrong or missing), "http" (any other error reply), "protocol" (not the
    JSON an Orchard rank 0 sends)."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


def _d(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else {}


class AdminClient:
    """One keep-alive connection to rank 0; every call raises `AdminError` or returns parsed data."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport`: httpx's seam for tests (an in-process app or a mock); None talks HTTP."""
        self.url = url.rstrip("/")
        self.has_token = bool(token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            transport=transport,
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

    async def state(self) -> JobSnapshot:
        body = await self._call("GET", "/admin/state")
        try:
            return JobSnapshot.from_json(body)
        except SnapshotDecodeError as exc:
            raise AdminError("protocol", f"unexpected /admin/state answer: {exc}") from exc

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

    async def unload_adapter(self, name: str, drain: bool = False) -> str:
        """DELETE /admin/adapters/NAME: the adapter's state after the call (unloaded, unloading, draining)."""
        path = f"/admin/adapters/{quote(name, safe='')}" + ("?drain=true" if drain else "")
        return str((await self._call("DELETE", path)).get("state", "?"))
