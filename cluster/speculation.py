"""Speculative decoding on rank 0: who proposes drafts, and how many each step verifies.

A decode row may feed its pending token plus drafted tokens; the packed pass yields logits at each of
those positions, rank 0 samples them in order and keeps drafts while they equal what it samples (so the
output is exactly what decoding one token at a time gives: the same greedy tokens, the same sampled
distribution, and with a seed the same tokens, since every output position draws from its own step of
the request's key stream). The ranks keep the accepted positions and roll the rest back (rank.ragged).

Proposers: `NgramProposer` (prompt lookup: the longest recent n-gram of the request's context that ended
earlier in its prompt or output proposes what followed it) and a draft model (rank/draft.py). Both are
called on the engine thread while the scheduler builds a plan; followers only execute.

`SpecController` decides how much to verify. A step costs about `base + per_position x positions` on a
CPU (measured: 58 ms for one row of one token on the embedded model, 77 ms for five positions; 87 ms for
eight rows, 285 ms for eight rows of five), and every decode row is padded to the step's widest row, so
the controller picks the width with the most expected tokens per millisecond: each row's drafts are
worth `alpha + alpha^2 + ...` tokens, alpha being its running acceptance rate; the cost coefficients are
fitted from the steps the engine times. Rows whose drafts keep missing rest (proposed for once every
`REST_STEPS`), large batches end up at width 1 by the same arithmetic, and a step where nothing is worth
verifying is a plain decode step: no row costs anything extra.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cluster.requests import Request

MODES = ("off", "ngram", "draft")
REST_BELOW = 0.1  # a row whose acceptance falls under this rests...
REST_STEPS = 16  # ...proposing once every this many steps, to notice when copying starts again
PRIOR_ALPHA = 0.5  # a new row's acceptance estimate
ALPHA_RATE = 0.25  # weight of the latest step in a row's estimate
RECOVERY = 1 / 32  # per step without drafts, a low estimate moves this much of the way back to the prior


@dataclass(frozen=True, slots=True)
class SpecConfig:
    mode: str = "off"  # "off", "ngram" or "draft" (--spec)
    tokens: int = 4  # drafted tokens per row per step at most (--spec-tokens)
    ngram_max: int = 4  # prompt lookup: longest n-gram matched...
    ngram_min: int = 2  # ...and shortest (single tokens match everywhere and rarely predict)
    # a step's cost in ms: base + per_position x positions, until the engine's timings say otherwise
    base_ms: float = 40.0
    per_position_ms: float = 5.0

    @property
    def on(self) -> bool:
        return self.mode != "off" and self.tokens > 0


class Proposer(Protocol):
    def propose(self, req: Request, k: int) -> tuple[int, ...]:
        """Up to `k` tokens the request's output may continue with after `req.output[-1]`."""
        ...

    def forget(self, req: Request) -> None:
        """The request ended: drop what is kept for it."""
        ...


@dataclass(slots=True)
class SpecState:
    """One request's speculation, on its `Request.spec`."""

    alpha: float = PRIOR_ALPHA
    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # steps since it was last proposed for
    misses: int = 0  # drafting steps in a row that accepted nothing (probes thin out as they grow)
    # prompt lookup: the context so far and, per n-gram, the position after its latest occurrence
    tokens: list[int] = field(default_factory=list)
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # n-grams ending before this position are in `index`

    @property
    def resting(self) -> bool:
        return self.alpha < REST_BELOW


class NgramProposer:
    """Prompt lookup decoding: the continuation of the most recent earlier occurrence of the context's
    last n tokens, longest n first. The index grows with the context (a dict entry per n-gram), so a
    proposal costs a few dict lookups whatever the length."""

    def __init__(self, max_n: int = 4, min_n: int = 2) -> None:
        self.max_n, self.min_n = max_n, max(1, min_n)

    def propose(self, req: Request, k: int) -> tuple[int, ...]:
        st = req.spec
        if st is None or k <= 0:
            return ()
        if not st.tokens:
            st.tokens.extend(req.prompt_tokens)
        st.tokens.extend(req.output[len(st.tokens) - req.prompt_len :])
        toks, index = st.tokens, st.index
        # n-grams with a continuation (ending before the last token) go in the index, latest wins
        for end in range(max(st.indexed, 1), len(toks)):
            for n in range(self.min_n, self.max_n + 1):
                if end >= n:
                    index[tuple(toks[end - n : end])] = end
        st.indexed = max(st.indexed, len(toks))
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(toks) < n:
                continue
            at = index.get(tuple(toks[-n:]))
            if at is not None:
                return tuple(toks[at : at + k])
        return ()

    def forget(self, req: Request) -> None:
        pass  # its index lives on `req.spec`


