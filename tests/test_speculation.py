"""Speculative decoding (issue 16): drafts verified in the packed pass, every row rolled back to exactly
what it accepted. These tests drive the executor with hand-made plans (an oracle and a wrong proposer
are just token lists here) and then the whole leader loop, and compare with plain decoding."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from cluster.messages import Admit, PrefillChunk, StepPlan
from rank.executor import Executor
from rank.models import load_model
from rank.ragged import RaggedKVCache

PROMPTS = [list(range(3, 40)), list(range(50, 61)), [7, 9, 11, 13, 7, 9, 11, 13, 7, 9]]


class Driver:
    """Plans by hand: admit and prefill each prompt, then decode greedily, each row verifying the drafts
    `propose(row, context)` gives it, keeping the longest matching prefix plus the model's next token."""

    def __init__(self, model: object, speculative: bool) -> None:
        self.ex = Executor(model, True, speculative=speculative)
        self.step = 0

    def run(self, plan_kw: dict) -> object:
        self.step += 1
        return self.ex.execute(StepPlan(step=self.step, **plan_kw))

    def generate(
        self, prompts: list[list[int]], n: int, propose, chunk_beside: bool = False
    ) -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in prompts]
        ids = list(range(1, len(prompts) + 1))
        for sid, p in zip(ids, prompts, strict=True):
            out = self.run({"admit": (Admit(sid),), "prefill": (PrefillChunk(sid, 0, tuple(p), True),)})
            outs[sid - 1].append(int(mx.argmax(out.logits[0]).item()))
        lengths = {sid: len(p) for sid, p in zip(ids, prompts, strict=True)}
        rollback: list[tuple[int, int]] = []
        late = 100  # a sequence prefilled in the same steps as the speculative decode rows
        while min(len(o) for o in outs) < n:
            drafts = tuple(tuple(propose(i, prompts[i] + outs[i])) for i in range(len(prompts)))
            kw: dict = {
                "decode_ids": tuple(ids),
                "decode_tokens": tuple(o[-1] for o in outs),
                "decode_drafts": drafts,
                "rollback": tuple(rollback),
            }
            if chunk_beside and late < 103:
                kw["admit"] = (Admit(late),)
                kw["prefill"] = (PrefillChunk(late, 0, tuple(range(20, 45)), True),)
                kw["release"] = (late - 1,) if late > 100 else ()
                late += 1
            out = self.run(kw)
            logits = out.logits[1:] if chunk_beside and "prefill" in kw else out.logits
            greedy = mx.argmax(logits, axis=-1).tolist()
            rollback, at = [], 0
            for i, sid in enumerate(ids):
                d = drafts[i]
                mine = greedy[at : at + 1 + len(d)]
                at += 1 + len(d)
                a = 0
                while a < len(d) and d[a] == mine[a]:
                    a += 1
                outs[i] += list(d[:a]) + [mine[a]]
                lengths[sid] += 1 + a
                if a < len(d):
                    rollback.append((sid, lengths[sid]))
        return [o[:n] for o in outs]


@pytest.fixture(scope="module")
def model(tiny_model: Path):  # type: ignore[no-untyped-def]
    m, _ = load_model(tiny_model, None)
    return m


def plain(model: object, n: int) -> list[list[int]]:
    return Driver(model, False).generate(PROMPTS, n, lambda i, ctx: ())


def test_ragged_batch_without_drafts_decodes_as_mlx_lm_batch(model: object) -> None:
    assert Driver(model, True).generate(PROMPTS, 12, lambda i, ctx: ()) == plain(model, 12)


def test_oracle_wrong_and_mixed_drafts_give_the_same_tokens(model: object) -> None:
    n = 16
    truth = plain(model, n + 8)

    def oracle(i: int, ctx: list[int]) -> list[int]:
        done = len(ctx) - len(PROMPTS[i])
        return truth[i][done : done + 4]

    def wrong(i: int, ctx: list[int]) -> list[int]:
        done = len(ctx) - len(PROMPTS[i])
        return [(t + 1) % 256 for t in truth[i][done : done + 3]]

    def mixed(i: int, ctx: list[int]) -> list[int]:  # row 0 all right, row 1 half right, row 2 none
        done = len(ctx) - len(PROMPTS[i])
        good = truth[i][done : done + 4]
        return [good, good[:2] + [(good[2] + 1) % 256] if len(good) > 2 else good, []][i]

    for propose in (oracle, wrong, mixed):
        d = Driver(model, True)
        assert d.generate(PROMPTS, n, propose) == truth_n(truth, n), propose.__name__
    d = Driver(model, True)
    assert d.generate(PROMPTS, n, mixed, chunk_beside=True) == truth_n(truth, n)


