"""The LoRA adapters rank 0 serves besides the base model: which name is in which slot, and what state it
is in. Pure logic: no model, no MLX; the ranks hold the weights (rank/lora.py), this decides.

Slot 0 is the base model (with a fused `--adapter-path`, the fused model); slots 1..`max_loras` hold
adapters. Every rank loads the `--lora` ones at start-up (`add_loaded`). A runtime one's life: reserved
(`LOADING`: its `AdapterLoad` goes in the next plan) -> `READY` once that plan ran on every rank ->
unloaded when no request uses it (at once, or `DRAINING` until the last one finishes) -> `UNLOADING`
(its slot in a later plan's `adapter_unload`) -> free once that plan ran, and reused after. Every
change to the ranks' adapters rides in a plan, so all ranks agree.

Threads: HTTP handlers reserve, unload and acquire (a request's use of an adapter is counted when the
engine door accepts it, so "refused while requests use it" counts requests the engine has not seen
yet); the engine thread releases and moves plan operations. One lock, held for a few dict operations.
Expected conditions (unknown name, all slots taken, in use) are return values, never exceptions.
"""

from __future__ import annotations

import enum
import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cluster.messages import MAX_ADAPTER_OPS_PER_PLAN, MAX_ADAPTER_PATH_BYTES, AdapterLoad
from cluster.snapshot import AdapterView

BASE_SLOT = 0
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")  # a model name a client can send


class AdapterState(str, enum.Enum):
    LOADING = "loading"  # reserved; its load is in the next plan or in one that has not run yet
    READY = "ready"  # requests may use it
    DRAINING = "draining"  # unload asked with drain: no new requests; unloads when the last one finishes
    UNLOADING = "unloading"  # its unload is in the next plan or in one that has not run yet


@dataclass(slots=True, frozen=True)
class AdapterSpec:
    """What validation (rank/lora.py's `inspect_adapter`, on rank 0) found: name-independent facts."""

    path: str  # the adapter's folder, absolute: every rank reads it there
    digest: bytes  # its content (adapter_config.json + adapters.safetensors): the ranks check their copies
    rank: int = 0  # the LoRA rank r, shown to operators


@dataclass(slots=True, frozen=True)
class AdapterCheck:
    """What validating a folder gave: its facts, or why it cannot be served (the rank side's message)."""

    spec: AdapterSpec | None
    error: str = ""


AdapterInspector = Callable[[str], AdapterCheck]  # a folder's absolute path -> its check (slow: file I/O)


@dataclass(slots=True)
class Adapter:
    name: str
    slot: int
    spec: AdapterSpec
    state: AdapterState = AdapterState.LOADING
    requests: int = 0  # requests accepted and not finished that run with it
    total_requests: int = 0  # requests ever accepted for it (the /metrics counter)
    in_plan: bool = False  # its pending load or unload is in a plan that has not run yet
    # An unload waits one plan: the plan after its last request ended may still release that request's
    # sequence, and a plan runs adapter unloads before releases.
    defer: bool = False


class Reserve(str, enum.Enum):
    """Outcome of `reserve`."""

    RESERVED = "reserved"
    BAD_NAME = "bad_name"
    NAME_TAKEN = "name_taken"  # an adapter (or the base model) already has this name
    FULL = "full"  # every slot holds an adapter (--max-loras)
    BAD_PATH = "bad_path"  # longer than a plan carries


class Unload(str, enum.Enum):
    """Outcome of `unload`."""

    UNLOADING = "unloading"  # no request uses it: it leaves in the next plan
    DRAINING = "draining"  # requests use it: it leaves when the last one finishes
    UNKNOWN = "unknown"
    IN_USE = "in_use"  # requests use it and no drain was asked
    LOADING = "loading"  # not loaded yet: unload it once it is


