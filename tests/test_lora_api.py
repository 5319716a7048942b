"""LoRA adapters on the HTTP side: `model` picks an adapter, /v1/models lists them, the admin API loads
and unloads them with OpenAI-shaped errors.

In-process first (no model: a stand-in engine thread takes the inbox and runs each plan's adapter
operations the way rank 0's engine does), then one real TP=2 job (`--lora` with a synthetic adapter from
tests/lora_check.py) that loads and unloads adapters through the admin API while traffic runs: no
request fails except those named (requests for an adapter being drained get 404)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.service import Service
from cluster.adapters import AdapterCheck, AdapterRegistry, AdapterSpec
from cluster.config import ServingConfig
from cluster.engine_client import Cancel, EngineClient, EngineState
from cluster.requests import Admission, GenerationRequest, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from tests.jobs import Job, stream_in_subprocess, tiny_args

TOKEN = "lora-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Codec:
    vocab_size = 256

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Any) -> str:
        return bytes(ids).decode(errors="replace")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(str(messages))


def inspect(path: str) -> AdapterCheck:
    """rank/lora.py's check, faked: a folder named "bad" is refused with the rank side's kind of message."""
    if path.endswith("bad"):
        return AdapterCheck(None, f"adapter {path}: adapters.safetensors is missing")
    return AdapterCheck(AdapterSpec(path, hashlib.sha256(path.encode()).digest(), 4))


class Engine(threading.Thread):
    """Rank 0's engine loop minus the model: inbox -> scheduler, plans 'run' at once. Requests never get a
    batch slot (max_batch 0), so a request keeps using its adapter until it is cancelled."""

    def __init__(self, client: EngineClient, adapters: AdapterRegistry) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.scheduler = Scheduler(SchedulerConfig(max_batch=0), Codec().decode, [0], None, adapters)
        client.attach(self.scheduler)
        self.done = threading.Event()
        self.publish: Any = lambda: None  # the dashboard's test publishes snapshots as the engine does

    def run(self) -> None:
        while not self.done.is_set():
            self.publish()
            with self.client.taking() as commands:
                for cmd in commands:
                    if isinstance(cmd, Cancel):
                        self.scheduler.cancel(cmd.request_id)
                    elif isinstance(cmd, GenerationRequest):
                        self.scheduler.add(cmd)
            if self.scheduler.adapters is not None and self.scheduler.adapters.has_ops():
                step = self.scheduler.schedule()
                self.scheduler.update(step, ())
            else:
                self.client.wait(0.01)


@pytest.fixture
def served() -> Iterator[tuple[TestClient, Service]]:
    reg = AdapterRegistry(2, "tiny")
    client = EngineClient(max_waiting=8, adapters=reg)
    svc = Service(
        client, Codec(), ServingConfig("tiny", 2048, admin_token=TOKEN), 256, inspect_adapter=inspect
    )
    engine = Engine(client, reg)
    engine.start()
    client.set_state(EngineState.READY)
    try:
        with TestClient(create_app(svc)) as http:
            yield http, svc
    finally:
        engine.done.set()
        engine.join(5)


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return str(err["message"])


def use(svc: Service, rid: str, model: str) -> None:
    """A request for `model` the engine keeps (it never gets a batch slot in this test)."""
    sub = GenerationRequest(rid, (1, 2), SamplingParams(), lambda e: None, adapter_name=model)
    assert svc.client.submit(sub) is Admission.ACCEPTED


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_load_list_select_and_unload(served: tuple[TestClient, Service]) -> None:
    http, svc = served
    assert http.get("/admin/adapters", headers=AUTH).json() == {
        "base": "tiny",
        "max_loras": 2,
        "adapters": [],
    }
    assert http.get("/admin/adapters").status_code == 401
    r = http.post("/admin/adapters", json={"name": "sql", "path": "/adapters/sql"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("name", "slot", "state", "requests", "rank")} == {
        "name": "sql", "slot": 1, "state": "ready", "requests": 0, "rank": 4,
    }  # fmt: skip
    models = http.get("/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("sql", "tiny")]
    assert http.get("/v1/models/sql").json()["parent"] == "tiny"
    assert "'sql'" in error(http.get("/v1/models/chat"), 404, "model_not_found")
    # vLLM's field names work too
    r = http.post("/admin/adapters", json={"lora_name": "chat", "lora_path": "/adapters/chat"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["slot"] == 2
    assert "unload one first" in error(
        http.post("/admin/adapters", json={"name": "more", "path": "/adapters/more"}, headers=AUTH),
        507,
        "adapter_slots_full",
    )
    assert http.delete("/admin/adapters/chat", headers=AUTH).json() == {"name": "chat", "state": "unloaded"}
    error(http.delete("/admin/adapters/chat", headers=AUTH), 404, "adapter_not_found")
    r = http.post("/admin/adapters", json={"name": "more", "path": "/adapters/more"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["slot"] == 2  # the freed slot, reused
    body = {"model": "nope", "prompt": "hi", "max_tokens": 1}
    error(http.post("/v1/completions", json=body), 404, "model_not_found")


def test_bad_loads_are_refused_clearly(served: tuple[TestClient, Service]) -> None:
    http, _ = served

    def load(body: dict[str, Any]) -> httpx.Response:
        return http.post("/admin/adapters", json=body, headers=AUTH)

    assert "adapters.safetensors is missing" in error(
        load({"name": "x", "path": "/adapters/bad"}), 400, "invalid_adapter"
    )
    assert "not absolute" in error(load({"name": "x", "path": "adapters/x"}), 400, "invalid_value")
    error(load({"name": "tiny", "path": "/adapters/x"}), 409, "adapter_exists")  # the base model's name
    error(load({"name": "bad name", "path": "/adapters/x"}), 400, "invalid_adapter_name")
    assert load({"name": "x", "path": "/adapters/x"}).status_code == 200
    error(load({"name": "x", "path": "/adapters/y"}), 409, "adapter_exists")
    assert load({"name": "x"}).status_code == 400
    assert load({"name": "y", "path": "/a", "extra": 1}).status_code == 400


def test_unload_is_refused_while_in_use_or_drained(served: tuple[TestClient, Service]) -> None:
    http, svc = served
    assert (
        http.post("/admin/adapters", json={"name": "sql", "path": "/a/sql"}, headers=AUTH).status_code == 200
    )
    use(svc, "r1", "sql")
    use(svc, "r2", "sql")
    assert "2 request(s) use adapter 'sql'" in error(
        http.delete("/admin/adapters/sql", headers=AUTH), 409, "adapter_in_use"
    )
    r = http.delete("/admin/adapters/sql?drain=true", headers=AUTH)
    assert r.status_code == 202 and r.json() == {"name": "sql", "state": "draining", "requests": 2}
    # no new requests for it: 404, as for any model not served
    error(
        http.post("/v1/completions", json={"model": "sql", "prompt": "hi", "max_tokens": 1}),
        404,
        "model_not_found",
    )
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
    rows = http.get("/admin/adapters", headers=AUTH).json()["adapters"]
    assert [(a["name"], a["state"], a["requests"]) for a in rows] == [("sql", "draining", 2)]
    svc.client.cancel("r1")
    svc.client.cancel("r2")  # the last one: it unloads
    wait_until(lambda: http.get("/admin/adapters", headers=AUTH).json()["adapters"] == [])
    assert (
        http.post("/admin/adapters", json={"name": "sql", "path": "/a/sql"}, headers=AUTH).status_code == 200
    )


def test_adapters_off_says_how_to_turn_them_on() -> None:
    svc = Service(EngineClient(max_waiting=1), Codec(), ServingConfig("tiny", 2048, admin_token=TOKEN), 256)
    with TestClient(create_app(svc)) as http:
        assert http.get("/admin/adapters", headers=AUTH).json()["adapters"] == []
        r = http.post("/admin/adapters", json={"name": "x", "path": "/a"}, headers=AUTH)
        assert "--max-loras" in error(r, 400, "adapters_off")
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]


# -- the dashboard -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_dashboard_shows_adapters_and_drains_one_after_asking() -> None:
    """The adapters pane and its unload key, against the real API served by uvicorn (the stand-in engine
    publishes snapshots as rank 0's does): an adapter in use is drained, after a confirmation."""
    import dataclasses

    from api.app import ApiServer
    from cluster.snapshot import JobFacts, JobSnapshot
    from tests.test_tui import RecordingApp, screen, wait_for
    from tui.screens import Confirm

    reg = AdapterRegistry(2, "tiny")
    client = EngineClient(max_waiting=8, adapters=reg)
    svc = Service(
        client, Codec(), ServingConfig("tiny", 2048, admin_token=TOKEN), 256, inspect_adapter=inspect
    )
    engine = Engine(client, reg)
    base = dataclasses.replace(JobSnapshot.starting(JobFacts("tiny", 1, 2048, time.time())), engine="ready")
    engine.publish = lambda: client.publish(dataclasses.replace(base, adapters=reg.rows()))
    engine.start()
    client.set_state(EngineState.READY)
    server = ApiServer(create_app(svc), "127.0.0.1", 0)
    server.start()
    app = RecordingApp(f"http://127.0.0.1:{server.bound_port}", TOKEN, interval=0.2)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.snapshot is not None)
            assert not app.adapters.display and "u unload" not in screen(app).splitlines()[-1]
            reg.reserve("sql", AdapterSpec("/adapters/sql", b"\x01" * 32, 8))
            client.wake()
            await wait_for(pilot, lambda: app.adapters.row_count == 1 and "ready" in screen(app))
            use(svc, "r1", "sql")
            await wait_for(pilot, lambda: app.adapters.by_name["sql"].requests == 1)
            text = screen(app)
            assert "adapters · 1" in text and "sql" in text and "u unload" in text.splitlines()[-1]
            await pilot.press("u")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
            assert "Drain and unload adapter sql?" in screen(app) and "1 request(s) use it" in screen(app)
            await pilot.press("n")  # declined: nothing happens
            await wait_for(pilot, lambda: not isinstance(app.screen, Confirm))
            assert reg.rows()[0].state == "ready"
            await pilot.press("u")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
            await pilot.press("y")
            await wait_for(pilot, lambda: ("information", "adapter sql: draining") in app.notes)
            await wait_for(pilot, lambda: "draining" in screen(app))
            client.cancel("r1")  # its last request ends: it unloads, and the pane goes
            await wait_for(pilot, lambda: not app.adapters.display)
            assert not [n for n in app.notes if n[0] == "error"], app.notes
    finally:
        server.stop()
        engine.done.set()
        engine.join(5)


