"""The liveness side channel: datagram codec, rank 0's book, and real UDP sockets on loopback."""

from __future__ import annotations

import socket
import time

import msgpack

from cluster.health import UNRESPONSIVE, HealthTable
from cluster.pulse import Ping, Pong, PulseBook, decode
from rank.pulse import Activity, PulseMonitor, PulseResponder


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
    book.answered(Pong(1, 1, 1, "", 0.0))
    assert not book.refused(1)  # a stray ICMP message
    book.answered(Pong(1, 1, 2, "", 0.0))  # ... and it answers again
    for _ in range(3):
        assert not book.refused(1)  # three in a row, but within 0.3 s
    clock.now += 0.4
    assert book.refused(1) and book.gone_ranks() == [1]
    assert not book.refused(1)  # reported once


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
        time.sleep(0.6)
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