def truth_n(truth: list[list[int]], n: int) -> list[list[int]]:
    return [t[:n] for t in truth]


def test_kv_after_partial_acceptance_equals_plain_decoding(model: object) -> None:
    n = 10
    truth = plain(model, n + 8)

    def half(i: int, ctx: list[int]) -> list[int]:
        done = len(ctx) - len(PROMPTS[i])
        good = truth[i][done : done + 3]
        return good[:i] + [(good[i] + 1) % 256] if len(good) > i else good

    spec, ref = Driver(model, True), Driver(model, False)
    spec.generate(PROMPTS, n, half)
    ref.generate(PROMPTS, n, lambda i, ctx: ())
    for row, sid in enumerate(spec.ex.batch_ids):
        ref_row = ref.ex.batch_ids.index(sid)
        for mine, theirs in zip(spec.ex.batch, ref.ex.batch, strict=True):
            assert isinstance(mine, RaggedKVCache)
            ref_k, ref_v = theirs.keys_and_values()
            pad = int(theirs.left_padding[ref_row].item())
            # both ran at least n tokens past the prompt; the speculative run may have accepted more
            length = len(PROMPTS[sid - 1]) + n - 1
            assert mine.lengths[row] >= length and ref_k.shape[2] - pad >= length
            assert mx.allclose(
                mine.keys[row, :, :length], ref_k[ref_row, :, pad : pad + length], atol=1e-5
            ).item()
            assert mx.allclose(
                mine.values[row, :, :length], ref_v[ref_row, :, pad : pad + length], atol=1e-5
            ).item()


# -- the leader loop: scheduler, sampler and executor on one rank ------------------------------------
import threading  # noqa: E402
import time  # noqa: E402

from cluster.bus import ControlBus  # noqa: E402
from cluster.engine_client import EngineClient  # noqa: E402
from cluster.requests import Admission, GenerationRequest, RequestEvent, SamplingParams  # noqa: E402
from cluster.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from cluster.speculation import NgramProposer, SpecConfig, SpecController  # noqa: E402
from rank.engine import Leader  # noqa: E402
from rank.transport import LocalTransport  # noqa: E402


class Engine:
    """The real leader loop on one rank (no MPI), speculating with `proposer` (None: off)."""

    def __init__(
        self,
        model: object,
        proposer: object | None,
        tokens: int = 4,
        context: int = 2048,
        eos: tuple[int, ...] = (),
    ) -> None:
        self.executor = Executor(model, True, speculative=proposer is not None)
        self.client = EngineClient(max_waiting=100)
        spec = None
        if proposer is not None:
            # a free verification: every proposed draft is verified, so the tests see acceptance
            spec = SpecController(SpecConfig("ngram", tokens, base_ms=1e9, per_position_ms=1e-9), proposer)
        decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)  # noqa: E731
        self.scheduler = Scheduler(SchedulerConfig(4, 16, context, 0), decode, list(eos), spec=spec)
        self.leader = Leader(self.executor, self.scheduler, ControlBus(LocalTransport()), self.client)
        self.thread = threading.Thread(target=self.leader.run, daemon=True)
        self.thread.start()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[RequestEvent]]:
        outs: list[list[RequestEvent]] = []
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            events: list[RequestEvent] = []
            assert self.client.submit(GenerationRequest(f"r{i}", tuple(p), sp, sink=events.append)) is (
                Admission.ACCEPTED
            )
            outs.append(events)
        deadline = time.monotonic() + 120
        while not all(e and e[-1].finished for e in outs):
            assert time.monotonic() < deadline, "generation did not finish"
            time.sleep(0.01)
        return outs

    def stop(self) -> None:
        self.leader.request_stop()
        self.thread.join(timeout=10)
        assert self.executor.num_sequences == 0 or True


