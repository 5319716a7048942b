"""The KV cache's part of the published snapshot (`cluster.snapshot` re-exports it): one view per
cache tier (RAM, SSD) and the running sequences' KV against the budget. Split from `cluster.snapshot` to
keep each module one idea; stdlib only, as the dashboard imports it through that module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cluster.snapshot_doc import Doc

SSD_KEYS = ("enabled", "disabled_reason", "corrupt_dropped", "rank0_io")


@dataclass(slots=True, frozen=True)
class SsdIoView:
    """Rank 0's own SSD file counters (each rank writes its slice; rank 0 sees only its own)."""

    write_bytes: int
    read_bytes: int
    writes: int
    reads: int
    write_ms_avg: float
    read_ms_avg: float
    corrupt_found: int
    errors: int

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, doc: object, path: str = "rank0_io") -> SsdIoView:
        d = Doc(doc, path)
        return cls(
            d.integer("write_bytes"), d.integer("read_bytes"), d.integer("writes"), d.integer("reads"),
            d.number("write_ms_avg"), d.number("read_ms_avg"), d.integer("corrupt_found"), d.integer("errors"),
        )  # fmt: skip


@dataclass(slots=True, frozen=True)
class SsdExtra:
    """The SSD tier's own fields, sent flat beside the common ones (as `cluster.ssdtier.SsdTier` does)."""

    enabled: bool
    disabled_reason: str
    corrupt_dropped: int
    rank0_io: SsdIoView | None  # null when rank 0 keeps no file counters (tests without a block store)

    def to_json(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "corrupt_dropped": self.corrupt_dropped,
            "rank0_io": None if self.rank0_io is None else self.rank0_io.to_json(),
        }

    @classmethod
    def from_json(cls, d: Doc) -> SsdExtra:
        enabled, reason, dropped = d.flag("enabled"), d.text("disabled_reason"), d.integer("corrupt_dropped")
        io = None if d.get("rank0_io") is None else SsdIoView.from_json(d.get("rank0_io"), d.at("rank0_io"))
        return cls(enabled, reason, dropped, io)


@dataclass(slots=True, frozen=True)
class MemoryView:
    """The running sequences' KV cache against the budget, per rank (`cluster.memory.KvMemory`; every
    rank holds the same share): `kv_bytes` the caches now, padding of the decode batch included
    (`padding_bytes` of it), `reserved_bytes` what they may grow to, `waiting_for_memory` requests queued
    because the budget is full. All zero when no budget is enforced."""

    budget_bytes: int
    kv_bytes: int
    padding_bytes: int
    reserved_bytes: int
    waiting_for_memory: int
    admitted: int  # requests admitted against the budget since start
    delayed: int  # of them, those that waited for memory first
    live_from: int = 0  # --kv-live-from: caches quantized from this many positions (0: off)
    quantized: int = 0  # running sequences whose cache is quantized now

    @property
    def pressure(self) -> float:
        """Reserved over budget: near 1.0 the next request waits."""
        return round(self.reserved_bytes / self.budget_bytes, 4) if self.budget_bytes else 0.0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {f: getattr(self, f) for f in _MEMORY_FIELDS}
        out["pressure"] = self.pressure
        return out

    @classmethod
    def from_json(cls, doc: object, path: str = "memory") -> MemoryView:
        d = Doc(doc, path)
        view = cls(*(d.integer(f) for f in _MEMORY_FIELDS))
        d.number("pressure")  # derived, but part of the document: it must be there
        return view


_MEMORY_FIELDS = tuple(f.name for f in dataclasses.fields(MemoryView))
NO_MEMORY = MemoryView(0, 0, 0, 0, 0, 0, 0)


class TierSource(Protocol):
    """A live KV tier as the engine holds it (`cluster.kvindex.TierStats`, `cluster.ssdtier.SsdTier`)."""

    def to_json(self) -> Mapping[str, object]: ...


@dataclass(slots=True, frozen=True)
class TierView:
    """One KV cache tier: the fields every tier sends, plus the SSD tier's own (`extra`)."""

    name: str
    blocks: int
    capacity_blocks: int
    bytes_used: int
    capacity_bytes: int
    block_bytes: int
    query_tokens: int
    hit_tokens: int
    miss_tokens: int
    hit_rate: float  # since start; the dashboard derives the recent rate from the two counters
    evictions: int
    stored: int
    extra: SsdExtra | None = None

    @property
    def enabled(self) -> bool:
        return self.extra is None or self.extra.enabled

    @property
    def disabled_reason(self) -> str:
        return "" if self.extra is None else self.extra.disabled_reason

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "tier": self.name, "blocks": self.blocks, "capacity_blocks": self.capacity_blocks,
            "bytes_used": self.bytes_used, "capacity_bytes": self.capacity_bytes,
            "block_bytes": self.block_bytes, "query_tokens": self.query_tokens, "hit_tokens": self.hit_tokens,
            "miss_tokens": self.miss_tokens, "hit_rate": self.hit_rate, "evictions": self.evictions,
            "stored": self.stored,
        }  # fmt: skip
        if self.extra is not None:
            out.update(self.extra.to_json())
        return out

    @classmethod
    def from_json(cls, doc: object, path: str = "tier") -> TierView:
        """The SSD fields come all together or not at all: one of them alone is a renamed field."""
        d = Doc(doc, path)
        extra = SsdExtra.from_json(d) if any(k in d.d for k in SSD_KEYS) else None
        return cls(
            d.text("tier"), d.integer("blocks"), d.integer("capacity_blocks"), d.integer("bytes_used"),
            d.integer("capacity_bytes"), d.integer("block_bytes"), d.integer("query_tokens"),
            d.integer("hit_tokens"), d.integer("miss_tokens"), d.number("hit_rate"), d.integer("evictions"),
            d.integer("stored"), extra,
        )  # fmt: skip

    @classmethod
    def of(cls, tier: TierSource) -> TierView:
        """From a live tier, on the engine thread (the same strict decoding: a drifting producer fails
        here, in the engine's tests, not on an operator's screen)."""
        j = dict(tier.to_json())
        if "enabled" in j:
            j.setdefault("rank0_io", None)  # SsdTier leaves it out when it has no counters
        return cls.from_json(j, f"tier {j.get('tier')!r}")
