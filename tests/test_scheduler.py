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


# -- vLLM's extensions (#15); with a model: tests/test_extensions.py --------------------------------------
def ext(rid: str, prompt_len: int = 3, fork_of: str = "", **sampling: object) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": 5, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(rid, tuple(range(1, prompt_len + 1)), params, sink=lambda e: None, fork_of=fork_of)


def drive(s: Scheduler, tokens: Sequence[int]) -> list[RequestEvent]:
    """One request: sample `tokens` in turn (the last one repeats)."""
    events: list[RequestEvent] = []
    i = 0
    while s.has_work():
        step = s.schedule()
        out = s.update(step, [SampledToken(tokens[min(i, len(tokens) - 1)])] * len(step.rows))
        i += bool(step.rows)
        events.extend(e for _, e in out)
    return events


def text(events: Sequence[RequestEvent]) -> str:
    return "".join(e.text for e in events)


def test_ignore_eos_finishes_on_length_only() -> None:
    s = make()
    s.add(ext("i", ignore_eos=True, max_tokens=4))
    events = drive(s, [EOS])
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].completion_tokens == 4


def test_min_tokens_holds_off_eos_stop_ids_and_stop_strings() -> None:
    s = make()
    s.add(ext("m", min_tokens=3, max_tokens=10))
    events = drive(s, [EOS])  # the sampler bans EOS before min_tokens; one that comes anyway is text
    assert events[-1].finish_reason is FinishReason.STOP and events[-1].completion_tokens == 4
    s = make()
    s.add(ext("s", min_tokens=3, max_tokens=10, stop=("b",)))
    events = drive(s, [2, 1, 2, 2])  # "b" "a" then "b" at the third token: min_tokens reached, stops
    assert events[-1].finish_reason is FinishReason.STOP and text(events) == "ba"
    s = make()
    s.add(ext("s2", min_tokens=2, max_tokens=10, stop=("ab",)))
    events = drive(s, [1, 2, 1, 2])  # "ab" ends at token 2 (= min_tokens): it counts
    assert text(events) == "" and events[-1].completion_tokens == 2
    s = make()
    s.add(ext("s3", min_tokens=3, max_tokens=10, stop=("ab",)))
    events = drive(s, [1, 2, 3, 1, 2])  # the first "ab" ends before min_tokens: passes; the second stops
    assert text(events) == "abc" and events[-1].completion_tokens == 5


def test_stop_token_ids_finish_without_their_text() -> None:
    s = make()
    s.add(ext("t", stop_token_ids=(3,), max_tokens=10))
    events = drive(s, [1, 2, 3])
    assert events[-1].finish_reason is FinishReason.STOP and text(events) == "ab"
    assert [t for e in events for t in e.token_ids] == [1, 2, 3]
    s = make()
    s.add(ext("t2", stop_token_ids=(3,), ignore_eos=True, max_tokens=10))  # ignore_eos spares EOS only
    events = drive(s, [EOS, 3])
    assert events[-1].finish_reason is FinishReason.STOP and events[-1].completion_tokens == 2


def test_include_stop_str_in_output_and_held_text_survives_eos() -> None:
    s = make()
    s.add(ext("inc", stop=("bc",), include_stop_str_in_output=True, max_tokens=10))
    events = drive(s, [1, 2, 3, 4])
    assert events[-1].finish_reason is FinishReason.STOP and text(events) == "abc"
    s = make()
    s.add(ext("held", stop=("xyz",), max_tokens=10))
    events = drive(s, [1, 24, EOS])  # "ax" then EOS: the held-back "ax" is not lost
    assert events[-1].finish_reason is FinishReason.STOP and text(events) == "ax"


def test_skip_special_tokens_false_uses_the_keeping_decode() -> None:
    s = Scheduler(SchedulerConfig(4, 16, 1000, 0), decode, [EOS], decode_special=lambda ids: decode(ids).upper())
    s.add(ext("keep", skip_special_tokens=False, max_tokens=2))
    s.add(ext("skip", max_tokens=2))
    events = drive(s, [1])
    assert text([e for e in events if e.request_id == "keep"]) == "AA"
    assert text([e for e in events if e.request_id == "skip"]) == "aa"


def cached(max_batch: int = 4, chunk: int = 16, block: int = 4) -> Scheduler:
    from cluster.kvindex import BlockIndex
    from cluster.prefix import PrefixCache

    cache = PrefixCache(BlockIndex(block_tokens=block, capacity_blocks=64, block_bytes=1), b"r" * 16)
    return Scheduler(SchedulerConfig(max_batch, chunk, 1000, 0), decode, [EOS], prefix_cache=cache)


