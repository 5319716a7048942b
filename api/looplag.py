"""How late the HTTP event loop runs: every answer (a /health probe, each stream's next chunk) waits for
the loop, so its lag is the floor of every latency rank 0 serves.

A task sleeps `PERIOD` at a time and records how much later than asked it woke up: time the loop spent
on other callbacks, waiting for the GIL (held by the engine thread between MLX calls) or waiting for a
core (the OS). `/metrics` exports the worst lag of the last `WINDOW` seconds and a count of stalls over
100 ms since start, so an operator (and benchmarks/soak.py) can tell a slow loop from a slow network or
client.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

PERIOD = 0.05  # seconds between wake-ups
WINDOW = 10.0  # seconds the reported maximum covers
STALL = 0.1  # a lag this long or longer counts as a stall


class LoopLag:
    def __init__(self) -> None:
        self._recent: deque[tuple[float, float]] = deque()  # (monotonic time, lag) of the last WINDOW s
        self.stalls = 0  # lags of STALL or more since start
        self.worst = 0.0  # since start
        self._task: asyncio.Task[None] | None = None

    def record(self, lag: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._recent.append((now, lag))
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()
        self.worst = max(self.worst, lag)
        if lag >= STALL:
            self.stalls += 1

    def recent_max(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return max((lag for t, lag in self._recent if t >= now - WINDOW), default=0.0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(PERIOD)
            self.record(max(0.0, loop.time() - start - PERIOD))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="orchard-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
