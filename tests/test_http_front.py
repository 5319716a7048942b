"""The HTTP server's edge (issue #19), on a real uvicorn (`ApiServer`) on 127.0.0.1 with real sockets: slow
and half-sent requests lose their connection, a cap on open connections, chunked bodies over the limit,
the Host guard of a key-less loopback server, X-Forwarded-For only from trusted proxies, and the
read-only metrics token. No model: the engine stays "starting" (routes that need it answer 503)."""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import Request

from api.app import ApiServer, create_app
from api.front import host_name, is_loopback_name
from api.service import Service
from cluster.config import HttpFront, ServingConfig, ServingLimits
from cluster.engine_client import EngineClient
from cluster.errors import ConfigError
from rank.cli import build_parser, http_front

ADMIN, METRICS = "admin-secret", "metrics-secret"
MAX_BODY = 1000
CHAT = "/v1/chat/completions"


class _NoTokenizer:
    """No request in these tests gets as far as tokenizing."""

    vocab_size = 100


@contextmanager
def serving(
    front: HttpFront | None = None, *, host: str = "127.0.0.1", api_keys: tuple[str, ...] = ()
) -> Iterator[ApiServer]:
    config = ServingConfig(
        "tiny",
        2048,
        limits=ServingLimits(max_body_bytes=MAX_BODY),
        api_keys=api_keys,
        admin_token=ADMIN,
        front=front or HttpFront(),
    )
    app = create_app(Service(EngineClient(max_waiting=4), _NoTokenizer(), config, 100))  # type: ignore[arg-type]

    @app.get("/peer")
    async def peer(request: Request) -> dict[str, Any]:
        """The client address routes see (what the request log and the ledger record as client=)."""
        return {"client": request.client.host if request.client else None}

    @app.get("/slow")
    async def slow() -> dict[str, Any]:
        import asyncio

        await asyncio.sleep(2.5)
        return {"slow": True}

    server = ApiServer(app, host, 0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def url(server: ApiServer) -> str:
    return f"http://127.0.0.1:{server.bound_port}"


def open_sockets(server: ApiServer, n: int, stack: ExitStack, first: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = stack.enter_context(socket.create_connection(("127.0.0.1", server.bound_port), timeout=10))
        if first:
            s.sendall(first)
        socks.append(s)
    return socks


def wait_open(server: ApiServer, n: int) -> None:
    """Until the server holds n connections (accepting runs on its own thread)."""
    deadline = time.monotonic() + 10
    while len(server.server.server_state.connections) != n:
        assert time.monotonic() < deadline, len(server.server.server_state.connections)
        time.sleep(0.02)


def response_of(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_and_body(raw: bytes) -> tuple[int, dict[str, Any], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head.lower()


def closed_by_server(socks: Sequence[socket.socket], within: float, trickle: bytes = b"") -> list[bool]:
    """Which sockets the server closed within `within` seconds; `trickle` is sent to the open ones every
    0.2 s (a slowloris client: trickling bytes must not buy time)."""
    closed = [False] * len(socks)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    deadline = time.monotonic() + within
    while not all(closed) and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            i = key.data
            try:
                data = socks[i].recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                closed[i] = True
                sel.unregister(socks[i])
        for i, s in enumerate(socks):
            if trickle and not closed[i]:
                try:
                    s.send(trickle)
                except (BrokenPipeError, ConnectionResetError):
                    pass
    sel.close()
    return closed


# --- slow and half-sent requests, open connections ---


def test_slowloris_connections_are_closed_although_they_trickle_bytes() -> None:
    with serving(HttpFront(header_timeout=1.0)) as server, ExitStack() as stack:
        socks = open_sockets(server, 50, stack, first=b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-a: ")
        closed = closed_by_server(socks, within=10, trickle=b"a")
        assert all(closed), f"{closed.count(False)} of 50 slow connections still open"
        assert httpx.get(url(server) + "/health", timeout=5).status_code == 200


def test_health_answers_while_hundreds_of_connections_idle() -> None:
    with serving(HttpFront(header_timeout=60.0)) as server, ExitStack() as stack:
        open_sockets(server, 150, stack)
        open_sockets(server, 150, stack, first=b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        wait_open(server, 300)
        with httpx.Client(base_url=url(server), timeout=10) as http:
            started = time.monotonic()
            for _ in range(5):
                assert http.get("/health").status_code == 200
            assert http.get("/v1/models").json()["data"][0]["id"] == "tiny"
            assert time.monotonic() - started < 5  # loose: each answers in milliseconds


def test_connections_over_the_cap_get_503_and_are_closed() -> None:
    with serving(HttpFront(max_connections=8, header_timeout=60.0)) as server, ExitStack() as stack:
        idle = open_sockets(server, 8, stack)
        wait_open(server, 8)
        (extra,) = open_sockets(server, 1, stack)
        status, body, head = status_and_body(response_of(extra))
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        assert b"connection: close" in head
        for s in idle:
            s.close()
        wait_open(server, 0)
        assert httpx.get(url(server) + "/health", timeout=5).status_code == 200


def test_a_body_not_sent_in_time_gets_408() -> None:
    head = f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    with serving(HttpFront(request_read_timeout=1.0)) as server, ExitStack() as stack:
        counted, chunked = open_sockets(server, 2, stack)
        counted.sendall(f'{head}Content-Length: 500\r\n\r\n{{"model"'.encode())
        chunked.sendall(f'{head}Transfer-Encoding: chunked\r\n\r\n8\r\n{{"model"\r\n'.encode())
        for sock in (counted, chunked):
            status, body, raw_head = status_and_body(response_of(sock))
            assert status == 408 and body["error"]["code"] == "request_timeout", body
            assert b"connection: close" in raw_head


def test_a_body_no_route_reads_loses_its_connection_although_it_trickles() -> None:
    with serving(HttpFront(request_read_timeout=1.0)) as server, ExitStack() as stack:
        (sock,) = open_sockets(server, 1, stack)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 900\r\n\r\n")
        assert closed_by_server([sock], within=10, trickle=b"x") == [True]


def test_zero_timeouts_mean_no_limit() -> None:
    with serving(HttpFront(header_timeout=0, request_read_timeout=0)) as server, ExitStack() as stack:
        head, body = open_sockets(
            server, 2, stack, first=b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        )
        body.sendall(b"Content-Length: 10\r\n\r\n{")
        assert closed_by_server([head, body], within=2.5) == [False, False]


def test_deadlines_do_not_cut_slow_answers_or_kept_alive_connections() -> None:
    with serving(HttpFront(header_timeout=1.0, request_read_timeout=1.0)) as server:
        with httpx.Client(base_url=url(server), timeout=10) as http:
            assert http.get("/slow").json() == {"slow": True}  # 2.5 s of work after a complete request
            for _ in range(3):  # one kept-alive connection, a request every 0.5 s
                assert http.get("/health").status_code == 200
                time.sleep(0.5)


# --- body limit ---


def test_chunked_body_over_the_limit_gets_413_like_a_counted_one() -> None:
    head = f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    with serving() as server, ExitStack() as stack:
        chunked, counted, small = open_sockets(server, 3, stack)
        chunked.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(5):  # 2000 bytes in 400-byte chunks, never a length
            chunked.sendall(b"190\r\n" + b" " * 400 + b"\r\n")
        chunked.sendall(b"0\r\n\r\n")
        counted.sendall(f"{head}Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
        for sock in (chunked, counted):
            status, body, raw_head = status_and_body(response_of(sock))
            assert status == 413 and body["error"]["code"] == "request_too_large", body
            assert str(MAX_BODY) in body["error"]["message"] and b"connection: close" in raw_head
        small.sendall(
            f"{head}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n1\r\n{{\r\n0\r\n\r\n".encode()
        )
        status, body, _ = status_and_body(response_of(small))
        assert status == 400, body  # within the limit: read and found to be bad JSON


# --- Host names (DNS rebinding) ---


def host_status(server: ApiServer, host: str, path: str = "/v1/models") -> httpx.Response:
    return httpx.get(url(server) + path, headers={"Host": host}, timeout=5)


def test_keyless_loopback_server_refuses_foreign_host_names() -> None:
    with serving() as server:
        for host in ("localhost", "localhost:8000", "LocalHost.", "127.0.0.1:1", "127.1.2.3", "[::1]:8000"):
            assert host_status(server, host).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"):
            r = host_status(server, host)
            assert r.status_code == 403, host
            error = r.json()["error"]
            assert error["code"] == "host_not_allowed" and "--allowed-hosts" in error["message"]
        assert host_status(server, "evil.example", "/health").status_code == 403


def test_allowed_hosts_api_keys_or_a_public_bind_lift_the_host_guard() -> None:
    with serving(HttpFront(allowed_hosts=("box.lan",))) as server:
        assert host_status(server, "box.lan:8000").status_code == 200
        assert host_status(server, "evil.example").status_code == 403
    with serving(HttpFront(allowed_hosts=("*",))) as server:
        assert host_status(server, "evil.example").status_code == 200
    with serving(api_keys=("user-key",)) as server:  # the key protects it: any name may reach it
        assert host_status(server, "evil.example", "/health").status_code == 200
    with serving(host="0.0.0.0") as server:  # reached by whatever name the network gives it
        assert host_status(server, "studio-1.local", "/health").status_code == 200


def test_host_names_parse() -> None:
    assert host_name("LOCALHOST:80") == "localhost" and host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1" and host_name("box.lan.") == "box.lan"
    assert is_loopback_name("127.200.0.1") and is_loopback_name("::1") and not is_loopback_name("10.0.0.1")


# --- X-Forwarded-For ---


def test_x_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    with serving() as server:
        r = httpx.get(url(server) + "/peer", headers=forwarded, timeout=5)
        assert r.json()["client"] == "127.0.0.1"
    with serving(HttpFront(trusted_proxies=("127.0.0.1",))) as server:
        r = httpx.get(url(server) + "/peer", headers=forwarded, timeout=5)
        assert r.json()["client"] == "203.0.113.9"


# --- the metrics token ---


def test_metrics_token_reads_metrics_and_nothing_else() -> None:
    with serving(HttpFront(metrics_token=METRICS), api_keys=("user-key",)) as server:
        with httpx.Client(base_url=url(server), timeout=5) as http:

            def as_(token: str | None, method: str, path: str) -> httpx.Response:
                headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
                return http.request(method, path, headers=headers)

            for token in (METRICS, ADMIN):
                r = as_(token, "GET", "/metrics")
                assert r.status_code == 200 and "orchard_queue_depth" in r.text
            for token in (None, "wrong", "user-key", "None"):
                assert as_(token, "GET", "/metrics").status_code == 401, token
            for method, path in (
                ("GET", "/admin/state"),
                ("POST", "/admin/drain"),
                ("GET", "/admin/cache"),
                ("DELETE", "/admin/requests/x"),
                ("GET", "/v1/models"),
            ):
                assert as_(METRICS, method, path).status_code == 401, path
            assert as_(ADMIN, "GET", "/admin/state").status_code == 200


def test_without_a_metrics_token_only_the_admin_token_reads_metrics() -> None:
    with serving() as server:
        for token in ("None", "wrong", METRICS):
            r = httpx.get(url(server) + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            assert r.status_code == 401
        r = httpx.get(url(server) + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
        assert r.status_code == 200


# --- flags ---


def test_flags_build_the_http_front(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCHARD_METRICS_TOKEN", raising=False)
    assert http_front(build_parser().parse_args([])) == HttpFront()
    token_file = tmp_path / "metrics-token"
    token_file.write_text("\nfrom-file\n")
    args = build_parser().parse_args(
        [
            "--max-connections=64",
            "--header-timeout=3",
            "--request-read-timeout=0",
            "--allowed-hosts=box.lan,studio.local",
            "--allowed-hosts=other",
            "--trusted-proxies=10.0.0.0/8,127.0.0.1",
            f"--metrics-token-file={token_file}",
        ]
    )
    assert http_front(args) == HttpFront(
        64, 3.0, 0.0, ("box.lan", "studio.local", "other"), ("10.0.0.0/8", "127.0.0.1"), "from-file"
    )
    monkeypatch.setenv("ORCHARD_METRICS_TOKEN", "from-env")
    assert http_front(build_parser().parse_args([])).metrics_token == "from-env"
    for bad in (["--max-connections=0"], ["--header-timeout=-1"], ["--trusted-proxies=proxy.lan"]):
        with pytest.raises(ConfigError):
            http_front(build_parser().parse_args(bad))
