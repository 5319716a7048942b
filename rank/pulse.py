"""The sockets and threads of the liveness side channel (cluster/pulse.py has the why and the formats).

Followers: `PulseResponder` answers rank 0's pings from a thread of its own, with what the engine
thread is doing (`Activity`). It listens on loopback (rank 0 on the same host) and on the addresses
MPI's TCP links may use, never on every interface. Rank 0: `PulseMonitor` pings each follower at the
addresses it announced at start-up (over MPI, with its token) and records answers in a `PulseBook`.
Neither thread touches MPI or MLX, so both keep going while the engine waits in a collective.

Anyone who can reach a port can flood it. Each thread reads at most `max_datagrams` a second and then
sleeps until the next second (the kernel drops the excess in its small queue), so a flood costs a
bounded slice of the CPU and of the GIL the engine thread needs; the work per datagram is bounded too
(one recv of at most MAX_PULSE_BYTES + 1, a bounded decode, one HMAC), and neither thread takes a lock
the engine thread may hold (`Activity` is one tuple, swapped whole). A flood can drown rank 0's pings:
the channel then cannot name a hung rank, and --step-timeout still stops a hung job.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cluster.messages import MAX_PULSE_ADDRESSES, PulseHello
from cluster.pulse import MAX_PULSE_BYTES, TOKEN_BYTES, Ping, Pong, PulseBook, decode

log = logging.getLogger("orchard.pulse")

# a second, per thread: rank 0 sends 10 rounds a second of 2 datagrams (ping and probe) to each address,
# 320 at most for MAX_PULSE_ADDRESSES addresses before one answers
DEFAULT_MAX_DATAGRAMS = 500
RECEIVE_BUFFER_BYTES = 16384  # what a flood may park in the kernel between two reads


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


def _mca_list(env: Mapping[str, str], name: str) -> list[str]:
    return [v.strip() for v in env.get(f"OMPI_MCA_{name}", "").split(",") if v.strip()]


def _matches(interface: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, specs: list[str]) -> bool:
    """Open MPI's if_include/if_exclude syntax: interface names or CIDR subnets."""
    for spec in specs:
        if spec == interface:
            return True
        if "/" in spec:
            try:
                if ip in ipaddress.ip_network(spec, strict=False):
                    return True
            except ValueError:
                continue
    return False


def local_addresses(env: Mapping[str, str] | None = None) -> list[str]:
    """This host's IPv4 addresses other than loopback that MPI's TCP links may use: all of them, unless
    Open MPI is told to narrow its links (btl_tcp_if_include / btl_tcp_if_exclude, e.g. `--mca
    btl_tcp_if_include bridge0`, which mpirun hands every rank as OMPI_MCA_*). Link-local ones count: a
    Thunderbolt bridge between Macs often has only a self-assigned 169.254 address."""
    import psutil

    env = os.environ if env is None else env
    include, exclude = _mca_list(env, "btl_tcp_if_include"), _mca_list(env, "btl_tcp_if_exclude")
    out = []
    for interface, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(a.address)
            if ip.is_loopback or (include and not _matches(interface, ip, include)):
                continue
            if exclude and _matches(interface, ip, exclude):
                continue
            out.append(a.address)
    return sorted(set(out))


