"""One frozen picture of the job: built by the engine thread, read by everything else.

The engine thread builds a `JobSnapshot` with `capture()` a few times a second and swaps it in whole
(`EngineClient.publish`); `/health`, `/metrics` and `/admin/state` read only that, never the live
statistics the engine is writing. The dashboard decodes `/admin/state` with the same classes
(`JobSnapshot.from_json`), strictly: a field the server renamed or dropped is an error on screen, not a
column of zeros. Stdlib only (plus the stdlib-only `cluster.errors`): the TUI imports this module. The
KV cache's views live in `cluster.snapshot_kv` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.snapshot_doc import Doc, SnapshotDecodeError
from cluster.snapshot_kv import NO_MEMORY, MemoryView, TierSource, TierView

if TYPE_CHECKING:
    from cluster.stats import ServingStats

__all__ = [
    "HISTORY_SHOWN_S", "HISTORY_STEP_S", "LATENCY_BUCKETS", "NO_MEMORY", "SPEC_RECENT_S", "AdapterView",
    "BatchView", "HistogramView", "JobFacts", "JobSnapshot", "LatencyView", "MemoryView", "RankView",
    "RequestRow", "SnapshotDecodeError", "SpeculationView", "ThroughputView", "TierSource", "TierView",
    "Totals", "admission_of", "capture",
]  # fmt: skip

# Latency buckets in seconds (Prometheus convention: base units), from 5 ms to 5 minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HISTORY_SHOWN_S = 180  # the throughput history shown: 36 slots of 5 s
HISTORY_STEP_S = 5


def admission_of(engine: str, paused: bool) -> str:
    """What a new request meets: "open", "paused" (an operator's drain), or the engine's state."""
    return ("paused" if paused else "open") if engine == "ready" else engine


@dataclass(slots=True, frozen=True)
class JobFacts:
    """What does not change while the job runs; `started` is unix seconds."""

    model: str
    tensor_parallel: int
    context_length: int
    started: float


@dataclass(slots=True, frozen=True)
class RequestRow:
    """One line of the queue in /admin/state and the TUI."""

    request_id: str
    state: str
    age_s: float
    prompt_tokens: int
    generated_tokens: int
    tokens_per_s: float
    client: str

    def to_json(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "state": self.state,
            "age_s": self.age_s,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.tokens_per_s,
            "client": self.client,
        }

    @classmethod
    def from_json(cls, doc: object, path: str = "row") -> RequestRow:
        d = Doc(doc, path)
        return cls(
            d.text("request_id"), d.text("state"), d.number("age_s"), d.integer("prompt_tokens"),
            d.integer("generated_tokens"), d.number("tokens_per_s"), d.text("client"),
        )  # fmt: skip


@dataclass(slots=True, frozen=True)
class BatchView:
    running: int  # sequences prefilling or decoding
    waiting: int  # admitted to the queue, not started
    max_batch: int

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.running

    def to_json(self) -> dict[str, object]:
        return {"running": self.running, "waiting": self.waiting, "max_batch": self.max_batch}

    @classmethod
    def from_json(cls, doc: object, path: str = "batch") -> BatchView:
        d = Doc(doc, path)
        return cls(d.integer("running"), d.integer("waiting"), d.integer("max_batch"))


@dataclass(slots=True, frozen=True)
class ThroughputView:
    output_tokens_per_s: float  # over the last 10 s
    history_step_s: int
    history: tuple[float, ...]  # output tokens/s per slot, oldest first

    def to_json(self) -> dict[str, object]:
        return {
            "output_tokens_per_s": self.output_tokens_per_s,
            "history_step_s": self.history_step_s,
            "history": list(self.history),
        }

    @classmethod
    def from_json(cls, doc: object, path: str = "throughput") -> ThroughputView:
        d = Doc(doc, path)
        return cls(d.number("output_tokens_per_s"), d.integer("history_step_s"), d.numbers("history"))


@dataclass(slots=True, frozen=True)
class Totals:
    prompt_tokens: int
    generated_tokens: int
    requests: Mapping[str, int]  # finished requests by outcome; never mutated once published

    def to_json(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "requests": dict(self.requests),
        }

    @classmethod
    def from_json(cls, doc: object, path: str = "totals") -> Totals:
        d = Doc(doc, path)
        return cls(d.integer("prompt_tokens"), d.integer("generated_tokens"), d.counts("requests"))


@dataclass(slots=True, frozen=True)
class HistogramView:
    """A latency histogram as Prometheus wants it: cumulative counts per upper bound, then +Inf (which
    JSON cannot spell, so the bounds list leaves it out and `cumulative` has one entry more)."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float
    count: int

    def to_json(self) -> dict[str, object]:
        return {"bounds": list(self.bounds), "cumulative": list(self.cumulative), "sum": self.sum,
                "count": self.count}  # fmt: skip

    @classmethod
    def from_json(cls, doc: object, path: str = "histogram") -> HistogramView:
        d = Doc(doc, path)
        bounds, cumulative = d.numbers("bounds"), d.integers("cumulative")
        if len(cumulative) != len(bounds) + 1:
            raise SnapshotDecodeError(f"{d.at('cumulative')}: expected {len(bounds) + 1} counts")
        return cls(bounds, cumulative, d.number("sum"), d.integer("count"))

    @classmethod
    def empty(cls, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> HistogramView:
        return cls(bounds, (0,) * (len(bounds) + 1), 0.0, 0)


@dataclass(slots=True, frozen=True)
class LatencyView:
    time_to_first_token: HistogramView
    inter_token: HistogramView
    request_duration: HistogramView

    def to_json(self) -> dict[str, object]:
        return {
            "time_to_first_token": self.time_to_first_token.to_json(),
            "inter_token": self.inter_token.to_json(),
            "request_duration": self.request_duration.to_json(),
        }

    @classmethod
    def from_json(cls, doc: object, path: str = "latency") -> LatencyView:
        d = Doc(doc, path)
        return cls(*(HistogramView.from_json(d.get(k), d.at(k)) for k in ("time_to_first_token",
                     "inter_token", "request_duration")))  # fmt: skip


SPEC_RECENT_S = 10  # the window of the recent acceptance rate, as the throughput's


@dataclass(slots=True, frozen=True)
class SpeculationView:
    """Speculative decoding as rank 0 counts it (`ServingStats.speculated`): `drafted` tokens proposed
    for verification, `accepted` of them (the bonus token not counted), `rows` decode rows that carried
    drafts (each gains its accepted drafts in that step). The `recent_*` counters cover the last
    `SPEC_RECENT_S` seconds, so an operator sees the rate now, not the average since start."""

    mode: str  # off, ngram, draft
    tokens: int  # the most drafted tokens per row and step (--spec-tokens)
    drafted: int
    accepted: int
    rows: int
    recent_drafted: int
    recent_accepted: int

    @property
    def acceptance(self) -> float:
        """Accepted over drafted since start; 0 while nothing was drafted."""
        return round(self.accepted / self.drafted, 4) if self.drafted else 0.0

    @property
    def recent_acceptance(self) -> float:
        return round(self.recent_accepted / self.recent_drafted, 4) if self.recent_drafted else 0.0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {f: getattr(self, f) for f in _SPEC_FIELDS}
        out["acceptance"], out["recent_acceptance"] = self.acceptance, self.recent_acceptance
        return out

    @classmethod
    def from_json(cls, doc: object, path: str = "speculation") -> SpeculationView:
        d = Doc(doc, path)
        view = cls(d.text("mode"), *(d.integer(f) for f in _SPEC_FIELDS[1:]))
        d.number("acceptance")  # derived, but part of the document: it must be there
        d.number("recent_acceptance")
        return view


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(SpeculationView))


@dataclass(slots=True, frozen=True)
class RankView:
    """One rank as rank 0 judges it (ok, slow, unresponsive, dead) from its own reports; built by
    `cluster.health.HealthTable.snapshot`."""

    rank: int
    host: str
    pid: int
    state: str
    report_age_s: float
    step: int
    step_ms: float
    median_step_ms: float
    active_bytes: int  # MLX active memory
    peak_bytes: int  # MLX peak memory
    rss_bytes: int
    kv_blocks: int
    kv_bytes: int
    last_error: str
    liveness_age_s: float | None  # since the rank last answered rank 0's liveness ping (None: not pinged)

    @property
    def beat_age_s(self) -> float:
        """How long since we last heard of the rank: a liveness answer when pinged, else a report."""
        return self.report_age_s if self.liveness_age_s is None else self.liveness_age_s

    def to_json(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in _RANK_FIELDS}

    @classmethod
    def from_json(cls, doc: object, path: str = "rank") -> RankView:
        d = Doc(doc, path)
        return cls(
            d.integer("rank"), d.text("host"), d.integer("pid"), d.text("state"), d.number("report_age_s"),
            d.integer("step"), d.number("step_ms"), d.number("median_step_ms"), d.integer("active_bytes"),
            d.integer("peak_bytes"), d.integer("rss_bytes"), d.integer("kv_blocks"), d.integer("kv_bytes"),
            d.text("last_error"), d.optional_number("liveness_age_s"),
        )  # fmt: skip


_RANK_FIELDS = tuple(f.name for f in dataclasses.fields(RankView))


@dataclass(slots=True, frozen=True)
class AdapterView:
    """One LoRA adapter served besides the base model (`cluster.adapters.AdapterRegistry.rows`)."""

    name: str  # the `model` name that selects it
    slot: int
    state: str  # loading, ready, draining, unloading
    requests: int  # running or queued requests that use it
    total_requests: int  # requests accepted for it since it was loaded
    rank: int  # the LoRA rank r
    path: str
    digest: str  # hex digest of its files

    def to_json(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in _ADAPTER_FIELDS}

    @classmethod
    def from_json(cls, doc: object, path: str = "adapter") -> AdapterView:
        d = Doc(doc, path)
        return cls(
            d.text("name"), d.integer("slot"), d.text("state"), d.integer("requests"),
            d.integer("total_requests"), d.integer("rank"), d.text("path"), d.text("digest"),
        )  # fmt: skip


_ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(AdapterView))


