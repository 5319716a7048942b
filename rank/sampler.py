"""Token selection on rank 0 (followers never sample, so ranks cannot disagree about tokens).

The sampler keeps no state of its own: a request's PRNG key and generated-token counts live on its
`Request` (the scheduler's), so they go when it does. Each request with a seed gets its own PRNG key stream, so the same seed gives the same output whatever
else is in the batch. Filters follow the usual order: logit bias, penalties, the constraint's mask
(rank/grammar.py) and min_tokens' ban on EOS and stop ids, temperature, top-k, top-p, min-p. Logprobs are
those of the model's distribution after bias and penalties, before the mask and temperature (so they stay
finite: a masked token's would be -inf, which JSON cannot carry).

Whatever the settings or the model's logits, every row gives a token of the vocabulary and finite
logprobs: a NaN or infinity here would reach the client as invalid JSON (or a 500). Logits are clamped
to +-`LOGIT_LIMIT` (NaN counts as the floor) after the model, and again after bias and penalties;
temperatures under `GREEDY_BELOW` are greedy, since dividing by them overflows float32. The API bounds
every parameter as well (`api/schemas.py`); this is the second line, for any caller.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import partial

import mlx.core as mx

from cluster.requests import Request, SamplingParams, TokenLogprob
from cluster.scheduler import SampledToken
from rank.grammar import StepMasks

# Far beyond any real model's logits (tens), small enough that dividing by `GREEDY_BELOW`, subtracting a
# logsumexp or adding a bias stays finite in float32 (1e4 / 1e-5 = 1e9 < 3.4e38).
LOGIT_LIMIT = 1e4
GREEDY_BELOW = 1e-5  # temperatures under this (vLLM's threshold too) pick the most likely token


class Sampler:
    def __init__(self, default_seed: int = 0, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self._fallback = mx.random.key(default_seed)  # splits into the keys of requests without a seed
        self.eos_token_ids = eos_token_ids  # banned with stop_token_ids until min_tokens are out

    def _next_key(self, req: Request) -> mx.array:
        key = req.rng_key
        if key is None:
            if req.sampling.seed is not None:
                key = mx.random.key(req.sampling.seed)
            else:
                self._fallback, key = mx.random.split(self._fallback)
        key, sub = mx.random.split(key)
        req.rng_key = key
        return sub

    def draws(self, rows: Sequence[Request]) -> tuple[tuple[float, int, int], ...]:
        """`StepPlan.draws` for rows that are plain greedy or sample at a temperature alone: each sampling
        row's temperature and the key `sample` would draw for it now (the request's next one), 0 and no key
        for a greedy row. Every rank then picks as `sample` would (`gumbel_scores`)."""
        keys = {i: self._next_key(req) for i, req in enumerate(rows) if not _greedy(req.sampling)}
        words = dict(zip(keys, mx.stack(list(keys.values())).tolist(), strict=True)) if keys else {}
        return tuple(
            (float(req.sampling.temperature), *words[i]) if i in words else (0.0, 0, 0)
            for i, req in enumerate(rows)
        )

    def sample(
        self, rows: Sequence[Request], logits: mx.array, masks: StepMasks | None = None
    ) -> list[SampledToken]:
        """One token for each row of `logits`, whose row i belongs to `rows[i]`; `masks`: the tokens the
        constrained rows may take (rows without one are untouched, so they get what they get alone)."""
        logits = finite_logits(logits)
        penalty = masks.penalty(*logits.shape) if masks is not None else None
        bans = {i: self._banned(req) for i, req in enumerate(rows) if self._bans(req)}
        # Greedy rows that read nothing but their own logits (a logit bias at most) are one argmax of
        # the batch, in `_sample_row`'s order: bias, clamp, the constraint's mask.
        quick = [i for i, req in enumerate(rows) if i not in bans and _argmax_pick(req.sampling)]
        picks: dict[int, SampledToken] = {}
        if quick:
            some = None if len(quick) == len(rows) else mx.array(quick, dtype=mx.int32)
            sub = logits if some is None else logits[some]
            biased = [
                (j, rows[i].sampling.logit_bias) for j, i in enumerate(quick) if rows[i].sampling.logit_bias
            ]
            if biased:
                at = [(j, t) for j, bias in biased for t, _ in bias]
                rows_at, ids_at = (
                    mx.array([j for j, _ in at], dtype=mx.int32),
                    mx.array([t for _, t in at], dtype=mx.int32),
                )
                values = mx.array([b for _, bias in biased for _, b in bias], dtype=sub.dtype)
                sub = finite_logits(sub.at[rows_at, ids_at].add(values))
            if penalty is not None:  # + 0 leaves a free row's logits exactly as they were
                sub = sub + (penalty if some is None else penalty[some])
            picks = {
                i: SampledToken(int(t)) for i, t in zip(quick, mx.argmax(sub, axis=-1).tolist(), strict=True)
            }
            if len(picks) == len(rows):
                return [picks[i] for i in range(len(rows))]
        if penalty is not None:
            mx.eval(penalty)  # once: each row's sampling evaluates on its own
        masked = set(masks.rows) if masks is not None else set()
        return [
            picks[i]
            if i in picks
            else self._sample_row(
                logits[i], req, penalty[i] if penalty is not None and i in masked else None, bans.get(i)
            )
            for i, req in enumerate(rows)
        ]

    def sample_runs(
        self,
        rows: Sequence[Request],
        logits: mx.array,
        drafts: Sequence[Sequence[int]],
        masks: StepMasks | None = None,
    ) -> list[tuple[SampledToken, ...]]:
        """Speculation: row i of `rows` has 1 + len(drafts[i]) consecutive rows of `logits` (its pending
        token's position, then each draft's). Sample its first position as `sample` would; while the token
        sampled equals the next draft, sample the position after that draft (penalties, min_tokens and
        the PRNG stream see the accepted drafts as generated tokens: each position draws its own key, so
        with a seed the tokens are those of decoding one at a time). A run ends at the first token that
        differs from its draft, or after the last draft (the "bonus" token)."""
        starts, at = [], 0
        for d in drafts:
            starts.append(at)
            at += 1 + len(d)
        if at != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} rows of logits for runs of {at} positions")
        firsts = self.sample(rows, logits[mx.array(starts, dtype=mx.int32)], masks)
        greedy: list[int] | None = None  # every position's argmax, once, for plain greedy rows
        runs = []
        for i, (req, d) in enumerate(zip(rows, drafts, strict=True)):
            run = [firsts[i]]
            for j, draft in enumerate(d, start=1):
                if run[-1].token_id != draft:
                    break
                ahead = self._bans(req, j)
                if req.sampling.plain_greedy and not ahead:
                    if greedy is None:
                        greedy = mx.argmax(finite_logits(logits), axis=-1).tolist()
                    run.append(SampledToken(int(greedy[starts[i] + j])))
                else:
                    banned = self._banned(req) if ahead else None
                    run.append(self._sample_row(finite_logits(logits[starts[i] + j]), req, None, banned))
            runs.append(tuple(run))
        return runs

    @staticmethod
    def runs_of_picks(
        picks: Sequence[int], drafts: Sequence[Sequence[int]]
    ) -> list[tuple[SampledToken, ...]]:
        """`sample_runs` for rows that are all plain greedy with nothing banned, given each position's
        argmax (`picks`, positions laid out as there): a row's run goes on while its pick equals its draft."""
        runs, at = [], 0
        for d in drafts:
            run = [SampledToken(int(picks[at]))]
            for j, draft in enumerate(d, start=1):
                if run[-1].token_id != draft:
                    break
                run.append(SampledToken(int(picks[at + j])))
            runs.append(tuple(run))
            at += 1 + len(d)
        if at != len(picks):
            raise ValueError(f"{len(picks)} picks for runs of {at} positions")
        return runs

    def _bans(self, req: Request, ahead: int = 0) -> bool:
        """min_tokens still to go (a constrained row's length is its grammar's business: once the
        grammar is complete it allows EOS alone, and a ban would leave no token); `ahead`: positions
        past the output so far (accepted drafts)."""
        return len(req.output) + ahead < req.sampling.min_tokens and req.constraint is None

    def _banned(self, req: Request) -> mx.array:
        return mx.array(sorted(self.eos_token_ids | set(req.sampling.stop_token_ids)), dtype=mx.int32)

    def _penalise(self, row: mx.array, req: Request) -> mx.array:
        p = req.sampling
        if req.token_counts is None:
            req.token_counts = Counter()
        counts = req.token_counts
        if counts and (p.presence_penalty or p.frequency_penalty):
            ids = mx.array(list(counts), dtype=mx.int32)
            n = mx.array(list(counts.values()), dtype=row.dtype)
            row = row.at[ids].add(-(p.frequency_penalty * n + p.presence_penalty))
        if p.repetition_penalty != 1.0:
            ids = mx.array(sorted(set(req.prompt_tokens) | set(counts)), dtype=mx.int32)
            seen = row[ids]
            rp = p.repetition_penalty
            factor = mx.where(seen > 0, 1.0 / rp if rp else math.inf, rp)  # overflows are clamped later
            row = row.at[ids].multiply(factor.astype(row.dtype))
        return row

    def _sample_row(
        self, row: mx.array, req: Request, penalty: mx.array | None = None, banned: mx.array | None = None
    ) -> SampledToken:
        p = req.sampling
        if p.logit_bias:
            ids = mx.array([t for t, _ in p.logit_bias], dtype=mx.int32)
            row = row.at[ids].add(mx.array([b for _, b in p.logit_bias], dtype=row.dtype))
        if p.penalised:
            row = self._penalise(row, req)
        row = finite_logits(row)  # a bias or penalty can push a logit past the limit (or to inf in float32)
        logprobs = row - mx.logsumexp(row)
        if penalty is not None:  # the constraint's mask (rank/grammar.py)
            row = row + penalty
        if banned is not None and banned.size:
            row = row.at[banned].add(-mx.inf)
        if _greedy(p):
            token = int(mx.argmax(row).item())
        else:
            scores = row / p.temperature  # finite: |row| <= LOGIT_LIMIT, temperature >= GREEDY_BELOW
            if 0 < p.top_k < scores.shape[-1]:  # chosen on the logits: dividing may round two into a tie
                scores = mx.where(top_k_mask(row, p.top_k), scores, -mx.inf)
            if p.top_p < 1.0:
                order = mx.argsort(-scores)
                probs = mx.softmax(scores[order])
                cum = mx.cumsum(probs)
                drop_sorted = (cum - probs) > max(p.top_p, 0.0)  # the most likely token always stays
                drop = mx.zeros_like(drop_sorted).at[order].add(drop_sorted)
                scores = mx.where(drop, -mx.inf, scores)
            if p.min_p > 0.0:
                probs = mx.softmax(scores)
                scores = mx.where(probs < min(p.min_p, 1.0) * probs.max(), -mx.inf, scores)
            token = int(mx.random.categorical(scores, key=self._next_key(req)).item())
        lp = None
        if p.logprobs is not None:
            top: tuple[tuple[int, float], ...] = ()
            if p.logprobs > 0:
                idx = mx.argsort(-logprobs)[: p.logprobs]
                top = tuple(zip(idx.tolist(), logprobs[idx].tolist(), strict=True))
            lp = TokenLogprob(token, float(logprobs[token].item()), top)
        if req.token_counts is not None:
            req.token_counts[token] += 1
        return SampledToken(token, lp)


