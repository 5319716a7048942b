"""The liveness side channel: datagram codec, rank 0's book, and real UDP sockets on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import msgpack
import psutil
import pytest

from cluster.health import UNRESPONSIVE, HealthTable
from cluster.pulse import Ping, Pong, PulseBook, decode
from rank.pulse import Activity, PulseMonitor, PulseResponder, local_addresses


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_codec_round_trips_signed_and_refuses_garbage() -> None:
    key, other = b"k" * 16, b"o" * 16
    ping = Ping.sign(key, 7)
    pong = Pong(2, 4242, 7, "executing step 9", 1.5).signed(key)
    assert decode(ping.encode()) == ping and ping.valid(key) and not ping.valid(other)
    assert decode(pong.encode()) == pong and pong.valid(key) and not pong.valid(other)
    assert key not in ping.encode() + pong.encode()  # the secret never crosses the wire
    forged = Pong(2, 4242, 7, "alive, honest", 1.5, pong.mac)  # a sniffer's edit of a real answer
    assert not forged.valid(key)
    for junk in (
        b"",
        b"\xc1",
        b"x" * 600,
        msgpack.packb([9, 1]),
        msgpack.packb([1, "no", "nonce"]),
        msgpack.packb({"a": 1}),
        msgpack.packb([1, 2**31, 1]),  # a number where the MAC goes: no allocation of that size
        msgpack.packb([1, 5, b"short"]),
    ):
        assert decode(junk) is None


def test_book_names_the_silent_rank_first() -> None:
    clock = Clock()
    book = PulseBook(clock, {1: "rank 1 (host a, pid 1)", 2: "rank 2 (host b, pid 2)"})
    clock.now += 0.5
    book.pinged()
    book.answered(Pong(1, 1, 1, "waiting for rank 0's next message", 0.2))
    book.answered(Pong(2, 2, 1, "executing step 3", 0.1))
    clock.now += 3.0
    book.pinged()
    book.answered(Pong(1, 1, 2, "executing step 3", 3.0))  # rank 2 went quiet
    assert book.silent(1.0) == [2]
    text = book.describe(1.0)
    assert text.startswith("rank 2 (host b, pid 2) is not responding (no liveness answer for 3.0 s")
    assert "rank 1 (host a, pid 1) is alive (executing step 3 for 3.0 s)" in text
    book.answered(Pong(9, 9, 1, "", 0.0))  # unknown ranks are ignored
    assert book.ranks == [1, 2]


def test_silence_needs_unanswered_pings_and_an_answer_first() -> None:
    clock = Clock()
    book = PulseBook(clock, {1: "rank 1", 2: "rank 2"})
    book.pinged()
    book.answered(Pong(1, 1, 1, "", 0.0))
    clock.now += 30.0  # nobody pinged meanwhile (rank 0 starved): that is not the followers' silence
    assert book.silence(1) == 0.0 and book.silent(1.0) == []
    book.pinged()
    assert book.silence(1) == 30.0
    assert book.silence(2) is None and book.never_answered() == [2]  # unreachable: never condemned
    assert "rank 2 has never answered" in book.describe(1.0)


def test_one_refusal_is_not_death() -> None:
    clock = Clock()
    book = PulseBook(clock, {1: "rank 1"})
    book.pinged()
    book.answered(Pong(1, 1, 1, "", 0.0))
    assert not book.refused(1)  # a stray ICMP message
    book.answered(Pong(1, 1, 2, "", 0.0))  # ... and it answers again
    for _ in range(3):
        book.pinged()
        assert not book.refused(1)  # three rounds in a row, but within a second
    clock.now += 1.0
    book.pinged()
    assert book.refused(1) and book.gone_ranks() == [1]
    book.pinged()
    assert not book.refused(1)  # reported once


def test_refusals_count_once_per_ping_round() -> None:
    """A dead port refuses each ping once; a forger can send any number of ICMP errors per round."""
    clock = Clock()
    book = PulseBook(clock, {1: "rank 1"})
    book.pinged()
    book.answered(Pong(1, 1, 1, "", 0.0))
    for _ in range(1000):
        clock.now += 0.01
        assert not book.refused(1)
    assert book.gone_ranks() == []
    for _ in range(20):  # forged errors in every round, but the rank answers every round
        book.pinged()
        clock.now += 0.1
        assert not book.refused(1) and not book.refused(1)
        book.answered(Pong(1, 1, 2, "", 0.0))
    assert book.gone_ranks() == []


def test_health_uses_liveness_over_report_age() -> None:
    clock = Clock()
    table = HealthTable(clock, timeout=5.0)
    for r in (0, 1, 2):
        table.register(r, "h", r)
    book = PulseBook(clock, {1: "rank 1", 2: "rank 2"})
    table.liveness = book.silence
    book.pinged()
    book.answered(Pong(2, 2, 1, "", 0.0))
    clock.now += 10.0  # no reports for 10 s (rank 0 busy in one long step) ...
    book.pinged()
    book.answered(Pong(1, 1, 1, "executing step 1", 10.0))  # ... but rank 1 answers its pings
    states = {h.rank: h.state for h in table.snapshot()}
    assert states == {0: UNRESPONSIVE, 1: "ok", 2: UNRESPONSIVE}
    assert table.snapshot()[1].liveness_age_s == 0.0


def test_real_sockets_answer_until_the_responder_stops() -> None:
    activity = Activity()
    responder = PulseResponder(1, activity)
    responder.start()
    book = PulseBook(time.monotonic, {1: "rank 1"})
    monitor = PulseMonitor(book, interval=0.05)
    monitor.add(1, responder.hello(), same_host=True)
    monitor.start()
    try:
        activity.set("executing step 5")
        deadline = time.monotonic() + 5
        while book.silence(1) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert book.silence(1) is not None and book.silence(1) < 0.2  # type: ignore[operator]
        time.sleep(0.2)
        assert "executing step 5" in book.describe(1.0)
        responder.stop()
        deadline = time.monotonic() + 10
        while not book.gone_ranks() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert book.silent(0.4) == [1]
        assert book.gone_ranks() == [1]  # its port now refuses: the process is gone, not just quiet
        assert "rank 1 is gone" in book.describe(1.0)
    finally:
        monitor.stop()


def test_responder_ignores_strangers_and_replays() -> None:
    responder = PulseResponder(1, Activity())
    responder.start()
    port = responder.hello().port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(Ping.sign(b"wrong-secret-16b", 1).encode(), ("127.0.0.1", port))
        s.sendto(b"not msgpack at all", ("127.0.0.1", port))
        try:
            s.recvfrom(1024)
            raise AssertionError("a stranger's ping was answered")
        except TimeoutError:
            pass
        real = Ping.sign(responder.token, 3)
        s.sendto(real.encode(), ("127.0.0.1", port))
        pong = decode(s.recvfrom(1024)[0])
        assert isinstance(pong, Pong) and pong.valid(responder.token)
        assert (pong.rank, pong.pid, pong.nonce, pong.activity) == (1, responder.pid, 3, "starting")
        s.sendto(real.encode(), ("127.0.0.1", port))  # a replay of rank 0's ping
        try:
            s.recvfrom(1024)
            raise AssertionError("a replayed ping was answered")
        except TimeoutError:
            pass
    responder.stop()


def ask(port: int, address: str, token: bytes, nonce: int, timeout: float = 0.5) -> Pong | None:
    """One ping as rank 0 sends it; the answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(Ping.sign(token, nonce).encode(), (address, port))
        try:
            answer = decode(s.recvfrom(1024)[0])
        except OSError:  # no answer, or refused (nobody listens there)
            return None
        return answer if isinstance(answer, Pong) else None