def prefilled(plans: Sequence[StepPlan]) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in plans:
        for c in p.prefill:
            out[c.seq_id] = out.get(c.seq_id, 0) + c.end - c.start
    return out


def test_n_siblings_start_from_the_first_ones_blocks() -> None:
    s = cached(chunk=8, block=4)
    reqs = [s.add(ext(rid, 22, fork_of="r" if i else "", max_tokens=3)) for i, rid in enumerate(["r", "r-1", "r-2"])]
    plans, events = run(s)
    counts = prefilled(plans)
    assert counts[reqs[0].seq_id] == 22
    assert counts[reqs[1].seq_id] == counts[reqs[2].seq_id] == 2  # 5 blocks hit, the partial block recomputed
    hits = {a.seq_id: len(a.cached) for p in plans for a in p.admit}
    assert hits[reqs[1].seq_id] == hits[reqs[2].seq_id] == 5
    assert sum(e.finished for e in events) == 3
    # a prompt of whole blocks: each sibling recomputes one block at most (one position must be computed)
    s = cached(chunk=8, block=4)
    reqs = [s.add(ext(rid, 16, fork_of="q" if i else "")) for i, rid in enumerate(["q", "q-1"])]
    counts = prefilled(run(s)[0])
    assert counts[reqs[1].seq_id] == 4


def test_n_siblings_without_a_prefix_cache_prefill_and_survive_the_first() -> None:
    s = make(chunk=8)
    reqs = [s.add(ext(rid, 10, fork_of="r" if i else "")) for i, rid in enumerate(["r", "r-1"])]
    counts = prefilled(run(s)[0])
    assert counts[reqs[0].seq_id] == counts[reqs[1].seq_id] == 10
    s = cached(chunk=8)
    for i, rid in enumerate(["c", "c-1", "c-2"]):
        s.add(ext(rid, 30, fork_of="c" if i else ""))
    s.update(s.schedule(), ())  # the first's first chunk; the siblings wait
    assert [e.finish_reason for _, e in s.cancel("c")] == [FinishReason.CANCELLED]
    _, events = run(s)
    assert {e.request_id for e in events if e.finish_reason is FinishReason.LENGTH} == {"c-1", "c-2"}


def test_fork_seeds_differ_per_sibling_and_repeat() -> None:
    from cluster.scheduler import fork_seed

    s = make()
    seeds = [s.add(ext(rid, fork_of="x" if i else "", seed=7)).sampling.seed for i, rid in enumerate(["x", "x-1", "x-2"])]
    assert seeds[0] == 7 and len(set(seeds)) == 3
    assert seeds[1] == fork_seed(7, "y-1", "y") and 0 <= seeds[2] < 2**63  # type: ignore[operator]
    assert s.add(ext("z-1", fork_of="z")).sampling.seed is None  # unseeded siblings draw their own keys


def test_prompt_logprobs_compute_every_position_and_reach_the_first_event() -> None:
    from cluster.requests import TokenLogprob

    s = cached(chunk=8, block=4)
    s.add(ext("warm", 12, max_tokens=1))
    run(s)
    req = s.add(ext("pl", 12, max_tokens=2, prompt_logprobs=2))
    plans, seen = [], []
    while s.has_work():
        step = s.schedule()
        plans.append(step.plan)
        for c in step.plan.prefill:  # what rank 0's executor computes for the chunk
            s.record_prompt_logprobs(c.seq_id, [TokenLogprob(t, -1.0) for t in c.tokens[1 if c.start == 0 else 0 :]])
        seen += [e for _, e in s.update(step, [SampledToken(1)] * len(step.rows))]
    assert [a.cached for p in plans for a in p.admit] == [()]  # no prefix-cache hit: positions are computed
    assert [c.prompt_logprobs for p in plans for c in p.prefill] == [2, 2]
    first = seen[0].prompt_logprobs
    assert first[0] is None and [e.token_id for e in first[1:] if e] == list(req.prompt_tokens[1:])
    assert seen[1].prompt_logprobs == ()