# -- a real job ------------------------------------------------------------------------------------

NO_EOS = {"2": -100}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    from tests.lora_check import build_adapter

    root = tmp_path_factory.mktemp("lora-api")
    return {
        "sql": build_adapter(tiny_model, root / "sql", seed=1),
        "chat": build_adapter(tiny_model, root / "chat", seed=2, rank=8),
    }


@pytest.fixture(scope="module")
def job(job_factory, tiny_model: Path, adapters: dict[str, Path]) -> Job:  # type: ignore[no-untyped-def]
    args = tiny_args(
        tiny_model, "--admin-token", TOKEN, "--lora", f"sql={adapters['sql']}", "--max-loras", "2"
    )
    job: Job = job_factory.start(2, args, "lora-api")
    wait_until(lambda: httpx.get(job.url + "/health/ready").status_code == 200, 60)
    return job


class Traffic(threading.Thread):
    """Greedy completions for `model`, one after another until stopped; every answer is kept."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.stop = threading.Event()
        self.results: list[tuple[int, str]] = []

    def run(self) -> None:
        body = {"model": self.model, "prompt": "count: 1 2 3", "max_tokens": 8, "temperature": 0,
                "logit_bias": NO_EOS}  # fmt: skip
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                r = http.post(self.url + "/v1/completions", json=body)
                self.results.append((r.status_code, r.text))


def complete(job: Job, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "count: 1 2 3", "max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS}
    return httpx.post(job.url + "/v1/completions", json=body, timeout=120)


@pytest.mark.cluster
@pytest.mark.asyncio
async def test_load_and_unload_while_traffic_runs(job: Job, adapters: dict[str, Path]) -> None:
    models = httpx.get(job.url + "/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("sql", "tiny")]
    answers = {m: complete(job, m).json() for m in ("tiny", "sql")}
    assert {m: a["model"] for m, a in answers.items()} == {"tiny": "tiny", "sql": "sql"}  # the name asked for
    before = {m: a["choices"][0]["text"] for m, a in answers.items()}
    traffic = [Traffic(job.url, m) for m in ("tiny", "sql")]
    for t in traffic:
        t.start()
    admin = httpx.Client(base_url=job.url, headers=AUTH, timeout=120)
    try:
        r = admin.post("/admin/adapters", json={"name": "chat", "path": str(adapters["chat"])})
        assert r.status_code == 200 and r.json()["state"] == "ready" and r.json()["slot"] == 2, r.text
        assert complete(job, "chat").status_code == 200
        bad = admin.post("/admin/adapters", json={"name": "x", "path": str(adapters["chat"].parent / "none")})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_adapter"
        assert (
            admin.post("/admin/adapters", json={"name": "x", "path": str(adapters["sql"])}).status_code == 507
        )
        # a long stream on "chat": its adapter cannot go while it runs, and drains after it
        body = {"model": "chat", "prompt": "x", "max_tokens": 300, "stream": True, "logit_bias": NO_EOS}
        proc = await stream_in_subprocess(job.url, body)
        assert proc.stdout is not None
        first = await proc.stdout.readline()
        assert first.startswith(b"data: {"), first
        in_use = admin.delete("/admin/adapters/chat")
        assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "adapter_in_use", in_use.text
        drain = admin.delete("/admin/adapters/chat", params={"drain": "true"})
        assert drain.status_code == 202 and drain.json()["state"] == "draining", drain.text
        named = complete(job, "chat")  # the one kind of request allowed to fail: for a draining adapter
        assert named.status_code == 404 and named.json()["error"]["code"] == "model_not_found"
        out, _ = await proc.communicate()
        lines = [json.loads(x[6:]) for x in (first + out).splitlines() if x.startswith(b"data: {")]
        assert "error" not in lines[-1] and lines[-1]["choices"][0]["finish_reason"] == "length", lines[-1]
        wait_until(
            lambda: [a["name"] for a in admin.get("/admin/adapters").json()["adapters"]] == ["sql"], 60
        )
        r = admin.post("/admin/adapters", json={"name": "chat2", "path": str(adapters["chat"])})
        assert r.status_code == 200 and r.json()["slot"] == 2  # the slot, reused
        assert complete(job, "chat2").status_code == 200
        metrics = admin.get("/metrics").text
        assert 'orchard_adapter_requests_total{adapter="chat2"}' in metrics
    finally:
        for t in traffic:
            t.stop.set()
        for t in traffic:
            t.join(120)
        admin.close()
    for t in traffic:
        assert t.results and all(code == 200 for code, _ in t.results), [x for x in t.results if x[0] != 200][
            :3
        ]
        texts = {json.loads(text)["choices"][0]["text"] for _, text in t.results}
        assert texts == {before[t.model]}, (t.model, texts)  # greedy: the same answer all along
    assert httpx.get(job.url + "/health/ready").status_code == 200
