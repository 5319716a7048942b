"""The scheduler as a step function: synthetic requests, a fake clock, no model."""

from __future__ import annotations

import random
from collections.abc import Sequence

from cluster.messages import StepPlan
from cluster.requests import FinishReason, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import SampledToken, ScheduledStep, Scheduler, SchedulerConfig

EOS = 0


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(96 + (i % 26)) for i in ids)  # token 1 -> "a", 2 -> "b", ...


def make(max_batch: int = 4, chunk: int = 16, context: int = 1000, idle: int = 0) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch, chunk, context, idle), decode, [EOS])


def request(rid: str, prompt_len: int, max_tokens: int = 5, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(
        rid,
        tuple(range(1, prompt_len + 1)),
        SamplingParams(max_tokens=max_tokens, stop=stop),
        sink=lambda e: None,
    )


def rows(plan: StepPlan, sched_prompts: dict[int, int]) -> list[int]:
    """The rows of logits a plan yields, as the executor orders them: completed prompts, then decodes."""
    for p in plan.prefill:
        assert p.last == (p.end == sched_prompts[p.seq_id])
    done = [p.seq_id for p in plan.prefill if p.last]
    return done + list(plan.decode_ids)


def sample(step: ScheduledStep, token: int = 1) -> list[SampledToken]:
    return [SampledToken(token)] * len(step.rows)


def run(s: Scheduler, token: int = 1, limit: int = 10_000) -> tuple[list[StepPlan], list[RequestEvent]]:
    """Drive the scheduler like the leader does, sampling `token` for every row, and check that the rows
    the scheduler expects are the rows the executor computes."""
    prompts = {r.seq_id: r.prompt_len for r in s.requests.values()}
    plans, events = [], []
    for _ in range(limit):
        if not s.has_work():
            break
        step = s.schedule()
        plan = step.plan
        for p in plan.prefill:
            assert p.tokens == tuple(range(1, prompts[p.seq_id] + 1))[p.start : p.end]
        assert [r.seq_id for r in step.rows] == rows(plan, prompts)
        plans.append(plan)
        out = s.update(step, sample(step, token))
        events.extend(e for _, e in out)
    return plans, events


def test_chunked_prefill_then_decode_then_release() -> None:
    s = make(chunk=16)
    r = s.add(request("a", 40, max_tokens=3))
    plans, events = run(s)
    assert [(p.start, p.end) for p in plans[0].prefill] == [(0, 16)]
    assert [(p.start, p.end) for p in plans[2].prefill] == [(32, 40)]
    assert plans[3].decode_ids == (r.seq_id,)
    assert plans[-1].release == (r.seq_id,) and plans[-1].decode_ids == ()
    final = events[-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert final.completion_tokens == 3 and final.prompt_tokens == 40
    assert "".join(e.text for e in events) == "aaa"


def test_continuous_batching_join_and_leave_without_stall() -> None:
    s = make(max_batch=2, chunk=100)
    short, long_, late = (
        s.add(request("s", 4, max_tokens=2)),
        s.add(request("l", 4, max_tokens=6)),
        s.add(request("x", 4, max_tokens=2)),
    )
    plans, events = run(s)
    assert {a.seq_id for a in plans[0].admit} == {short.seq_id, long_.seq_id}
    # `late` is admitted as soon as `short` finishes, while `long` keeps decoding.
    join = next(i for i, p in enumerate(plans) if any(a.seq_id == late.seq_id for a in p.admit))
    assert short.seq_id in plans[join].release
    assert long_.seq_id in plans[join].decode_ids
    assert all(len(p.admit) + len(p.decode_ids) <= 2 for p in plans)
    finished = {e.request_id for e in events if e.finished}
    assert finished == {"s", "l", "x"}


def test_prefill_budget_is_shared() -> None:
    s = make(max_batch=4, chunk=10)
    for i in range(3):
        s.add(request(str(i), 7))
    plan = s.schedule().plan
    assert sum(p.end - p.start for p in plan.prefill) == 10
    assert [(p.start, p.end) for p in plan.prefill] == [(0, 7), (0, 3)]


def test_idle_prefill_chunk_only_while_nothing_decodes() -> None:
    """With no stream decoding, prompts prefill in larger steps; once one decodes, steps are short again."""
    s = make(max_batch=4, chunk=10, idle=40)
    s.add(request("a", 50))
    step = s.schedule()
    assert [(p.start, p.end) for p in step.plan.prefill] == [(0, 40)] and step.rows == ()
    s.update(step, ())
    step = s.schedule()
    assert [(p.start, p.end) for p in step.plan.prefill] == [(40, 50)] and len(step.rows) == 1
    s.update(step, sample(step))  # "a" decodes from now on
    s.add(request("b", 50))
    plan = s.schedule().plan
    assert [(p.start, p.end) for p in plan.prefill] == [(0, 10)] and len(plan.decode_ids) == 1
    s = make(chunk=10, idle=5)  # an idle chunk below the chunk is ignored
    s.add(request("c", 50))
    assert [(p.start, p.end) for p in s.schedule().plan.prefill] == [(0, 10)]


def test_eos_stop_string_and_cancel() -> None:
    s = make()
    s.add(request("eos", 3, max_tokens=50))
    _, events = run(s, token=EOS)
    assert events[-1].finish_reason is FinishReason.STOP and events[-1].completion_tokens == 1

    s = make()
    s.add(request("stop", 3, max_tokens=50, stop=("bb",)))
    _, events = run(s, token=2)  # "b" each step: stops on the second one
    assert events[-1].finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events) == ""
    assert events[-1].completion_tokens == 2

    s = make(max_batch=1)
    s.add(request("run", 3, max_tokens=50))
    s.add(request("wait", 3))
    step = s.schedule()
    s.update(step, ())
    out = s.cancel("wait") + s.cancel("run") + s.cancel("unknown")
    assert [e.finish_reason for _, e in out] == [FinishReason.CANCELLED, FinishReason.CANCELLED]
    assert s.requests == {}
    nxt = s.schedule().plan
    assert nxt.release == (step.plan.admit[0].seq_id,)  # only admitted sequences are released on the ranks
    assert not s.has_work()


def test_context_limit_finishes_with_length() -> None:
    s = make(context=10)
    s.add(request("c", 8, max_tokens=100))
    _, events = run(s)
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].completion_tokens == 2


