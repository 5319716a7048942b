"""Operator routes (`/admin/*`, `/metrics`): the engine's published snapshot for the TUI and scripts,
actions, and Prometheus exposition. All need `Authorization: Bearer <admin token>`; `/metrics` also takes
the read-only metrics token. Every figure comes from `Service.snapshot()`, never from the engine's live
objects."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from api.errors import APIError
from api.looplag import LoopLag
from api.service import Service
from cluster.snapshot import HistogramView, JobSnapshot


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def _bearer_matches(request: Request, tokens: tuple[str | None, ...]) -> bool:
    header = request.headers.get("authorization", "")
    given = (header[7:].strip() if header.lower().startswith("bearer ") else "").encode()
    ok = False
    for token in tokens:  # no early exit: timing does not tell which token matched
        ok |= bool(token) and bool(given) and hmac.compare_digest(given, (token or "").encode())
    return ok


def require_admin(request: Request) -> None:
    if not _bearer_matches(request, (_svc(request).config.admin_token,)):
        raise APIError(
            401,
            "admin token missing or wrong: send Authorization: Bearer <admin token>",
            code="invalid_admin_token",
        )


def require_metrics_reader(request: Request) -> None:
    """/metrics takes the admin token or the read-only metrics token (`--metrics-token`), so Prometheus
    needs no token that can drain the server or cancel requests."""
    config = _svc(request).config
    if not _bearer_matches(request, (config.admin_token, config.front.metrics_token)):
        raise APIError(
            401,
            "admin or metrics token missing or wrong: send Authorization: Bearer <token>",
            code="invalid_admin_token",
        )


router = APIRouter(dependencies=[Depends(require_admin)])
metrics_router = APIRouter(dependencies=[Depends(require_metrics_reader)])


def admission(svc: Service) -> str:
    return svc.snapshot().admission


def cluster_state(svc: Service) -> dict[str, Any]:
    """The /admin/state document: the published snapshot as the dashboard decodes it."""
    return svc.snapshot().to_json()


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
    svc.client.cancel(request_id)
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
    return {"tiers": [t.to_json() for t in _svc(request).snapshot().tiers]}


@router.delete("/admin/cache/{tier}")
async def clear_tier(tier: str, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    names = [t.name for t in svc.snapshot().tiers]
    if tier not in names:
        raise APIError(
            404, f"no KV cache tier {tier!r} (tiers: {', '.join(names) or 'none'})", code="tier_not_found"
        )
    svc.client.clear_cache(tier)
    return {"clearing": tier}


@metrics_router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def _histogram(name: str, doc: str, hist: HistogramView) -> HistogramMetricFamily:
    bounds = [*(str(b) for b in hist.bounds), "+Inf"]
    return HistogramMetricFamily(
        name, doc, buckets=list(zip(bounds, hist.cumulative, strict=True)), sum_value=hist.sum
    )


class OrchardCollector(Collector):
    """Reads the engine's published snapshot at scrape time; nothing is counted twice or recomputed."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def collect(self):  # type: ignore[no-untyped-def]
        snap = self.svc.snapshot()
        lat, totals = snap.latency, snap.totals
        yield _histogram(
            "orchard_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            lat.time_to_first_token,
        )
        yield _histogram(
            "orchard_inter_token_latency_seconds", "Time between tokens of a request.", lat.inter_token
        )
        yield _histogram(
            "orchard_request_duration_seconds", "Time from arrival to the last token.", lat.request_duration
        )
        c = CounterMetricFamily("orchard_requests", "Finished requests by outcome.", labels=["outcome"])
        for outcome, n in sorted(totals.requests.items()):
            c.add_metric([outcome], n)
        yield c
        yield CounterMetricFamily(
            "orchard_prompt_tokens", "Prompt tokens admitted.", value=totals.prompt_tokens
        )
        yield CounterMetricFamily(
            "orchard_generation_tokens", "Tokens generated.", value=totals.generated_tokens
        )
        yield GaugeMetricFamily(
            "orchard_queue_depth", "Requests waiting for a batch slot.", value=snap.batch.waiting
        )
        yield GaugeMetricFamily(
            "orchard_running_sequences", "Sequences being prefilled or decoded.", value=snap.batch.running
        )
        yield GaugeMetricFamily("orchard_max_batch", "Configured batch capacity.", value=snap.batch.max_batch)
        yield CounterMetricFamily(
            "orchard_chained_steps",
            "Steps whose plan went out while the step before ran (--chain-steps).",
            value=snap.chained_steps,
        )
        yield GaugeMetricFamily(
            "orchard_ready", "1 when the engine admits requests.", value=float(snap.admission == "open")
        )
        if snap.tiers:
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
            for t in snap.tiers:
                name = [t.name]
                used.add_metric(name, t.bytes_used)
                cap.add_metric(name, t.capacity_bytes)
                blocks.add_metric(name, t.blocks)
                hit.add_metric(name, t.hit_rate)
                q.add_metric(name, t.query_tokens)
                h.add_metric(name, t.hit_tokens)
                ev.add_metric(name, t.evictions)
            yield from (used, cap, blocks, hit, q, h, ev)
        yield from _memory_metrics(snap)
        yield from _speculation_metrics(snap)
        if snap.adapters:
            live = GaugeMetricFamily(
                "orchard_adapter_live_requests",
                "Running or queued requests per LoRA adapter.",
                labels=["adapter"],
            )
            total = CounterMetricFamily(
                "orchard_adapter_requests", "Requests accepted per LoRA adapter since it was loaded.",
                labels=["adapter"],
            )  # fmt: skip
            for a in snap.adapters:
                live.add_metric([a.name], a.requests)
                total.add_metric([a.name], a.total_requests)
            yield live
            yield total
        up = GaugeMetricFamily("orchard_rank_up", "1 when the rank is ok or slow.", labels=["rank", "host"])
        step = GaugeMetricFamily(
            "orchard_rank_step_seconds", "Duration of the rank's last step.", labels=["rank", "host"]
        )
        mem = GaugeMetricFamily(
            "orchard_rank_memory_bytes", "Memory of a rank.", labels=["rank", "host", "kind"]
        )
        for r in snap.ranks:
            labels = [str(r.rank), r.host]
            up.add_metric(labels, float(r.state in ("ok", "slow")))
            step.add_metric(labels, r.step_ms / 1000)
            for kind, value in (
                ("mlx_active", r.active_bytes),
                ("mlx_peak", r.peak_bytes),
                ("rss", r.rss_bytes),
            ):
                mem.add_metric([*labels, kind], value)
        yield up
        yield step
        yield mem


