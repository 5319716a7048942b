"""Memory admission: the running sequences' KV cache stays under a per-rank budget (`--kv-budget`).

Every rank holds the same share of every sequence's KV (its slice of the heads), so rank 0 can account
for all ranks at once: a position costs `token_bytes` on each rank, and a cache holds up to 256 positions
more than it uses (mlx-lm's `KVCache` and `BatchKVCache` grow 256 positions at a time). The decode batch is one array per
layer of (rows, heads, longest row, dim): every row is padded to the longest, so one long sequence beside
seven short ones costs eight long ones. The accounting charges exactly that.

A sequence is admitted only if the batch it would join still fits at everybody's final length (prompt
plus `max_tokens`, capped by the context): once running, a sequence is never out of memory, and no rank
is ever asked to hold more than the budget (a rank that runs out of memory takes the whole job down).
Admission is first come, first served: a request that does not fit now waits at the head of the queue
until enough others finish (a short one never overtakes it, or a stream of short ones could starve it).
The padding a mixed batch wastes is charged against the budget like the rest, so it can never push a
rank over; it only delays admissions, and only when the budget is tight.

A request that cannot fit even alone gets a 400 from the API (`refusal`); should one reach the queue, the
scheduler fails it at once with the same message (`never_fits`), never runs it over the budget.
Stdlib only: the API and the scheduler import this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.snapshot import MemoryView

if TYPE_CHECKING:
    from cluster.requests import Request

GIB = 2**30
STEP = 256  # positions mlx-lm's caches allocate at a time


@dataclass(frozen=True, slots=True)
class KvCost:
    """What one position of one sequence costs on each rank: every layer's keys and values of its heads,
    in the model's dtype (`rank.model_caps.BlockGeometry.bytes(1)`)."""

    token_bytes: int
    step: int = STEP
    # --kv-live-from (rank.livequant): a cache holding `live_from` positions or more is quantized, each
    # position then `quant_token_bytes`; None: never
    live_from: int | None = None
    quant_token_bytes: int = 0

    def bytes(self, tokens: int) -> int:
        """At most what a cache holding `tokens` positions has allocated: a cache that grows allocates
        `step` more positions at once (mlx-lm's `BatchKVCache` from its current length, not a multiple of
        the step; `KVCache` a multiple of the step past the chunk it appends)."""
        return (tokens + self.step) * self.token_bytes if tokens > 0 else 0

    def live(self, tokens: int) -> bool:
        """Whether a cache of `tokens` positions is quantized."""
        return self.live_from is not None and tokens >= self.live_from

    def quant_bytes(self, tokens: int) -> int:
        return (tokens + self.step) * self.quant_token_bytes if tokens > 0 else 0

    def held(self, tokens: int) -> int:
        """What one sequence's own cache of `tokens` positions holds now, in whichever form it is."""
        return self.quant_bytes(tokens) if self.live(tokens) else self.bytes(tokens)

    def batch(self, lengths: Sequence[int]) -> int:
        """The decode batch of rows of these lengths now: each form's rows padded to its longest."""
        quant = [n for n in lengths if self.live(n)]
        plain = [n for n in lengths if not self.live(n)]
        return len(plain) * self.bytes(max(plain, default=0)) + len(quant) * self.quant_bytes(max(quant, default=0))


