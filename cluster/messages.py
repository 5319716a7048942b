"""Typed messages of the control bus. Every rank executes a `StepPlan` exactly as rank 0 sent it.

Wire form: each message is a msgpack array whose first element is its kind tag; `cluster.bus` wraps it
in the versioned envelope. Field order is the wire order: append fields, never reorder them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from cluster.errors import BusDecodeError


@dataclass(slots=True, frozen=True)
class Admit:
    """A new sequence: every rank remembers its prompt tokens and opens its KV cache, filled from the
    cached blocks `cached` (prompt blocks 0..len(cached)-1) when there are any."""

    seq_id: int
    tokens: tuple[int, ...]
    cached: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class StoreBlocks:
    """Copy prompt blocks `first`, `first + 1`, ... of a sequence's KV cache into blocks `block_ids`."""

    seq_id: int
    first: int
    block_ids: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class PrefillChunk:
    """Run prompt positions [start, end) of a sequence; `end == len(prompt)` means sample afterwards."""

    seq_id: int
    start: int
    end: int


@dataclass(slots=True, frozen=True)
class StepPlan:
    """One engine step. Order of execution on every rank: release, evict, admit, prefill, store, decode.

    `decode_ids[i]` is row i of the decode batch and `decode_tokens[i]` its input token: the batch rows
    on every rank are put in exactly this order before the forward pass.
    """

    KIND: ClassVar[int] = 1
    step: int
    release: tuple[int, ...] = ()
    admit: tuple[Admit, ...] = ()
    prefill: tuple[PrefillChunk, ...] = ()
    decode_ids: tuple[int, ...] = ()
    decode_tokens: tuple[int, ...] = ()
    store: tuple[StoreBlocks, ...] = ()
    evict: tuple[int, ...] = ()
    ssd_load: tuple[tuple[int, bytes], ...] = ()  # (RAM block id to fill, block hash): read from disk
    ssd_save: tuple[tuple[int, bytes], ...] = ()  # (RAM block id, block hash): write to disk
    ssd_delete: tuple[bytes, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.release
            or self.admit
            or self.prefill
            or self.decode_ids
            or self.store
            or self.evict
            or self.ssd_load
            or self.ssd_save
            or self.ssd_delete
        )

    def to_wire(self) -> list[Any]:
        return [
            self.KIND,
            self.step,
            list(self.release),
            [[a.seq_id, list(a.tokens), list(a.cached)] for a in self.admit],
            [[p.seq_id, p.start, p.end] for p in self.prefill],
            list(self.decode_ids),
            list(self.decode_tokens),
            [[s.seq_id, s.first, list(s.block_ids)] for s in self.store],
            list(self.evict),
            [[b, h] for b, h in self.ssd_load],
            [[b, h] for b, h in self.ssd_save],
            list(self.ssd_delete),
        ]

    @classmethod
    def from_wire(cls, w: list[Any]) -> StepPlan:
        _, step, release, admit, prefill, decode_ids, decode_tokens, store, evict, load, save, delete = w
        if len(decode_ids) != len(decode_tokens):
            raise BusDecodeError("step plan: decode ids and tokens differ in length")
        return cls(
            step=_int(step),
            release=_ints(release),
            admit=tuple(Admit(_int(s), _ints(toks), _ints(cached)) for s, toks, cached in admit),
            prefill=tuple(PrefillChunk(_int(s), _int(a), _int(b)) for s, a, b in prefill),
            decode_ids=_ints(decode_ids),
            decode_tokens=_ints(decode_tokens),
            store=tuple(StoreBlocks(_int(s), _int(first), _ints(ids)) for s, first, ids in store),
            evict=_ints(evict),
            ssd_load=tuple((_int(b), _hash(h)) for b, h in load),
            ssd_save=tuple((_int(b), _hash(h)) for b, h in save),
            ssd_delete=tuple(_hash(h) for h in delete),
        )


@dataclass(slots=True, frozen=True)
class Heartbeat:
    """Sent by an idle rank 0 at a low rate so followers know it is alive."""

    KIND: ClassVar[int] = 2
    step: int
    sent_at: float = 0.0

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.step, self.sent_at]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Heartbeat:
        _, step, sent_at = w
        if not isinstance(sent_at, (int, float)):
            raise BusDecodeError("heartbeat: sent_at is not a number")
        return cls(step=_int(step), sent_at=float(sent_at))


@dataclass(slots=True, frozen=True)
class Shutdown:
    """Every rank leaves its loop and exits with `exit_code`; `reason` goes to each rank's log."""

    KIND: ClassVar[int] = 3
    exit_code: int = 0
    reason: str = field(default="")

    def to_wire(self) -> list[Any]:
        return [self.KIND, self.exit_code, self.reason]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Shutdown:
        _, code, reason = w
        if not isinstance(reason, str):
            raise BusDecodeError("shutdown: reason is not a string")
        return cls(exit_code=_int(code), reason=reason)


@dataclass(slots=True, frozen=True)
class SsdSync:
    """Start-up: the blocks rank 0's manifest lists as persisted; each rank checks its files against it."""

    KIND: ClassVar[int] = 4
    hashes: tuple[bytes, ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.KIND, list(self.hashes)]

    @classmethod
    def from_wire(cls, w: list[Any]) -> SsdSync:
        _, hashes = w
        if not isinstance(hashes, list):
            raise BusDecodeError("ssd sync: hashes is not an array")
        return cls(tuple(_hash(h) for h in hashes))


BusMessage = StepPlan | Heartbeat | Shutdown | SsdSync
MESSAGE_TYPES: dict[int, type[StepPlan] | type[Heartbeat] | type[Shutdown] | type[SsdSync]] = {
    t.KIND: t for t in (StepPlan, Heartbeat, Shutdown, SsdSync)
}


def _hash(x: Any) -> bytes:
    if type(x) is not bytes or len(x) != 16:
        raise BusDecodeError("expected a 16-byte block hash on the bus")
    return x


def _ints(xs: Any) -> tuple[int, ...]:
    if not isinstance(xs, list):
        raise BusDecodeError("expected an array of integers on the bus")
    return tuple(_int(x) for x in xs)


def _int(x: Any) -> int:
    if type(x) is not int:
        raise BusDecodeError(f"expected an integer on the bus, got {type(x).__name__}")
    return x
