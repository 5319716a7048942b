"""The step watchdog: a thread that never touches MPI or MLX and ends the job when a step hangs.

A rank that hangs (SIGSTOP, a stuck GPU, a cable pulled) leaves every other rank waiting inside an MPI
collective, which cannot be interrupted. Rank 0's engine thread marks when it enters a step; if a step
takes longer than `timeout`, this thread answers every in-flight request with an error, marks the engine
failed (/health/ready turns 503), logs what it knows, and exits the process non-zero, which makes mpirun
end the whole job. The trade-off of the timeout: too short and a slow but healthy step (a long prefill
chunk on a slow machine) kills the job; too long and clients wait that long on a hung rank.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from cluster.engine_client import EngineClient, EngineState
from rank.launch import tell_launcher

log = logging.getLogger("orchard.watchdog")


class StepWatchdog:
    def __init__(
        self,
        client: EngineClient,
        timeout: float,
        describe: Callable[[], str],
        exit_process: Callable[[int], None] = os._exit,
        grace: float = 1.0,
        hung: Callable[[float], list[str]] | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.describe = describe  # what is known about the ranks, for the message
        self.exit_process = exit_process
        self.grace = grace  # time for HTTP responses to flush before the process ends
        self.hung = hung  # verdicts ("rank 1 (...) hung") given how long the step has taken so far
        self._since: float | None = None
        self._label = ""
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)

    def start(self) -> None:
        if self.timeout > 0 or self.hung is not None:
            self._thread.start()

    def stop(self) -> None:
        """Join the thread: a live thread at exit keeps MPI from finalizing (mpirun calls that abnormal)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def enter(self, label: str) -> None:
        self._label = label
        self._since = time.monotonic()

    def leave(self) -> None:
        self._since = None

    def _run(self) -> None:
        while not self._stopped.wait(min(0.25, self.timeout / 4) if self.timeout > 0 else 0.25):
            since = self._since
            if since is None:
                continue
            elapsed = time.monotonic() - since
            hung = self.hung(elapsed) if self.hung is not None else []
            if hung:
                message = (
                    f"step watchdog: {', '.join(hung)}: {self._label} has waited {elapsed:.1f} s "
                    f"({self.describe()}). Failing in-flight requests and stopping the job."
                )
            elif self.timeout > 0 and elapsed >= self.timeout:
                message = (
                    f"step watchdog: {self._label} has not completed in {self.timeout:g} s; a rank is hung or "
                    f"dead ({self.describe()}). Failing in-flight requests and stopping the job."
                )
            else:
                continue
            log.error(message)
            self.client.set_state(EngineState.FAILED, message)
            n = self.client.fail_live(message)
            log.error("answered %d in-flight request(s) with an error", n)
            tell_launcher("ORCHARD_STATUS_FILE", "1")  # the launcher's record of rank 0's exit code
            time.sleep(self.grace)
            logging.shutdown()
            self.exit_process(1)
            return
