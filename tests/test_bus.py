"""Control bus: codec round trips both ways, limits, every failure being a BusError, and the typed
replies and reports between real `ControlBus` ends over an in-memory transport."""

from __future__ import annotations

import queue

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.bus import PROTOCOL_VERSION, BusCodec, Channel, ControlBus
from cluster.errors import BusDecodeError, BusError, BusMessageTooLarge, BusVersionMismatch
from cluster.messages import (
    Admit,
    Heartbeat,
    Hello,
    PlanLimits,
    PrefillChunk,
    PulseHello,
    RankReport,
    Shutdown,
    SsdLoadResult,
    SsdMissing,
    SsdSync,
    StepPlan,
    StoreBlocks,
)

ids = st.integers(min_value=0, max_value=2**62)
hashes = st.binary(min_size=16, max_size=16)
small = st.integers(min_value=0, max_value=2**20)


@st.composite
def plans(draw: st.DrawFn) -> StepPlan:
    decode_ids = draw(st.lists(ids, max_size=16))
    prefill = tuple(
        PrefillChunk(draw(ids), draw(small), tuple(draw(st.lists(small, max_size=64))), draw(st.booleans()))
        for _ in range(draw(st.integers(0, 4)))
    )
    drafts = (
        tuple(tuple(draw(st.lists(small, max_size=4))) for _ in decode_ids) if draw(st.booleans()) else ()
    )
    rows = sum(p.last for p in prefill) + len(decode_ids)
    words = st.integers(0, 2**32 - 1)
    return StepPlan(
        step=draw(ids),
        release=tuple(draw(st.lists(ids, max_size=8))),
        admit=tuple(
            Admit(draw(ids), tuple(draw(st.lists(small, max_size=8))))
            for _ in range(draw(st.integers(0, 4)))
        ),
        prefill=prefill,
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
        decode_drafts=drafts,
        rollback=tuple((draw(ids), draw(small)) for _ in range(draw(st.integers(0, 3)))),
        argmax=draw(st.booleans()),
        chained=draw(st.booleans()),
        topk=draw(st.integers(0, 256)),
        draws=tuple((draw(st.floats(0, 2)), draw(words), draw(words)) for _ in range(rows))
        if draw(st.booleans()) and not any(drafts)
        else (),
    )


hash_tuples = st.lists(hashes, max_size=5).map(tuple)
names = st.text(max_size=40)
pulses = st.builds(
    PulseHello,
    port=st.integers(1, 65535),
    token=st.binary(min_size=16, max_size=16),
    addresses=st.lists(st.text(max_size=20), max_size=16).map(tuple),
)
messages = st.one_of(
    plans(),
    st.builds(Heartbeat, step=ids, sent_at=st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(Shutdown, exit_code=st.integers(0, 255), reason=st.text(max_size=200)),
    st.builds(SsdSync, hashes=hash_tuples, more=st.booleans()),
    st.builds(Hello, rank=small, host=names, pid=small, pulse=st.none() | pulses),
    st.builds(SsdLoadResult, failed=st.lists(ids, max_size=8).map(tuple)),
    st.builds(SsdMissing, hashes=hash_tuples, more=st.booleans()),
    st.builds(
        RankReport,
        rank=small,
        host=names,
        pid=small,
        step=ids,
        step_ms=st.floats(allow_nan=False, allow_infinity=False),
        active_bytes=ids,
        last_error=names,
        ssd_written=st.lists(st.tuples(hashes, st.booleans()), max_size=4).map(tuple),
    ),
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
    plan = StepPlan(step=1, prefill=(PrefillChunk(1, 0, tuple(range(2000))),))
    with pytest.raises(BusMessageTooLarge, match="over the limit of 1024"):
        codec.encode(1, plan)


def test_receiver_refuses_oversize() -> None:
    data = BusCodec().encode(1, StepPlan(step=1, prefill=(PrefillChunk(1, 0, tuple(range(2000))),)))
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
            [1, 1, [], [], [], [1, 2], [3], [], [], [], [], [], [], []],
        ],  # decode ids/tokens differ
        [PROTOCOL_VERSION, 1, [1, 1, ["a"], [], [], [], [], [], [], [], [], [], [], []]],  # non-int id
        [
            PROTOCOL_VERSION,
            1,
            [1, 1, [], [[1, 2, 0]], [], [], [], [], [], [], [], [], [], []],
        ],  # cached not an array
        [PROTOCOL_VERSION, 1, [1, 1, [], [], [], [], [], [], [], [[1, b"short"]], [], [], [], []]],  # bad hash
        [PROTOCOL_VERSION, 1, [4, [b"x" * 15], False]],  # bad hash in a sync
        [PROTOCOL_VERSION, 1, [4, [], 0]],  # `more` not a boolean
        [PROTOCOL_VERSION, 1, [1, 1]],  # truncated plan
        [PROTOCOL_VERSION, 1, [5, 1, "h", 2, [9, b"t" * 15, []]]],  # short liveness token
        [PROTOCOL_VERSION, 1, [5, 1, "h", 2, [9, b"t" * 16, ["a"] * 17]]],  # too many addresses
        [PROTOCOL_VERSION, 1, [5, 1, "h" * 256, 2, None]],  # host too long
        [PROTOCOL_VERSION, 1, [6, ["1"]]],  # non-int failed block
        [PROTOCOL_VERSION, 1, [7, [b"x" * 16]]],  # truncated missing list
        [PROTOCOL_VERSION, 1, [8, 1, "h", 2, 3, "slow", 0, 0, 0, 0, 0, "", []]],  # step_ms not a number
        [PROTOCOL_VERSION, 1, [8, 1, "h", 2, 3, 1.0, 0, 0, 0, 0, 0, "", [[b"x" * 16]]]],  # bad write result
        {"v": 1},
    ],
)
def test_malformed_messages(raw: object) -> None:
    with pytest.raises(BusDecodeError):
        BusCodec().decode(msgpack.packb(raw))


