"""Control-bus codec: round trips, limits, and every failure being a BusError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.bus import PROTOCOL_VERSION, BusCodec, ControlBus
from cluster.errors import BusDecodeError, BusError, BusMessageTooLarge, BusVersionMismatch
from cluster.messages import Admit, Heartbeat, PrefillChunk, Shutdown, SsdSync, StepPlan, StoreBlocks

ids = st.integers(min_value=0, max_value=2**62)
hashes = st.binary(min_size=16, max_size=16)
small = st.integers(min_value=0, max_value=2**20)


@st.composite
def plans(draw: st.DrawFn) -> StepPlan:
    decode_ids = draw(st.lists(ids, max_size=16))
    return StepPlan(
        step=draw(ids),
        release=tuple(draw(st.lists(ids, max_size=8))),
        admit=tuple(
            Admit(draw(ids), tuple(draw(st.lists(small, max_size=64))))
            for _ in range(draw(st.integers(0, 4)))
        ),
        prefill=tuple(
            PrefillChunk(draw(ids), draw(small), draw(small)) for _ in range(draw(st.integers(0, 4)))
        ),
        decode_ids=tuple(decode_ids),
        decode_tokens=tuple(draw(st.lists(small, min_size=len(decode_ids), max_size=len(decode_ids)))),
        store=tuple(
            StoreBlocks(draw(ids), draw(small), tuple(draw(st.lists(ids, max_size=4))))
            for _ in range(draw(st.integers(0, 3)))
        ),
        evict=tuple(draw(st.lists(ids, max_size=8))),
        ssd_load=tuple((draw(ids), draw(hashes)) for _ in range(draw(st.integers(0, 3)))),
        ssd_save=tuple((draw(ids), draw(hashes)) for _ in range(draw(st.integers(0, 3)))),
        ssd_delete=tuple(draw(st.lists(hashes, max_size=3))),
    )


messages = st.one_of(
    plans(),
    st.builds(Heartbeat, step=ids, sent_at=st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(Shutdown, exit_code=st.integers(0, 255), reason=st.text(max_size=200)),
    st.builds(SsdSync, hashes=st.lists(hashes, max_size=5).map(tuple)),
)


@settings(max_examples=300, deadline=None)
@given(seq=ids, message=messages)
def test_round_trip(seq: int, message: object) -> None:
    codec = BusCodec()
    env = codec.decode(codec.encode(seq, message))  # type: ignore[arg-type]
    assert env.seq == seq
    assert env.message == message


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_garbage_is_a_bus_error(data: bytes) -> None:
    try:
        BusCodec().decode(data)
    except BusError:
        pass


def test_sender_refuses_oversize() -> None:
    codec = BusCodec(max_message_bytes=1024)
    plan = StepPlan(step=1, admit=(Admit(1, tuple(range(2000))),))
    with pytest.raises(BusMessageTooLarge, match="over the limit of 1024"):
        codec.encode(1, plan)


def test_receiver_refuses_oversize() -> None:
    data = BusCodec().encode(1, StepPlan(step=1, admit=(Admit(1, tuple(range(2000))),)))
    with pytest.raises(BusMessageTooLarge):
        BusCodec(max_message_bytes=1024).decode(data)


def test_version_mismatch_names_both_versions() -> None:
    data = msgpack.packb([PROTOCOL_VERSION + 1, 1, Heartbeat(1).to_wire()])
    with pytest.raises(BusVersionMismatch, match=f"speaks {PROTOCOL_VERSION}"):
        BusCodec().decode(data)


@pytest.mark.parametrize(
    "raw",
    [
        [PROTOCOL_VERSION, 1, [99]],  # unknown kind
        [PROTOCOL_VERSION, 1, []],  # no kind
        [PROTOCOL_VERSION, "x", Heartbeat(1).to_wire()],  # bad seq
        [
            PROTOCOL_VERSION,
            1,
            [1, 1, [], [], [], [1, 2], [3], [], [], [], [], []],
        ],  # decode ids/tokens differ
        [PROTOCOL_VERSION, 1, [1, 1, ["a"], [], [], [], [], [], [], [], [], []]],  # non-int id
        [
            PROTOCOL_VERSION,
            1,
            [1, 1, [], [[1, [2], 3]], [], [], [], [], [], [], [], []],
        ],  # cached not an array
        [PROTOCOL_VERSION, 1, [1, 1, [], [], [], [], [], [], [], [[1, b"short"]], [], []]],  # bad hash
        [PROTOCOL_VERSION, 1, [4, [b"x" * 15]]],  # bad hash in a sync
        [PROTOCOL_VERSION, 1, [1, 1]],  # truncated plan
        {"v": 1},
    ],
)
def test_malformed_messages(raw: object) -> None:
    with pytest.raises(BusDecodeError):
        BusCodec().decode(msgpack.packb(raw))


class Loopback:
    """An in-memory transport: a real ControlBus on both ends, bytes passed through a list."""

    def __init__(self, rank: int, wire: list[bytes]) -> None:
        self.rank, self.size, self.wire = rank, 2, wire

    def broadcast(self, data: bytes) -> None:
        self.wire.append(data)

    def receive(self, max_bytes: int, expect_soon: bool = False) -> bytes:
        return self.wire.pop(0)

    def abort(self, code: int) -> None:
        raise SystemExit(code)

    def acknowledge(self, seq: int) -> None:
        self.acked = seq

    def await_acks(self, seq: int, timeout: float) -> list[int]:
        return []

    def send_to_leader(self, data: bytes, tag: int) -> None:
        pass

    def recv_from_followers(self, tag: int, max_bytes: int) -> list[bytes]:
        return []

    def close(self, last_seq: int) -> None:
        pass

    def send_report(self, data: bytes) -> None:
        pass

    def poll_reports(self) -> list[bytes]:
        return []

    def failed_ranks(self) -> list[int]:
        return []


def test_control_bus_in_order_and_gap_detection() -> None:
    wire: list[bytes] = []
    sender, receiver = ControlBus(Loopback(0, wire)), ControlBus(Loopback(1, wire))
    sender.send(Heartbeat(1))
    sender.send(StepPlan(step=2, release=(5,)))
    assert receiver.receive() == Heartbeat(1)
    assert receiver.receive() == StepPlan(step=2, release=(5,))
    sender.send(Heartbeat(3))
    wire.pop()  # a lost message
    sender.send(Heartbeat(4))
    with pytest.raises(BusDecodeError, match="out of step"):
        receiver.receive()