class AdapterRegistry:
    def __init__(self, max_loras: int, base_name: str, max_ops: int = MAX_ADAPTER_OPS_PER_PLAN) -> None:
        self.max_loras = max_loras
        self.base_name = base_name
        self.max_ops = max_ops
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._by_slot: dict[int, Adapter] = {}

    # -- HTTP side (and start-up) ----------------------------------------------------------------
    def reserve(self, name: str, spec: AdapterSpec) -> tuple[Reserve, int]:
        """A free slot for `name`, whose load the next plan carries; (outcome, slot or 0)."""
        if not NAME.fullmatch(name):
            return Reserve.BAD_NAME, 0
        if len(spec.path.encode()) > MAX_ADAPTER_PATH_BYTES:
            return Reserve.BAD_PATH, 0
        with self._lock:
            if name == self.base_name or name in self._by_name:
                return Reserve.NAME_TAKEN, 0
            free = [s for s in range(1, self.max_loras + 1) if s not in self._by_slot]
            if not free:
                return Reserve.FULL, 0
            adapter = Adapter(name, free[0], spec)
            self._by_name[name] = self._by_slot[adapter.slot] = adapter
            return Reserve.RESERVED, adapter.slot

    def add_loaded(self, name: str, slot: int, spec: AdapterSpec) -> Reserve:
        """An adapter every rank loaded at start-up (`--lora NAME=DIR`, rank/startup.py) into `slot`."""
        if not NAME.fullmatch(name):
            return Reserve.BAD_NAME
        with self._lock:
            if name == self.base_name or name in self._by_name:
                return Reserve.NAME_TAKEN
            if not 1 <= slot <= self.max_loras or slot in self._by_slot:
                return Reserve.FULL
            adapter = Adapter(name, slot, spec, AdapterState.READY)
            self._by_name[name] = self._by_slot[slot] = adapter
            return Reserve.RESERVED

    def unload(self, name: str, drain: bool = False) -> tuple[Unload, int]:
        """Stop serving `name`: (outcome, requests still using it). Asking again is harmless."""
        with self._lock:
            a = self._by_name.get(name)
            if a is None:
                return Unload.UNKNOWN, 0
            if a.state is AdapterState.LOADING:
                return Unload.LOADING, 0
            if a.state is AdapterState.UNLOADING:
                return Unload.UNLOADING, 0
            if a.requests == 0:
                self._unloading(a)
                return Unload.UNLOADING, 0
            if not drain and a.state is not AdapterState.DRAINING:
                return Unload.IN_USE, a.requests
            a.state = AdapterState.DRAINING
            return Unload.DRAINING, a.requests

    def acquire(self, name: str) -> int | None:
        """The slot a new request for `name` runs in, counted as using it; None: not served (unknown,
        loading, or being unloaded)."""
        with self._lock:
            a = self._by_name.get(name)
            if a is None or a.state is not AdapterState.READY:
                return None
            a.requests += 1
            a.total_requests += 1
            return a.slot

    def state_of(self, name: str) -> AdapterState | None:
        with self._lock:
            a = self._by_name.get(name)
            return None if a is None else a.state

    def rows(self) -> tuple[AdapterView, ...]:
        """Every adapter, by slot, as the snapshot shows it (frozen copies)."""
        with self._lock:
            return tuple(
                AdapterView(a.name, a.slot, a.state.value, a.requests, a.total_requests, a.spec.rank,
                           a.spec.path, a.spec.digest.hex())
                for a in sorted(self._by_slot.values(), key=lambda a: a.slot)
            )  # fmt: skip

    # -- engine thread ---------------------------------------------------------------------------
    def release(self, slot: int) -> None:
        """A request of `slot` finished; the last one of a draining adapter starts its unload."""
        if slot == BASE_SLOT:
            return
        with self._lock:
            a = self._by_slot.get(slot)
            if a is None or a.requests <= 0:
                return
            a.requests -= 1
            if a.requests == 0 and a.state is AdapterState.DRAINING:
                self._unloading(a)

    def digest(self, slot: int) -> bytes:
        """The content digest of the adapter in `slot` (b"" for the base model): it roots the slot's
        prefix-cache blocks, so blocks are shared within an adapter and never between adapters."""
        if slot == BASE_SLOT:
            return b""
        with self._lock:
            a = self._by_slot.get(slot)
            return b"" if a is None else a.spec.digest

    def has_ops(self) -> bool:
        with self._lock:
            return any(self._pending(a) for a in self._by_slot.values())

    def take_ops(self) -> tuple[tuple[AdapterLoad, ...], tuple[int, ...]]:
        """The next plan's loads and unloads (at most `max_ops` of each; the rest wait a plan)."""
        with self._lock:
            loads: list[AdapterLoad] = []
            unloads: list[int] = []
            for a in sorted(self._by_slot.values(), key=lambda a: a.slot):
                if not self._pending(a):
                    continue
                if a.defer:
                    a.defer = False
                elif a.state is AdapterState.LOADING and len(loads) < self.max_ops:
                    loads.append(AdapterLoad(a.slot, a.spec.path, a.spec.digest))
                    a.in_plan = True
                elif a.state is AdapterState.UNLOADING and len(unloads) < self.max_ops:
                    unloads.append(a.slot)
                    a.in_plan = True
            return tuple(loads), tuple(unloads)

    def ran(self, loads: tuple[AdapterLoad, ...], unloads: tuple[int, ...]) -> None:
        """The plan carrying these operations ran: loaded adapters serve, unloaded slots are free."""
        with self._lock:
            for load in loads:
                a = self._by_slot.get(load.slot)
                if a is not None and a.state is AdapterState.LOADING:
                    a.state, a.in_plan = AdapterState.READY, False
            for slot in unloads:
                a = self._by_slot.get(slot)
                if a is not None and a.state is AdapterState.UNLOADING:
                    del self._by_slot[slot]
                    del self._by_name[a.name]

    @staticmethod
    def _unloading(a: Adapter) -> None:
        a.state, a.in_plan, a.defer = AdapterState.UNLOADING, False, True

    @staticmethod
    def _pending(a: Adapter) -> bool:
        return a.state in (AdapterState.LOADING, AdapterState.UNLOADING) and not a.in_plan


def adapter_root(base: bytes, digest: bytes) -> bytes:
    """The prefix-cache root of an adapter's blocks: the base root (model, layout) joined by its digest."""
    if not digest:
        return base
    return hashlib.blake2b(base + b"|lora|" + digest, digest_size=len(base) or 16).digest()

