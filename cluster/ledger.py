"""Per-request accounting on rank 0: latencies into `ServingStats`, one log line per finished request,
and the queue rows operators see. Pure: fed requests, events and times by the engine thread; a request's
timings live on its `Request`, not here."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from cluster.requests import Request, RequestEvent
from cluster.snapshot import RequestRow
from cluster.stats import ServingStats

log = logging.getLogger("orchard.requests")


class RequestLedger:
    def __init__(self, stats: ServingStats) -> None:
        self.stats = stats

    def arrived(self, req: Request) -> None:
        self.stats.prompt_tokens += req.prompt_len

    def on_event(self, req: Request, event: RequestEvent, now: float, now_unix: float) -> None:
        n = len(event.token_ids)
        if n:
            if req.first_token_at is None:
                req.first_token_at = now
                self.stats.ttft.observe(now - req.arrival)
            elif req.last_token_at is not None:
                self.stats.itl.observe(now - req.last_token_at)
            req.last_token_at = now
            self.stats.record_tokens(now_unix, n)
        if event.finished:
            outcome = event.finish_reason.value if event.finish_reason else "unknown"
            self.stats.e2e.observe(now - req.arrival)
            self.stats.record_outcome(outcome)
            first = req.first_token_at
            ttft = f"{(first - req.arrival) * 1000:.0f}ms" if first is not None else "-"
            log.info(
                "request %s %s prompt=%d completion=%d ttft=%s duration=%.2fs client=%s%s",
                req.request_id,
                outcome,
                event.prompt_tokens,
                event.completion_tokens,
                ttft,
                now - req.arrival,
                req.client or "-",
                f" error={event.error!r}" if event.error else "",
            )

    @staticmethod
    def rows(queue: Iterable[Request], now: float) -> tuple[RequestRow, ...]:
        """Queue rows for the scheduler's unfinished requests, in queue order."""
        out = []
        for req in queue:
            tokens, first = len(req.output), req.first_token_at
            rate = tokens / (now - first) if first is not None and now > first and tokens > 1 else 0.0
            out.append(
                RequestRow(
                    req.request_id,
                    req.status.value,
                    round(now - req.arrival, 2),
                    req.prompt_len,
                    tokens,
                    round(rate, 2),
                    req.client,
                )
            )
        return tuple(out)