class SpecController:
    """Per step: which rows propose, how many drafts each verifies (the step's width), and what was
    accepted. Lives in the scheduler, on the engine thread."""

    def __init__(self, config: SpecConfig, proposer: Proposer) -> None:
        self.config, self.proposer = config, proposer
        self._base, self._per = config.base_ms, config.per_position_ms
        self._fit: list[tuple[int, float]] = []  # recent (positions, ms) of timed steps
        self._propose_ms = 0.0  # what proposing for a step costs (a draft model's passes), running mean

    def start(self, req: Request) -> None:
        """A request starts decoding: it speculates unless it opted out or a grammar constrains it (its
        matcher would have to check every draft)."""
        if self.config.on and req.speculative and req.constraint is None:
            req.spec = SpecState()

    def drafts(
        self, rows: Sequence[Request], limits: Sequence[int], other_positions: int
    ) -> tuple[tuple[int, ...], ...]:
        """Each decode row's drafts for this step (() for most rows, when nothing pays): `limits[i]` is
        how many row i may draft (its max_tokens and the context allow), `other_positions` the prompt
        tokens the step computes anyway."""
        b = len(rows)
        k = self.config.tokens
        want = [
            r.spec is not None and lim > 0 and (not r.spec.resting or r.spec.steps >= REST_STEPS)
            for r, lim in zip(rows, limits, strict=True)
        ]
        # the best case first: if even full drafts at every row's estimate do not pay, propose nothing
        alphas = [r.spec.alpha if w and r.spec is not None else 0.0 for r, w in zip(rows, want, strict=True)]
        best = self._best_width([min(k, lim) for lim in limits], alphas, b, other_positions, self._propose_ms)
        if best == 1:
            for r in rows:
                _idle(r.spec)
            return ()
        asked = [i for i, w in enumerate(want) if w]
        ks = [min(k, limits[i]) for i in asked]
        many = getattr(self.proposer, "propose_rows", None)  # a draft model drafts all rows in one batch
        t0 = time.perf_counter()
        if many is not None and len(asked) > 1:
            got = list(many([rows[i] for i in asked], ks))
        else:
            got = [self.proposer.propose(rows[i], n) for i, n in zip(asked, ks, strict=True)]
        self._propose_ms += 0.25 * ((time.perf_counter() - t0) * 1000 - self._propose_ms)
        drafts: list[tuple[int, ...]] = [()] * b
        for i, n, d in zip(asked, ks, got, strict=True):
            drafts[i] = tuple(d[:n])
            spec = rows[i].spec
            if spec is not None:
                spec.steps = 0
        width = self._best_width([len(d) for d in drafts], alphas, b, other_positions)
        for r, d in zip(rows, drafts, strict=True):
            if width == 1 or not d:
                _idle(r.spec)
        if width == 1:
            return ()
        return tuple(d[: width - 1] for d in drafts)

    def _best_width(
        self, lengths: Sequence[int], alphas: Sequence[float], b: int, other: int, propose_ms: float = 0.0
    ) -> int:
        """The step width with the most expected tokens per ms; `propose_ms`: what drafting would cost
        first (before proposing; once drafts exist their cost is spent)."""
        best, best_rate = 1, 0.0
        for width in range(1, max(lengths, default=0) + 2):
            tokens = b + sum(_expected(a, min(width - 1, n)) for a, n in zip(alphas, lengths, strict=True))
            extra = propose_ms if width > 1 else 0.0
            rate = tokens / (self._base + extra + self._per * (other + b * width))
            if rate > best_rate * 1.02:  # a wider step must pay clearly: ties stay narrow
                best, best_rate = width, rate
        return best

    def accepted(self, req: Request, drafted: int, accepted: int) -> None:
        """What a row's drafts earned this step (its estimate moves toward it)."""
        st = req.spec
        if st is None or drafted <= 0:
            return
        st.drafted += drafted
        st.accepted += accepted
        st.alpha += ALPHA_RATE * (accepted / drafted - st.alpha)
        st.misses = 0 if accepted else st.misses + 1

    def timed(self, positions: int, ms: float) -> None:
        """A step of `positions` positions (prompt tokens and decode rows' widths) took `ms`: refit the
        cost line over the recent steps once they differ enough in size to tell base from slope."""
        if positions <= 0 or ms <= 0:
            return
        self._fit.append((positions, ms))
        if len(self._fit) > 128:
            del self._fit[:64]
        xs = [p for p, _ in self._fit]
        if len(self._fit) < 16 or max(xs) < 2 * min(xs):
            return
        n = len(self._fit)
        mx_, my = sum(xs) / n, sum(m for _, m in self._fit) / n
        var = sum((x - mx_) ** 2 for x in xs)
        slope = sum((p - mx_) * (m - my) for p, m in self._fit) / var
        base = my - slope * mx_
        if slope > 0 and base > 0:
            self._base, self._per = base, slope

    def forget(self, req: Request) -> None:
        if req.spec is not None:
            self.proposer.forget(req)


def _idle(st: SpecState | None) -> None:
    """A step without drafts for a row: its estimate drifts back toward the prior, so a row priced out
    by a bad streak is tried again later (its output may start copying its input)."""
    if st is not None:
        st.steps += 1
        if st.alpha < PRIOR_ALPHA:
            st.alpha += (PRIOR_ALPHA - st.alpha) * RECOVERY / (1 + st.misses)


def _expected(alpha: float, n: int) -> float:
    """Expected accepted drafts of `n` at acceptance `alpha` (each accepted only if all before were)."""
    return sum(alpha**j for j in range(1, n + 1))
