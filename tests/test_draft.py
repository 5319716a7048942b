"""The draft-model proposer (rank/draft.py): its drafts are the draft model's own greedy continuation,
whatever the cache held before (the rewind is exact), with a bounded number of per-request caches.

Real tiny models from tests/families.py (their weights scaled, so greedy text is not one repeated token):
the 2-layer llama as the served model, its first layer as a layer-skip draft (`write_layer_skip_draft`,
what benchmarks/make_draft.py writes for SmolLM2), and a differently seeded llama with the same vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_load

from cluster.errors import ModelError
from cluster.requests import GenerationRequest, Request, SamplingParams
from rank import cpu_kernels, mlx_patch
from rank.draft import DraftProposer, load_draft
from rank.layer_skip import write_layer_skip_draft
from rank.models import load_model
from tests import families


def greedy(model: Any, context: list[int], n: int) -> list[int]:
    """Plain one-sequence greedy generation from a fresh cache: what every draft must equal."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(context)[None], cache=cache)[:, -1]
    out: list[int] = []
    for _ in range(n):
        token: int = mx.argmax(logits, axis=-1).item()  # type: ignore[assignment]
        out.append(token)
        logits = model(mx.array([[out[-1]]]), cache=cache)[:, -1]
    return out


def request(rid: str, prompt: list[int], output: list[int] | None = None) -> Request:
    sub = GenerationRequest(rid, tuple(prompt), SamplingParams(temperature=0.0), sink=lambda e: None)
    req = Request.from_submission(sub, 0, lambda ids: "")
    req.output.extend(output or [])
    return req


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return families.build("llama", tmp_path_factory.mktemp("models") / "target", seed=0)