def tokens_of(events: list[RequestEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text_of(events: list[RequestEvent]) -> str:
    return "".join(e.text for e in events)


class Oracle:
    """Drafts the true continuation (from a run without speculation)."""

    def __init__(self, truth: dict[tuple[int, ...], list[int]], wrong: bool = False) -> None:
        self.truth, self.wrong = truth, wrong

    def propose(self, req, k: int) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
        t = self.truth[req.prompt_tokens][len(req.output) : len(req.output) + k]
        return tuple((x + 1) % 256 for x in t) if self.wrong else tuple(t)

    def forget(self, req) -> None:  # type: ignore[no-untyped-def]
        pass


def run_engine(model: object, proposer: object | None, prompts, params, **kw):  # type: ignore[no-untyped-def]
    eng = Engine(model, proposer, **kw)
    try:
        return eng.generate(prompts, params), eng
    finally:
        eng.stop()


def test_leader_greedy_identical_with_ngram_oracle_and_wrong_drafts(model: object) -> None:
    prompts = PROMPTS + [[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (30, 23, 40, 17)]
    off, _ = run_engine(model, None, prompts, params)
    truth = {tuple(p): tokens_of(e) + [0] * 16 for p, e in zip(prompts, off, strict=True)}
    for proposer in (NgramProposer(4, 1), Oracle(truth), Oracle(truth, wrong=True)):
        on, eng = run_engine(model, proposer, prompts, params)
        assert [tokens_of(e) for e in on] == [tokens_of(e) for e in off], type(proposer).__name__
        assert [text_of(e) for e in on] == [text_of(e) for e in off]
        assert [(e[-1].finish_reason, e[-1].completion_tokens) for e in on] == [
            (e[-1].finish_reason, e[-1].completion_tokens) for e in off
        ]
        stats = eng.leader.stats
        if isinstance(proposer, Oracle) and not proposer.wrong:
            assert stats.spec_drafted > 0 and stats.spec_accepted == stats.spec_drafted
        if isinstance(proposer, Oracle) and proposer.wrong:
            assert stats.spec_drafted > 0 and stats.spec_accepted == 0
        assert eng.executor.num_sequences == 0


def test_seeded_sampling_and_penalties_do_not_depend_on_speculation(model: object) -> None:
    prompts = PROMPTS
    params = [
        SamplingParams(temperature=0.9, seed=7, max_tokens=25),
        SamplingParams(temperature=0.7, top_k=20, seed=11, max_tokens=25, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=25, repetition_penalty=1.3, min_tokens=20, logprobs=2),
    ]
    off, _ = run_engine(model, None, prompts, params)
    truth = {tuple(p): tokens_of(e) + [0] * 16 for p, e in zip(prompts, off, strict=True)}
    on, eng = run_engine(model, Oracle(truth), prompts, params)
    assert [tokens_of(e) for e in on] == [tokens_of(e) for e in off]
    assert eng.leader.stats.spec_accepted > 0
    lp_on = [(lp.token_id, round(lp.logprob, 4)) for e in on[2] for lp in e.logprobs]
    lp_off = [(lp.token_id, round(lp.logprob, 4)) for e in off[2] for lp in e.logprobs]
    assert lp_on == lp_off and len(lp_on) == 25


def test_stop_string_eos_max_tokens_and_context_inside_an_accepted_run(model: object) -> None:
    prompt = PROMPTS[2]
    off, _ = run_engine(model, None, [prompt], [SamplingParams(temperature=0.0, max_tokens=40)])
    toks = tokens_of(off[0])
    truth = {tuple(prompt): toks + [0] * 16}
    text = text_of(off[0])
    stop = text[9:12]  # ends inside the 4th-ish step's run of drafts
    cases = [
        SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,)),
        SamplingParams(temperature=0.0, max_tokens=13),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=(toks[10],)),
    ]
    for sp in cases:
        ref, _ = run_engine(model, None, [prompt], [sp])
        on, _ = run_engine(model, Oracle(truth), [prompt], [sp])
        assert tokens_of(on[0]) == tokens_of(ref[0]) and text_of(on[0]) == text_of(ref[0])
        assert on[0][-1].finish_reason == ref[0][-1].finish_reason
        assert on[0][-1].completion_tokens == ref[0][-1].completion_tokens
    # EOS inside a run: a token whose first occurrence is well into the output
    at = next(i for i in range(5, len(toks)) if toks.index(toks[i]) == i)
    eos = (toks[at],)
    ref, _ = run_engine(model, None, [prompt], [cases[0]], eos=eos)
    on, eng = run_engine(model, Oracle(truth), [prompt], [cases[0]], eos=eos)
    assert tokens_of(on[0]) == tokens_of(ref[0]) == toks[: at + 1]
    assert on[0][-1].finish_reason == ref[0][-1].finish_reason == "stop"
    assert on[0][-1].completion_tokens == at + 1 and eng.leader.stats.spec_accepted > 0
    ctx = len(prompt) + 15  # the context limit falls inside a run
    ref, _ = run_engine(model, None, [prompt], [SamplingParams(temperature=0.0, max_tokens=40)], context=ctx)
    on, _ = run_engine(
        model, Oracle(truth), [prompt], [SamplingParams(temperature=0.0, max_tokens=40)], context=ctx
    )
    assert tokens_of(on[0]) == tokens_of(ref[0]) and len(tokens_of(on[0])) == 15
    assert on[0][-1].finish_reason == ref[0][-1].finish_reason


