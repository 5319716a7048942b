"""The thread-safe door between the HTTP thread and the engine thread.

`submit` decides admission synchronously (so the API can answer 429/503 at once) and queues the request;
the engine thread drains the inbox between steps. Nothing here blocks the event loop for long: a lock
held for a few list operations.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cluster.requests import Admission, FinishReason, GenerationRequest, RequestEvent
from cluster.stats import EngineSnapshot, RequestRow


class EngineState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(slots=True, frozen=True)
class Cancel:
    request_id: str
    reason: str = "cancelled"


@dataclass(slots=True, frozen=True)
class ClearCache:
    tier: str


Command = GenerationRequest | Cancel | ClearCache


class EngineClient:
    def __init__(self, max_waiting: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_waiting = max_waiting
        self.clock = clock  # the engine's: arrival is stamped here, not when the engine next looks
        self._lock = threading.Lock()
        self._inbox: deque[Command] = deque()
        self._wake = threading.Event()
        self._waiting = 0  # submitted, not yet started or dropped by the engine
        self._live: dict[
            str, GenerationRequest
        ] = {}  # submitted and not finished: failed together on a fault
        self.state = EngineState.STARTING
        self.failure: str | None = None
        self.snapshot = EngineSnapshot()  # replaced whole by the engine thread: readers never see a torn one
        self.queue_rows: tuple[RequestRow, ...] = ()  # likewise, refreshed a few times a second
        self.admission_paused = False  # an operator's drain: 503 for new requests, the job keeps running

    # -- HTTP side -------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Admission:
        with self._lock:
            if self.state is EngineState.DRAINING or (
                self.admission_paused and self.state is EngineState.READY
            ):
                return Admission.DRAINING
            if self.state is not EngineState.READY:
                return Admission.UNAVAILABLE
            if self._waiting >= self.max_waiting:
                return Admission.QUEUE_FULL
            self._waiting += 1
            if request.arrival == 0.0:
                # A request that arrives mid-step waits for the step to end before the engine sees it:
                # that wait is part of its time to first token.
                request.arrival = self.clock()
            self._inbox.append(request)
            self._live[request.request_id] = request
        self._wake.set()
        return Admission.ACCEPTED

    def clear_cache(self, tier: str) -> None:
        with self._lock:
            self._inbox.append(ClearCache(tier))
        self._wake.set()

    def is_live(self, request_id: str) -> bool:
        return request_id in self._live

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        with self._lock:
            self._inbox.append(Cancel(request_id, reason))
        self._wake.set()

    @property
    def waiting(self) -> int:
        return self._waiting

    # -- engine side -----------------------------------------------------------------------------
    def take(self) -> list[Command]:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._wake.clear()
        return items

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)

    def finished(self, request_id: str) -> None:
        with self._lock:
            self._live.pop(request_id, None)

    @property
    def live(self) -> int:
        return len(self._live)

    def fail_live(self, message: str) -> int:
        """Answer every unfinished request with an error (any thread; used when the engine is stuck)."""
        with self._lock:
            victims = list(self._live.values())
            self._live.clear()
        for req in victims:
            try:
                req.sink(
                    RequestEvent(
                        req.request_id,
                        finish_reason=FinishReason.ERROR,
                        error=message,
                        error_type="unavailable",
                    )
                )
            except Exception:  # a closed event loop: nobody is listening any more
                pass
        return len(victims)

    def left_queue(self, n: int = 1) -> None:
        """The engine started (or dropped) n waiting requests."""
        with self._lock:
            self._waiting -= n

    def set_state(self, state: EngineState, failure: str | None = None) -> None:
        with self._lock:
            if self.state in (EngineState.FAILED, EngineState.STOPPED):
                return
            self.state = state
            if failure:
                self.failure = failure
        self._wake.set()
