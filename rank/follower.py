"""A follower's step loop: execute what rank 0 broadcasts, report health, never decide anything."""

from __future__ import annotations

import logging
import time

from cluster.bus import ControlBus
from cluster.messages import Shutdown, SsdLoadResult, StepPlan
from rank.executor import Executor
from rank.pulse import Activity
from rank.report import Reporter

log = logging.getLogger("orchard.engine")


def follow(executor: Executor, bus: ControlBus, reporter: Reporter, activity: Activity | None = None) -> int:
    """A follower's whole life: execute what rank 0 broadcasts until it says stop, and report health.
    `activity` tells rank 0's liveness pings what this loop is doing."""
    step, step_ms = 0, 0.0
    activity = activity or Activity()
    while True:
        activity.set("waiting for rank 0's next message")
        message = bus.receive()
        if isinstance(message, Shutdown):
            bus.close()
            if message.exit_code:
                log.error("rank 0 stopped the job: %s", message.reason)
            return message.exit_code
        if isinstance(message, StepPlan):
            start = time.monotonic()
            activity.set(f"executing step {message.step}")
            out = executor.execute(message)
            step, step_ms = message.step, (time.monotonic() - start) * 1000
            if message.ssd_load:  # rank 0 waits for every rank's read result before using the blocks
                bus.reply(SsdLoadResult(out.ssd_failed))
        now = time.monotonic()
        written: tuple[tuple[bytes, bool], ...] = ()
        dropped: tuple[bytes, ...] = ()
        if executor.ssd is not None:
            outcomes = executor.ssd.take_outcomes()
            written, dropped = tuple(outcomes.written), tuple(outcomes.dropped)
        if written or dropped or reporter.due(now):
            reporter.last_sent = now
            kv_blocks = len(executor.blocks)
            kv_bytes = kv_blocks * executor.block_bytes
            bus.report(reporter.build(step, step_ms, kv_blocks, kv_bytes, written, dropped))
