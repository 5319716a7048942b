"""LoRA adapters on rank 0's control side, without a model: the plan's adapter fields on the wire, the
registry's slots and states, the scheduler carrying slots in plans, and prefix-cache isolation between
adapters (a prefix cached under one adapter is reused under the same one, never under another)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.adapters import AdapterRegistry, AdapterSpec, AdapterState, Reserve, Unload, adapter_root
from cluster.bus import PROTOCOL_VERSION, BusCodec
from cluster.engine_client import EngineClient, EngineState
from cluster.errors import BusDecodeError
from cluster.kvindex import BlockIndex, root_hash
from cluster.messages import (
    MAX_ADAPTER_OPS_PER_PLAN,
    MAX_ADAPTER_PATH_BYTES,
    AdapterLoad,
    Admit,
    PlanLimits,
    StepPlan,
)
from cluster.prefix import PrefixCache
from cluster.requests import Admission, FinishReason, GenerationRequest, SamplingParams
from cluster.scheduler import SampledToken, ScheduledStep, Scheduler, SchedulerConfig

ids = st.integers(min_value=0, max_value=2**62)
slots = st.integers(min_value=1, max_value=2**31)
loads = st.builds(
    AdapterLoad,
    slot=slots,
    path=st.text(min_size=1, max_size=60),
    digest=st.binary(min_size=1, max_size=64),
)


@st.composite
def adapter_plans(draw: st.DrawFn) -> StepPlan:
    return StepPlan(
        step=draw(ids),
        admit=tuple(
            Admit(draw(ids), tuple(draw(st.lists(ids, max_size=4))), draw(st.integers(0, 2**31)))
            for _ in range(draw(st.integers(0, 4)))
        ),
        adapter_load=tuple(draw(st.lists(loads, max_size=MAX_ADAPTER_OPS_PER_PLAN))),
        adapter_unload=tuple(draw(st.lists(slots, max_size=MAX_ADAPTER_OPS_PER_PLAN))),
    )


# -- the wire --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(seq=ids, plan=adapter_plans())
def test_adapter_fields_round_trip(seq: int, plan: StepPlan) -> None:
    codec = BusCodec()
    env = codec.decode(codec.encode(seq, plan))
    assert env.message == plan


def _plan(
    admit: list[object] | None = None, load: list[object] | None = None, unload: object = None
) -> bytes:
    body = [
        1,
        1,
        [],
        admit or [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        load or [],
        [] if unload is None else unload,
        [],  # decode_drafts (protocol 8)
        [],  # rollback
        False,  # argmax (protocol 9)
        False,  # chained (protocol 10)
        0,  # topk (protocol 11)
        [],  # draws (protocol 12)
    ]
    return msgpack.packb([PROTOCOL_VERSION, 1, body], use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (_plan(admit=[[1, []]]), "admit is not"),  # protocol 5's admit: no slot
        (_plan(admit=[[1, [], -1]]), "negative"),
        (_plan(admit=[[1, [], "1"]]), "integer"),
        (_plan(load=[[0, "/a", b"d"]]), "not 1 or more"),  # slot 0 is the base model
        (_plan(load=[[1, "", b"d"]]), "adapter path"),
        (_plan(load=[[1, "x" * (MAX_ADAPTER_PATH_BYTES + 1), b"d"]]), "adapter path"),
        (_plan(load=[[1, "/a", "d"]]), "digest"),
        (_plan(load=[[1, "/a", b""]]), "digest"),
        (_plan(load=[[1, "/a", b"d" * 65]]), "digest"),
        (_plan(load=[[1, "/a"]]), "adapter load is not"),
        (_plan(load=[[1, "/a", b"d"]] * (MAX_ADAPTER_OPS_PER_PLAN + 1)), "more than"),
        (_plan(unload=[0]), "not 1 or more"),
        (_plan(unload=[1] * (MAX_ADAPTER_OPS_PER_PLAN + 1)), "more than"),
        (_plan(unload=3), "not an array"),
        (msgpack.packb([PROTOCOL_VERSION, 1, [1, 1, [], [], [], [], [], [], [], [], [], []]]), "malformed"),
    ],
)
def test_malformed_adapter_fields_are_refused(data: bytes, says: str) -> None:
    with pytest.raises(BusDecodeError, match=says):
        BusCodec().decode(data)


def test_largest_plan_carries_the_bounded_adapter_operations() -> None:
    plan = PlanLimits(8, 1024, 256, 32, 8192, 4096).largest_plan()
    assert len(plan.adapter_load) == len(plan.adapter_unload) == MAX_ADAPTER_OPS_PER_PLAN
    assert all(a.adapter == 2**32 - 1 for a in plan.admit)
    encoded = BusCodec().encode(1, plan)
    assert len(encoded) < 1_000_000 and BusCodec().decode(encoded).message == plan


# -- the registry ----------------------------------------------------------------------------------


def spec(n: int = 1) -> AdapterSpec:
    return AdapterSpec(f"/adapters/{n}", bytes([n]) * 32, 8)


def ran_next_plan(reg: AdapterRegistry) -> tuple[tuple[AdapterLoad, ...], tuple[int, ...]]:
    ops = reg.take_ops()
    reg.ran(*ops)
    return ops


def test_slots_are_bounded_and_reused() -> None:
    reg = AdapterRegistry(2, "base")
    assert reg.reserve("base", spec()) == (Reserve.NAME_TAKEN, 0)
    assert reg.reserve("bad name", spec()) == (Reserve.BAD_NAME, 0)
    assert reg.reserve("a", AdapterSpec("/" + "x" * MAX_ADAPTER_PATH_BYTES, b"d", 1)) == (Reserve.BAD_PATH, 0)
    assert reg.reserve("a", spec(1)) == (Reserve.RESERVED, 1)
    assert reg.reserve("a", spec(1)) == (Reserve.NAME_TAKEN, 0)
    assert reg.reserve("b", spec(2)) == (Reserve.RESERVED, 2)
    assert reg.reserve("c", spec(3)) == (Reserve.FULL, 0)
    assert reg.acquire("a") is None  # loading: not served yet
    loads, unloads = ran_next_plan(reg)
    assert [(x.slot, x.path, x.digest) for x in loads] == [
        (1, "/adapters/1", spec(1).digest),
        (2, "/adapters/2", spec(2).digest),
    ]
    assert unloads == () and reg.state_of("a") is AdapterState.READY and not reg.has_ops()
    assert reg.unload("a") == (Unload.UNLOADING, 0)
    assert reg.acquire("a") is None
    assert reg.take_ops() == ((), ())  # an unload waits one plan (see Adapter.defer)
    assert ran_next_plan(reg) == ((), (1,))
    assert reg.state_of("a") is None and reg.unload("a") == (Unload.UNKNOWN, 0)
    assert reg.reserve("c", spec(3)) == (Reserve.RESERVED, 1)  # the freed slot


def test_an_adapter_in_use_is_refused_or_drained() -> None:
    reg = AdapterRegistry(1, "base")
    reg.reserve("a", spec())
    assert reg.unload("a") == (Unload.LOADING, 0)
    ran_next_plan(reg)
    assert reg.acquire("a") == 1 and reg.acquire("a") == 1
    assert reg.unload("a") == (Unload.IN_USE, 2)
    assert reg.state_of("a") is AdapterState.READY
    assert reg.unload("a", drain=True) == (Unload.DRAINING, 2)
    assert reg.acquire("a") is None  # no new requests while draining
    assert reg.unload("a") == (Unload.DRAINING, 2)  # asking again (without drain) changes nothing
    reg.release(1)
    assert not reg.has_ops()
    reg.release(1)  # the last one: the unload is queued
    assert reg.has_ops() and reg.state_of("a") is AdapterState.UNLOADING
    assert reg.take_ops() == ((), ())
    assert ran_next_plan(reg) == ((), (1,))
    row = reg.rows()
    assert row == ()


def test_counts_and_rows() -> None:
    reg = AdapterRegistry(3, "base")
    assert reg.add_loaded("sql", 2, spec(2)) is Reserve.RESERVED
    assert reg.add_loaded("sql", 3, spec(2)) is Reserve.NAME_TAKEN
    assert reg.add_loaded("x", 4, spec(2)) is Reserve.FULL
    reg.reserve("chat", spec(1))
    for _ in range(3):
        reg.acquire("sql")
    reg.release(2)
    reg.release(0)  # the base model: nothing to count
    rows = reg.rows()
    assert [(r.name, r.slot, r.state, r.requests, r.total_requests, r.rank) for r in rows] == [
        ("chat", 1, "loading", 0, 0, 8),
        ("sql", 2, "ready", 2, 3, 8),
    ]
    assert rows[1].digest == spec(2).digest.hex() and rows[1].path == "/adapters/2"
    assert reg.digest(2) == spec(2).digest and reg.digest(0) == b"" and reg.digest(3) == b""


def test_plan_operations_are_bounded() -> None:
    reg = AdapterRegistry(6, "base", max_ops=4)
    for i in range(6):
        reg.reserve(f"a{i}", spec(i + 1))
    first = reg.take_ops()
    assert [x.slot for x in first[0]] == [1, 2, 3, 4] and reg.has_ops()
    second = reg.take_ops()
    assert [x.slot for x in second[0]] == [5, 6] and not reg.has_ops()
    reg.ran(*first)
    assert reg.state_of("a0") is AdapterState.READY and reg.state_of("a5") is AdapterState.LOADING
    reg.ran(*second)
    assert reg.state_of("a5") is AdapterState.READY


def test_adapter_roots_differ_by_content() -> None:
    base = root_hash("model", "tp2")
    assert adapter_root(base, b"") == base
    one, two = adapter_root(base, b"\x01" * 32), adapter_root(base, b"\x02" * 32)
    assert len({base, one, two}) == 3 and len(one) == 16
    assert adapter_root(base, b"\x01" * 32) == one  # the same content in any slot, under any name


# -- the engine door -------------------------------------------------------------------------------


def submission(rid: str, adapter: str = "", prompt: tuple[int, ...] = (1, 2, 3)) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=3), lambda e: None, adapter_name=adapter)


def test_the_door_counts_a_request_when_it_accepts_it() -> None:
    reg = AdapterRegistry(1, "base")
    client = EngineClient(max_waiting=2, adapters=reg)
    client.set_state(EngineState.READY)
    assert client.submit(submission("x", "a")) is Admission.UNKNOWN_MODEL
    reg.reserve("a", spec())
    assert client.submit(submission("x", "a")) is Admission.UNKNOWN_MODEL  # still loading
    ran_next_plan(reg)
    sub = submission("y", "a")
    assert client.submit(sub) is Admission.ACCEPTED and sub.adapter == 1
    assert reg.unload("a") == (Unload.IN_USE, 1)  # the engine has not taken it yet: it still counts
    base = submission("z")
    assert client.submit(base) is Admission.ACCEPTED and base.adapter == 0
    assert client.submit(submission("w", "a")) is Admission.QUEUE_FULL
    assert reg.rows()[0].requests == 1  # a refused request is not counted
    assert client.fail_live("stuck") == 2
    assert reg.rows()[0].requests == 0


# -- the scheduler ---------------------------------------------------------------------------------


def make(reg: AdapterRegistry | None = None, block_tokens: int = 4) -> Scheduler:
    cache = PrefixCache(BlockIndex(block_tokens, 64, 1), root_hash("model", "tp1"))
    return Scheduler(SchedulerConfig(4, 64, 1000, 0), lambda ids: "x" * len(ids), [0], cache, reg)


def drive(s: Scheduler) -> list[StepPlan]:
    """Run until idle, sampling token 1 for every row (as tests/test_scheduler.py's `run`)."""
    plans = []
    for _ in range(1000):
        if not s.has_work():
            break
        step: ScheduledStep = s.schedule()
        plans.append(step.plan)
        s.update(step, [SampledToken(1)] * len(step.rows))
    return plans


def accepted(reg: AdapterRegistry, rid: str, adapter: str, prompt: tuple[int, ...]) -> GenerationRequest:
    sub = submission(rid, adapter, prompt)
    if adapter:
        slot = reg.acquire(adapter)
        assert slot is not None
        sub.adapter = slot
    return sub


def test_plans_carry_slots_loads_and_unloads() -> None:
    reg = AdapterRegistry(2, "base")
    s = make(reg)
    reg.reserve("a", spec(1))
    assert s.has_work()
    plans = drive(s)
    assert [p.adapter_load for p in plans] == [(AdapterLoad(1, "/adapters/1", spec(1).digest),)]
    assert reg.state_of("a") is AdapterState.READY
    r1 = s.add(accepted(reg, "r1", "a", (1, 2, 3)))
    r0 = s.add(accepted(reg, "r0", "", (1, 2, 3)))
    assert (r1.adapter, r0.adapter) == (1, 0)
    plans = drive(s)
    assert {(a.seq_id, a.adapter) for a in plans[0].admit} == {(r1.seq_id, 1), (r0.seq_id, 0)}
    assert reg.rows()[0].requests == 0  # both finished: released
    assert reg.unload("a") == (Unload.UNLOADING, 0)
    plans = drive(s)
    assert [p.adapter_unload for p in plans] == [(), (1,)]


def test_a_drained_adapter_unloads_a_plan_after_its_last_sequence_is_released() -> None:
    reg = AdapterRegistry(1, "base")
    s = make(reg)
    reg.reserve("a", spec())
    drive(s)
    req = s.add(accepted(reg, "r", "a", (5, 6, 7)))
    step = s.schedule()
    s.update(step, [SampledToken(1)] * len(step.rows))
    assert reg.unload("a", drain=True) == (Unload.DRAINING, 1)
    s.cancel("r")
    plans = drive(s)
    released = next(i for i, p in enumerate(plans) if req.seq_id in p.release)
    unloaded = next(i for i, p in enumerate(plans) if p.adapter_unload == (1,))
    assert unloaded > released  # a plan runs adapter unloads before releases
    assert reg.rows() == ()


PROMPT = tuple(range(1, 18))  # four full blocks of 4 tokens, and one more token


def test_a_cached_prefix_is_reused_under_the_same_adapter_only() -> None:
    reg = AdapterRegistry(2, "base")
    s = make(reg)
    reg.reserve("a", spec(1))
    reg.reserve("b", spec(2))
    drive(s)
    assert s.prefix_cache is not None
    index = s.prefix_cache.index

    def cached_blocks(rid: str, adapter: str) -> tuple[tuple[int, ...], list[bytes]]:
        req = s.add(accepted(reg, rid, adapter, PROMPT))
        assert req.prefix is not None
        hashes = list(req.prefix.hashes)
        plans = drive(s)
        admit = next(a for p in plans for a in p.admit if a.seq_id == req.seq_id)
        return admit.cached, hashes

    cached, under_a = cached_blocks("a1", "a")
    assert cached == () and index.stats.hit_tokens == 0  # nothing cached yet: 4 blocks stored
    cached, again_a = cached_blocks("a2", "a")
    assert len(cached) == 4 and again_a == under_a  # the same adapter: every block reused
    hits = index.stats.hit_tokens
    assert hits == 16
    cached, under_b = cached_blocks("b1", "b")
    assert cached == () and index.stats.hit_tokens == hits  # another adapter: nothing reused
    assert not set(under_b) & set(under_a)
    cached, under_base = cached_blocks("base1", "")
    assert cached == () and not set(under_base) & (set(under_a) | set(under_b))
    cached, _ = cached_blocks("b2", "b")
    assert len(cached) == 4 and index.stats.hit_tokens == hits + 16


def test_same_content_in_another_slot_shares_blocks() -> None:
    """Blocks are keyed by what an adapter is (its digest), not where it sits: reloaded in another slot or
    under another name, its cached prefixes still serve."""
    reg = AdapterRegistry(2, "base")
    s = make(reg)
    reg.reserve("a", spec(1))
    drive(s)
    first = s.add(accepted(reg, "r1", "a", PROMPT))
    drive(s)
    reg.unload("a")
    drive(s)
    reg.reserve("filler", spec(9))
    reg.reserve("a-again", spec(1))
    drive(s)
    again = s.add(accepted(reg, "r2", "a-again", PROMPT))
    assert again.adapter == 2 and first.adapter == 1
    assert first.prefix is not None and again.prefix is not None
    assert again.prefix.hashes == first.prefix.hashes
    plans = drive(s)
    admit = next(a for p in plans for a in p.admit if a.seq_id == again.seq_id)
    assert len(admit.cached) == 4 and admit.adapter == 2


def test_cancelled_and_failed_requests_release_their_adapter() -> None:
    reg = AdapterRegistry(1, "base")
    s = make(reg)
    reg.reserve("a", spec())
    drive(s)
    s.add(accepted(reg, "r1", "a", PROMPT))
    s.add(accepted(reg, "r2", "a", PROMPT))
    assert reg.rows()[0].requests == 2
    ((req, event),) = s.cancel("r1")
    assert event.finish_reason is FinishReason.CANCELLED and reg.rows()[0].requests == 1
    s.fail_all("boom")
    assert reg.rows()[0].requests == 0
