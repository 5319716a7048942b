"""The contract between the server and the dashboard: one schema (`cluster.snapshot`) writes /admin/state
and reads it back. A fully populated snapshot built from the real producers (ServingStats, the RAM and
SSD tiers, the health table) round-trips equal; deleting, renaming or mistyping any field of the served
document makes the decoder fail; the API serves the engine's published snapshot and the TUI's client
decodes it. No model, no MPI: the API runs in-process."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.service import Service
from cluster.adapters import AdapterRegistry, AdapterSpec
from cluster.config import ServingConfig
from cluster.engine_client import EngineClient, EngineState
from cluster.health import HealthTable, RankReport
from cluster.kvindex import BlockIndex
from cluster.manifest import Manifest
from cluster.memory import KvCost, KvMemory
from cluster.requests import GenerationRequest, Request, SamplingParams
from cluster.snapshot import JobFacts, JobSnapshot, RequestRow, SnapshotDecodeError, SpeculationView, capture
from cluster.ssdtier import SsdTier
from cluster.stats import ServingStats
from tui.client import AdminClient, AdminError

TOKEN = "contract-token"
NOW = 1_700_000_100.25
FACTS = JobFacts("tiny", 2, 2048, started=NOW - 100.0)

# /admin/state as scripts have read it since the dashboard came: these keys, this nesting.
LEGACY_TOP = {
    "model", "tensor_parallel", "context_length", "uptime_s", "engine", "admission", "failure", "batch",
    "last_step_ms", "throughput", "totals", "queue", "kv", "ranks",
}  # fmt: skip
LEGACY_NESTED = {
    "batch": {"running", "waiting", "max_batch"},
    "throughput": {"output_tokens_per_s", "history_step_s", "history"},
    "totals": {"prompt_tokens", "generated_tokens", "requests"},
    "kv": {"tiers"},
}
LEGACY_TIER = {
    "tier", "blocks", "capacity_blocks", "bytes_used", "capacity_bytes", "block_bytes", "query_tokens",
    "hit_tokens", "miss_tokens", "hit_rate", "evictions", "stored",
}  # fmt: skip
LEGACY_SSD = {"enabled", "disabled_reason", "corrupt_dropped", "rank0_io"}
LEGACY_IO = {"write_bytes", "read_bytes", "writes", "reads", "write_ms_avg", "read_ms_avg", "corrupt_found",
             "errors"}  # fmt: skip
LEGACY_RANK = {
    "rank", "host", "pid", "state", "report_age_s", "step", "step_ms", "median_step_ms", "active_bytes",
    "peak_bytes", "rss_bytes", "kv_blocks", "kv_bytes", "last_error", "liveness_age_s",
}  # fmt: skip
ADAPTER_KEYS = {"name", "slot", "state", "requests", "total_requests", "rank", "path", "digest"}
LEGACY_ROW = {"request_id", "state", "age_s", "prompt_tokens", "generated_tokens", "tokens_per_s", "client"}
MEMORY_KEYS = {
    "budget_bytes", "kv_bytes", "padding_bytes", "reserved_bytes", "waiting_for_memory", "admitted", "delayed",
    "pressure", "live_from", "quantized",
}  # fmt: skip
SPEC_KEYS = {
    "mode", "tokens", "drafted", "accepted", "rows", "recent_drafted", "recent_accepted", "acceptance",
    "recent_acceptance",
}  # fmt: skip


class SsdCounters:
    """Rank 0's file counters as rank/ssd.py keeps them (that module needs MLX)."""

    write_bytes, read_bytes, write_seconds, read_seconds = 4096, 2048, 0.03, 0.01
    writes, reads, corrupt, errors = 3, 2, 1, 0


def stats() -> ServingStats:
    s = ServingStats()
    s.prompt_tokens = 123
    for i in range(40):
        s.record_tokens(NOW - 60 + i * 1.5, 3)
    for v in (0.004, 0.02, 0.3, 7.0, 400.0):
        s.ttft.observe(v)
        s.itl.observe(v / 10)
        s.e2e.observe(v * 2)
    for outcome in ("stop", "stop", "length", "cancelled", "error"):
        s.record_outcome(outcome)
    s.memory = memory()
    s.spec_mode, s.spec_tokens = "ngram", 4
    s.speculated(12, 9, 4, NOW - 30)  # outside the recent window (10 s)
    s.speculated(5, 2, 1, NOW - 2)
    s.speculated(3, 1, 1, NOW - 1.5)  # the same second: one slot of the window
    return s


