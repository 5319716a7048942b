"""The top-k gather (`StepPlan.topk`): under a vocabulary-parallel head each rank sends rank 0 its slice's
k best entries per row, rank 0 samples from rows of -inf holding them. It must give the token sampling
the whole row gives, for the same key, whatever the ties: rank/sampler.py `top_k_mask` keeps exactly k,
ties at the k-th value to the lower ids, on every rank alike.

Real parts: the sampler and MLX; the ranks' slices are cut here from whole rows (tests/test_cluster.py
runs the gather across two ranks over HTTP)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cluster.requests import GenerationRequest, Request, SamplingParams
from cluster.scheduler import SampledToken, Scheduler, SchedulerConfig
from rank.sampler import Sampler, finite_logits, from_top_k, top_k_entries, top_k_mask


def test_top_k_mask_keeps_exactly_k_with_ties_to_the_lower_ids() -> None:
    row = mx.array([[1.0, 5.0, 3.0, 5.0, 3.0, 3.0, 0.0]])
    assert top_k_mask(row, 1).tolist() == [[False, True, False, False, False, False, False]]
    assert top_k_mask(row, 3).tolist() == [[False, True, True, True, False, False, False]]
    assert top_k_mask(row, 4).tolist() == [[False, True, True, True, True, False, False]]
    values, idx = top_k_entries(row, 4)
    assert sorted(idx[0].tolist()) == [1, 2, 3, 4] and sorted(values[0].tolist()) == [3.0, 3.0, 5.0, 5.0]


def slices_then_merged(logits: mx.array, ranks: int, k: int) -> mx.array:
    """What rank 0 samples from under a top-k plan: each rank's k best of its slice (as the executor's
    `_vocab_topk` sends them), set in rows of -inf."""
    vocab = logits.shape[1]
    bounds = [vocab * i // ranks for i in range(ranks + 1)]
    parts = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        local = finite_logits(logits[:, lo:hi].astype(mx.float32))
        values, idx = top_k_entries(local, min(k, hi - lo))
        parts.append(mx.concatenate([values, (idx + lo).astype(mx.float32)], axis=-1))
    return from_top_k(parts, vocab)


@pytest.mark.parametrize("ranks", [2, 3])
def test_sampling_from_the_gathered_entries_equals_sampling_the_whole_row(ranks: int) -> None:
    """Rows full of ties (logits rounded to a coarse grid, as a bf16 model's often are), top_k small and
    large, with top_p and min_p after it, a greedy row among them, several seeds: the same tokens."""
    rng = np.random.default_rng(0)
    vocab = 301
    cases = [
        SamplingParams(temperature=0.8, top_k=5, seed=1),
        SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=2),
        SamplingParams(temperature=0.7, top_k=1, seed=3),
        SamplingParams(temperature=1.0, top_k=17, min_p=0.05, seed=4),
        SamplingParams(temperature=0.0, seed=5),  # greedy beside them: its argmax among the entries
    ]
    k = max(p.top_k for p in cases)
    for trial in range(24):
        grid = (0.125, 0.5, 2.0)[trial % 3]  # coarse values: many ties at every k-th value (2.0: dozens)
        rows = mx.array(np.round(rng.normal(0, 2, (len(cases), vocab)) / grid) * grid, dtype=mx.float32)
        merged = slices_then_merged(rows, ranks, k)
        whole = [Request.from_submission(GenerationRequest(f"w{i}", (1,), p, print), i, str) for i, p in enumerate(cases)]
        part = [Request.from_submission(GenerationRequest(f"p{i}", (1,), p, print), i, str) for i, p in enumerate(cases)]
        for _ in range(3):  # each draw takes the next key of every request's stream
            a = [t.token_id for t in Sampler().sample(whole, rows)]
            b = [t.token_id for t in Sampler().sample(part, merged)]
            assert a == b, (trial, a, b)


def test_the_scheduler_asks_for_top_k_entries_only_when_no_row_reads_more() -> None:
    def plans_with(*params: SamplingParams) -> list[int]:
        s = Scheduler(SchedulerConfig(4, 100, 1000, 0), lambda ids: "", [])
        for i, p in enumerate(params):
            s.add(GenerationRequest(f"r{i}", (1, 2, 3), p, sink=lambda e: None))
        out = []
        while s.has_work():
            step = s.schedule()
            if step.plan.prefill or step.plan.decode_ids:
                out.append(step.plan.topk)
            s.update(step, [SampledToken(1)] * len(step.rows))
        return out

    sampled = SamplingParams(max_tokens=3, temperature=0.9, top_k=20)
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    assert plans_with(sampled) == [20, 20, 20]
    assert plans_with(sampled, greedy, SamplingParams(max_tokens=3, temperature=0.9, top_k=50)) == [50, 50, 50]
    assert plans_with(greedy) == [0, 0, 0]  # all greedy: an argmax plan instead
    assert plans_with(SamplingParams(max_tokens=3, temperature=0.9)) == [0, 0, 0]  # no top_k: the whole row
    assert plans_with(SamplingParams(max_tokens=3, temperature=0.9, top_k=20, logprobs=1)) == [0, 0, 0]
    assert plans_with(SamplingParams(max_tokens=3, temperature=0.9, top_k=300)) == [0, 0, 0]  # past the cap
    assert plans_with(SamplingParams(max_tokens=3, temperature=0.9, top_k=20, min_tokens=2)) == [0, 0, 20]
    assert plans_with(sampled, SamplingParams(max_tokens=3, temperature=0.9, top_k=5, logit_bias={7: 2.0})) == [0, 0, 0]