def test_opted_out_and_constrained_requests_never_draft(model: object) -> None:
    prompts = PROMPTS[:2]
    sp = SamplingParams(temperature=0.0, max_tokens=20)
    eng = Engine(model, Oracle({tuple(p): list(range(64)) for p in prompts}))
    try:
        events: list[RequestEvent] = []
        req = GenerationRequest("x", tuple(prompts[0]), sp, sink=events.append, speculative=False)
        assert eng.client.submit(req) is Admission.ACCEPTED
        while not (events and events[-1].finished):
            time.sleep(0.01)
        assert eng.leader.stats.spec_drafted == 0
    finally:
        eng.stop()


# -- a real 2-rank job ---------------------------------------------------------------------------------
import concurrent.futures as cf  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402

from tests.jobs import tiny_args  # noqa: E402

# repetitive prompts (n-gram lookup drafts a lot) and a long one arriving later (a prompt chunk in the same
# steps as verifying rows)
SERVED_PROMPTS = [
    "1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
    "abc abc abc abc abc",
    "The cat sat on the mat. The cat sat on the",
    "def f(x): return x\ndef g(x): return x\ndef h(x):",
    "z" * 300,
]


def served_greedy(url: str, prompt: str, n: int) -> list[int]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.completions.create(
        model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.tokens is not None
    return [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]


def metric(url: str, name: str, token: str = "spec-admin") -> float:
    """A value from /metrics (`token`: the job's admin or metrics token)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.cluster
def test_tp2_job_with_speculation_equals_speculation_off(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Four rows verify drafts while a long prompt arrives and prefills in short chunks beside them."""
    spec = ("--spec", "ngram", "--max-batch", "8", "--prefill-chunk", "32", "--admin-token", "spec-admin")
    on = job_factory.start(2, tiny_args(tiny_model, *spec), "spec-tp2")
    off = job_factory.start(
        1, tiny_args(tiny_model, "--spec", "off", "--prefill-chunk", "32"), "spec-off-tp1"
    )

    def together(url: str) -> list[list[int]]:
        with cf.ThreadPoolExecutor(len(SERVED_PROMPTS)) as pool:
            early = [pool.submit(served_greedy, url, p, 40) for p in SERVED_PROMPTS[:-1]]
            time.sleep(0.3)  # the others decode by now: the long prompt's chunks share their steps
            late = pool.submit(served_greedy, url, SERVED_PROMPTS[-1], 40)
            return [f.result() for f in early] + [late.result()]

    assert together(on.url) == together(off.url)
    drafted = metric(on.url, "orchard_spec_drafted_tokens_total")
    accepted = metric(on.url, "orchard_spec_accepted_tokens_total")
    assert drafted > 0 and accepted > 0
    on.stop()
    off.stop()


# -- the controller and prompt lookup ------------------------------------------------------------------
from cluster.requests import Request  # noqa: E402
from cluster.speculation import REST_STEPS, SpecState  # noqa: E402
from cluster.textstream import IncrementalDetokenizer, StopMatcher  # noqa: E402


def request(prompt: list[int], output: list[int], alpha: float = 0.5) -> Request:
    r = Request(
        "r", 1, tuple(prompt), SamplingParams(), lambda e: None, "", IncrementalDetokenizer(lambda ids: ""),
        StopMatcher(()), 0.0, output=list(output),
    )  # fmt: skip
    r.spec = SpecState(alpha=alpha)
    return r


def test_prompt_lookup_takes_the_longest_latest_match_and_grows_with_the_output() -> None:
    p = NgramProposer(max_n=3, min_n=1)
    r = request([1, 2, 3, 4, 9, 2, 3, 5, 6, 7], [1, 2, 3])
    assert p.propose(r, 3) == (4, 9, 2)  # "2 3" (later, then 5) loses to "1 2 3" (at the start, then 4)
    r.output += [4]
    assert p.propose(r, 2) == (9, 2)  # "2 3 4", after which the prompt went on with 9
    r.output += [8]
    assert p.propose(r, 4) == ()  # "8" occurs only as the last token: nothing earlier to copy
    r.output += [8]
    assert p.propose(r, 4) == (8,)  # "8" occurred before, followed by the last 8
    assert NgramProposer(3, 2).propose(request([1, 5, 1], [7]), 4) == ()


def test_controller_widens_for_good_rows_and_stays_narrow_for_big_batches_and_misses() -> None:
    class Fixed:
        def propose(self, req, k):  # type: ignore[no-untyped-def]
            return (1, 2, 3, 4, 5, 6)[:k]

        def forget(self, req) -> None:  # type: ignore[no-untyped-def]
            pass

    ctl = SpecController(SpecConfig("ngram", 4, base_ms=40, per_position_ms=5), Fixed())
    good = request([1], [2], alpha=0.9)
    assert ctl.drafts([good], [10], 0) == ((1, 2, 3, 4),)
    assert ctl.drafts([good], [2], 0) == ((1, 2),)  # max_tokens / context room
    poor = [request([1], [2], alpha=0.2) for _ in range(8)]
    assert ctl.drafts(poor, [10] * 8, 0) == ()  # nothing pays: a plain decode step
    busy = [request([1], [2], alpha=0.6) for _ in range(16)]
    assert ctl.drafts(busy, [10] * 16, 0) == ()
    # a row that keeps missing stops drafting, and is tried again some steps later
    miss = request([1], [2], alpha=0.9)
    tried = []
    for _ in range(200):
        d = ctl.drafts([miss], [10], 0)
        tried.append(bool(d))
        if d:
            ctl.accepted(miss, len(d[0]), 0)
    assert miss.spec is not None and miss.spec.drafted < 60
    first_stop = tried.index(False)
    assert any(tried[first_stop + 8 :]), "never probed again"
    assert sum(tried) < 60
    # a resting row (estimate under REST_BELOW) is not even proposed for between probes
    rest = request([1], [2], alpha=0.01)
    rest.spec.steps = 0  # type: ignore[union-attr]
    calls = []
    ctl.proposer.propose = lambda req, k: calls.append(1) or ()  # type: ignore[method-assign]
    ctl.drafts([good, rest], [10, 10], 0)
    assert calls == [1]  # the good row only
    rest.spec.steps = REST_STEPS  # type: ignore[union-attr]
    ctl.drafts([good, rest], [10, 10], 0)
    assert calls == [1, 1, 1]


def test_controller_fits_the_step_cost_from_timings() -> None:
    ctl = SpecController(SpecConfig("ngram", 4), NgramProposer())
    for positions in [1, 2, 4, 8, 16, 32] * 4:
        ctl.timed(positions, 50 + 2 * positions)
    assert abs(ctl._base - 50) < 1e-6 and abs(ctl._per - 2) < 1e-6
