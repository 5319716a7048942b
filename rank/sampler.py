"""Token selection on rank 0 (followers never sample, so ranks cannot disagree about tokens).

Each request with a seed gets its own PRNG key stream, so the same seed gives the same output whatever
else is in the batch. Filters follow the usual order: logit bias, penalties, temperature, top-k, top-p,
min-p. Logprobs are those of the model's distribution after bias and penalties, before temperature.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import mlx.core as mx

from cluster.requests import GenerationRequest, SamplingParams, TokenLogprob
from cluster.scheduler import SampledToken


class Sampler:
    def __init__(self, default_seed: int = 0) -> None:
        self._keys: dict[int, mx.array] = {}
        self._fallback = mx.random.key(default_seed)
        self._generated: dict[int, Counter[int]] = {}  # only for requests with penalties

    def forget(self, seq_ids: Sequence[int]) -> None:
        for sid in seq_ids:
            self._keys.pop(sid, None)
            self._generated.pop(sid, None)

    def _next_key(self, seq_id: int, params: SamplingParams) -> mx.array:
        key = self._keys.get(seq_id)
        if key is None:
            if params.seed is not None:
                key = mx.random.key(params.seed)
            else:
                self._fallback, key = mx.random.split(self._fallback)
        key, sub = mx.random.split(key)
        self._keys[seq_id] = key
        return sub

    def sample(
        self, row_ids: list[int], logits: mx.array, requests: dict[int, GenerationRequest]
    ) -> dict[int, SampledToken]:
        out: dict[int, SampledToken] = {}
        if all(_plain_greedy(requests[sid].sampling) for sid in row_ids):
            for sid, tok in zip(row_ids, mx.argmax(logits, axis=-1).tolist(), strict=True):
                out[sid] = SampledToken(int(tok))
            return out
        for i, sid in enumerate(row_ids):
            out[sid] = self._sample_row(sid, logits[i], requests[sid])
        return out

    def _penalise(self, seq_id: int, row: mx.array, req: GenerationRequest) -> mx.array:
        p = req.sampling
        counts = self._generated.setdefault(seq_id, Counter())
        if counts and (p.presence_penalty or p.frequency_penalty):
            ids = mx.array(list(counts), dtype=mx.int32)
            n = mx.array(list(counts.values()), dtype=row.dtype)
            row = row.at[ids].add(-(p.frequency_penalty * n + p.presence_penalty))
        if p.repetition_penalty != 1.0:
            ids = mx.array(sorted(set(req.prompt_tokens) | set(counts)), dtype=mx.int32)
            seen = row[ids]
            factor = mx.where(seen > 0, 1.0 / p.repetition_penalty, p.repetition_penalty)
            row = row.at[ids].multiply(factor.astype(row.dtype))
        return row

    def _sample_row(self, seq_id: int, row: mx.array, req: GenerationRequest) -> SampledToken:
        p = req.sampling
        if p.logit_bias:
            ids = mx.array([t for t, _ in p.logit_bias], dtype=mx.int32)
            row = row.at[ids].add(mx.array([b for _, b in p.logit_bias], dtype=row.dtype))
        if p.penalised:
            row = self._penalise(seq_id, row, req)
        logprobs = row - mx.logsumexp(row)
        if p.greedy:
            token = int(mx.argmax(row).item())
        else:
            scores = row / p.temperature
            if p.top_k and p.top_k < scores.shape[-1]:
                kth = mx.sort(scores)[-p.top_k]
                scores = mx.where(scores < kth, -mx.inf, scores)
            if p.top_p < 1.0:
                order = mx.argsort(-scores)
                probs = mx.softmax(scores[order])
                cum = mx.cumsum(probs)
                drop_sorted = (cum - probs) > p.top_p
                drop = mx.zeros_like(drop_sorted).at[order].add(drop_sorted)
                scores = mx.where(drop, -mx.inf, scores)
            if p.min_p > 0.0:
                probs = mx.softmax(scores)
                scores = mx.where(probs < p.min_p * probs.max(), -mx.inf, scores)
            token = int(mx.random.categorical(scores, key=self._next_key(seq_id, p)).item())
        lp = None
        if p.logprobs is not None:
            top: tuple[tuple[int, float], ...] = ()
            if p.logprobs > 0:
                idx = mx.argsort(-logprobs)[: p.logprobs]
                top = tuple(zip(idx.tolist(), logprobs[idx].tolist(), strict=True))
            lp = TokenLogprob(token, float(logprobs[token].item()), top)
        if p.penalised:
            self._generated[seq_id][token] += 1
        return SampledToken(token, lp)


def _plain_greedy(p: SamplingParams) -> bool:
    return p.greedy and not p.logit_bias and p.logprobs is None and not p.penalised