class Net:
    """An in-memory job of `size` ranks: queues instead of MPI, shared by one `NetTransport` per rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bcast: dict[int, queue.Queue[bytes]] = {r: queue.Queue() for r in range(1, size)}
        self.p2p: dict[tuple[Channel, int], queue.Queue[bytes]] = {
            (c, r): queue.Queue() for c in Channel for r in range(1, size)
        }
        self.acks = dict.fromkeys(range(1, size), 0)

    def bus(self, rank: int, max_bytes: int = 1 << 20) -> ControlBus:
        return ControlBus(NetTransport(self, rank), BusCodec(max_bytes))


class NetTransport:
    """The `Transport` protocol, in memory (blocking calls time out instead of hanging a test)."""

    def __init__(self, net: Net, rank: int) -> None:
        self.net, self.rank, self.size = net, rank, net.size

    def broadcast(self, data: bytes) -> None:
        for q in self.net.bcast.values():
            q.put(data)

    def receive(self, max_bytes: int, expect_soon: bool = False) -> bytes:
        return self.net.bcast[self.rank].get(timeout=10)

    def acknowledge(self, seq: int) -> None:
        self.net.acks[self.rank] = seq

    def await_acks(self, seq: int, timeout: float, acked: dict[int, int]) -> None:
        acked.update(self.net.acks)

    def send(self, channel: Channel, data: bytes) -> None:
        self.net.p2p[channel, self.rank].put(data)

    def recv(self, channel: Channel, source: int, max_bytes: int) -> bytes:
        data = self.net.p2p[channel, source].get(timeout=10)
        if len(data) > max_bytes:
            raise BusMessageTooLarge(f"rank {source} sent {len(data)} bytes")
        return data

    def poll(self, channel: Channel) -> list[tuple[int, bytes]]:
        out = []
        for r in range(1, self.size):
            q = self.net.p2p[channel, r]
            while not q.empty():
                out.append((r, q.get()))
        return out

    def failed_ranks(self) -> list[int]:
        return []

    def abort(self, code: int) -> None:
        raise SystemExit(code)

    def close(self) -> None:
        pass


def test_control_bus_in_order_and_gap_detection() -> None:
    net = Net(2)
    sender, receiver = net.bus(0), net.bus(1)
    sender.send(Heartbeat(1))
    sender.send(StepPlan(step=2, release=(5,)))
    assert receiver.receive() == Heartbeat(1)
    assert receiver.receive() == StepPlan(step=2, release=(5,))
    assert sender.await_acks(1.0) == [] and sender.last_acks() == {1: 2}
    sender.send(Heartbeat(3))
    net.bcast[1].get()  # a lost message
    sender.send(Heartbeat(4))
    assert sender.await_acks(1.0) == [1]
    with pytest.raises(BusDecodeError, match="out of step"):
        receiver.receive()


def test_gather_is_typed_in_rank_order_and_answers_the_last_message() -> None:
    net = Net(3)
    leader, f1, f2 = net.bus(0), net.bus(1), net.bus(2)
    leader.send(StepPlan(step=1))
    for f in (f2, f1):
        f.receive()
        f.reply(SsdLoadResult((f.rank * 10,)))
    assert leader.gather(SsdLoadResult) == [SsdLoadResult((10,)), SsdLoadResult((20,))]
    f1.reply(SsdLoadResult())
    f2.reply(SsdMissing())
    with pytest.raises(BusDecodeError, match="rank 2 sent SsdMissing where rank 0 expected SsdLoadResult"):
        leader.gather(SsdLoadResult)
    f1.reply(SsdLoadResult())  # an answer to message 1 ...
    leader.send(Heartbeat(2))  # ... read after message 2 went out
    with pytest.raises(BusDecodeError, match="rank 1 answered bus message 1, expected an answer to 2"):
        leader.gather(SsdLoadResult)


def test_oversize_reply_is_refused_at_both_ends() -> None:
    net = Net(2)
    leader, follower = net.bus(0, max_bytes=256), net.bus(1, max_bytes=256)
    with pytest.raises(BusMessageTooLarge):
        follower.reply(SsdLoadResult(tuple(range(1000, 1200))))
    ControlBus(NetTransport(net, 1), BusCodec(1 << 20)).reply(SsdLoadResult(tuple(range(1000, 1200))))
    with pytest.raises(BusError):
        leader.gather(SsdLoadResult)


def test_hello_round_trip_with_pulse_info() -> None:
    net = Net(2)
    leader, follower = net.bus(0), net.bus(1)
    hello = Hello(1, "studio-2", 4242, PulseHello(50001, b"k" * 16, ("10.0.0.2", "169.254.1.2")))
    follower.reply(hello)
    assert leader.gather(Hello) == [hello]


def test_reports_are_split_to_fit_and_oversize_ones_fail_loudly() -> None:
    net = Net(3)
    leader, f1, f2 = net.bus(0, 1024), net.bus(1, 1024), net.bus(2, 1 << 20)
    written = tuple((bytes([i % 256, i // 256]) * 8, i % 3 != 0) for i in range(500))
    f1.report(RankReport(1, "h1", 11, step=7, step_ms=2.5, ssd_written=written))
    got = leader.poll_reports()
    assert len(got) > 10 and {r.step for r in got} == {7}
    assert tuple(w for r in got for w in r.ssd_written) == written  # nothing lost, nothing reordered
    assert leader.poll_reports() == []
    # A rank with another limit (or a bug) sends more than rank 0 accepts: a clear error, never a drop.
    f2.report(RankReport(2, "h2" * 100, 12, last_error="x" * 1500))
    with pytest.raises(BusMessageTooLarge, match="rank 2 sent a .*-byte health report, over the bus limit"):
        leader.poll_reports()
    f2.report(RankReport(1, "h2", 12))  # claims to be another rank
    with pytest.raises(BusDecodeError, match="rank 2 sent RankReport as its health report"):
        leader.poll_reports()


def test_a_follower_cannot_broadcast_replies() -> None:
    net = Net(2)
    follower = net.bus(1)
    net.bcast[1].put(BusCodec().encode(1, SsdLoadResult()))
    with pytest.raises(BusDecodeError, match="only followers send"):
        follower.receive()


def test_largest_plan_is_checked_against_the_bus_limit_at_start_up() -> None:
    """Every bounded field at its bound: the defaults fit the default bus limit with room to spare; a bus
    limit too small for the limits is a clear start-up error on every rank, not a failure mid-serving."""
    from cluster.errors import ConfigError
    from rank.cli import build_parser
    from rank.startup import check_plan_fits

    config = {"max_position_embeddings": 8192}
    args = build_parser().parse_args([])
    check_plan_fits(args, config, BusCodec(args.bus_max_bytes))
    small = build_parser().parse_args(["--bus-max-bytes", "20000"])
    with pytest.raises(ConfigError, match="--bus-max-bytes"):
        check_plan_fits(small, config, BusCodec(small.bus_max_bytes))
    plan = BusCodec().encode(1, PlanLimits(8, 1024, 256, 32, 8192, 4096).largest_plan())
    assert len(plan) < 1_000_000


def test_clearing_a_huge_tier_spreads_evictions_over_plans() -> None:
    from cluster.kvindex import BlockIndex
    from cluster.prefix import PrefixCache

    index = BlockIndex(block_tokens=2, capacity_blocks=100, block_bytes=1)
    cache = PrefixCache(index, b"r" * 16, max_evictions=8)
    st = cache.state_for(tuple(range(41)))
    cache.store(1, tuple(range(41)), st, 41)
    cache.release(st)
    assert cache.clear() == 20
    taken = [cache.take_evictions() for _ in range(4)]
    assert [len(t) for t in taken] == [8, 8, 4, 0]
    assert len({b for t in taken for b in t}) == 20 and not cache.has_evictions


def test_ranks_with_other_software_are_named() -> None:
    from cluster.messages import Hello
    from rank.startup import mismatched_software

    same = (Hello(0, "a", 1, None, "orchard 1, mlx 2"), Hello(1, "b", 2, None, "orchard 1, mlx 2"))
    assert mismatched_software(same) is None
    odd = (*same, Hello(2, "c", 3, None, "orchard 1, mlx 3"))
    problem = mismatched_software(odd)
    assert problem is not None and "rank 2 on c runs orchard 1, mlx 3" in problem


def test_speculation_fields_must_match_the_decode_rows() -> None:
    """Drafts come one tuple per decode row (or not at all); anything else is a malformed plan."""
    codec = BusCodec()
    good = StepPlan(step=1, decode_ids=(4, 5), decode_tokens=(1, 2), decode_drafts=((3, 4), ()), rollback=((4, 9),))
    assert codec.decode(codec.encode(1, good)).message == good
    wire = good.to_wire()
    drafts, rollback = len(wire) - 6, len(wire) - 5  # then `argmax`, `chained`, `topk`, `draws`
    wire[drafts] = [[3, 4]]  # one row's drafts for two rows
    with pytest.raises(BusDecodeError, match="drafts"):
        StepPlan.from_wire(wire)
    wire[drafts] = [[3, "x"], []]
    with pytest.raises(BusDecodeError):
        StepPlan.from_wire(wire)
    wire[drafts], wire[rollback] = [], [[4]]
    with pytest.raises(BusDecodeError):
        StepPlan.from_wire(wire)
    wire[rollback], wire[-4] = [], 1  # argmax is a bool
    with pytest.raises(BusDecodeError):
        StepPlan.from_wire(wire)
    wire[-4], wire[-3] = False, "yes"  # and so is chained
    with pytest.raises(BusDecodeError):
        StepPlan.from_wire(wire)
    wire[-3], wire[-2] = False, "8"  # topk is an integer
    with pytest.raises(BusDecodeError):
        StepPlan.from_wire(wire)
    wire[-2] = 0
    for draws, row_drafts, says in [
        ([[1.0, 1, 2]], [], "one per row"),  # one draw for two rows
        ([[1.0, 1, 2], [0.0, 0, 0]], [[3], []], "one per row"),  # rows with drafts draw keys as they go
        ([[1, 1, 2], [0.0, 0, 0]], [], "temperature"),  # an integer temperature
        ([[float("nan"), 1, 2], [0.0, 0, 0]], [], "temperature"),
        ([[-1.0, 1, 2], [0.0, 0, 0]], [], "temperature"),
        ([[1.0, 2**32, 2], [0.0, 0, 0]], [], "32-bit"),
        ([[1.0, 1], [0.0, 0, 0]], [], "not \\(temperature"),
    ]:
        wire[-1], wire[drafts] = draws, row_drafts
        with pytest.raises(BusDecodeError, match=says):
            StepPlan.from_wire(wire)
    ok = StepPlan(step=1, decode_ids=(4, 5), decode_tokens=(1, 2), draws=((0.7, 1, 2**32 - 1), (0.0, 0, 0)))
    assert codec.decode(codec.encode(1, ok)).message == ok
