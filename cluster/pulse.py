"""Liveness pulses: a side channel outside MPI that tells which rank is hung.

A rank that hangs mid-step (SIGSTOP, a stuck GPU, a host that lost power) leaves every other rank
waiting inside the same MPI collective, so nothing that travels over MPI can say which one it is. Each
follower therefore runs a tiny UDP responder thread (no MPI, no MLX); rank 0 pings every follower a few
times a second and records the answers. A rank whose process is stopped or gone stops answering, while
ranks that merely wait in a collective keep answering and say what they are doing.

This module is the pure part: the datagram formats (msgpack, bounded, authenticated by a per-rank
token that travelled over MPI at start-up) and `PulseBook`, rank 0's record of the answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

MAX_PULSE_BYTES = 512
PING, PONG = 1, 2


@dataclass(slots=True, frozen=True)
class Ping:
    token: bytes  # the follower's secret, so strangers' datagrams get no answer
    nonce: int

    def encode(self) -> bytes:
        return msgpack.packb([PING, self.token, self.nonce], use_bin_type=True)


@dataclass(slots=True, frozen=True)
class Pong:
    rank: int
    pid: int
    nonce: int
    activity: str  # what the rank's engine thread is doing: "waiting for rank 0", "step 57"
    activity_s: float  # for how long

    def encode(self) -> bytes:
        data: bytes = msgpack.packb(
            [PONG, self.rank, self.pid, self.nonce, self.activity[:120], self.activity_s], use_bin_type=True
        )
        return data


def decode(data: bytes) -> Ping | Pong | None:
    """A datagram, or None when it is not one of ours (never raises: anyone can send UDP)."""
    if len(data) > MAX_PULSE_BYTES:
        return None
    try:
        w = msgpack.unpackb(data, raw=False, max_bin_len=64, max_str_len=256, max_array_len=8)
        if w[0] == PING and len(w) == 3:
            return Ping(bytes(w[1]), int(w[2]))
        if w[0] == PONG and len(w) == 6:
            return Pong(int(w[1]), int(w[2]), int(w[3]), str(w[4]), float(w[5]))
    except Exception:
        return None
    return None


@dataclass(slots=True)
class _Peer:
    name: str
    answered: float | None = None  # clock time of the last answer
    address: str = ""  # where the answers come from
    activity: str = ""
    activity_s: float = 0.0
    gone: bool = False  # its port refused a ping after it had answered: the process is dead


class PulseBook:
    """Rank 0's record of who answered when. Written by the pulse thread, read by the watchdog and HTTP."""

    def __init__(self, clock: Callable[[], float], names: dict[int, str]) -> None:
        self.clock = clock
        self.started = clock()
        self._peers = {r: _Peer(name) for r, name in names.items()}
        self._lock = threading.Lock()

    @property
    def ranks(self) -> list[int]:
        return sorted(self._peers)

    def name(self, rank: int) -> str:
        return self._peers[rank].name

    def answered(self, pong: Pong, address: str = "") -> None:
        with self._lock:
            peer = self._peers.get(pong.rank)
            if peer is not None and not peer.gone:
                peer.answered = self.clock()
                peer.address = peer.address or address
                peer.activity, peer.activity_s = pong.activity, pong.activity_s

    def answered_ranks(self) -> dict[int, str]:
        """Rank -> the address it answers from, for ranks that have answered."""
        with self._lock:
            return {r: p.address for r, p in self._peers.items() if p.answered is not None}

    def address_of(self, rank: int) -> str:
        return self._peers[rank].address

    def gone(self, rank: int) -> bool:
        """Record that `rank`'s port refused pings; True the first time (so it is logged once)."""
        with self._lock:
            peer = self._peers[rank]
            first, peer.gone = not peer.gone, True
            return first

    def gone_ranks(self) -> list[int]:
        with self._lock:
            return [r for r, p in sorted(self._peers.items()) if p.gone]

    def silence(self, rank: int) -> float:
        """Seconds since `rank` last answered (since start-up when it never has)."""
        with self._lock:
            peer = self._peers[rank]
            return self.clock() - (peer.answered if peer.answered is not None else self.started)

    def silent(self, longer_than: float) -> list[int]:
        return [r for r in self.ranks if self.silence(r) > longer_than]

    def describe(self, longer_than: float) -> str:
        """One clause per rank, silent ones first: what the log says when a step hangs."""
        silent, alive = [], []
        for r in self.ranks:
            with self._lock:
                peer = self._peers[r]
                activity, busy = peer.activity, peer.activity_s
            quiet = self.silence(r)
            if peer.gone:
                silent.append(f"{peer.name} is gone (its liveness port refuses pings: the process died)")
            elif quiet > longer_than:
                silent.append(f"{peer.name} is not responding (no liveness answer for {quiet:.1f} s: hung or gone)")
            else:
                alive.append(f"{peer.name} is alive ({activity or 'starting'} for {busy:.1f} s)")
        return "; ".join(silent + alive)