def _memory_metrics(snap: JobSnapshot) -> Iterator[Any]:
    """The running sequences' KV against the budget (cluster.memory), per rank: every rank holds the same
    share, so each rank's series carries the same accounted numbers (its measured memory is
    orchard_rank_memory_bytes)."""
    m = snap.memory
    if not m.budget_bytes:
        return
    per_rank = GaugeMetricFamily(
        "orchard_rank_kv_bytes",
        "KV cache of running sequences per rank: in use (padding included), reserved, budget.",
        labels=["rank", "host", "kind"],
    )
    for r in snap.ranks:
        labels = [str(r.rank), r.host]
        for kind, value in (("used", m.kv_bytes), ("reserved", m.reserved_bytes), ("budget", m.budget_bytes)):
            per_rank.add_metric([*labels, kind], value)
    yield per_rank
    yield GaugeMetricFamily(
        "orchard_kv_budget_bytes", "KV budget per rank (--kv-budget).", value=m.budget_bytes
    )
    yield GaugeMetricFamily(
        "orchard_kv_running_bytes",
        "KV cache of running sequences per rank, padding included.",
        value=m.kv_bytes,
    )
    yield GaugeMetricFamily(
        "orchard_kv_padding_bytes",
        "Of it, the decode batch's padding to its longest row.",
        value=m.padding_bytes,
    )
    yield GaugeMetricFamily(
        "orchard_kv_reserved_bytes", "KV the running sequences may grow to, per rank.", value=m.reserved_bytes
    )
    yield GaugeMetricFamily("orchard_kv_pressure", "Reserved KV over the budget.", value=m.pressure)
    yield GaugeMetricFamily(
        "orchard_kv_waiting_for_memory",
        "Requests queued because the KV budget is full.",
        value=m.waiting_for_memory,
    )
    yield CounterMetricFamily(
        "orchard_kv_delayed_requests", "Requests that waited for KV memory before starting.", value=m.delayed
    )
    yield GaugeMetricFamily(
        "orchard_kv_live_quantized_sequences",
        "Running sequences whose KV cache is quantized (--kv-live-from).",
        value=m.quantized,
    )


def _speculation_metrics(snap: JobSnapshot) -> Iterator[Any]:
    """Speculative decoding (#16): counters since start; a recent rate is Prometheus' own
    `rate(accepted) / rate(drafted)`. Present whenever the server reports speculation, zeros when off."""
    spec = snap.speculation
    if spec is None:
        return
    mode = GaugeMetricFamily(
        "orchard_spec_mode", "Speculative decoding mode: 1 for the one in use (--spec).", labels=["mode"]
    )
    mode.add_metric([spec.mode], 1)
    yield mode
    yield GaugeMetricFamily(
        "orchard_spec_max_draft_tokens",
        "Most tokens drafted per row and step (--spec-tokens).",
        value=spec.tokens,
    )
    yield CounterMetricFamily(
        "orchard_spec_drafted_tokens", "Drafted tokens verified by the model.", value=spec.drafted
    )
    yield CounterMetricFamily(
        "orchard_spec_accepted_tokens",
        "Drafted tokens accepted (the bonus token not counted).",
        value=spec.accepted,
    )
    yield CounterMetricFamily(
        "orchard_spec_verify_rows", "Decode rows that carried drafts, one per row and step.", value=spec.rows
    )
    yield GaugeMetricFamily(
        "orchard_spec_acceptance_ratio", "Accepted over drafted tokens since start.", value=spec.acceptance
    )


class LoopLagCollector(Collector):
    """The HTTP event loop's lag (api/looplag.py), measured on the loop itself, not through the engine."""

    def __init__(self, lag: LoopLag) -> None:
        self.lag = lag

    def collect(self):  # type: ignore[no-untyped-def]
        yield GaugeMetricFamily(
            "orchard_event_loop_lag_seconds",
            "Worst lateness of rank 0's HTTP event loop over the last 10 s (every answer waits for it).",
            value=self.lag.recent_max(),
        )
        yield CounterMetricFamily(
            "orchard_event_loop_stalls",
            "Times rank 0's HTTP event loop ran 100 ms or more late.",
            value=self.lag.stalls,
        )


def metrics_registry(svc: Service, lag: LoopLag | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OrchardCollector(svc))
    if lag is not None:
        registry.register(LoopLagCollector(lag))
    return registry
