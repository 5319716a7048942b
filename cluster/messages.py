"""Typed messages of the control bus, both directions. Every rank executes a `StepPlan` exactly as rank 0
sent it; every follower answers with typed replies (`Hello`, `SsdLoadResult`, `SsdMissing`) and health
reports (`RankReport`).

Wire form: each message is a msgpack array whose first element is its kind tag; `cluster.bus` wraps it
in the versioned envelope and bounds its size. Field order is the wire order: append fields, never
reorder them. Nothing here grows without bound with the number of blocks: what can (the SSD start-up
sync, SSD write results) is split into messages that each fit the bus limit (`chunks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from typing import Self

from cluster.errors import BusDecodeError
from cluster.pulse import TOKEN_BYTES


@dataclass(slots=True, frozen=True)
class Admit:
    """A new sequence: every rank opens its KV cache, filled from the cached blocks `cached` (prompt blocks
    0..len(cached)-1) when there are any. The prompt itself travels chunk by chunk (`PrefillChunk`), so
    no plan grows with the length of a prompt and no rank keeps a copy of it."""

    seq_id: int
    cached: tuple[int, ...] = ()
    adapter: int = 0  # the LoRA slot its tokens run with (AdapterLoad); 0: the base model


# What bounds the adapter fields of a plan (checked when decoding; the registry never exceeds them).
MAX_ADAPTER_OPS_PER_PLAN = 4  # loads per plan, and unloads per plan
MAX_ADAPTER_PATH_BYTES = 4096  # Linux's PATH_MAX (macOS's is 1024)
MAX_ADAPTER_DIGEST_BYTES = 64


@dataclass(slots=True, frozen=True)
class AdapterLoad:
    """Every rank loads the LoRA adapter in folder `path` into `slot` (1..--max-loras; free until then)
    before anything else in the step, and checks that its content hashes to `digest` (the digest rank 0
    validated): hosts whose copies differ would serve different models."""

    slot: int
    path: str
    digest: bytes

    def to_wire(self) -> list[Any]:
        return [self.slot, self.path, self.digest]

    @classmethod
    def from_wire(cls, w: Any) -> AdapterLoad:
        if not isinstance(w, list) or len(w) != 3:
            raise BusDecodeError("step plan: an adapter load is not a [slot, path, digest] array")
        slot, path, digest = w
        if type(path) is not str or not path or len(path.encode()) > MAX_ADAPTER_PATH_BYTES:
            raise BusDecodeError(
                f"step plan: an adapter path is not a string of 1 to {MAX_ADAPTER_PATH_BYTES} bytes"
            )
        if type(digest) is not bytes or not 0 < len(digest) <= MAX_ADAPTER_DIGEST_BYTES:
            raise BusDecodeError("step plan: an adapter digest is not 1 to 64 bytes")
        return cls(_slot(slot), path, digest)


@dataclass(slots=True, frozen=True)
class StoreBlocks:
    """Copy prompt blocks `first`, `first + 1`, ... of a sequence's KV cache into blocks `block_ids`."""

    seq_id: int
    first: int
    block_ids: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class PrefillChunk:
    """Run `tokens`, the prompt positions [start, end) of a sequence; `last`: they end its prompt, so the
    step yields a row of logits for it."""

    seq_id: int
    start: int
    tokens: tuple[int, ...]
    last: bool = False
    # k >= 0: rank 0 also computes the logits of every position (prompt logprobs with k alternatives; on
    # every rank, so a vocabulary-parallel head gathers the same rows); -1: only the last one's, if `last`
    prompt_logprobs: int = -1

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(slots=True, frozen=True)
class StepPlan:
    """One engine step. Order of execution on every rank: adapter unloads and loads, release, evict, admit,
    prefill, store, decode (an adapter loaded by a plan may serve the sequences that plan admits).

    `decode_ids[i]` is row i of the decode batch and `decode_tokens[i]` its input token: the batch rows
    on every rank are put in exactly this order before the forward pass. Speculation (rank 0 proposes,
    cluster/speculation.py): `decode_drafts[i]`, when given, are drafted tokens row i feeds after its input
    token, each position yielding a row of logits; `rollback` (first, after release) sets sequences'
    lengths back to what they accepted in the step before. `argmax`: every row's pick is its plain greedy
    argmax (no logprobs, penalties, bias, bans or grammar; no prompt logprobs): under a vocabulary-parallel
    head each rank then sends rank 0 its slice's best entry per row instead of the slice (with two ranks,
    each sends the other its entries, so every rank knows every pick). `chained`: rank 0 sent this plan
    before it knew the step before's picks (rank/engine.py: the plan broadcast overlaps that step): each
    row's input token is the pick every rank computed for it in the step before (`decode_tokens` are 0).
    `topk` (when not `argmax`): every row samples with top_k <= topk or is plain greedy, and nothing else
    reads the rest of the distribution: each rank sends rank 0 its slice's `topk` best entries per row
    (rank/sampler.py `top_k_mask`), not the slice; 0: the slices. `draws` (an `argmax` plan whose rows
    include plain sampling ones, at temperature only): one (temperature, PRNG key) per row, temperature 0
    for a greedy row; a sampling row's pick is the argmax of its logits / temperature plus the Gumbel
    noise of its key over the whole vocabulary, which is how `mx.random.categorical` samples, so each rank
    takes its slice's best entry of that sum as for a greedy row (rank/sampler.py `gumbel_scores`).
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
    adapter_load: tuple[AdapterLoad, ...] = ()
    adapter_unload: tuple[int, ...] = ()  # slots to free (no sequence uses them)
    decode_drafts: tuple[tuple[int, ...], ...] = ()  # () or one (maybe empty) tuple per decode row
    rollback: tuple[tuple[int, int], ...] = ()  # (sequence id, positions it keeps)
    argmax: bool = False
    chained: bool = False
    topk: int = 0
    draws: tuple[tuple[float, int, int], ...] = ()  # () or (temperature, key word 0, key word 1) per row

    def to_wire(self) -> list[Any]:
        return [
            self.KIND,
            self.step,
            list(self.release),
            [[a.seq_id, list(a.cached), a.adapter] for a in self.admit],
            [[p.seq_id, p.start, list(p.tokens), p.last, p.prompt_logprobs] for p in self.prefill],
            list(self.decode_ids),
            list(self.decode_tokens),
            [[s.seq_id, s.first, list(s.block_ids)] for s in self.store],
            list(self.evict),
            [[b, h] for b, h in self.ssd_load],
            [[b, h] for b, h in self.ssd_save],
            list(self.ssd_delete),
            [a.to_wire() for a in self.adapter_load],
            list(self.adapter_unload),
            [list(d) for d in self.decode_drafts],
            [[sid, n] for sid, n in self.rollback],
            self.argmax,
            self.chained,
            self.topk,
            [[t, k0, k1] for t, k0, k1 in self.draws],
        ]

    @classmethod
    def from_wire(cls, w: list[Any]) -> StepPlan:
        (_, step, release, admit, prefill, decode_ids, decode_tokens, store, evict, load, save, delete,
         adapter_load, adapter_unload, drafts, rollback, argmax, chained, topk, draws) = w  # fmt: skip
        if len(decode_ids) != len(decode_tokens):
            raise BusDecodeError("step plan: decode ids and tokens differ in length")
        drafts = _list(drafts, "step plan: decode_drafts")
        if drafts and len(drafts) != len(decode_ids):
            raise BusDecodeError("step plan: decode drafts and ids differ in length")
        loads = _list(adapter_load, "step plan: adapter_load")
        unloads = _list(adapter_unload, "step plan: adapter_unload")
        if len(loads) > MAX_ADAPTER_OPS_PER_PLAN or len(unloads) > MAX_ADAPTER_OPS_PER_PLAN:
            raise BusDecodeError(f"step plan: more than {MAX_ADAPTER_OPS_PER_PLAN} adapter loads or unloads")
        plan = cls(
            step=_int(step),
            release=_ints(release),
            admit=tuple(_admit(a) for a in _list(admit, "step plan: admit")),
            prefill=tuple(
                PrefillChunk(_int(s), _int(a), _ints(toks), _bool(last), _int(k))
                for s, a, toks, last, k in prefill
            ),
            decode_ids=_ints(decode_ids),
            decode_tokens=_ints(decode_tokens),
            store=tuple(StoreBlocks(_int(s), _int(first), _ints(ids)) for s, first, ids in store),
            evict=_ints(evict),
            ssd_load=tuple((_int(b), _hash(h)) for b, h in load),
            ssd_save=tuple((_int(b), _hash(h)) for b, h in save),
            ssd_delete=tuple(_hash(h) for h in delete),
            adapter_load=tuple(AdapterLoad.from_wire(a) for a in loads),
            adapter_unload=tuple(_slot(x) for x in unloads),
            decode_drafts=tuple(_ints(d) for d in drafts),
            rollback=tuple(_pair(r, "step plan: a rollback") for r in _list(rollback, "step plan: rollback")),
            argmax=_bool(argmax),
            chained=_bool(chained),
            topk=_int(topk),
            draws=tuple(_draw(d) for d in _list(draws, "step plan: draws")),
        )
        if plan.draws and (any(plan.decode_drafts) or len(plan.draws) != plan.num_rows):
            raise BusDecodeError("step plan: draws are not one per row of a step without drafts")
        return plan

    @property
    def num_rows(self) -> int:
        """Rows of logits the step yields without drafts: its prompts' last chunks, then its decode rows."""
        return sum(p.last for p in self.prefill) + len(self.decode_ids)