class KvMemory:
    """Rank 0's accounting of the running sequences' KV against the budget; the scheduler asks it before
    admitting a request (`admits`) and tells it what runs after every schedule (`observe`)."""

    def __init__(self, cost: KvCost, budget_bytes: int, context_length: int) -> None:
        self.cost = cost
        self.budget_bytes = budget_bytes
        self.context_length = context_length
        self._view = MemoryView(budget_bytes, 0, 0, 0, 0, 0, 0)
        self._blocked: Request | None = None  # the request at the head of the queue that did not fit
        self._delayed_ids: set[int] = set()
        self._admitted = 0
        self._delayed = 0

    # -- sizes -----------------------------------------------------------------------------------
    def final_tokens(self, prompt_tokens: int, max_tokens: int) -> int:
        return min(self.context_length, prompt_tokens + max(1, max_tokens))

    def need(self, prompt_tokens: int, max_tokens: int) -> int:
        """Bytes per rank a request needs alone, at its longest."""
        return self.reserved([self.final_tokens(prompt_tokens, max_tokens)])

    def refusal(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request can never run (for a 400), or None: what it needs and what the job has."""
        need = self.need(prompt_tokens, max_tokens)
        if need <= self.budget_bytes:
            return None
        tokens = self.final_tokens(prompt_tokens, max_tokens)
        most = self._most_alone()
        return (
            f"this request needs {need / GIB:.2f} GiB of KV cache per rank ({prompt_tokens} prompt tokens + "
            f"max_tokens up to {tokens} positions), but the job has {self.budget_bytes / GIB:.2f} GiB per "
            f"rank (--kv-budget): at most {most} positions of prompt and completion together"
        )

    def never_fits(self, req: Request) -> str | None:
        """`refusal` of a queued request: the scheduler fails such a request at once (its error event
        says why) rather than let it hold the head of the queue or run over the budget."""
        return self.refusal(req.prompt_len, req.sampling.max_tokens)

    def room(self, prompt_tokens: int) -> int:
        """The most completion tokens a request of `prompt_tokens` can have within the budget alone (0:
        none; then `refusal` says why): what a default `max_tokens` is capped to."""
        return max(0, min(self._most_alone(), self.context_length) - prompt_tokens)

    def _most_alone(self) -> int:
        """The most positions (prompt and completion) one sequence can reach within the budget."""
        if self.cost.live_from is None:
            return max(0, self.budget_bytes // self.cost.token_bytes - self.cost.step)
        lo, hi = 0, self.budget_bytes // max(1, min(self.cost.token_bytes, self.cost.quant_token_bytes or 1))
        while lo < hi:  # reserved() of one row grows with its length
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.reserved([mid]) <= self.budget_bytes else (lo, mid - 1)
        return lo

    def _final(self, req: Request) -> int:
        return self.final_tokens(req.prompt_len, req.sampling.max_tokens)

    def reserved(self, finals: Sequence[int]) -> int:
        """The batch of these sequences at their final lengths: every row as long as the longest.

        With live quantization (rank.livequant) the batch has two groups, each padded to its own longest
        row: rows in the model's dtype (those that never reach `live_from`, and the others until they do,
        so at most `live_from` positions) and quantized rows. A row that reaches `live_from` holds both
        forms for a moment (its quantized copy is made before the other is let go). At any time, then,
        the rows that never reach it cost at most their plain form, and each other row at most the larger
        of its plain form plus that copy, and its quantized form at the longest final length."""
        if not finals:
            return 0
        cost = self.cost
        longest = max(finals)
        if cost.live_from is None:
            return len(finals) * cost.bytes(longest)
        plain = cost.bytes(min(longest, cost.live_from))
        quant = [n for n in finals if cost.live(n)]
        if not quant:
            return len(finals) * plain
        crossing = max(plain + cost.quant_bytes(cost.live_from), cost.quant_bytes(max(quant)))
        return (len(finals) - len(quant)) * plain + len(quant) * crossing

    # -- the scheduler's calls -------------------------------------------------------------------
    def admits(self, active: Sequence[Request], candidate: Request) -> bool:
        """Whether `candidate` may start beside `active` without any rank ever passing the budget (a
        candidate that fits alone always fits beside nobody: the queue cannot stall)."""
        finals = [self._final(r) for r in active]
        ok = self.reserved([*finals, self._final(candidate)]) <= self.budget_bytes
        if ok:
            self._admitted += 1
            if id(candidate) in self._delayed_ids:
                self._delayed_ids.discard(id(candidate))
                self._delayed += 1
        else:
            self._delayed_ids.add(id(candidate))
            self._blocked = candidate
        return ok

    def observe(self, active: Sequence[Request], waiting: int) -> None:
        """After a schedule: the running sequences' bytes now, and how many wait for memory (the whole
        queue when its head did not fit)."""
        lengths = [r.computed + len(r.output) for r in active]
        decoding = [n for r, n in zip(active, lengths, strict=True) if r.output]
        prefilling = [n for r, n in zip(active, lengths, strict=True) if not r.output]
        batch = self.cost.batch(decoding)
        own = sum(self.cost.held(n) for n in prefilling)
        used = sum(
            n * (self.cost.quant_token_bytes if self.cost.live(n) else self.cost.token_bytes) for n in decoding
        )
        padding = batch - used
        blocked = waiting if self._blocked is not None else 0
        self._blocked = None
        if not waiting:
            self._delayed_ids.clear()
        self._view = MemoryView(
            self.budget_bytes,
            batch + own,
            padding,
            self.reserved([self._final(r) for r in active]),
            blocked,
            self._admitted,
            self._delayed,
            self.cost.live_from or 0,
            sum(1 for n in lengths if self.cost.live(n)),
        )

    def view(self) -> MemoryView:
        return self._view


def default_budget(
    device_bytes: int, weights_bytes: int, ram_tier_bytes: int, ranks_on_host: int = 1
) -> tuple[int, str]:
    """A rank's KV budget when `--kv-budget` is not given, and how it was reached (for the log): its
    share of the device's memory, minus its weights, its RAM prefix tier and a margin (the larger of
    1 GiB and 20% of the share) for activations, the copies a growing cache makes, and everything else."""
    share = device_bytes // max(1, ranks_on_host)
    margin = max(GIB, share // 5)
    budget = share - weights_bytes - ram_tier_bytes - margin
    how = (
        f"{share / GIB:.1f} GiB of memory per rank - {weights_bytes / GIB:.2f} weights - "
        f"{ram_tier_bytes / GIB:.2f} RAM prefix tier - {margin / GIB:.1f} margin"
    )
    floor = max(256 << 20, share // 10)
    if budget < floor:
        return floor, how + f" is under {floor / GIB:.2f} GiB: using that (set --kv-budget)"
    return budget, how