def test_thousands_of_requests_all_finish_and_invariants_hold() -> None:
    rng = random.Random(3)
    s = make(max_batch=8, chunk=64)
    reqs = [request(str(i), rng.randint(1, 200), max_tokens=rng.randint(1, 20)) for i in range(2000)]
    for r in reqs:
        s.add(r)
    plans, events = run(s, token=5)
    live: set[int] = set()
    released: list[int] = []
    for p in plans:
        assert set(p.release) <= live  # only what the ranks hold is released
        live -= set(p.release)
        released += p.release
        live |= {a.seq_id for a in p.admit}
        assert len(live) <= 8
        assert set(p.decode_ids) <= live
    # Every admitted sequence was released exactly once, in the plans themselves: nothing is left
    # on the ranks, and the scheduler forgot every request.
    assert live == set() and len(released) == len(set(released)) == 2000
    assert not s.has_work() and s.requests == {} and s.num_running == s.num_waiting == 0
    done = [e for e in events if e.finished]
    assert len(done) == 2000
    by_id = {r.request_id: r for r in reqs}
    assert all(e.completion_tokens == by_id[e.request_id].sampling.max_tokens for e in done)


def test_store_splits_runs_around_blocks_others_stored() -> None:
    """A prompt prefilled in one step whose middle block some other sequence stored meanwhile: both runs
    around it are stored now (there may be no later step to store the rest)."""
    from cluster.kvindex import BlockIndex
    from cluster.prefix import PrefixCache

    index = BlockIndex(block_tokens=4, capacity_blocks=16, block_bytes=1)
    cache = PrefixCache(index, b"r" * 16)
    tokens = tuple(range(1, 22))  # 5 full blocks and one token
    st = cache.state_for(tokens)
    other = index.insert(st.hashes[2], tokens[8:12], [])  # block 2, stored by another sequence
    assert other is not None
    index.ready([other])
    runs = cache.store(7, tokens, st, len(tokens))
    assert [(r.first, len(r.block_ids)) for r in runs] == [(0, 2), (3, 2)]
    assert st.covered == 5 and st.blocks[2] is other
