"""Serving statistics, gathered in one place by the engine thread and frozen into the published
`cluster.snapshot.JobSnapshot`; `/metrics`, `/admin/state` and the TUI read only that, nobody recomputes
them and nobody reads them live."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from cluster.snapshot import (
    HISTORY_SHOWN_S,
    HISTORY_STEP_S,
    LATENCY_BUCKETS,
    NO_MEMORY,
    SPEC_RECENT_S,
    HistogramView,
    LatencyView,
    MemoryView,
    RequestRow,
    SpeculationView,
    ThroughputView,
    Totals,
)

if TYPE_CHECKING:
    from cluster.memory import KvMemory

__all__ = ["LATENCY_BUCKETS", "Histogram", "RequestRow", "ServingStats"]


class Histogram:
    """Cumulative-bucket histogram written by the engine thread; readers get its `view()`."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.sum = 0.0
        self._view: HistogramView | None = None

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self._counts[i] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative (upper bound, count) pairs ending with +Inf, the sum and the count."""
        view = self.view()
        return list(zip((*view.bounds, float("inf")), view.cumulative, strict=True)), view.sum, view.count

    def view(self) -> HistogramView:
        """Frozen; the same object until the next observation (a publish between requests is free)."""
        if self._view is None or self._view.count != self.count:
            out, running = [], 0
            for n in self._counts:
                running += n
                out.append(running)
            self._view = HistogramView(self.buckets, tuple(out), self.sum, self.count)
        return self._view


class ServingStats:
    """Every serving statistic, in one place. Engine thread only: it writes them (through
    `cluster.ledger.RequestLedger`) and freezes them into each published snapshot (`*_view`); no other
    thread may read them, so nothing here takes a lock or copies for a reader."""

    HISTORY_SECONDS = 300  # kept; the snapshot shows the last `snapshot.HISTORY_SHOWN_S` of it

    def __init__(self) -> None:
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.outcomes: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._history: deque[tuple[int, int]] = deque()  # (unix second, tokens generated in it)
        self._finished = 0  # bumps with every outcome: the totals view is rebuilt only then
        self._totals: tuple[tuple[int, int, int], Totals] | None = None
        self._rates: tuple[tuple[int, int], ThroughputView] | None = None
        self._latency: LatencyView | None = None
        self.memory: KvMemory | None = None  # the KV budget's accounting, when one is enforced
        # speculative decoding (#16): the engine sets the mode and k at start and calls `speculated`
        self.spec_mode = "off"
        self.spec_tokens = 0
        self.spec_drafted = 0
        self.spec_accepted = 0
        self.spec_rows = 0
        self._spec_recent: deque[tuple[int, int, int]] = deque()  # (unix second, drafted, accepted)
        self._spec_view: tuple[tuple[object, ...], SpeculationView] | None = None

    def memory_view(self) -> MemoryView:
        return self.memory.view() if self.memory is not None else NO_MEMORY

    def record_tokens(self, now_unix: float, n: int) -> None:
        self.generated_tokens += n
        sec = int(now_unix)
        if self._history and self._history[-1][0] == sec:
            self._history[-1] = (sec, self._history[-1][1] + n)
        else:
            self._history.append((sec, n))
            cutoff = sec - self.HISTORY_SECONDS
            while self._history and self._history[0][0] < cutoff:
                self._history.popleft()

    def speculated(self, drafted: int, accepted: int, rows: int, now_unix: float | None = None) -> None:
        """One step's verification, from the engine, for a step whose decode rows carried drafts: `rows`
        such rows, `drafted` tokens in them, `accepted` of those kept (the bonus token each row samples
        after its accepted run is not a draft and is not counted). A count that cannot be is the caller's
        bug: it raises here, in the engine's tests, rather than showing an acceptance over 100%."""
        if not (0 <= accepted <= drafted and 0 <= rows <= drafted and (rows == 0) == (drafted == 0)):
            raise ValueError(f"speculated(drafted={drafted}, accepted={accepted}, rows={rows}): impossible")
        self.spec_drafted += drafted
        self.spec_accepted += accepted
        self.spec_rows += rows
        sec = int(time.time() if now_unix is None else now_unix)
        if self._spec_recent and self._spec_recent[-1][0] == sec:
            _, d, a = self._spec_recent[-1]
            self._spec_recent[-1] = (sec, d + drafted, a + accepted)
        else:
            self._spec_recent.append((sec, drafted, accepted))
            while self._spec_recent and self._spec_recent[0][0] <= sec - SPEC_RECENT_S:
                self._spec_recent.popleft()

    def record_outcome(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self._finished += 1

    def throughput(self, now_unix: float, window: int = 10) -> float:
        sec = int(now_unix)
        total = 0
        for s, n in reversed(self._history):  # newest first: stop at the window's start
            if s < sec - window:
                break
            if s < sec:
                total += n
        return total / window

    def history(
        self, now_unix: float, seconds: int = HISTORY_SHOWN_S, step: int = HISTORY_STEP_S
    ) -> list[float]:
        """Output tokens/s averaged over `step`-second slots, oldest first, for the last `seconds`."""
        end = int(now_unix)
        slots = [0] * (seconds // step)
        for s, n in reversed(self._history):
            idx = (s - (end - seconds)) // step
            if idx < 0:
                break
            if idx < len(slots):
                slots[idx] += n
        return [round(x / step, 2) for x in slots]

    # -- frozen views for the published snapshot: cached until what they show changes ---------------
    def throughput_view(self, now_unix: float) -> ThroughputView:
        key = (int(now_unix), self.generated_tokens)  # both figures move only with these
        if self._rates is None or self._rates[0] != key:
            view = ThroughputView(
                round(self.throughput(now_unix), 2), HISTORY_STEP_S, tuple(self.history(now_unix))
            )
            self._rates = (key, view)
        return self._rates[1]

    def totals_view(self) -> Totals:
        key = (self.prompt_tokens, self.generated_tokens, self._finished)
        if self._totals is None or self._totals[0] != key:
            self._totals = (key, Totals(self.prompt_tokens, self.generated_tokens, dict(self.outcomes)))
        return self._totals[1]

    def latency_view(self) -> LatencyView:
        ttft, itl, e2e = self.ttft.view(), self.itl.view(), self.e2e.view()
        c = self._latency
        if c is None or (c.time_to_first_token, c.inter_token, c.request_duration) != (ttft, itl, e2e):
            c = self._latency = LatencyView(ttft, itl, e2e)
        return c

    def speculation_view(self, now_unix: float) -> SpeculationView:
        """The recent counters cover the seconds (now - SPEC_RECENT_S, now], the current one included: a
        ratio, unlike a rate, is not biased by a second that is still filling."""
        sec = int(now_unix)
        key = (sec, self.spec_mode, self.spec_tokens, self.spec_drafted, self.spec_accepted, self.spec_rows)
        if self._spec_view is None or self._spec_view[0] != key:
            recent_d = recent_a = 0
            for s, d, a in reversed(self._spec_recent):
                if s <= sec - SPEC_RECENT_S:
                    break
                if s <= sec:
                    recent_d, recent_a = recent_d + d, recent_a + a
            view = SpeculationView(
                self.spec_mode, self.spec_tokens, self.spec_drafted, self.spec_accepted, self.spec_rows,
                recent_d, recent_a,
            )  # fmt: skip
            self._spec_view = (key, view)
        return self._spec_view[1]