def _draw(w: Any) -> tuple[float, int, int]:
    """A row's (temperature, PRNG key) of `StepPlan.draws`: a finite temperature >= 0, two 32-bit words."""
    if not isinstance(w, list) or len(w) != 3:
        raise BusDecodeError("step plan: a draw is not (temperature, key, key)")
    t, k0, k1 = w
    if type(t) is not float or not math.isfinite(t) or t < 0:
        raise BusDecodeError(f"step plan: a draw's temperature is not a finite float >= 0: {t!r}")
    if not all(0 <= _int(k) < 2**32 for k in (k0, k1)):
        raise BusDecodeError("step plan: a draw's key is not two 32-bit words")
    return t, k0, k1


def _pair(w: Any, what: str) -> tuple[int, int]:
    if not isinstance(w, list) or len(w) != 2:
        raise BusDecodeError(f"{what} is not a pair of integers")
    return _int(w[0]), _int(w[1])


def _admit(w: Any) -> Admit:
    if not isinstance(w, list) or len(w) != 3:
        raise BusDecodeError("step plan: an admit is not a [seq_id, cached, adapter] array")
    seq_id, cached, adapter = w
    adapter = _int(adapter)
    if adapter < 0:
        raise BusDecodeError(f"step plan: adapter slot {adapter} is negative")
    return Admit(_int(seq_id), _ints(cached), adapter)