def memory() -> KvMemory:
    """The real accounting: one request decoding, one prefilling beside it, a third waiting for room."""
    mem = KvMemory(KvCost(token_bytes=1024), budget_bytes=3 * 512 * 1024, context_length=2048)
    decoding, prefilling, waiting = (
        Request.from_submission(
            GenerationRequest(f"m{i}", (1,) * n, SamplingParams(max_tokens=m), sink=lambda e: None), i, bytes
        )
        for i, (n, m) in enumerate([(300, 100), (40, 10), (900, 100)])
    )
    decoding.computed, decoding.output = 300, [5, 6]
    prefilling.computed = 32
    assert mem.admits([], decoding) and mem.admits([decoding], prefilling)
    assert not mem.admits([decoding, prefilling], waiting)
    mem.observe([decoding, prefilling], 1)
    return mem


def tiers(tmp: Path) -> list[Any]:
    index = BlockIndex(32, 100, 4096)
    index.stats.blocks, index.stats.query_tokens, index.stats.hit_tokens = 7, 640, 320
    index.stats.evictions, index.stats.stored = 2, 9
    ssd = SsdTier(Manifest(tmp / "manifest.sqlite", 2), index, 10 * 4096)
    ssd.stats.query_tokens, ssd.stats.hit_tokens, ssd.corrupt = 320, 64, 1
    ssd.enabled, ssd.disabled_reason = False, "disk full"
    ssd.io = SsdCounters()
    return [index.stats, ssd]


def ranks() -> list[Any]:
    clock = [50.0]
    table = HealthTable(lambda: clock[0], timeout=5.0)
    table.register(0, "studio-1", 100)
    table.register(1, "studio-2", 101)
    table.liveness = lambda r: 0.75  # rank 1 is pinged; rank 0 never is (None)
    for step in range(10):
        table.update(RankReport(0, "studio-1", 100, step, 20.0, 1 << 28, 1 << 29, 1 << 30, 7, 7 * 4096))
        table.update(
            RankReport(1, "studio-2", 101, step, 21.5, 1 << 27, 1 << 28, 1 << 29, 7, 7 * 4096, "oops")
        )
    clock[0] += 1.25
    return table.snapshot()


def adapters() -> Any:
    """Two LoRA adapters from the real registry: one serving a request, one being loaded."""
    reg = AdapterRegistry(4, "tiny")
    reg.add_loaded("sql", 1, AdapterSpec("/adapters/sql", b"\x01" * 32, 8))
    reg.reserve("chat", AdapterSpec("/adapters/chat", b"\x02" * 32, 16))
    assert reg.acquire("sql") == 1
    return reg.rows()


QUEUE = (
    RequestRow("cmpl-1", "running", 3.5, 40, 12, 8.25, "10.0.0.2"),
    RequestRow("cmpl-2", "waiting", 0.5, 1000, 0, 0.0, ""),
)


@pytest.fixture
def full(tmp_path: Path) -> JobSnapshot:
    return capture(
        facts=FACTS, engine_state="ready", admission_paused=True, failure="rank 1 is slow",
        running=1, waiting=1, max_batch=8, sequences_on_ranks=1, steps=321, last_step_ms=41.237,
        stats=stats(), queue=QUEUE, tiers=tiers(tmp_path), ranks=ranks(), now_unix=NOW, adapters=adapters(),
        chained_steps=300,
    )  # fmt: skip


def wire(snap: JobSnapshot) -> Any:
    """As a client receives it (strict JSON: no NaN or Infinity)."""
    return json.loads(json.dumps(snap.to_json(), allow_nan=False))