def test_argmax_plans_only_when_every_row_takes_the_plain_greedy_pick() -> None:
    """`StepPlan.argmax` lets a vocabulary-parallel head send rank 0 each slice's best entry alone: only
    when no row reads more of the distribution (logprobs, penalties, bias, sampling, banned EOS)."""

    def plans_with(**params: object) -> list[bool]:
        s = make(chunk=100)
        s.add(
            GenerationRequest("a", (1, 2, 3), SamplingParams(max_tokens=4, **params), sink=lambda e: None)  # type: ignore[arg-type]
        )
        return [p.argmax for p in run(s)[0] if p.prefill or p.decode_ids]

    assert plans_with(temperature=0.0) == [True] * 4
    assert plans_with(temperature=0.7) == [False] * 4
    assert plans_with(temperature=0.0, logprobs=2) == [False] * 4
    assert plans_with(temperature=0.0, logit_bias={5: 1.0}) == [False] * 4
    assert plans_with(temperature=0.0, repetition_penalty=1.1) == [False] * 4
    assert plans_with(temperature=0.0, min_tokens=2) == [False, False, True, True]  # EOS banned until then
    s = make(chunk=100)  # one greedy row beside a sampled one: the slices are gathered for both
    for rid, t in (("g", 0.0), ("s", 0.8)):
        s.add(GenerationRequest(rid, (1, 2, 3), SamplingParams(max_tokens=2, temperature=t), sink=lambda e: None))
    assert not any(p.argmax for p in run(s)[0] if p.prefill or p.decode_ids)


def test_a_burst_prefills_in_larger_steps_while_starters_outnumber_decoders() -> None:
    """More sequences waiting for their first token than decoding: prefill_chunk per starter per decoder
    (at most the idle chunk); as many decoding as starting: short steps again."""
    s = make(max_batch=8, chunk=10, idle=40)
    s.add(request("a", 10))
    step = s.schedule()  # "a" alone, idle: its whole prompt
    s.update(step, sample(step))  # "a" decodes from now on
    for rid in "bcdef":  # five starters beside one decoder: 5 x 10, capped at 40
        s.add(request(rid, 30))
    step = s.schedule()
    assert sum(p.end - p.start for p in step.plan.prefill) == 40 and len(step.plan.decode_ids) == 1
    s.update(step, sample(step))
    s = make(max_batch=8, chunk=10, idle=40)
    for rid in "abc":
        s.add(request(rid, 5))
    step = s.schedule()
    s.update(step, sample(step))  # three decoding
    for rid in "de":  # two starters, three decoders: plain chunks
        s.add(request(rid, 30))
    plan = s.schedule().plan
    assert sum(p.end - p.start for p in plan.prefill) == 10 and len(plan.decode_ids) == 3


def test_chain_plans_the_next_greedy_step_only_when_nothing_else_could_change_it() -> None:
    """`Scheduler.chain`: the next step of the same rows, planned before the step runs (rank/engine.py):
    only for a pure greedy decode step of every running row, nobody waiting or leaving, no row ending
    for its length at the step; a row that then ends on EOS is skipped in the chained step's update."""

    def greedy(rid: str, n: int) -> GenerationRequest:
        return GenerationRequest(rid, (1, 2, 3), SamplingParams(max_tokens=n, temperature=0.0), sink=lambda e: None)

    s = make(chunk=100)
    s.add(greedy("a", 10))
    s.add(greedy("b", 3))
    first = s.schedule()  # the prompts: no chain
    assert s.chain(first) is None
    s.update(first, sample(first))
    step = s.schedule()  # both decode; "b" reaches its 2nd token here and its 3rd in a chained step
    chained = s.chain(step)
    assert chained is not None and chained.plan.chained and chained.plan.argmax
    assert chained.plan.decode_ids == step.plan.decode_ids and chained.plan.step == step.plan.step + 1
    s.update(step, sample(step))
    s.update(chained, [SampledToken(1), SampledToken(EOS)])  # "b" ends on its last token
    step = s.schedule()
    assert step.plan.release == (chained.rows[1].seq_id,)  # "b" leaves in this plan, which may chain
    chained = s.chain(step)
    assert chained is not None and chained.plan.decode_ids == step.plan.decode_ids == (chained.rows[0].seq_id,)
    s.update(step, [SampledToken(EOS)])  # "a" ends at `step` on EOS: the chained step computes it in vain
    assert s.update(chained, [SampledToken(1)]) == []  # and its row there is skipped
    assert s.schedule().plan.release == chained.plan.decode_ids  # released in the next plan
    s.add(greedy("c", 5))
    step = s.schedule()
    s.update(step, sample(step))
    step = s.schedule()
    s.add(greedy("d", 5))  # waiting: the next plan admits it
    assert s.chain(step) is None
    sampled = make(chunk=100)
    sampled.add(GenerationRequest("t", (1, 2), SamplingParams(max_tokens=5, temperature=0.9), sink=lambda e: None))
    step = sampled.schedule()
    sampled.update(step, sample(step))
    assert sampled.chain(sampled.schedule()) is None  # sampled rows need rank 0's logits
