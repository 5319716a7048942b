"""The event-loop lag monitor (api/looplag.py): a loop blocked by a callback shows as a stall."""

from __future__ import annotations

import asyncio
import time

from api.looplag import STALL, WINDOW, LoopLag


def test_window_and_stalls() -> None:
    lag = LoopLag()
    lag.record(0.02, now=100.0)
    lag.record(0.3, now=101.0)
    lag.record(0.01, now=102.0)
    assert lag.recent_max(now=102.0) == 0.3 and lag.stalls == 1 and lag.worst == 0.3
    lag.record(0.001, now=101.0 + WINDOW + 0.5)
    assert lag.recent_max(now=101.0 + WINDOW + 0.5) == 0.01  # the 0.3 left the window
    assert lag.stalls == 1 and lag.worst == 0.3


def test_a_blocked_loop_is_measured() -> None:
    async def main() -> LoopLag:
        lag = LoopLag()
        lag.start()
        await asyncio.sleep(0.12)
        time.sleep(STALL + 0.05)  # a callback that holds the loop
        await asyncio.sleep(0.12)
        await lag.stop()
        return lag

    lag = asyncio.run(main())
    assert lag.stalls >= 1 and lag.worst >= STALL