def _slot(x: Any) -> int:
    """An adapter slot a plan loads or unloads: 1 and up (slot 0 is the base model, never unloaded)."""
    slot = _int(x)
    if slot < 1:
        raise BusDecodeError(f"step plan: adapter slot {slot} is not 1 or more")
    return slot


@dataclass(slots=True, frozen=True)
class PlanLimits:
    """What bounds every field of a `StepPlan` (the scheduler and the tiers never exceed these), so the
    largest plan the limits allow can be built and measured against the bus limit at start-up."""

    max_batch: int
    prefill_tokens: int  # prompt tokens a step may compute (the larger of the two prefill chunks)
    max_prompt_blocks: int  # cached blocks one admitted prompt may load
    block_tokens: int
    max_evictions: int  # RAM blocks dropped per plan (PrefixCache)
    max_ssd_ops: int  # SSD loads and deletes per plan, each (SsdTier); saves follow the plan's stores
    max_adapter_ops: int = MAX_ADAPTER_OPS_PER_PLAN  # adapter loads per plan, and unloads (AdapterRegistry)
    spec_tokens: int = 0  # drafted tokens per decode row (--spec-tokens; 0 without speculation)

    def largest_plan(self) -> StepPlan:
        """Every field at its bound, with ids and tokens of the widest encoding (msgpack uint32)."""
        big = 2**32 - 1
        h = b"\xff" * 16
        n = self.max_batch
        per_chunk, extra = divmod(self.prefill_tokens, n)
        chunks = tuple(
            PrefillChunk(big, big, (big,) * (per_chunk + (1 if i < extra else 0)), True, big)
            for i in range(n)
        )
        stored = self.prefill_tokens // self.block_tokens + n  # a chunk may complete one block besides
        return StepPlan(
            step=big,
            release=(big,) * n,
            admit=tuple(Admit(big, (big,) * self.max_prompt_blocks, big) for _ in range(n)),
            prefill=chunks,
            decode_ids=(big,) * n,
            decode_tokens=(big,) * n,
            store=tuple(StoreBlocks(big, big, (big,)) for _ in range(stored)),  # runs split to single blocks
            evict=(big,) * self.max_evictions,
            ssd_load=((big, h),) * self.max_ssd_ops,
            ssd_save=((big, h),) * stored,  # saves follow stores, never deferred
            ssd_delete=(h,) * self.max_ssd_ops,
            adapter_load=(AdapterLoad(big, "x" * MAX_ADAPTER_PATH_BYTES, b"\xff" * MAX_ADAPTER_DIGEST_BYTES),)
            * self.max_adapter_ops,
            adapter_unload=(big,) * self.max_adapter_ops,
            decode_drafts=((big,) * self.spec_tokens,) * n if self.spec_tokens else (),
            rollback=((big, big),) * n if self.spec_tokens else (),
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
class _HashList:
    """A list of block hashes sent in chunks that each fit the bus limit; `more` is False on the last."""

    KIND: ClassVar[int] = 0
    LABEL: ClassVar[str] = ""
    hashes: tuple[bytes, ...] = ()
    more: bool = False

    @classmethod
    def chunks(cls, hashes: list[bytes], max_message_bytes: int) -> list[Self]:
        return [cls(part, more) for part, more in _hash_chunks(hashes, max_message_bytes)]

    def to_wire(self) -> list[Any]:
        return [self.KIND, list(self.hashes), self.more]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Self:
        _, hashes, more = w
        return cls(_hashes(hashes, cls.LABEL), _bool(more))


@dataclass(slots=True, frozen=True)
class SsdSync(_HashList):
    """Start-up: the blocks rank 0's manifest lists as persisted; each rank checks its files against it."""

    KIND: ClassVar[int] = 4
    LABEL: ClassVar[str] = "ssd sync"


@dataclass(slots=True, frozen=True)
class SsdMissing(_HashList):
    """A follower's answer to the SSD start-up sync: listed blocks it lacks (it may lack every one)."""

    KIND: ClassVar[int] = 7
    LABEL: ClassVar[str] = "ssd missing"


# -- follower to rank 0 ------------------------------------------------------------------------------

MAX_HOST_CHARS = 255
MAX_PULSE_ADDRESSES = 16
MAX_ERROR_CHARS = 2000


@dataclass(slots=True, frozen=True)
class PulseHello:
    """Where rank 0 can ping a follower's liveness responder (rank/pulse.py), and its secret."""

    port: int
    token: bytes
    addresses: tuple[str, ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.port, self.token, list(self.addresses)]

    @classmethod
    def from_wire(cls, w: Any) -> PulseHello:
        if not isinstance(w, list) or len(w) != 3:
            raise BusDecodeError("hello: pulse info is not a 3-element array")
        port, token, addresses = w
        if type(token) is not bytes or len(token) != TOKEN_BYTES:
            raise BusDecodeError(f"hello: the liveness token is not {TOKEN_BYTES} bytes")
        if not isinstance(addresses, list) or len(addresses) > MAX_PULSE_ADDRESSES:
            raise BusDecodeError(f"hello: more than {MAX_PULSE_ADDRESSES} liveness addresses")
        port = _int(port)
        if not 0 < port < 65536:
            raise BusDecodeError(f"hello: liveness port {port} is out of range")
        return cls(port, token, tuple(_str(a, "a liveness address", 64) for a in addresses))


@dataclass(slots=True, frozen=True)
class Hello:
    """Start-up: who a rank is (rank 0 names ranks by it) and how to ping it; `pulse` None: not pinged."""

    KIND: ClassVar[int] = 5
    rank: int
    host: str
    pid: int
    pulse: PulseHello | None = None
    # The code a rank runs ("orchard 0.1.0, mlx 0.32.4, mlx-lm 0.32.2"): ranks that differ may batch
    # differently (packed steps depend on the mlx-lm version) and enter collectives out of step.
    software: str = ""

    def to_wire(self) -> list[Any]:
        return [
            self.KIND,
            self.rank,
            self.host,
            self.pid,
            None if self.pulse is None else self.pulse.to_wire(),
            self.software,
        ]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Hello:
        _, rank, host, pid, pulse, software = w
        return cls(
            _int(rank),
            _str(host, "hello: host", MAX_HOST_CHARS),
            _int(pid),
            None if pulse is None else PulseHello.from_wire(pulse),
            _str(software, "hello: software", MAX_HOST_CHARS),
        )


@dataclass(slots=True, frozen=True)
class SsdLoadResult:
    """A follower's answer to a plan with `ssd_load`: the RAM blocks it could not fill from disk (bounded
    by the plan's own `ssd_load`)."""

    KIND: ClassVar[int] = 6
    failed: tuple[int, ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.KIND, list(self.failed)]

    @classmethod
    def from_wire(cls, w: list[Any]) -> SsdLoadResult:
        _, failed = w
        return cls(_ints(failed))


@dataclass(slots=True, frozen=True)
class RankReport:
    """What a rank says about itself (cluster/health.py judges it); posted, never waited for."""

    KIND: ClassVar[int] = 8
    rank: int
    host: str
    pid: int
    step: int = 0  # the last step this rank executed
    step_ms: float = 0.0  # how long that step took on this rank
    active_bytes: int = 0  # MLX active memory
    peak_bytes: int = 0  # MLX peak memory
    rss_bytes: int = 0
    kv_blocks: int = 0
    kv_bytes: int = 0
    last_error: str = ""
    ssd_written: tuple[tuple[bytes, bool], ...] = ()  # SSD writes finished since the last report
    ssd_dropped: tuple[bytes, ...] = ()  # saves dropped unwritten (the rank's disk was too far behind)

    def chunks(self, max_message_bytes: int) -> list[RankReport]:
        """This report as several that each fit the bus limit: the SSD write results split among them
        (a long step can finish many writes), everything else repeated."""
        fixed = _RESERVED_BYTES + 128 + len(self.host.encode()) + len(self.last_error.encode())
        n = max(1, (max_message_bytes - fixed) // _WRITTEN_BYTES)
        written, dropped = self.ssd_written, self.ssd_dropped
        parts = [
            replace(self, ssd_written=written[i : i + n], ssd_dropped=()) for i in range(0, len(written), n)
        ]
        parts += [
            replace(self, ssd_written=(), ssd_dropped=dropped[i : i + n]) for i in range(0, len(dropped), n)
        ]
        return parts or [self]

    def to_wire(self) -> list[Any]:
        return [
            self.KIND,
            self.rank,
            self.host,
            self.pid,
            self.step,
            self.step_ms,
            self.active_bytes,
            self.peak_bytes,
            self.rss_bytes,
            self.kv_blocks,
            self.kv_bytes,
            self.last_error,
            [[h, ok] for h, ok in self.ssd_written],
            list(self.ssd_dropped),
        ]

    @classmethod
    def from_wire(cls, w: list[Any]) -> RankReport:
        _, rank, host, pid, step, step_ms, active, peak, rss, blocks, kvb, err, written, dropped = w
        if not isinstance(step_ms, (int, float)) or isinstance(step_ms, bool):
            raise BusDecodeError("rank report: step_ms is not a number")
        if not isinstance(written, list):
            raise BusDecodeError("rank report: ssd_written is not an array")
        pairs = []
        for pair in written:
            if not isinstance(pair, list) or len(pair) != 2:
                raise BusDecodeError("rank report: an ssd_written entry is not a [hash, ok] pair")
            pairs.append((_hash(pair[0]), _bool(pair[1])))
        return cls(
            _int(rank),
            _str(host, "rank report: host", MAX_HOST_CHARS),
            _int(pid),
            _int(step),
            float(step_ms),
            _int(active),
            _int(peak),
            _int(rss),
            _int(blocks),
            _int(kvb),
            _str(err, "rank report: last_error", MAX_ERROR_CHARS),
            tuple(pairs),
            tuple(_hash(h) for h in _list(dropped, "rank report: ssd_dropped")),
        )


BusMessage = StepPlan | Heartbeat | Shutdown | SsdSync  # rank 0 to every rank (broadcast)
Reply = Hello | SsdLoadResult | SsdMissing  # one follower to rank 0, waited for
Message = BusMessage | Reply | RankReport
BROADCAST_TYPES = (StepPlan, Heartbeat, Shutdown, SsdSync)
MESSAGE_TYPES: dict[int, type[Message]] = {
    t.KIND: t for t in (*BROADCAST_TYPES, Hello, SsdLoadResult, SsdMissing, RankReport)
}

# Chunk sizing, in encoded bytes: the envelope and a message's fixed fields stay under _RESERVED_BYTES;
# a hash costs 18 (msgpack bin 8 header) and an SSD write result 20.
_RESERVED_BYTES = 64
_HASH_BYTES = 18
_WRITTEN_BYTES = 20


def _hash_chunks(hashes: list[bytes], max_message_bytes: int) -> list[tuple[tuple[bytes, ...], bool]]:
    """`hashes` cut into (part, more) pieces that each encode within the limit; always at least one."""
    n = max(1, (max_message_bytes - _RESERVED_BYTES) // _HASH_BYTES)
    parts = [tuple(hashes[i : i + n]) for i in range(0, len(hashes), n)] or [()]
    return [(part, i < len(parts) - 1) for i, part in enumerate(parts)]


def _hashes(xs: Any, what: str) -> tuple[bytes, ...]:
    if not isinstance(xs, list):
        raise BusDecodeError(f"{what}: hashes is not an array")
    return tuple(_hash(h) for h in xs)


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


def _bool(x: Any) -> bool:
    if type(x) is not bool:
        raise BusDecodeError(f"expected a boolean on the bus, got {type(x).__name__}")
    return x


def _str(x: Any, what: str, max_chars: int) -> str:
    if type(x) is not str:
        raise BusDecodeError(f"{what} is not a string")
    if len(x) > max_chars:
        raise BusDecodeError(f"{what} is longer than {max_chars} characters")
    return x


def _list(x: Any, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise BusDecodeError(f"{what} is not an array")
    return x
