"""Sampled picks (`StepPlan.draws`): under a vocabulary-parallel head a row that samples at a temperature
alone costs the gather what a greedy row costs. Each rank adds its slice of the Gumbel noise of the row's
key (the key `Sampler.sample` would draw) to its logits / temperature and sends rank 0 the best entry; the
best of those is the token sampling the whole row gives, because `mx.random.categorical` is the argmax of
the scores plus that noise.

Real parts: the sampler, the scheduler and MLX; the ranks' slices are cut here from whole rows
(tests/test_cluster.py runs the gather across two ranks over HTTP)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cluster.requests import GenerationRequest, Request, SamplingParams
from cluster.scheduler import SampledToken, Scheduler, SchedulerConfig
from rank.sampler import Sampler, finite_logits, gumbel_scores


def picks_from_slices(logits: mx.array, ranks: int, draws: tuple[tuple[float, int, int], ...]) -> list[int]:
    """What rank 0 takes under an argmax plan with draws: each rank's best score and its id per row (as the
    executor's `_vocab_argmax` sends them), the first rank's on a tie."""
    vocab = logits.shape[1]
    bounds = [vocab * i // ranks for i in range(ranks + 1)]
    best = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        scores = gumbel_scores(finite_logits(logits[:, lo:hi].astype(mx.float32)), draws, lo, vocab)
        best.append(mx.stack([scores.max(axis=-1), (mx.argmax(scores, axis=-1) + lo).astype(mx.float32)], -1))
    every = mx.stack(best)  # ranks x rows x (score, id)
    winner = mx.argmax(every[:, :, 0], axis=0)
    return mx.take_along_axis(every[:, :, 1], winner[None], axis=0)[0].astype(mx.int32).tolist()


def requests(cases: list[SamplingParams], prefix: str) -> list[Request]:
    return [
        Request.from_submission(GenerationRequest(f"{prefix}{i}", (1,), p, print), i, str) for i, p in enumerate(cases)
    ]


@pytest.mark.parametrize("ranks", [2, 3])
def test_sampled_picks_equal_sampling_the_whole_row(ranks: int) -> None:
    """Seeded and unseeded rows at several temperatures, a greedy row and one below the greedy threshold
    beside them, rows full of ties (a coarse grid, as a bf16 model's logits often are) and clamped
    extremes: the same tokens as `Sampler.sample` on the whole rows, draw after draw."""
    rng = np.random.default_rng(1)
    vocab = 1001
    cases = [
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.0),  # no seed: the sampler's own key stream, in row order
        SamplingParams(temperature=1.6, seed=3),
        SamplingParams(temperature=0.0, seed=4),  # greedy: its argmax
        SamplingParams(temperature=1e-6),  # under GREEDY_BELOW: greedy too, and it draws no key
        SamplingParams(temperature=0.05, seed=6),  # sharp: nearly greedy, ties decided by the noise
    ]
    whole, part = requests(cases, "w"), requests(cases, "p")
    whole_sampler, part_sampler = Sampler(default_seed=9), Sampler(default_seed=9)
    differs = 0
    for trial in range(30):
        grid = (0.0, 0.125, 2.0)[trial % 3]  # 0: continuous values; else many ties
        raw = rng.normal(0, 3, (len(cases), vocab))
        rows = mx.array(np.round(raw / grid) * grid if grid else raw, dtype=mx.float32)
        if trial == 5:
            rows = rows.at[0, 17].add(mx.inf).at[2, 3].add(mx.nan)  # clamped to the limit and the floor
        a = [t.token_id for t in whole_sampler.sample(whole, rows)]
        b = picks_from_slices(rows, ranks, part_sampler.draws(part))
        assert a == b, (trial, a, b)
        differs += a[1] != int(mx.argmax(rows[1]).item())
    assert differs > 10  # the sampling rows really sampled (not their argmax every time)


def test_the_scheduler_draws_keys_only_for_rows_that_sample_at_a_temperature_alone() -> None:
    """Plans are argmax plans with draws when every row is greedy or samples at a temperature alone and the
    ranks gather picks; a top-p, top-k or min-p cut, logprobs, a bias or penalty turns the step back to
    its other gathers; without a draws hook (one rank, or a head that does not split the vocabulary)
    sampling rows never make argmax plans; greedy-only steps carry no draws."""

    def plans_with(*params: SamplingParams, hooked: bool = True) -> list[tuple[bool, int]]:
        s = Scheduler(SchedulerConfig(4, 100, 1000, 0), lambda ids: "", [])
        if hooked:
            s.draws = Sampler().draws
        for i, p in enumerate(params):
            s.add(GenerationRequest(f"r{i}", (1, 2, 3), p, sink=lambda e: None))
        out = []
        while s.has_work():
            step = s.schedule()
            if not step.rows:  # prompt chunks short of their end, releases
                s.update(step, [])
                continue
            assert not step.plan.draws or len(step.plan.draws) == len(step.rows)
            out.append((step.plan.argmax, len(step.plan.draws)))
            s.update(step, [SampledToken(1)] * len(step.rows))
        return out

    hot = SamplingParams(temperature=0.8, max_tokens=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    assert set(plans_with(hot, greedy)) == {(True, 2)}
    assert set(plans_with(greedy, greedy)) == {(True, 0)}
    assert set(plans_with(hot, greedy, hooked=False)) == {(False, 0)}
    for cut in (
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=3),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=3),
        SamplingParams(temperature=0.8, min_p=0.1, max_tokens=3),
        SamplingParams(temperature=0.8, logprobs=0, max_tokens=3),
        SamplingParams(temperature=0.8, logit_bias=((5, 1.0),), max_tokens=3),
        SamplingParams(temperature=0.8, presence_penalty=0.5, max_tokens=3),
    ):
        assert set(plans_with(hot, cut)) == {(False, 0)}, cut
    # min_tokens bans EOS until it is out: those steps gather slices, the later ones picks
    assert plans_with(SamplingParams(temperature=0.8, max_tokens=4, min_tokens=2)) == [
        (False, 0), (False, 0), (True, 1), (True, 1)
    ]  # fmt: skip


def test_keys_are_the_ones_sampling_would_draw() -> None:
    """A seeded request's stream of keys is the same whether its steps draw them in plans (sampled picks)
    or the sampler draws them itself: mixing the two paths leaves its tokens those of either alone."""
    p = SamplingParams(temperature=0.9, seed=11)
    rng = np.random.default_rng(2)
    rows = [mx.array(rng.normal(0, 2, (1, 300)), dtype=mx.float32) for _ in range(8)]
    sampled = requests([p], "a")
    mixed = requests([p], "b")
    s1, s2 = Sampler(), Sampler()
    a = [s1.sample(sampled, r)[0].token_id for r in rows]
    b = [
        picks_from_slices(r, 2, s2.draws(mixed))[0] if i % 2 else s2.sample(mixed, r)[0].token_id
        for i, r in enumerate(rows)
    ]
    assert a == b


def test_batched_greedy_rows_pick_what_each_row_alone_picks() -> None:
    """`Sampler.sample` takes the argmax of every greedy row that reads nothing but its logits (a logit
    bias at most) in one batched pass; each must be the token the row-by-row path gives: biases that push
    past the clamp, NaN and infinite logits, rows beside sampling, logprobs and min_tokens rows."""
    rng = np.random.default_rng(3)
    vocab = 500
    cases = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias=((7, 100.0), (8, -100.0))),
        SamplingParams(temperature=0.0, logit_bias=((9, 3.0e38),)),  # past the clamp: ties at the limit
        SamplingParams(temperature=0.9, seed=2),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.0, min_tokens=5, logit_bias=((2, 50.0),)),  # EOS banned meanwhile
        SamplingParams(temperature=1e-7, logit_bias=((4, 1.0),)),  # under GREEDY_BELOW
    ]
    for trial in range(20):
        raw = rng.normal(0, 3, (len(cases), vocab))
        raw[trial % len(cases), rng.integers(vocab, size=5)] = [np.nan, np.inf, -np.inf, 1e30, np.nan]
        logits = mx.array(raw, dtype=mx.float32)
        batch, alone = requests(cases, "b"), requests(cases, "a")
        got = [t.token_id for t in Sampler(eos_token_ids=frozenset({2})).sample(batch, logits)]
        ref = Sampler(eos_token_ids=frozenset({2}))
        want = [
            ref._sample_row(finite_logits(logits)[i], req, None, ref._banned(req) if ref._bans(req) else None).token_id
            for i, req in enumerate(alone)
        ]
        assert got == want, (trial, got, want)
