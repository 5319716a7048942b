"""Liveness pulses: a side channel outside MPI that tells which rank is hung.

A rank that hangs mid-step (SIGSTOP, a stuck GPU, a host that lost power) leaves every other rank
waiting inside the same MPI collective, so nothing that travels over MPI can say which one it is. Each
follower therefore runs a tiny UDP responder thread (no MPI, no MLX); rank 0 pings every follower a few
times a second and records the answers. A rank whose process is stopped or gone stops answering, while
ranks that merely wait in a collective keep answering and say what they are doing.

This module is the pure part: the datagram formats (msgpack, bounded, each signed with an HMAC under a
per-rank secret that travelled over MPI at start-up and never crosses the wire) and `PulseBook`, rank
0's record of the answers.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

MAX_PULSE_BYTES = 512
TOKEN_BYTES = 16  # the per-rank secret, shared over MPI only; never sent on the wire
MAC_BYTES = 16
PING, PONG = 1, 2


def _mac(token: bytes, *fields: object) -> bytes:
    return hmac.new(token, msgpack.packb(list(fields), use_bin_type=True), hashlib.sha256).digest()[:MAC_BYTES]


@dataclass(slots=True, frozen=True)
class Ping:
    nonce: int
    mac: bytes  # HMAC of the nonce under the follower's secret: strangers' datagrams get no answer

    @classmethod
    def sign(cls, token: bytes, nonce: int) -> Ping:
        return cls(nonce, _mac(token, PING, nonce))

    def valid(self, token: bytes) -> bool:
        return hmac.compare_digest(self.mac, _mac(token, PING, self.nonce))

    def encode(self) -> bytes:
        data: bytes = msgpack.packb([PING, self.nonce, self.mac], use_bin_type=True)
        return data


@dataclass(slots=True, frozen=True)
class Pong:
    rank: int
    pid: int
    nonce: int
    activity: str  # what the rank's engine thread is doing: "waiting for rank 0", "step 57"
    activity_s: float  # for how long
    mac: bytes = b""  # HMAC of all of the above: nobody else can make a hung rank look alive

    def _fields(self) -> tuple[object, ...]:
        return (PONG, self.rank, self.pid, self.nonce, self.activity[:120], self.activity_s)

    def signed(self, token: bytes) -> Pong:
        return Pong(self.rank, self.pid, self.nonce, self.activity[:120], self.activity_s, _mac(token, *self._fields()))

    def valid(self, token: bytes) -> bool:
        return hmac.compare_digest(self.mac, _mac(token, *self._fields()))

    def encode(self) -> bytes:
        data: bytes = msgpack.packb([*self._fields(), self.mac], use_bin_type=True)
        return data


def decode(data: bytes) -> Ping | Pong | None:
    """A datagram, or None when it is not one of ours (never raises: anyone can send UDP). The caller
    checks the MAC with the secret it holds."""
    if len(data) > MAX_PULSE_BYTES:
        return None
    try:
        w = msgpack.unpackb(data, raw=False, max_bin_len=64, max_str_len=256, max_array_len=8)
        if not isinstance(w, list) or not w or not isinstance(w[-1], bytes) or len(w[-1]) != MAC_BYTES:
            return None
        if len(w) == 3 and w[0] == PING and isinstance(w[1], int):
            return Ping(w[1], w[2])
        if len(w) == 7 and w[0] == PONG and isinstance(w[4], str) and isinstance(w[5], (int, float)):
            return Pong(int(w[1]), int(w[2]), int(w[3]), w[4], float(w[5]), w[6])
    except Exception:
        return None
    return None


@dataclass(slots=True)
class _Peer:
    name: str
    answered: float | None = None  # clock time of the last answer (None: never answered)
    address: str = ""  # where the last answer came from
    activity: str = ""
    activity_s: float = 0.0
    refused_since: float | None = None  # first of the refusals in a row
    refusals: int = 0
    refused_round: int = -1  # the ping round of the last refusal counted
    gone: bool = False  # its port kept refusing pings: the process is dead


class PulseBook:
    """Rank 0's record of who answered when. Written by the pulse thread, read by the watchdog and HTTP.

    Silence counts only pings that went out unanswered: if the pinging itself stalls (rank 0 starved of
    CPU), nobody looks silent. A rank that never answered (UDP blocked, unreachable addresses) has no
    silence at all: the channel then cannot name it, but it never condemns it either."""

    # A refusal is an ICMP error, which anyone on the path can forge: only a run of refusals in GONE_AFTER
    # different ping rounds, over at least GONE_SPAN seconds, with no answer between, makes a rank gone.
    # A live rank answers every round, so forged errors alone never get there, however many are sent.
    GONE_AFTER = 3
    GONE_SPAN = 1.0

    def __init__(self, clock: Callable[[], float], names: dict[int, str]) -> None:
        self.clock = clock
        self.started = clock()
        self._last_ping: float | None = None
        self._round = 0  # ping rounds so far
        self._peers = {r: _Peer(name) for r, name in names.items()}
        self._lock = threading.Lock()

    @property
    def ranks(self) -> list[int]:
        return sorted(self._peers)

    def name(self, rank: int) -> str:
        return self._peers[rank].name

    def pinged(self) -> None:
        """The monitor sent a round of pings now."""
        with self._lock:
            self._last_ping = self.clock()
            self._round += 1

    def answered(self, pong: Pong, address: str = "") -> None:
        with self._lock:
            peer = self._peers.get(pong.rank)
            if peer is not None:
                peer.answered = self.clock()
                peer.address = address or peer.address
                peer.activity, peer.activity_s = pong.activity, pong.activity_s
                peer.refused_since, peer.refusals, peer.gone = None, 0, False

    def address_of(self, rank: int) -> str:
        """Where `rank` last answered from ("" before its first answer)."""
        with self._lock:
            return self._peers[rank].address

    def refused(self, rank: int) -> bool:
        """Record that `rank`'s port refused a ping; True when that makes it gone (once). Several
        refusals in one ping round count once: a dead port refuses each ping once, a forger at will."""
        with self._lock:
            peer, now = self._peers[rank], self.clock()
            if peer.refused_round == self._round:
                return False
            peer.refused_round = self._round
            if peer.refused_since is None:
                peer.refused_since = now
            peer.refusals += 1
            if peer.gone or peer.refusals < self.GONE_AFTER or now - peer.refused_since < self.GONE_SPAN:
                return False
            peer.gone = True
            return True

    def gone_ranks(self) -> list[int]:
        with self._lock:
            return [r for r, p in sorted(self._peers.items()) if p.gone]

    def silence(self, rank: int) -> float | None:
        """Seconds of pings to `rank` that went unanswered; None when it has never answered."""
        with self._lock:
            peer = self._peers[rank]
            if peer.answered is None:
                return None
            last_ping = self._last_ping if self._last_ping is not None else peer.answered
            return max(0.0, last_ping - peer.answered)

    def silent(self, longer_than: float) -> list[int]:
        return [r for r in self.ranks if (self.silence(r) or 0.0) > longer_than]

    def never_answered(self) -> list[int]:
        with self._lock:
            return [r for r, p in sorted(self._peers.items()) if p.answered is None]

    def describe(self, longer_than: float) -> str:
        """One clause per rank, silent ones first: what the log says when a step hangs."""
        silent, alive = [], []
        for r in self.ranks:
            with self._lock:
                peer = self._peers[r]
                activity, busy, gone = peer.activity, peer.activity_s, peer.gone
            quiet = self.silence(r)
            if gone:
                silent.append(f"{peer.name} is gone (its liveness port refuses pings: the process died)")
            elif quiet is None:
                alive.append(f"{peer.name} has never answered liveness pings (cannot tell)")
            elif quiet > longer_than:
                silent.append(f"{peer.name} is not responding (no liveness answer for {quiet:.1f} s: hung or gone)")
            else:
                alive.append(f"{peer.name} is alive ({activity or 'starting'} for {busy:.1f} s)")
        return "; ".join(silent + alive)