@pytest.fixture(scope="module")
def skip_draft(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layer_skip_draft(target_dir, tmp_path_factory.mktemp("drafts") / "skip1", 1)


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return families.build("llama", tmp_path_factory.mktemp("drafts") / "llama", seed=3)


@pytest.fixture(scope="module", params=["skip", "other"])
def draft_dir(request: pytest.FixtureRequest, skip_draft: Path, other_draft: Path) -> Path:
    return skip_draft if request.param == "skip" else other_draft


PROMPT = [1, 72, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101, 33, 2, 1, 98]


def test_drafts_are_the_draft_models_greedy_continuation(draft_dir: Path) -> None:
    proposer = load_draft(draft_dir, families.VOCAB, max_sequences=4)
    model = proposer.model
    for k in (1, 4, 7):
        req = request(f"r{k}", PROMPT, [65])
        assert proposer.propose(req, k) == tuple(greedy(model, [*PROMPT, 65], k))
    assert proposer.propose(request("zero", PROMPT, [65]), 0) == ()


def test_rewind_after_partial_acceptance_is_exact(draft_dir: Path) -> None:
    """Each step: keep some drafts and replace the rest by another token, as a verification step does;
    the next proposal must equal a fresh proposer's, which never saw the rejected tail."""
    proposer = load_draft(draft_dir, families.VOCAB, max_sequences=4)
    req = request("r", PROMPT, [80])
    for step, accept in enumerate((0, 2, 4, 1, 3, 0, 4)):
        drafts = proposer.propose(req, 4)
        fresh = DraftProposer(proposer.model, proposer.max_context, 1)
        assert drafts == fresh.propose(request("fresh", list(req.prompt_tokens), list(req.output)), 4)
        assert proposer.cached_tokens("r") == len(req.prompt_tokens) + len(req.output) + 3
        bonus = (drafts[accept] + 1 + step) % families.VOCAB if accept < 4 else 70 + step
        req.output.extend([*drafts[:accept], bonus])  # the accepted run, then a token that differs


@pytest.mark.parametrize("kernels", ["mlx", "cpu-kernels"])
def test_rows_drafted_together_equal_rows_drafted_alone(draft_dir: Path, kernels: str) -> None:
    """propose_rows (one batch of greedy steps over merged caches) gives each row what propose gives it,
    round after round of partial acceptance, with rows of different k and lengths, one row too close to
    the context limit to take the batch's width (drafted alone) and one asked for no drafts."""
    proposer = load_draft(draft_dir, families.VOCAB, max_sequences=8)
    # The served model's CPU kernels replace mlx-lm's attention module-wide (rank/mlx_patch.py), so a
    # draft model of its family runs them too: the batch's masks must work both ways.
    if kernels == "cpu-kernels":
        assert cpu_kernels.install(proposer.model, "on")
    try:
        check_rows_against_alone(proposer)
    finally:
        mlx_patch.restore(proposer.model)


def check_rows_against_alone(proposer: DraftProposer) -> None:
    prompts = [PROMPT, PROMPT[:3], [1, 50], list(range(60, 100)), [7, 8, 9]]
    reqs = [request(f"r{i}", p, [65 + i]) for i, p in enumerate(prompts)]
    for step, accept in enumerate((0, 4, 1, 2, 3)):
        ks = [4, 2, 3, 4, 0]
        together = proposer.propose_rows(reqs, ks)
        for req, k, drafts in zip(reqs, ks, together, strict=True):
            fresh = DraftProposer(proposer.model, proposer.max_context, 1)
            assert drafts == fresh.propose(request("f", list(req.prompt_tokens), list(req.output)), k)
        for req, drafts in zip(reqs, together, strict=True):
            a = min(accept, len(drafts))
            bonus = (drafts[a] + 1 + step) % families.VOCAB if a < len(drafts) else 70 + step
            req.output.extend([*drafts[:a], bonus])
    limited = DraftProposer(proposer.model, len(prompts[3]) + 3, 4)
    rows = [request("a", PROMPT, [65]), request("b", prompts[3], [66]), request("c", [1, 50], [67])]
    got = limited.propose_rows(rows, [4, 4, 4])
    assert got[1] == tuple(greedy(limited.model, [*prompts[3], 66], 2))  # the limit allows 2: alone
    assert got[0] == tuple(greedy(limited.model, [*PROMPT, 65], 4))
    assert got[2] == tuple(greedy(limited.model, [1, 50, 67], 4))


def test_context_outside_the_cache_rewinds_to_the_common_prefix(draft_dir: Path) -> None:
    """A request whose context changed behind the cached tokens (not something the engine does) still
    drafts exactly: only the common prefix is kept."""
    proposer = load_draft(draft_dir, families.VOCAB, max_sequences=2)
    model = proposer.model
    proposer.propose(request("r", PROMPT, [65, 66, 67]), 4)
    changed = [*PROMPT[:5], 99, 98]
    assert proposer.propose(request("r", changed, [65]), 3) == tuple(greedy(model, [*changed, 65], 3))
    short = PROMPT[:3]
    assert proposer.propose(request("r", short), 2) == tuple(greedy(model, short, 2))


def test_long_prompt_is_fed_in_chunks(other_draft: Path) -> None:
    model, config = load_model(other_draft, None)
    proposer = DraftProposer(model, 2048, 2, prefill_chunk=5)
    prompt = [(7 * i) % 250 + 3 for i in range(37)]
    assert proposer.propose(request("r", prompt, [9]), 4) == tuple(greedy(model, [*prompt, 9], 4))
    assert proposer.prefilled_tokens == len(prompt)  # the prompt and output[-1] but the last, once


def test_a_long_prompt_catches_up_over_several_calls(other_draft: Path) -> None:
    """At most `catch_up` context tokens are fed per call (shared by a call's rows): until a row is caught
    up it gets no drafts, so a new long prompt never stalls a step on the draft model."""
    model, _ = load_model(other_draft, None)
    proposer = DraftProposer(model, 2048, 4, prefill_chunk=4, catch_up=10)
    long = request("long", [(5 * i) % 250 + 3 for i in range(24)], [9])  # 24 tokens to feed
    assert [proposer.propose(long, 3) for _ in range(2)] == [(), ()]
    assert proposer.cached_tokens("long") == 20
    assert proposer.propose(long, 3) == tuple(greedy(model, [*long.prompt_tokens, 9], 3))
    a, b, c = request("a", PROMPT, [65]), request("b", PROMPT[:6], [66]), request("c", [1, 2, 3], [67])
    got = proposer.propose_rows([a, b, c], [3, 3, 3])  # 16 + 6 + 3 tokens to feed, 10 per call
    assert got[0] == () and got[1] == () and got[2] == ()  # a took 10, b and c wait (the budget is spent)
    got = proposer.propose_rows([a, b, c], [3, 3, 3])  # a finishes (6), b gets 4 of its 6
    assert got[0] == tuple(greedy(model, [*PROMPT, 65], 3)) and got[1] == () and got[2] == ()
    got = proposer.propose_rows([a, b, c], [3, 3, 3])
    assert got == [tuple(greedy(model, [*r.prompt_tokens, *r.output], 3)) for r in (a, b, c)]


def test_a_new_request_starts_from_a_shared_prefix(other_draft: Path) -> None:
    """n > 1 choices and chats with one system prompt share a prompt prefix: a new request copies the
    longest one another request's cache holds, feeds only the rest, and both stay exact afterwards."""
    model, _ = load_model(other_draft, None)
    proposer = DraftProposer(model, 2048, 4)
    system = [(11 * i) % 250 + 3 for i in range(30)]
    first = request("first", [*system, 40, 41], [9])
    assert proposer.propose(first, 3) == tuple(greedy(model, [*first.prompt_tokens, 9], 3))
    fed = proposer.prefilled_tokens
    second = request("second", [*system, 50, 51, 52], [8])
    assert proposer.propose(second, 3) == tuple(greedy(model, [*second.prompt_tokens, 8], 3))
    assert proposer.shared_tokens == 30 and proposer.prefilled_tokens - fed == 3
    first.output.extend([7, 6])  # the copy is independent: the first request's cache is unchanged
    assert proposer.propose(first, 3) == tuple(greedy(model, [*first.prompt_tokens, 9, 7, 6], 3))
    assert proposer.propose(request("short", system[:10], [5]), 2) == tuple(
        greedy(model, [*system[:10], 5], 2)
    )
    assert proposer.shared_tokens == 30  # under MIN_SHARED tokens in common: no copy


def test_context_limit_bounds_the_drafts(other_draft: Path) -> None:
    model, _ = load_model(other_draft, None)
    proposer = DraftProposer(model, max_context=len(PROMPT) + 3, max_sequences=2)
    assert len(proposer.propose(request("r", PROMPT, [65]), 8)) == 2
    assert proposer.propose(request("full", PROMPT, [65, 66, 67]), 4) == ()


def test_forget_frees_and_lru_bound_holds(other_draft: Path) -> None:
    proposer = load_draft(other_draft, families.VOCAB, max_sequences=2)
    a, b, c = request("a", PROMPT, [65]), request("b", PROMPT[:9], [66]), request("c", PROMPT[:5], [67])
    proposer.propose(a, 2)
    proposer.propose(b, 2)
    assert proposer.sequences == 2
    proposer.propose(a, 2)  # a is now the most recently used
    proposer.propose(c, 2)  # so b is dropped
    assert proposer.sequences == 2 and proposer.evictions == 1
    assert proposer.cached_tokens("b") == 0 and proposer.cached_tokens("a") > 0
    expected = tuple(greedy(proposer.model, [*PROMPT[:9], 66], 3))
    assert proposer.propose(b, 3) == expected  # a dropped request just starts over
    proposer.forget(a)
    proposer.forget(b)
    proposer.forget(request("never-seen", PROMPT))
    assert proposer.sequences == 1 and proposer.cached_tokens("c") > 0
    proposer.forget(c)
    assert proposer.sequences == 0


def test_vocabulary_mismatch_is_refused(other_draft: Path) -> None:
    with pytest.raises(
        ModelError, match=r"the draft model's vocabulary \(259\) differs from the served model's"
    ):
        load_draft(other_draft, 49152, max_sequences=2)


def test_sliding_window_draft_is_refused(tmp_path: Path) -> None:
    """A rotating cache trims only until its window first wraps: such a draft is refused at load."""
    folder = families.build("llama_sliding", tmp_path / "sliding")
    with pytest.raises(ModelError, match=r"caches \(RotatingKVCache\) cannot be rewound"):
        load_draft(folder, families.VOCAB, max_sequences=2)


def test_layer_skip_draft_is_a_plain_mlx_lm_folder(
    target_dir: Path, skip_draft: Path, tmp_path: Path
) -> None:
    """What benchmarks/make_draft.py writes: mlx_lm.load reads it; its layers are the served model's."""
    model, tokenizer = mlx_load(str(skip_draft))[:2]
    assert len(model.layers) == 1
    assert tokenizer.encode("hi there") == mlx_load(str(target_dir))[1].encode("hi there")
    config = json.loads((skip_draft / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == families.VOCAB
    target, _ = load_model(target_dir, None)
    assert mx.array_equal(model.layers[0].self_attn.q_proj.weight, target.layers[0].self_attn.q_proj.weight)
    assert mx.array_equal(model.model.embed_tokens.weight, target.model.embed_tokens.weight)
    last = write_layer_skip_draft(target_dir, tmp_path / "last", 1, keep_last=1)
    model = mlx_load(str(last))[0]
    assert mx.array_equal(model.layers[0].mlp.up_proj.weight, target.layers[1].mlp.up_proj.weight)
    with pytest.raises(ModelError, match="keeps 1 to 1"):
        write_layer_skip_draft(target_dir, tmp_path / "all", 2)


# The leader loop on one rank (no MPI) speculating with a draft model: greedy output is exactly what
# decoding without speculation gives, and what mlx-lm's own speculative loop gives with the same draft.

import threading  # noqa: E402
import time  # noqa: E402

from mlx_lm.generate import speculative_generate_step  # noqa: E402

from cluster.bus import ControlBus  # noqa: E402
from cluster.engine_client import EngineClient  # noqa: E402
from cluster.requests import Admission, RequestEvent  # noqa: E402
from cluster.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from cluster.speculation import SpecConfig, SpecController  # noqa: E402
from rank.engine import Leader  # noqa: E402
from rank.executor import Executor  # noqa: E402
from rank.transport import LocalTransport  # noqa: E402

E2E_PROMPTS = [PROMPT, [1, 88, 89, 90, 91, 88, 89, 90], list(range(40, 77)), [1, 50]]


def serve(model: object, proposer: DraftProposer | None, prompts: list[list[int]], max_tokens: int):  # type: ignore[no-untyped-def]
    """Greedy output of each prompt through the real Leader, Scheduler and Executor, and the stats."""
    spec = None
    if proposer is not None:  # verification priced as free: every proposed draft is verified
        spec = SpecController(SpecConfig("draft", 4, base_ms=1e9, per_position_ms=1e-9), proposer)
    executor = Executor(model, True, speculative=proposer is not None)
    client = EngineClient(max_waiting=100)
    scheduler = Scheduler(SchedulerConfig(4, 16, 2048, 0), lambda ids: "", [], spec=spec)
    leader = Leader(executor, scheduler, ControlBus(LocalTransport()), client)
    thread = threading.Thread(target=leader.run, daemon=True)
    thread.start()
    try:
        streams: list[list[RequestEvent]] = []
        for i, p in enumerate(prompts):
            events: list[RequestEvent] = []
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            assert client.submit(GenerationRequest(f"r{i}", tuple(p), params, sink=events.append)) is (
                Admission.ACCEPTED
            )
            streams.append(events)
        deadline = time.monotonic() + 120
        while not all(s and s[-1].finished for s in streams):
            assert time.monotonic() < deadline, "generation did not finish"
            time.sleep(0.01)
    finally:
        leader.request_stop()
        thread.join(timeout=10)
    assert executor.num_sequences == 0
    return [[t for e in s for t in e.token_ids] for s in streams], leader.stats


def mlx_lm_speculative(model: object, draft: object, prompt: list[int], n: int) -> list[int]:
    """mlx-lm's own speculative loop (what mlx_lm.generate runs with draft_model) at temperature 0. Its
    acceptance counts differ from ours by design: it drafts the first token too, and never rests a row."""
    steps = speculative_generate_step(mx.array(prompt), model, draft, num_draft_tokens=4, max_tokens=n)  # type: ignore[arg-type]
    return [int(t) for t, _, _ in steps]


@pytest.mark.parametrize("which", ["oracle", "skip", "other"])
def test_leader_with_draft_model_equals_off_and_mlx_lm(
    which: str, target_dir: Path, skip_draft: Path, other_draft: Path
) -> None:
    """Four concurrent rows; the draft is the served model itself (every draft accepted), its first layer
    (some) or an unrelated model (almost none). Two draft caches for four rows: evictions on the way."""
    n = 24
    model, _ = load_model(target_dir, None)
    off, _ = serve(model, None, E2E_PROMPTS, n)
    assert off == [greedy(model, p, n) for p in E2E_PROMPTS]
    draft_dir = {"oracle": target_dir, "skip": skip_draft, "other": other_draft}[which]
    proposer = load_draft(draft_dir, families.VOCAB, max_sequences=2)
    on, stats = serve(model, proposer, E2E_PROMPTS, n)
    assert on == off
    assert proposer.sequences == 0  # every request forgot its cache
    assert stats.spec_drafted > 0
    if which == "oracle":
        assert stats.spec_accepted == stats.spec_drafted
    assert [mlx_lm_speculative(model, proposer.model, p, n) for p in E2E_PROMPTS] == off


# -- a real 2-rank job: the draft model on rank 0 only, the followers never load it ----------------------
import concurrent.futures as cf  # noqa: E402

from tests.jobs import tiny_args  # noqa: E402
from tests.test_speculation import metric, served_greedy  # noqa: E402

SERVED_PROMPTS = ["Hello there, how are", "abc abc abc abc", "The cat sat on the mat. The", "z" * 200]


METRICS_TOKEN = "draft-metrics"


@pytest.mark.cluster
def test_tp2_job_with_draft_model_equals_speculation_off(  # type: ignore[no-untyped-def]
    job_factory, tiny_model: Path, tmp_path: Path
) -> None:
    draft = write_layer_skip_draft(tiny_model, tmp_path / "draft", 2)
    on = job_factory.start(
        2,
        tiny_args(
            tiny_model, "--draft-model", str(draft), "--max-batch", "4", "--metrics-token", METRICS_TOKEN
        ),
        "draft-tp2",
    )
    off = job_factory.start(1, tiny_args(tiny_model, "--spec", "off"), "draft-off-tp1")

    def together(url: str) -> list[list[int]]:
        # 64 tokens, not 32: whether a step drafts is the cost model's call on measured step times, and
        # on a loaded machine 32 tokens once gave it too few drafting steps to accept anything (CI)
        with cf.ThreadPoolExecutor(len(SERVED_PROMPTS)) as pool:
            return list(pool.map(lambda p: served_greedy(url, p, 64), SERVED_PROMPTS))

    assert together(on.url) == together(off.url)
    assert metric(on.url, "orchard_spec_drafted_tokens_total", METRICS_TOKEN) > 0
    assert metric(on.url, "orchard_spec_accepted_tokens_total", METRICS_TOKEN) > 0
    loaded = [line for line in on.log().splitlines() if "orchard: draft model" in line]
    assert len(loaded) == 1 and " rank0 " in loaded[0]  # rank 0 only: followers never load it
    on.stop()
    off.stop()
