"""A small async client of rank 0's admin API, with one exception type the dashboard shows, never raises."""

from __future__ import annotations

from typing import Any

import httpx


class AdminError(Exception):
    """`kind`: "unreachable" (connection refused, timeout), "auth" (token refused) or "http"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout: float = 5.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        try:
            r = await self._http.request(method, path)
        except httpx.HTTPError as exc:
            raise AdminError("unreachable", f"cannot reach {self.url}: {type(exc).__name__}") from exc
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 401:
            raise AdminError("auth", "the admin token was refused (pass --token or set ORCHARD_ADMIN_TOKEN)")
        if r.status_code >= 400:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else None
            raise AdminError("http", message or f"HTTP {r.status_code} from {path}")
        return body if isinstance(body, dict) else {}

    async def state(self) -> dict[str, Any]:
        return await self._call("GET", "/admin/state")

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/admin/requests/{request_id}")

    async def drain(self) -> dict[str, Any]:
        return await self._call("POST", "/admin/drain")

    async def resume(self) -> dict[str, Any]:
        return await self._call("POST", "/admin/resume")

    async def clear(self, tier: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/admin/cache/{tier}")