def top_k_mask(scores: mx.array, k: int) -> mx.array:
    """Which entries of each row (last axis) are its `k` largest: exactly k, ties at the k-th value going
    to the lower token ids (mlx-lm keeps exactly k too, ties as its partition falls). Exactly k with a
    fixed tie rule is what lets each rank of a vocabulary-parallel head send only its own k best
    (`StepPlan.topk`): the k best of the whole row are among them, whatever the ties."""
    kth = mx.sort(scores, axis=-1)[..., -k][..., None]
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(axis=-1, keepdims=True)
    return above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= need))


def top_k_entries(scores: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Each row's `k` largest entries by `top_k_mask`: (values, indices), rows x k, in no set order."""
    keep = top_k_mask(scores, k)
    idx = mx.argsort(mx.where(keep, 0, 1).astype(mx.int32), axis=-1)[..., :k]
    return mx.take_along_axis(scores, idx, axis=-1), idx


def from_top_k(parts: Sequence[mx.array], vocab: int) -> mx.array:
    """Rows of `vocab` logits from each rank's (values, vocabulary indices) pairs, rows x 2k (values first,
    then indices as float32): the entries sent, -inf elsewhere. Sampling a row of it with top_k <= k gives
    what sampling the whole row gives (rank/executor.py `_vocab_topk`)."""
    rows = parts[0].shape[0]
    full = mx.full((rows, vocab), -mx.inf, dtype=mx.float32)
    for part in parts:
        k = part.shape[1] // 2
        full = mx.put_along_axis(full, part[:, k:].astype(mx.int32), part[:, :k].astype(mx.float32), axis=-1)
    return full


def gumbel_scores(logits: mx.array, draws: Sequence[tuple[float, int, int]], lo: int, vocab: int) -> mx.array:
    """`logits` (rows x a slice of the vocabulary starting at id `lo`, clamped by `finite_logits`) as
    `StepPlan.draws` turn them into scores whose argmax is the row's token: a greedy row's (temperature 0)
    as they are; a sampling row's divided by its temperature plus its slice of the Gumbel noise its key
    gives over the whole `vocab`. `mx.random.categorical(scores, key)` is the argmax of the scores plus
    that noise, so the best entry of the slices' best entries is the token `Sampler.sample` draws from
    the whole row with the same key (tests/test_gumbel_gather.py)."""
    rows = []
    for i, (temperature, k0, k1) in enumerate(draws):
        if temperature == 0.0:
            rows.append(logits[i])
            continue
        key = mx.array([k0, k1], dtype=mx.uint32)
        noise = mx.random.gumbel(shape=(vocab,), dtype=logits.dtype, key=key)[lo : lo + logits.shape[-1]]
        rows.append(logits[i] / temperature + noise)
    return mx.stack(rows)


@partial(mx.compile, shapeless=True)
def finite_logits(x: mx.array) -> mx.array:
    """Logits within +-LOGIT_LIMIT; NaN becomes the floor, so a broken entry is never the pick. Compiled:
    one fused pass over the logits instead of three (8 rows of a 49k vocabulary: 0.5 ms, not 1.4)."""
    return mx.where(mx.isnan(x), -LOGIT_LIMIT, mx.clip(x, -LOGIT_LIMIT, LOGIT_LIMIT))


def _argmax_pick(p: SamplingParams) -> bool:
    """`_sample_row` would return the argmax of the (biased) row and nothing more: greedy, no logprobs, no
    penalties (their counts live on the request)."""
    return _greedy(p) and p.logprobs is None and not p.penalised


def _greedy(p: SamplingParams) -> bool:
    return not p.temperature >= GREEDY_BELOW  # "not >=": a NaN temperature is greedy too