def key_paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every object key in the document, at any depth (list items by index), except the outcome counts,
    whose keys are data (outcome names), not schema."""
    if isinstance(node, dict) and path != ("totals", "requests"):
        for key, value in node.items():
            yield (*path, key)
            yield from key_paths(value, (*path, key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from key_paths(item, (*path, i))


def parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


def test_populated_snapshot_round_trips_equal(full: JobSnapshot) -> None:
    assert full.queue and full.ranks and len(full.tiers) == 2 and full.failure
    assert full.tiers[1].extra is not None and full.tiers[1].extra.rank0_io is not None
    assert not full.tiers[1].enabled and full.tiers[0].enabled
    assert {r.liveness_age_s for r in full.ranks} == {None, 0.75}
    assert full.latency.time_to_first_token.count == 5 and full.totals.requests == {
        "stop": 2, "length": 1, "cancelled": 1, "error": 1,
    }  # fmt: skip
    assert full.throughput.output_tokens_per_s > 0 and any(full.throughput.history)
    assert full.admission == "paused" and full.uptime_s == 100.0
    assert [(a.name, a.slot, a.state, a.requests) for a in full.adapters] == [
        ("sql", 1, "ready", 1), ("chat", 2, "loading", 0),
    ]  # fmt: skip
    # 302 positions decoding, 32 prefilling, each with room for 256 more; both rows may grow to 400 + 256
    assert full.memory.waiting_for_memory == 1 and full.memory.padding_bytes == 256 * 1024
    assert full.memory.kv_bytes == (558 + 288) * 1024 and full.memory.reserved_bytes == 2 * 656 * 1024
    assert full.memory.pressure == 0.8542 and (full.memory.admitted, full.memory.delayed) == (2, 0)
    assert full.speculation == SpeculationView("ngram", 4, 20, 12, 6, 8, 3)
    assert (full.speculation.acceptance, full.speculation.recent_acceptance) == (0.6, 0.375)
    assert JobSnapshot.from_json(wire(full)) == full
    starting = JobSnapshot.starting(FACTS)
    assert JobSnapshot.from_json(wire(starting)) == starting


def test_legacy_keys_and_nesting_are_kept(full: JobSnapshot) -> None:
    doc = wire(full)
    assert LEGACY_TOP <= set(doc)
    assert set(doc) - LEGACY_TOP == {
        "steps", "sequences_on_ranks", "latency", "published_unix", "adapters", "memory", "speculation",
        "chained_steps",
    }  # fmt: skip
    assert set(doc["memory"]) == MEMORY_KEYS
    assert set(doc["speculation"]) == SPEC_KEYS
    for key, keys in LEGACY_NESTED.items():
        assert set(doc[key]) == keys, key
    ram, ssd = doc["kv"]["tiers"]
    assert set(ram) == LEGACY_TIER and set(ssd) == LEGACY_TIER | LEGACY_SSD
    assert set(ssd["rank0_io"]) == LEGACY_IO
    assert all(set(r) == LEGACY_RANK for r in doc["ranks"])
    assert all(set(q) == LEGACY_ROW for q in doc["queue"])
    assert all(set(a) == ADAPTER_KEYS for a in doc["adapters"]) and len(doc["adapters"]) == 2
    assert len(doc["throughput"]["history"]) == 36 and doc["throughput"]["history_step_s"] == 5


def test_every_missing_renamed_or_mistyped_field_fails(full: JobSnapshot) -> None:
    doc = wire(full)
    paths = list(key_paths(doc))
    assert len(paths) > 100
    for path in paths:
        for change in ("delete", "rename", "mistype"):
            broken = copy.deepcopy(doc)
            holder, key = parent(broken, path), path[-1]
            value = holder.pop(key)
            if change == "rename":
                holder[f"{key}_v2"] = value
            elif change == "mistype":
                holder[key] = 1 if isinstance(value, str) else "x"
            if path == ("speculation",) and change != "mistype":
                # the one section an older server leaves out: gone whole, it is unknown, never zeros
                assert JobSnapshot.from_json(broken) == dataclasses.replace(full, speculation=None)
                continue
            with pytest.raises(SnapshotDecodeError) as info:
                JobSnapshot.from_json(broken)
            assert str(key) in str(info.value), (path, change, info.value)


def test_unknown_fields_are_ignored(full: JobSnapshot) -> None:
    doc = wire(full)
    doc["added_later"] = {"x": 1}
    doc["kv"]["tiers"][0]["shards"] = 4
    doc["ranks"][0]["gpu"] = "m2"
    assert JobSnapshot.from_json(doc) == full


def test_one_ssd_field_alone_is_a_renamed_field(full: JobSnapshot) -> None:
    doc = wire(full)
    ram = doc["kv"]["tiers"][0]
    ram["corrupt_dropped"] = 0
    with pytest.raises(SnapshotDecodeError, match=r"kv\.tiers\[0\]\.enabled: missing"):
        JobSnapshot.from_json(doc)


class Codec:
    vocab_size = 256

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Any) -> str:
        return bytes(ids).decode(errors="replace")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(str(messages))


def service() -> Service:
    config = ServingConfig("tiny", 2048, admin_token=TOKEN, world_size=2)
    return Service(EngineClient(max_waiting=4), Codec(), config, 256, started=FACTS.started)


def test_api_serves_the_published_snapshot(full: JobSnapshot) -> None:
    svc = service()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(svc)) as http:
        before = http.get("/admin/state", headers=auth).json()  # nothing published yet: starting
        assert JobSnapshot.from_json(before).engine == "starting" and before["model"] == "tiny"
        svc.client.set_state(EngineState.READY)
        svc.client.publish(full)  # as the engine thread does
        served = JobSnapshot.from_json(http.get("/admin/state", headers=auth).json())
        # the engine's state and the operator's pause are the client's, overlaid live; the rest is published
        assert served == full.with_lifecycle("ready", False, None)
        assert served.admission == "open" and served.failure is None
        assert http.post("/admin/drain", headers=auth).json() == {"admission": "paused"}
        assert http.get("/admin/state", headers=auth).json()["admission"] == "paused"
        health = http.get("/health").json()
        assert health["engine_stats"] == {
            "state": "ready", "running": 1, "waiting": 1, "max_batch": 8, "free_slots": 7,
            "sequences_on_ranks": 1, "steps": 321, "chained_steps": 300, "generated_tokens": 120,
            "last_step_ms": 41.24,
        }  # fmt: skip
        assert (health["status"], health["ranks"], health["uptime_s"]) == ("ok", 2, 100.0)
        assert http.get("/health/ready").json()["ranks_ok"] is True
        assert [t["tier"] for t in http.get("/admin/cache", headers=auth).json()["tiers"]] == ["ram", "ssd"]
        assert http.delete("/admin/cache/nvme", headers=auth).status_code == 404
        assert http.delete("/admin/cache/ssd", headers=auth).json() == {"clearing": "ssd"}
        metrics = http.get("/metrics", headers=auth).text
        for needle in (
            'orchard_time_to_first_token_seconds_bucket{le="0.005"} 1.0',
            'orchard_time_to_first_token_seconds_bucket{le="+Inf"} 5.0',
            'orchard_requests_total{outcome="stop"} 2.0',
            "orchard_generation_tokens_total 120.0",
            'orchard_kv_hit_rate{tier="ssd"} 0.2',
            'orchard_rank_up{host="studio-2",rank="1"} 1.0',
            "orchard_queue_depth 1.0",
            'orchard_adapter_live_requests{adapter="sql"} 1.0',
            'orchard_adapter_requests_total{adapter="sql"} 1.0',
            'orchard_adapter_requests_total{adapter="chat"} 0.0',
            "orchard_kv_waiting_for_memory 1.0",
            "orchard_kv_pressure 0.8542",
            'orchard_rank_kv_bytes{host="studio-2",kind="budget",rank="1"} 1.572864e+06',
            'orchard_rank_kv_bytes{host="studio-1",kind="used",rank="0"} 866304.0',
            'orchard_spec_mode{mode="ngram"} 1.0',
            "orchard_spec_max_draft_tokens 4.0",
            "orchard_spec_drafted_tokens_total 20.0",
            "orchard_spec_accepted_tokens_total 12.0",
            "orchard_spec_verify_rows_total 6.0",
            "orchard_spec_acceptance_ratio 0.6",
            "# TYPE orchard_spec_drafted_tokens_total counter",
            "# HELP orchard_spec_acceptance_ratio Accepted over drafted tokens since start.",
            "# TYPE orchard_spec_acceptance_ratio gauge",
        ):
            assert needle in metrics, needle
        svc.client.set_state(EngineState.FAILED, "rank 1 died")
        failed = http.get("/health")
        assert failed.status_code == 503 and failed.json()["error"] == "rank 1 died"


def test_dashboard_client_decodes_the_served_state(full: JobSnapshot) -> None:
    svc = service()
    svc.client.set_state(EngineState.READY)
    svc.client.publish(full)
    app = create_app(svc)

    async def fetch(token: str) -> JobSnapshot:
        admin = AdminClient("http://rank0", token, transport=httpx.ASGITransport(app))
        try:
            return await admin.state()
        finally:
            await admin.close()

    assert asyncio.run(fetch(TOKEN)) == full.with_lifecycle("ready", False, None)


def test_dashboard_client_calls_an_undecodable_state_a_protocol_error(full: JobSnapshot) -> None:
    doc = wire(full)
    doc["batch"]["runing"] = doc["batch"].pop("running")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=doc)

    async def fetch() -> JobSnapshot:
        admin = AdminClient("http://rank0", TOKEN, transport=httpx.MockTransport(handler))
        try:
            return await admin.state()
        finally:
            await admin.close()

    with pytest.raises(AdminError) as info:
        asyncio.run(fetch())
    assert info.value.kind == "protocol" and "batch.running: missing" in info.value.message


def test_a_document_from_before_speculation_decodes_as_unknown(full: JobSnapshot) -> None:
    """An older server sends no `speculation`: the dashboard shows "n/a", not a mode of "off" or zeros."""
    doc = wire(full)
    del doc["speculation"]
    assert JobSnapshot.from_json(doc).speculation is None
    doc["speculation"] = None  # what the starting snapshot sends before the engine's first publish
    assert JobSnapshot.from_json(doc).speculation is None
    assert wire(JobSnapshot.starting(FACTS))["speculation"] is None


def test_speculation_counters_and_recent_window() -> None:
    s = ServingStats()
    off = s.speculation_view(NOW)
    assert off == SpeculationView("off", 0, 0, 0, 0, 0, 0) and off.acceptance == off.recent_acceptance == 0.0
    s.spec_mode, s.spec_tokens = "draft", 6
    s.speculated(6, 6, 1, NOW - 10)  # exactly the window's length ago: out of it
    s.speculated(10, 4, 3, NOW - 9)  # the window holds whole seconds: (now - 10 s, now]
    s.speculated(0, 0, 0, NOW)  # no row carried drafts: counts nothing
    view = s.speculation_view(NOW)
    assert (view.drafted, view.accepted, view.rows) == (16, 10, 4)
    assert (view.recent_drafted, view.recent_accepted) == (10, 4)
    assert (view.mode, view.tokens, view.acceptance, view.recent_acceptance) == ("draft", 6, 0.625, 0.4)
    assert s.speculation_view(NOW) is view  # cached until a figure moves
    later = s.speculation_view(NOW + 60)
    assert (later.recent_drafted, later.recent_acceptance, later.acceptance) == (0, 0.0, 0.625)
    for impossible in ((3, 4, 1), (3, 1, 0), (0, 0, 1), (2, 1, 3), (-1, 0, 0)):
        with pytest.raises(ValueError, match="impossible"):
            s.speculated(*impossible, now_unix=NOW)
    assert s.spec_drafted == 16  # nothing counted by a refused call


def test_metrics_with_speculation_off_and_before_the_first_publish() -> None:
    svc = service()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(svc)) as http:
        assert "orchard_spec" not in http.get("/metrics", headers=auth).text  # nothing known yet
        svc.client.publish(
            capture(
                facts=FACTS,
                engine_state="ready",
                admission_paused=False,
                failure=None,
                running=0,
                waiting=0,
                max_batch=8,
                sequences_on_ranks=0,
                steps=0,
                last_step_ms=0.0,
                stats=ServingStats(),
                queue=(),
                tiers=(),
                ranks=(),
                now_unix=NOW,
            )  # fmt: skip
        )
        metrics = http.get("/metrics", headers=auth).text
        for needle in (
            'orchard_spec_mode{mode="off"} 1.0',
            "orchard_spec_drafted_tokens_total 0.0",
            "orchard_spec_accepted_tokens_total 0.0",
            "orchard_spec_acceptance_ratio 0.0",
        ):
            assert needle in metrics, needle
        state = http.get("/admin/state", headers=auth).json()["speculation"]
        assert state["mode"] == "off" and state["drafted"] == 0 and state["acceptance"] == 0.0
