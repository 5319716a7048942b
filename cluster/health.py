"""Per-rank health: what each rank reports about itself, and rank 0's judgement of it.

Followers post a `RankReport` (a bus message, cluster/messages.py) to rank 0 at most once per report
interval; rank 0 builds its own. `HealthTable` (rank 0) turns reports into one `RankView` (the snapshot's own type) per rank with a state:
ok, slow (step time far above the rank's own median), unresponsive (no report within the timeout) or
dead (a fault was detected on it). Pure logic with an injected clock.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.messages import RankReport
from cluster.snapshot import RankView

__all__ = ["DEAD", "OK", "SLOW", "UNRESPONSIVE", "HealthTable", "RankReport", "RankView"]

OK, SLOW, UNRESPONSIVE, DEAD = "ok", "slow", "unresponsive", "dead"


@dataclass(slots=True)
class _RankRecord:
    report: RankReport
    received: float
    steps: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    dead_reason: str = ""


class HealthTable:
    """Written by the engine thread, read by HTTP handlers: guarded by a lock."""

    def __init__(self, clock: Callable[[], float], timeout: float = 5.0, slow_factor: float = 4.0) -> None:
        self.clock = clock
        self.timeout = timeout
        self.slow_factor = slow_factor
        self._ranks: dict[int, _RankRecord] = {}
        self._lock = threading.Lock()
        # Seconds since a rank last answered a liveness ping (cluster/pulse.py), when rank 0 pings it.
        # It outranks the report age: reports travel over MPI and stall with every rank during a long
        # or hung step, pings do not.
        self.liveness: Callable[[int], float | None] | None = None

    def register(self, rank: int, host: str, pid: int) -> None:
        with self._lock:
            self._ranks[rank] = _RankRecord(RankReport(rank, host, pid), self.clock())

    def update(self, report: RankReport) -> None:
        with self._lock:
            rec = self._ranks.get(report.rank)
            if rec is None:
                rec = self._ranks[report.rank] = _RankRecord(report, self.clock())
            rec.report, rec.received = report, self.clock()
            if report.step_ms > 0:
                rec.steps.append(report.step_ms)

    def mark_dead(self, rank: int, reason: str) -> None:
        with self._lock:
            if rank in self._ranks:
                self._ranks[rank].dead_reason = reason

    def snapshot(self) -> list[RankView]:
        now = self.clock()
        with self._lock:
            records = sorted(self._ranks.items())
            out = []
            for rank, rec in records:
                r, age = rec.report, now - rec.received
                median = statistics.median(rec.steps) if rec.steps else 0.0
                quiet = self._silence(rank)
                if rec.dead_reason:
                    state = DEAD
                elif (quiet if quiet is not None else age) > self.timeout:
                    state = UNRESPONSIVE
                elif (
                    len(rec.steps) >= 8
                    and median > 0
                    and r.step_ms > self.slow_factor * median
                    and r.step_ms > 50
                ):
                    state = SLOW
                else:
                    state = OK
                out.append(
                    RankView(
                        rank,
                        r.host,
                        r.pid,
                        state,
                        round(age, 2),
                        r.step,
                        round(r.step_ms, 2),
                        round(median, 2),
                        r.active_bytes,
                        r.peak_bytes,
                        r.rss_bytes,
                        r.kv_blocks,
                        r.kv_bytes,
                        rec.dead_reason or r.last_error,
                        None if quiet is None else round(quiet, 2),
                    )
                )
            return out

    def _silence(self, rank: int) -> float | None:
        if self.liveness is None or rank == 0:
            return None
        try:
            return self.liveness(rank)
        except KeyError:  # a rank that announced no liveness port
            return None

    def all_ok(self) -> bool:
        return all(h.state in (OK, SLOW) for h in self.snapshot())