def test_responder_listens_on_loopback_and_mpis_links_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not on every interface: on loopback (rank 0 on this host) and the addresses MPI's TCP links may
    use, narrowed as Open MPI is told to narrow them (mpirun hands --mca settings to every rank)."""
    external = local_addresses({})
    if not external:
        pytest.skip("this machine has no address but loopback")
    one = external[0]
    interface = next(n for n, addrs in psutil.net_if_addrs().items() if any(a.address == one for a in addrs))
    assert local_addresses({"OMPI_MCA_btl_tcp_if_include": f"{one}/32"}) == [one]
    assert one in local_addresses({"OMPI_MCA_btl_tcp_if_include": f"{interface},bogus/99"})
    assert one not in local_addresses({"OMPI_MCA_btl_tcp_if_exclude": interface})
    monkeypatch.setenv("OMPI_MCA_btl_tcp_if_include", "127.0.0.0/8")  # MPI stays on this host
    responder = PulseResponder(1, Activity())
    responder.start()
    try:
        port = responder.hello().port
        assert responder.hello().addresses == ()
        assert ask(port, "127.0.0.1", responder.token, 1) is not None
        assert ask(port, one, responder.token, 2) is None  # nothing listens on the host's own address
    finally:
        responder.stop()
    monkeypatch.delenv("OMPI_MCA_btl_tcp_if_include")
    responder = PulseResponder(1, Activity())
    responder.start()
    try:
        assert responder.hello().addresses == tuple(external)
        assert ask(responder.hello().port, one, responder.token, 1) is not None
    finally:
        responder.stop()


FLOOD = """
import socket, sys, time
port, seconds, junk = int(sys.argv[1]), float(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(50):
        s.sendto(junk, ("127.0.0.1", port))
    sent += 50
print(sent)
"""


def thread_cpu(native_id: int | None) -> float:
    return next(t.user_time + t.system_time for t in psutil.Process().threads() if t.id == native_id)


def test_a_flood_costs_the_responder_a_bounded_slice_of_cpu() -> None:
    """Datagrams that look like pings (each one costs a decode and an HMAC) sent as fast as a process
    can: the responder reads at most its budget a second and sleeps out the rest, so the engine thread
    keeps the CPU and the GIL; once the flood ends, rank 0's pings are answered again."""
    responder = PulseResponder(1, Activity())
    responder.start()
    try:
        port, budget = responder.hello().port, responder.max_datagrams
        junk = Ping.sign(b"not-the-secret!!", 10**9).encode()
        cpu0, t0 = thread_cpu(responder._thread.native_id), time.monotonic()
        flood = [sys.executable, "-c", FLOOD, str(port), "2.0", junk.hex()]
        sent = int(subprocess.run(flood, capture_output=True, text=True, timeout=60, check=True).stdout)
        elapsed = time.monotonic() - t0
        cpu = thread_cpu(responder._thread.native_id) - cpu0
        assert sent > 20 * budget  # it was a flood
        assert responder.datagrams <= budget * (elapsed + 1)
        assert cpu < 0.2 * elapsed, (cpu, elapsed)
        deadline, nonce, answer = time.monotonic() + 5, 1, None
        while answer is None and time.monotonic() < deadline:
            nonce += 1
            answer = ask(port, "127.0.0.1", responder.token, nonce, timeout=0.2)
        assert answer is not None and answer.nonce == nonce
    finally:
        responder.stop()


FORGE_ICMP = """
import socket, struct, sys, time
sports, dport, seconds, gap = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def checksum(b):
    total = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
def forged(sport):
    loop = socket.inet_aton("127.0.0.1")
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 48, 0, 0, 64, 17, 0, loop, loop)  # rank 0's ping ...
    quoted += struct.pack("!HHHH", sport, dport, 28, 0)  # ... from its socket to the follower's port
    body = struct.pack("!BBHI", 3, 3, 0, 0) + quoted  # ICMP: destination unreachable, port unreachable
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]
packets = [forged(int(p)) for p in sports]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sent, end = 0, time.monotonic() + seconds
while True:  # at least once
    for packet in packets:
        raw.sendto(packet, ("127.0.0.1", 0))
        sent += 1
    if time.monotonic() >= end:
        break
    if gap:
        time.sleep(gap)
print(sent)
"""


GAP = "0"  # seconds between forged errors: 0, as fast as a process can


def monitor_sockets(monitor: PulseMonitor) -> list[socket.socket]:
    """Every socket rank 0 pings from (the forger's targets)."""
    return [s for link in monitor._links for s in (getattr(link, "sock", None), getattr(link, "probe", None)) if s]


class CountingBook(PulseBook):
    def __init__(self) -> None:
        super().__init__(time.monotonic, {1: "rank 1"})
        self.refusals_seen = 0

    def refused(self, rank: int) -> bool:
        self.refusals_seen += 1
        return super().refused(rank)


def test_forged_port_unreachable_errors_do_not_kill_a_live_rank() -> None:
    """ICMP errors forged for rank 0's socket (what an attacker on the network can send), thousands of
    them while the rank answers every ping: the rank stays alive, and its process is not declared dead."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError:
        pytest.skip("forging ICMP needs a raw socket (root or CAP_NET_RAW)")
    responder = PulseResponder(1, Activity())
    responder.start()
    book = CountingBook()
    monitor = PulseMonitor(book, interval=0.1)
    monitor.add(1, responder.hello(), same_host=True)
    declared_dead: list[int] = []
    monitor.on_gone = declared_dead.append
    monitor.start()
    try:
        deadline = time.monotonic() + 5
        while book.silence(1) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert book.silence(1) is not None
        rank0_ports = ",".join(str(s.getsockname()[1]) for s in monitor_sockets(monitor))
        forge = [sys.executable, "-c", FORGE_ICMP, rank0_ports, str(responder.hello().port), "3.0", GAP]
        sent = int(subprocess.run(forge, capture_output=True, text=True, timeout=60, check=True).stdout)
        assert sent > 1000 and book.refusals_seen > 10  # the forged errors reached rank 0's socket
        assert declared_dead == [] and book.gone_ranks() == []
        assert book.silence(1) < 1.0  # type: ignore[operator]
    finally:
        monitor.stop()
        responder.stop()


def test_a_forged_error_pending_on_rank0s_socket_does_not_swallow_its_ping() -> None:
    """A connected UDP socket fails the next send after an ICMP error, and that ping never leaves: one
    forged error per round would then silence a live rank. Here one is waiting before the first round;
    the ping must still reach the follower (the next round is far away)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError:
        pytest.skip("forging ICMP needs a raw socket (root or CAP_NET_RAW)")
    responder = PulseResponder(1, Activity())
    responder.start()
    book = PulseBook(time.monotonic, {1: "rank 1"})
    monitor = PulseMonitor(book, interval=5.0)
    monitor.add(1, responder.hello(), same_host=True)
    rank0_ports = ",".join(str(s.getsockname()[1]) for s in monitor_sockets(monitor))
    forge = [sys.executable, "-c", FORGE_ICMP, rank0_ports, str(responder.hello().port), "0", "0"]
    assert int(subprocess.run(forge, capture_output=True, text=True, timeout=60, check=True).stdout) >= 1
    time.sleep(0.1)  # the error is now pending
    monitor.start()
    try:
        deadline = time.monotonic() + 3.0
        while book.silence(1) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert book.silence(1) is not None  # answered in the first round
    finally:
        monitor.stop()
        responder.stop()