def _udp_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class PulseResponder:
    MAX_ANSWERS_PER_SECOND = 50  # rank 0 asks 10 times a second

    def __init__(
        self,
        rank: int,
        activity: Activity,
        max_datagrams: int = DEFAULT_MAX_DATAGRAMS,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.rank, self.pid, self.activity = rank, os.getpid(), activity
        self.max_datagrams = max(1, max_datagrams)
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.datagrams = 0  # read so far (a flood shows here as at most max_datagrams a second)
        self._last_nonce = 0
        env = os.environ if env is None else env
        base = int(env.get("ORCHARD_PULSE_PORT", "0"))
        port = base + int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")) if base else 0
        try:
            loopback = _udp_socket("127.0.0.1", port)
        except OSError as exc:  # taken (another job on this host): any port beats no liveness channel
            log.warning("liveness port %d: %s; using a free port instead", port, exc.strerror)
            loopback = _udp_socket("127.0.0.1", 0)
        self.port = int(loopback.getsockname()[1])
        self.socks = [loopback]
        self.addresses: list[str] = []  # announced to rank 0: the ones we listen on
        for address in local_addresses(env)[:MAX_PULSE_ADDRESSES]:
            try:
                self.socks.append(_udp_socket(address, self.port))
                self.addresses.append(address)
            except OSError as exc:
                log.warning("liveness: cannot listen on %s:%d (%s); not announcing it", address, self.port, exc)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pulse-responder", daemon=True)

    def hello(self) -> PulseHello:
        """What rank 0 needs to reach us, sent to it over MPI at start-up (in this rank's `Hello`)."""
        return PulseHello(self.port, self.token, tuple(self.addresses))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for sock in self.socks:
            sock.close()

    def _run(self) -> None:
        window_start, budget, answers = time.monotonic(), self.max_datagrams, 0
        while not self._stopped.is_set():
            now = time.monotonic()
            if now - window_start >= 1.0:
                window_start, budget, answers = now, self.max_datagrams, 0
            if budget <= 0:  # a flood: sleep out the second instead of reading (and spinning on) it
                self._stopped.wait(window_start + 1.0 - now)
                continue
            ready, _, _ = select.select(self.socks, [], [], 0.25)
            for sock in ready[:budget]:
                budget -= 1
                self.datagrams += 1
                if self._answer(sock, answers < self.MAX_ANSWERS_PER_SECOND):
                    answers += 1

    def _answer(self, sock: socket.socket, allowed: bool) -> bool:
        """Read one datagram; answer it if it is rank 0's (and `allowed`). True when it was answered."""
        try:
            data, source = sock.recvfrom(MAX_PULSE_BYTES + 1)
        except OSError:
            return False
        if not allowed:
            return False
        ping = decode(data)
        if not isinstance(ping, Ping) or ping.nonce <= self._last_nonce or not ping.valid(self.token):
            return False  # a stranger's, or a replay of rank 0's (a sniffer cannot make us reflect)
        self._last_nonce = ping.nonce
        label, busy = self.activity.get()
        try:  # from the socket it came to, so the answer's source is the address rank 0 pinged
            sock.sendto(Pong(self.rank, self.pid, ping.nonce, label, busy).signed(self.token).encode(), source)
        except OSError:
            return False
        return True


@dataclass(slots=True)
class _Link:
    """Rank 0's two UDP sockets to one address of one follower, bound to the local address that routes
    there. `sock` (not connected) carries pings and answers: an unconnected socket is never told of ICMP
    errors, so nobody can make it fail by forging them. `probe` (connected) sends the same ping, which
    the follower ignores as a repeat; a connected socket reports the ICMP port-unreachable of a datagram
    as ECONNREFUSED, so a port nobody listens on any more (the process died, its host is up) shows."""

    rank: int
    token: bytes
    address: str
    port: int
    sock: socket.socket
    probe: socket.socket


class PulseMonitor:
    """Rank 0: ping every follower `interval` apart and record answers and refusals in `book`."""

    NONCE_WINDOW = 50  # answers to older pings than this many rounds ago are stale

    def __init__(
        self,
        book: PulseBook,
        interval: float = 0.1,
        warn_after: float = 10.0,
        max_datagrams: int = DEFAULT_MAX_DATAGRAMS,
    ) -> None:
        self.book, self.interval, self.warn_after = book, interval, warn_after
        # reads per socket per round: answers, strangers' datagrams and ICMP errors alike
        self.reads_per_round = max(2, int(max_datagrams * interval))
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
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.connect((address, hello.port))
                sock = _udp_socket(probe.getsockname()[0], 0)
            except OSError:
                probe.close()
                continue
            probe.setblocking(False)
            self._links.append(_Link(rank, hello.token, address, hello.port, sock, probe))

    def start(self) -> None:
        if self._links:
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for link in self._links:
            link.sock.close()
            link.probe.close()

    def _ping_all(self) -> None:
        self._nonce += 1
        for link in self._links:
            pinned = self.book.address_of(link.rank)
            quiet = self.book.silence(link.rank) or 0.0
            if pinned and pinned != link.address and quiet < 1.0:
                continue  # another address of this rank answers: ping that one only while it does
            ping = Ping.sign(link.token, self._nonce).encode()
            try:
                link.sock.sendto(ping, (link.address, link.port))
            except OSError:
                pass  # a full buffer or a lost route: silence, which the book measures
            try:
                link.probe.send(ping)
            except OSError as exc:
                self._refused(link, exc)
        self.book.pinged()

    def _refused(self, link: _Link, exc: OSError) -> None:
        """The probe's port is closed, so the process that held it died (its host is up). Counted only on
        the address it last answered from, and only a run of them makes the rank gone (PulseBook.refused:
        an ICMP error is easy to forge)."""
        if exc.errno != errno.ECONNREFUSED or self.book.address_of(link.rank) != link.address:
            return
        if self.book.refused(link.rank):
            log.error("%s is gone: its liveness port refuses pings (the process died)", self.book.name(link.rank))
            if self.on_gone is not None:
                self.on_gone(link.rank)

    def _receive(self, link: _Link, sock: socket.socket) -> None:
        try:
            data, source = sock.recvfrom(MAX_PULSE_BYTES + 1)
        except BlockingIOError:
            return
        except OSError as exc:  # only the probe is told of ICMP errors
            self._refused(link, exc)
            return
        if source != (link.address, link.port):
            return  # not the follower: the unconnected socket hears anyone
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
        socks = {s: link for link in self._links for s in (link.sock, link.probe)}
        budget = dict.fromkeys(socks, 0)
        while not self._stopped.is_set():
            try:
                now = time.monotonic()
                if now >= next_ping:
                    self._ping_all()
                    self._warn_unanswered()
                    next_ping = now + self.interval
                    budget = dict.fromkeys(socks, self.reads_per_round)
                # a socket that used up its round's reads (a flood) waits for the next round
                open_socks = [sock for sock, left in budget.items() if left > 0]
                wait = max(0.0, next_ping - time.monotonic())
                if not open_socks:
                    self._stopped.wait(wait)
                    continue
                ready, _, _ = select.select(open_socks, [], [], wait)
                for sock in ready:
                    budget[sock] -= 1
                    self._receive(socks[sock], sock)
            except Exception:  # never let the thread die: silence would then look like hung followers
                log.exception("liveness monitor error (continuing)")
                time.sleep(self.interval)