@dataclass(slots=True, frozen=True)
class JobSnapshot:
    """The whole job as `/admin/state` shows it. The first keys of `to_json()` are the document
    operators' scripts have read since the dashboard came (same keys, same nesting); `steps`,
    `sequences_on_ranks`, `latency` and `published_unix` came with this class, `adapters` with LoRA,
    `memory` with the KV budget, `speculation` with speculative decoding."""

    model: str
    tensor_parallel: int
    context_length: int
    uptime_s: float
    engine: str  # the engine's lifecycle state (EngineState value)
    admission: str  # admission_of(engine, paused)
    failure: str | None
    batch: BatchView
    last_step_ms: float
    throughput: ThroughputView
    totals: Totals
    queue: tuple[RequestRow, ...]
    tiers: tuple[TierView, ...]
    ranks: tuple[RankView, ...]
    steps: int
    sequences_on_ranks: int  # sequences whose KV the ranks hold (rank 0's executor mirrors all)
    latency: LatencyView
    published_unix: float  # when the engine thread captured it
    adapters: tuple[AdapterView, ...] = ()  # LoRA adapters, by slot (the base model is not listed)
    memory: MemoryView = NO_MEMORY  # the KV budget per rank (cluster.memory); came with #17
    # speculative decoding (#16); None: a server from before it (the key is absent) or not yet published
    speculation: SpeculationView | None = None
    chained_steps: int = 0  # steps whose plan went out before the step before ran (rank/engine.py)

    @classmethod
    def starting(cls, facts: JobFacts) -> JobSnapshot:
        """What readers see before the engine's first publish."""
        empty = HistogramView.empty()
        return cls(
            model=facts.model, tensor_parallel=facts.tensor_parallel, context_length=facts.context_length,
            uptime_s=0.0, engine="starting", admission="starting", failure=None, batch=BatchView(0, 0, 0),
            last_step_ms=0.0,
            throughput=ThroughputView(0.0, HISTORY_STEP_S, (0.0,) * (HISTORY_SHOWN_S // HISTORY_STEP_S)),
            totals=Totals(0, 0, {}), queue=(), tiers=(), ranks=(), steps=0, sequences_on_ranks=0,
            latency=LatencyView(empty, empty, empty), published_unix=facts.started,
        )  # fmt: skip

    def with_lifecycle(self, engine: str, paused: bool, failure: str | None) -> JobSnapshot:
        """This snapshot with the values `EngineClient` owns and changes at once (state, failure, the
        operator's pause) overlaid: a drain or a failure shows before the engine's next publish."""
        admission = admission_of(engine, paused)
        if (engine, admission, failure) == (self.engine, self.admission, self.failure):
            return self
        return dataclasses.replace(self, engine=engine, admission=admission, failure=failure)

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "tensor_parallel": self.tensor_parallel,
            "context_length": self.context_length,
            "uptime_s": self.uptime_s,
            "engine": self.engine,
            "admission": self.admission,
            "failure": self.failure,
            "batch": self.batch.to_json(),
            "last_step_ms": self.last_step_ms,
            "throughput": self.throughput.to_json(),
            "totals": self.totals.to_json(),
            "queue": [row.to_json() for row in self.queue],
            "kv": {"tiers": [t.to_json() for t in self.tiers]},
            "ranks": [r.to_json() for r in self.ranks],
            "steps": self.steps,
            "sequences_on_ranks": self.sequences_on_ranks,
            "latency": self.latency.to_json(),
            "published_unix": self.published_unix,
            "adapters": [a.to_json() for a in self.adapters],
            "memory": self.memory.to_json(),
            "speculation": None if self.speculation is None else self.speculation.to_json(),
            "chained_steps": self.chained_steps,
        }

    @classmethod
    def from_json(cls, doc: object) -> JobSnapshot:
        """Strict: every field must be there with its type (`SnapshotDecodeError` names the first that
        is not); fields this version does not know are ignored, so a newer server still decodes. The one
        exception is `speculation` (#16): a server from before it sends none, which decodes as None (the
        dashboard shows "n/a", never zeros); when present it is decoded as strictly as the rest."""
        d = Doc(doc, "")
        kv = d.child("kv")
        spec = d.d.get("speculation")
        return cls(
            model=d.text("model"),
            tensor_parallel=d.integer("tensor_parallel"),
            context_length=d.integer("context_length"),
            uptime_s=d.number("uptime_s"),
            engine=d.text("engine"),
            admission=d.text("admission"),
            failure=d.optional_text("failure"),
            batch=BatchView.from_json(d.get("batch")),
            last_step_ms=d.number("last_step_ms"),
            throughput=ThroughputView.from_json(d.get("throughput")),
            totals=Totals.from_json(d.get("totals")),
            queue=tuple(RequestRow.from_json(q.d, q.path) for q in d.children("queue")),
            tiers=tuple(TierView.from_json(t.d, t.path) for t in kv.children("tiers")),
            ranks=tuple(RankView.from_json(r.d, r.path) for r in d.children("ranks")),
            steps=d.integer("steps"),
            sequences_on_ranks=d.integer("sequences_on_ranks"),
            latency=LatencyView.from_json(d.get("latency")),
            published_unix=d.number("published_unix"),
            adapters=tuple(AdapterView.from_json(a.d, a.path) for a in d.children("adapters")),
            memory=MemoryView.from_json(d.get("memory")),
            speculation=None if spec is None else SpeculationView.from_json(spec),
            chained_steps=d.integer("chained_steps"),
        )


def capture(
    *,
    facts: JobFacts,
    engine_state: str,
    admission_paused: bool,
    failure: str | None,
    running: int,
    waiting: int,
    max_batch: int,
    sequences_on_ranks: int,
    steps: int,
    last_step_ms: float,
    stats: ServingStats,
    queue: tuple[RequestRow, ...],
    tiers: Sequence[TierSource],
    ranks: Sequence[RankView],
    now_unix: float,
    adapters: Sequence[AdapterView] = (),
    chained_steps: int = 0,
) -> JobSnapshot:
    """The job as it is now, for `EngineClient.publish`. Engine thread only (it reads `stats`, which
    only that thread writes). Cheap: the statistics' views are cached until they change."""
    return JobSnapshot(
        model=facts.model,
        tensor_parallel=facts.tensor_parallel,
        context_length=facts.context_length,
        uptime_s=round(now_unix - facts.started, 1),
        engine=engine_state,
        admission=admission_of(engine_state, admission_paused),
        failure=failure,
        batch=BatchView(running, waiting, max_batch),
        last_step_ms=round(last_step_ms, 2),
        throughput=stats.throughput_view(now_unix),
        totals=stats.totals_view(),
        queue=queue,
        tiers=tuple(TierView.of(t) for t in tiers),
        ranks=tuple(ranks),
        steps=steps,
        sequences_on_ranks=sequences_on_ranks,
        latency=stats.latency_view(),
        published_unix=now_unix,
        adapters=tuple(adapters),
        memory=stats.memory_view(),
        speculation=stats.speculation_view(now_unix),
        chained_steps=chained_steps,
    )
