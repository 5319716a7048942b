"""What this rank says about itself in its health report."""

from __future__ import annotations

import os
import resource
import sys

import mlx.core as mx

from cluster.messages import MAX_ERROR_CHARS, RankReport


def rss_bytes() -> int:
    if sys.platform == "linux":
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # macOS: bytes (peak; no cheap current)


class Reporter:
    def __init__(self, rank: int, host: str, interval: float) -> None:
        self.rank, self.host, self.pid = rank, host, os.getpid()
        self.interval = interval
        self.last_sent = 0.0
        self.last_error = ""

    def due(self, now: float) -> bool:
        return now - self.last_sent >= self.interval

    def build(
        self,
        step: int,
        step_ms: float,
        kv_blocks: int = 0,
        kv_bytes: int = 0,
        ssd_written: tuple[tuple[bytes, bool], ...] = (),
        ssd_dropped: tuple[bytes, ...] = (),
    ) -> RankReport:
        return RankReport(
            rank=self.rank,
            host=self.host,
            pid=self.pid,
            step=step,
            step_ms=step_ms,
            active_bytes=int(mx.get_active_memory()),
            peak_bytes=int(mx.get_peak_memory()),
            rss_bytes=rss_bytes(),
            kv_blocks=kv_blocks,
            kv_bytes=kv_bytes,
            last_error=self.last_error[:MAX_ERROR_CHARS],
            ssd_written=ssd_written,
            ssd_dropped=ssd_dropped,
        )
