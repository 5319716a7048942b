"""Operator routes (`/admin/*`, `/metrics`): one consistent snapshot for the TUI and scripts, actions,
and Prometheus exposition. All need `Authorization: Bearer <admin token>`."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from api.errors import APIError
from api.service import Service
from cluster.engine_client import EngineState
from cluster.stats import Histogram


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def require_admin(request: Request) -> None:
    token = _svc(request).config.admin_token
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token or not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise APIError(
            401,
            "admin token missing or wrong: send Authorization: Bearer <admin token>",
            code="invalid_admin_token",
        )


router = APIRouter(dependencies=[Depends(require_admin)])


def admission(svc: Service) -> str:
    state = svc.client.state
    if state is EngineState.READY:
        return "paused" if svc.client.admission_paused else "open"
    return state.value


def cluster_state(svc: Service) -> dict[str, Any]:
    snap, now = svc.client.snapshot, time.time()
    stats = svc.stats
    return {
        "model": svc.config.model_name,
        "tensor_parallel": svc.config.world_size,
        "context_length": svc.config.context_length,
        "uptime_s": round(now - svc.started, 1),
        "engine": svc.client.state.value,
        "admission": admission(svc),
        "failure": svc.client.failure,
        "batch": {"running": snap.running, "waiting": snap.waiting, "max_batch": snap.max_batch},
        "last_step_ms": round(snap.last_step_ms, 2),
        "throughput": {
            "output_tokens_per_s": round(stats.throughput(now), 2) if stats else 0.0,
            "history_step_s": 5,
            "history": stats.history(now) if stats else [],
        },
        "totals": {
            "prompt_tokens": stats.prompt_tokens if stats else 0,
            "generated_tokens": stats.generated_tokens if stats else 0,
            "requests": dict(stats.outcomes) if stats else {},
        },
        "queue": [row.to_json() for row in svc.client.queue_rows],
        "kv": {"tiers": [t.to_json() for t in svc.kv_tiers]},
        "ranks": [h.to_json() for h in svc.health.snapshot()] if svc.health else [],
    }


@router.get("/admin/state")
async def state(request: Request) -> dict[str, Any]:
    return cluster_state(_svc(request))


@router.delete("/admin/requests/{request_id}")
async def cancel_request(request_id: str, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    if not svc.client.is_live(request_id):
        raise APIError(
            404, f"no running or queued request {request_id!r}", param="request_id", code="request_not_found"
        )
    svc.client.cancel(request_id, "operator")
    return {"cancelled": request_id}


@router.post("/admin/drain")
async def drain(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    svc.client.admission_paused = True
    return {"admission": admission(svc)}


@router.post("/admin/resume")
async def resume(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    svc.client.admission_paused = False
    return {"admission": admission(svc)}


@router.get("/admin/cache")
async def cache(request: Request) -> dict[str, Any]:
    return {"tiers": [t.to_json() for t in _svc(request).kv_tiers]}


@router.delete("/admin/cache/{tier}")
async def clear_tier(tier: str, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    names = [t.to_json()["tier"] for t in svc.kv_tiers]
    if tier not in names:
        raise APIError(
            404, f"no KV cache tier {tier!r} (tiers: {', '.join(names) or 'none'})", code="tier_not_found"
        )
    svc.client.clear_cache(tier)
    return {"clearing": tier}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    buckets, total, _ = hist.snapshot()
    return HistogramMetricFamily(
        name, doc, buckets=[("+Inf" if b == float("inf") else str(b), n) for b, n in buckets], sum_value=total
    )


class OrchardCollector(Collector):
    """Reads the engine's statistics at scrape time; nothing is counted twice or recomputed."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def collect(self):  # type: ignore[no-untyped-def]
        svc, snap = self.svc, self.svc.client.snapshot
        stats = svc.stats
        if stats is not None:
            yield _histogram(
                "orchard_time_to_first_token_seconds", "Time from arrival to the first token.", stats.ttft
            )
            yield _histogram(
                "orchard_inter_token_latency_seconds", "Time between tokens of a request.", stats.itl
            )
            yield _histogram(
                "orchard_request_duration_seconds", "Time from arrival to the last token.", stats.e2e
            )
            c = CounterMetricFamily("orchard_requests", "Finished requests by outcome.", labels=["outcome"])
            for outcome, n in sorted(stats.outcomes.items()):
                c.add_metric([outcome], n)
            yield c
            yield CounterMetricFamily(
                "orchard_prompt_tokens", "Prompt tokens admitted.", value=stats.prompt_tokens
            )
            yield CounterMetricFamily(
                "orchard_generation_tokens", "Tokens generated.", value=stats.generated_tokens
            )
        yield GaugeMetricFamily(
            "orchard_queue_depth", "Requests waiting for a batch slot.", value=snap.waiting
        )
        yield GaugeMetricFamily(
            "orchard_running_sequences", "Sequences being prefilled or decoded.", value=snap.running
        )
        yield GaugeMetricFamily("orchard_max_batch", "Configured batch capacity.", value=snap.max_batch)
        ready = GaugeMetricFamily(
            "orchard_ready", "1 when the engine admits requests.", value=float(admission(svc) == "open")
        )
        yield ready
        if svc.kv_tiers:
            used = GaugeMetricFamily(
                "orchard_kv_used_bytes", "KV cache bytes in use per rank.", labels=["tier"]
            )
            cap = GaugeMetricFamily(
                "orchard_kv_capacity_bytes", "KV cache capacity per rank.", labels=["tier"]
            )
            blocks = GaugeMetricFamily("orchard_kv_blocks", "KV cache blocks held.", labels=["tier"])
            hit = GaugeMetricFamily(
                "orchard_kv_hit_rate", "Share of prompt tokens found in the tier.", labels=["tier"]
            )
            q = CounterMetricFamily("orchard_kv_query_tokens", "Prompt tokens looked up.", labels=["tier"])
            h = CounterMetricFamily("orchard_kv_hit_tokens", "Prompt tokens found.", labels=["tier"])
            ev = CounterMetricFamily("orchard_kv_evictions", "Blocks evicted.", labels=["tier"])
            for t in svc.kv_tiers:
                j = t.to_json()
                name = [str(j["tier"])]
                used.add_metric(name, j["bytes_used"])
                cap.add_metric(name, j["capacity_bytes"])
                blocks.add_metric(name, j["blocks"])
                hit.add_metric(name, j["hit_rate"])
                q.add_metric(name, j["query_tokens"])
                h.add_metric(name, j["hit_tokens"])
                ev.add_metric(name, j["evictions"])
            yield from (used, cap, blocks, hit, q, h, ev)
        if svc.health is None:
            return
        up = GaugeMetricFamily("orchard_rank_up", "1 when the rank is ok or slow.", labels=["rank", "host"])
        step = GaugeMetricFamily(
            "orchard_rank_step_seconds", "Duration of the rank's last step.", labels=["rank", "host"]
        )
        mem = GaugeMetricFamily(
            "orchard_rank_memory_bytes", "Memory of a rank.", labels=["rank", "host", "kind"]
        )
        for h in svc.health.snapshot():
            labels = [str(h.rank), h.host]
            up.add_metric(labels, float(h.state in ("ok", "slow")))
            step.add_metric(labels, h.step_ms / 1000)
            for kind, value in (
                ("mlx_active", h.active_bytes),
                ("mlx_peak", h.peak_bytes),
                ("rss", h.rss_bytes),
            ):
                mem.add_metric([*labels, kind], value)
        yield up
        yield step
        yield mem


def metrics_registry(svc: Service) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OrchardCollector(svc))
    return registry
