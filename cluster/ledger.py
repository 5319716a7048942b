"""Per-request accounting on rank 0: latencies into `ServingStats`, one log line per finished request,
and the queue rows operators see. Pure: fed events and times by the engine thread."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from cluster.requests import GenerationRequest, RequestEvent
from cluster.stats import RequestRow, ServingStats

log = logging.getLogger("orchard.requests")


@dataclass(slots=True)
class _Timing:
    arrival: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0


class RequestLedger:
    def __init__(self, stats: ServingStats) -> None:
        self.stats = stats
        self._timings: dict[str, _Timing] = {}

    def arrived(self, req: GenerationRequest) -> None:
        self._timings[req.request_id] = _Timing(req.arrival)
        self.stats.prompt_tokens += len(req.prompt_tokens)

    def on_event(self, req: GenerationRequest, event: RequestEvent, now: float, now_unix: float) -> None:
        t = self._timings.get(req.request_id)
        if t is None:
            return
        n = len(event.token_ids)
        if n:
            if t.first is None:
                t.first = now
                self.stats.ttft.observe(now - t.arrival)
            elif t.last is not None:
                self.stats.itl.observe(now - t.last)
            t.last = now
            t.tokens += n
            self.stats.record_tokens(now_unix, n)
        if event.finished:
            del self._timings[req.request_id]
            outcome = event.finish_reason.value if event.finish_reason else "unknown"
            self.stats.e2e.observe(now - t.arrival)
            self.stats.record_outcome(outcome)
            ttft = f"{(t.first - t.arrival) * 1000:.0f}ms" if t.first is not None else "-"
            log.info(
                "request %s %s prompt=%d completion=%d ttft=%s duration=%.2fs client=%s%s",
                req.request_id,
                outcome,
                event.prompt_tokens,
                event.completion_tokens,
                ttft,
                now - t.arrival,
                req.client or "-",
                f" error={event.error!r}" if event.error else "",
            )

    def rows(self, queue: Iterable[tuple[GenerationRequest, str]], now: float) -> tuple[RequestRow, ...]:
        """Queue rows for (request, scheduler state) pairs, in queue order."""
        out = []
        for req, state in queue:
            t = self._timings.get(req.request_id)
            if t is None:
                continue
            rate = (
                t.tokens / (now - t.first) if t.first is not None and now > t.first and t.tokens > 1 else 0.0
            )
            out.append(
                RequestRow(
                    req.request_id,
                    state,
                    round(now - t.arrival, 2),
                    len(req.prompt_tokens),
                    t.tokens,
                    round(rate, 2),
                    req.client,
                )
            )
        return tuple(out)
