"""Admin API, per-rank health and Prometheus metrics on a real TP=2 job."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.jobs import Job, stream_in_subprocess, tiny_args

pytestmark = pytest.mark.cluster
TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def job(job_factory, tiny_model: Path) -> Job:  # type: ignore[no-untyped-def]
    args = tiny_args(tiny_model, "--admin-token", TOKEN, "--api-key", "user-key")
    return job_factory.start(2, args, "admin")


def admin(job: Job, method: str, path: str) -> httpx.Response:
    return httpx.request(method, job.url + path, headers=AUTH, timeout=30)


def test_admin_routes_need_the_admin_token(job: Job) -> None:
    for method, path in (
        ("GET", "/admin/state"),
        ("POST", "/admin/drain"),
        ("GET", "/metrics"),
        ("DELETE", "/admin/requests/x"),
    ):
        assert httpx.request(method, job.url + path).status_code == 401
        wrong = httpx.request(method, job.url + path, headers={"Authorization": "Bearer user-key"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_token"
    assert httpx.get(job.url + "/health").status_code == 200
    assert httpx.get(job.url + "/health/ready").status_code == 200


def test_state_shows_every_rank_with_its_own_report(job: Job) -> None:
    deadline = time.monotonic() + 15
    while True:
        state = admin(job, "GET", "/admin/state").json()
        ranks = state["ranks"]
        if len(ranks) == 2 and all(r["rss_bytes"] > 0 for r in ranks):
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["model"] == "tiny" and state["tensor_parallel"] == 2 and state["admission"] == "open"
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["state"] == "ok" and r["report_age_s"] < 5 and r["host"] and r["pid"] > 0 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]


def test_cancel_from_admin_ends_the_stream_with_an_error(job: Job) -> None:
    body = {
        "model": "tiny",
        "prompt": "cancel me",
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": {"2": -100},
    }

    async def scenario() -> tuple[list[str], str]:
        client = await stream_in_subprocess(job.url, body, "user-key")
        assert client.stdout is not None
        first = (await asyncio.wait_for(client.stdout.readline(), 30)).decode().strip()
        rid = json.loads(first[6:])["id"]
        async with httpx.AsyncClient(base_url=job.url, timeout=60) as http:
            deadline = time.monotonic() + 5
            while True:  # the view is refreshed 4 times a second: it may show the request waiting first
                queue = (await http.get("/admin/state", headers=AUTH)).json()["queue"]
                row = next((r for r in queue if r["request_id"] == rid), None)
                if row is not None and row["state"] != "waiting":
                    break
                assert time.monotonic() < deadline, f"request not in the queue view as started: {row}"
                await asyncio.sleep(0.1)
            assert row["state"] in ("prefill", "running") and row["prompt_tokens"] > 0
            r = await http.delete(f"/admin/requests/{rid}", headers=AUTH)
            assert r.json() == {"cancelled": rid}
        rest, _ = await asyncio.wait_for(client.communicate(), 30)
        lines = [first] + [ln for ln in rest.decode().splitlines() if ln.startswith("data: {")]
        return lines, rid

    lines, rid = asyncio.run(scenario())
    assert "cancelled by an operator" in json.loads(lines[-1][6:])["error"]["message"]
    assert admin(job, "DELETE", f"/admin/requests/{rid}").status_code == 404


def test_drain_and_resume_admission(job: Job) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    user = {"Authorization": "Bearer user-key"}
    assert admin(job, "POST", "/admin/drain").json() == {"admission": "paused"}
    r = httpx.post(job.url + "/v1/completions", json=body, headers=user)
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    assert httpx.get(job.url + "/health/ready").status_code == 503
    assert httpx.get(job.url + "/health").status_code == 200  # alive, just not admitting
    assert admin(job, "POST", "/admin/resume").json() == {"admission": "open"}
    assert httpx.post(job.url + "/v1/completions", json=body, headers=user).status_code == 200


def test_prometheus_metrics(job: Job) -> None:
    body = {"model": "tiny", "prompt": "metrics", "max_tokens": 5, "logit_bias": {"2": -100}}
    assert (
        httpx.post(
            job.url + "/v1/completions", json=body, headers={"Authorization": "Bearer user-key"}
        ).status_code
        == 200
    )
    text = admin(job, "GET", "/metrics").text
    for needle in (
        "orchard_time_to_first_token_seconds_bucket",
        "orchard_inter_token_latency_seconds_count",
        "orchard_request_duration_seconds_sum",
        'orchard_requests_total{outcome="length"}',
        "orchard_generation_tokens_total",
        "orchard_queue_depth",
        "orchard_rank_up{host=",
        'rank="1"',
        "orchard_rank_memory_bytes",
        "orchard_kv_budget_bytes",  # the KV budget per rank (cluster.memory), on by default
        "orchard_rank_kv_bytes{host=",
        "orchard_kv_pressure",
        "# TYPE orchard_spec_drafted_tokens_total counter",  # speculative decoding (#16), whatever the mode
        "# TYPE orchard_spec_accepted_tokens_total counter",
        "# TYPE orchard_spec_acceptance_ratio gauge",
        "orchard_spec_mode{mode=",
        "# TYPE orchard_event_loop_lag_seconds gauge",  # rank 0's HTTP event loop (api/looplag.py)
        "orchard_event_loop_stalls_total",
    ):
        assert needle in text, needle
    spec = admin(job, "GET", "/admin/state").json()["speculation"]
    assert spec["mode"] in ("off", "ngram", "draft") and 0 <= spec["accepted"] <= spec["drafted"]
    assert 0.0 <= spec["acceptance"] <= 1.0
    memory = admin(job, "GET", "/admin/state").json()["memory"]
    assert memory["budget_bytes"] > 0 and memory["waiting_for_memory"] == 0 and memory["admitted"] >= 1
    assert admin(job, "DELETE", "/admin/cache/ssd-nope").status_code == 404


def test_prefix_cache_over_http_hit_equals_miss_and_clears(job: Job) -> None:
    user = {"Authorization": "Bearer user-key"}
    prompt = "A long shared context that the cache should keep. " * 6
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "logit_bias": {"2": -100}}
    before = admin(job, "GET", "/admin/cache").json()["tiers"][0]
    first = httpx.post(job.url + "/v1/completions", json=body, headers=user, timeout=60).json()
    second = httpx.post(job.url + "/v1/completions", json=body, headers=user, timeout=60).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    tier = admin(job, "GET", "/admin/cache").json()["tiers"][0]
    assert tier["tier"] == "ram" and tier["blocks"] > 0
    assert (
        tier["hit_tokens"] - before["hit_tokens"] >= (len(prompt) // 32 - 1) * 32
    )  # byte-level: 1 token per char
    assert tier["bytes_used"] == tier["blocks"] * tier["block_bytes"] <= tier["capacity_bytes"]
    assert "orchard_kv_hit_tokens_total" in admin(job, "GET", "/metrics").text
    assert admin(job, "DELETE", "/admin/cache/ram").json() == {"clearing": "ram"}
    deadline = time.monotonic() + 10
    while admin(job, "GET", "/admin/cache").json()["tiers"][0]["blocks"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    third = httpx.post(job.url + "/v1/completions", json=body, headers=user, timeout=60).json()
    assert third["choices"][0]["text"] == first["choices"][0]["text"]  # recomputed after the clear: same
