"""The sockets and threads of the liveness side channel (cluster/pulse.py has the why and the formats).

Followers: `PulseResponder` binds a UDP port on every interface and answers rank 0's pings from a
thread of its own, with what the engine thread is doing (`Activity`). Rank 0: `PulseMonitor` pings each
follower at the addresses it announced at start-up (over MPI, with its token) and records answers in a
`PulseBook`. Neither thread touches MPI or MLX, so both keep going while the engine waits in a collective.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.messages import MAX_PULSE_ADDRESSES, PulseHello
from cluster.pulse import MAX_PULSE_BYTES, TOKEN_BYTES, Ping, Pong, PulseBook, decode

log = logging.getLogger("orchard.pulse")


class Activity:
    """What this rank's engine thread is doing, and since when (set by it, read by the responder)."""

    def __init__(self) -> None:
        self._state = ("starting", time.monotonic())

    def set(self, label: str) -> None:
        if label != self._state[0]:
            self._state = (label, time.monotonic())

    def get(self) -> tuple[str, float]:
        label, since = self._state
        return label, time.monotonic() - since


def local_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback, where rank 0 may reach us (link-local ones too: a
    Thunderbolt bridge between Macs often has only a self-assigned 169.254 address)."""
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(a.address)
            if not ip.is_loopback:
                out.append(a.address)
    return sorted(set(out))


class PulseResponder:
    MAX_ANSWERS_PER_SECOND = 50  # rank 0 asks 10 times a second

    def __init__(self, rank: int, activity: Activity) -> None:
        self.rank, self.pid, self.activity = rank, os.getpid(), activity
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._last_nonce = 0
        self._window_start, self._answers = 0.0, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        base = int(os.environ.get("ORCHARD_PULSE_PORT", "0"))
        port = base + int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")) if base else 0
        try:
            self.sock.bind(("0.0.0.0", port))
        except OSError as exc:  # taken (another job on this host): any port beats no liveness channel
            log.warning("liveness port %d: %s; using a free port instead", port, exc.strerror)
            self.sock.bind(("0.0.0.0", 0))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pulse-responder", daemon=True)

    def hello(self) -> PulseHello:
        """What rank 0 needs to reach us, sent to it over MPI at start-up (in this rank's `Hello`)."""
        port = int(self.sock.getsockname()[1])
        return PulseHello(port, self.token, tuple(local_addresses()[:MAX_PULSE_ADDRESSES]))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.25)
            if not ready:
                continue
            try:
                data, source = self.sock.recvfrom(MAX_PULSE_BYTES + 1)
            except OSError:
                continue
            ping = decode(data)
            if not isinstance(ping, Ping) or not ping.valid(self.token) or ping.nonce <= self._last_nonce:
                continue  # a stranger's, or a replay of rank 0's (a sniffer cannot make us reflect)
            now = time.monotonic()
            if now - self._window_start >= 1.0:
                self._window_start, self._answers = now, 0
            if self._answers >= self.MAX_ANSWERS_PER_SECOND:
                continue
            self._answers += 1
            self._last_nonce = ping.nonce
            label, busy = self.activity.get()
            try:
                self.sock.sendto(Pong(self.rank, self.pid, ping.nonce, label, busy).signed(self.token).encode(), source)
            except OSError:
                continue


@dataclass(slots=True)
class _Link:
    """One connected UDP socket from rank 0 to one address of one follower. Connected, so that a port
    nobody listens on any more (the process died, its host is up) comes back as ECONNREFUSED at once."""

    rank: int
    token: bytes
    address: str
    sock: socket.socket


class PulseMonitor:
    """Rank 0: ping every follower `interval` apart and record answers and refusals in `book`."""

    NONCE_WINDOW = 50  # answers to older pings than this many rounds ago are stale

    def __init__(self, book: PulseBook, interval: float = 0.1, warn_after: float = 10.0) -> None:
        self.book, self.interval, self.warn_after = book, interval, warn_after
        self._links: list[_Link] = []
        self._nonce = 0
        self._warned = False
        self.on_gone: Callable[[int], None] | None = None  # called (monitor thread) when a rank's process died
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pulse-monitor", daemon=True)

    def add(self, rank: int, hello: PulseHello, same_host: bool) -> None:
        """`hello` is what the follower's responder announced (checked by the bus decoder); a rank on this
        host is reached on loopback."""
        for address in ["127.0.0.1"] if same_host else hello.addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.connect((address, hello.port))
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            self._links.append(_Link(rank, hello.token, address, sock))

    def start(self) -> None:
        if self._links:
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for link in self._links:
            link.sock.close()

    def _ping_all(self) -> None:
        self._nonce += 1
        for link in self._links:
            pinned = self.book.address_of(link.rank)
            quiet = self.book.silence(link.rank) or 0.0
            if pinned and pinned != link.address and quiet < 1.0:
                continue  # another address of this rank answers: ping that one only while it does
            try:
                link.sock.send(Ping.sign(link.token, self._nonce).encode())
            except OSError as exc:
                self._refused(link, exc)
        self.book.pinged()

    def _refused(self, link: _Link, exc: OSError) -> None:
        """A connected UDP socket reports the ICMP port-unreachable of an earlier datagram: the port is
        closed, so the process that held it died (its host is up). Counted only on the address it last
        answered from, and only a run of them makes the rank gone (PulseBook.refused)."""
        if exc.errno != errno.ECONNREFUSED or self.book.address_of(link.rank) != link.address:
            return
        if self.book.refused(link.rank):
            log.error("%s is gone: its liveness port refuses pings (the process died)", self.book.name(link.rank))
            if self.on_gone is not None:
                self.on_gone(link.rank)

    def _receive(self, link: _Link) -> None:
        try:
            data = link.sock.recv(MAX_PULSE_BYTES + 1)
        except OSError as exc:
            self._refused(link, exc)
            return
        pong = decode(data)
        if (
            isinstance(pong, Pong)
            and pong.rank == link.rank
            and self._nonce - self.NONCE_WINDOW <= pong.nonce <= self._nonce
            and pong.valid(link.token)
        ):
            self.book.answered(pong, link.address)

    def _warn_unanswered(self) -> None:
        never = self.book.never_answered()
        if never and not self._warned and time.monotonic() - self.started > self.warn_after:
            self._warned = True
            names = ", ".join(self.book.name(r) for r in never)
            log.warning(
                "%s never answered liveness pings (UDP blocked, or no address rank 0 can reach): a hang "
                "there is still stopped by --step-timeout, but cannot be named",
                names,
            )

    def _run(self) -> None:
        self.started = time.monotonic()
        next_ping = 0.0
        socks = {link.sock: link for link in self._links}
        while not self._stopped.is_set():
            try:
                now = time.monotonic()
                if now >= next_ping:
                    self._ping_all()
                    self._warn_unanswered()
                    next_ping = now + self.interval
                ready, _, _ = select.select(list(socks), [], [], max(0.0, next_ping - time.monotonic()))
                for sock in ready:
                    self._receive(socks[sock])
            except Exception:  # never let the thread die: silence would then look like hung followers
                log.exception("liveness monitor error (continuing)")
                time.sleep(self.interval)
