"""The thread-safe door between the HTTP thread and the engine thread.

`submit` decides admission synchronously (so the API can answer 429/503 at once) and queues the request;
the engine thread takes the inbox between steps. The door keeps no request state of its own: the inbox
holds what the engine has not taken yet, and everything taken lives in the scheduler's `requests`, which
`attach` lets the door read (membership and counts only). Nothing here blocks the event loop for long: a
lock held for a few list operations.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.adapters import AdapterRegistry
from cluster.requests import Admission, FinishReason, GenerationRequest, RequestEvent

if TYPE_CHECKING:
    from cluster.scheduler import Scheduler
    from cluster.snapshot import JobSnapshot


class EngineState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    # Stopping the job (SIGTERM): in-flight requests may finish, new ones get 503. The wire value is the
    # one /health has always shown. Not to be confused with an operator's admission pause (/admin/drain).
    SHUTTING_DOWN = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(slots=True, frozen=True)
class Cancel:
    request_id: str


@dataclass(slots=True, frozen=True)
class ClearCache:
    tier: str


Command = GenerationRequest | Cancel | ClearCache


class EngineClient:
    def __init__(
        self,
        max_waiting: int,
        clock: Callable[[], float] = time.monotonic,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self.max_waiting = max_waiting
        # The LoRA adapters served (None: none can be). A request's use of one is counted here, when it
        # is accepted, so an unload is refused while requests the engine has not taken yet use it.
        self.adapters = adapters
        self.clock = clock  # the engine's: arrival is stamped here, not when the engine next looks
        self._lock = threading.Lock()
        self._inbox: deque[Command] = deque()
        self._inbox_ids: set[str] = set()  # requests in the inbox
        self._scheduler: Scheduler | None = None
        self._wake = threading.Event()
        self.state = EngineState.STARTING
        self.failure: str | None = None
        self.snapshot: JobSnapshot | None = None  # the engine's published view, replaced whole (never torn)
        self.admission_paused = False  # an operator's pause: 503 for new requests, the job keeps running
        # Requests the HTTP side is still reading or preparing (counted by api/front.py, set by api/app.py):
        # an idle engine waits briefly for them so that a burst starts in one prefill (rank/engine.py).
        self.preparing: Callable[[], int] = lambda: 0

    def attach(self, scheduler: Scheduler) -> None:
        """The engine's scheduler, whose queue and requests the door counts as its own backlog."""
        self._scheduler = scheduler

    # -- HTTP side -------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Admission:
        with self._lock:
            if self.state is EngineState.SHUTTING_DOWN:
                return Admission.SHUTTING_DOWN
            if self.state is not EngineState.READY:
                return Admission.UNAVAILABLE
            if self.admission_paused:
                return Admission.PAUSED
            if self.waiting >= self.max_waiting:
                return Admission.QUEUE_FULL
            if request.adapter_name:
                slot = self.adapters.acquire(request.adapter_name) if self.adapters is not None else None
                if slot is None:
                    return Admission.UNKNOWN_MODEL
                request.adapter = slot
            if request.arrival == 0.0:
                # A request that arrives mid-step waits for the step to end before the engine sees it:
                # that wait is part of its time to first token.
                request.arrival = self.clock()
            self._inbox.append(request)
            self._inbox_ids.add(request.request_id)
        self._wake.set()
        return Admission.ACCEPTED

    def wake(self) -> None:
        """The engine has work that is not in the inbox (an adapter to load or unload): step now."""
        self._wake.set()

    def clear_cache(self, tier: str) -> None:
        self._command(ClearCache(tier))

    def cancel(self, request_id: str) -> None:
        self._command(Cancel(request_id))

    def is_live(self, request_id: str) -> bool:
        """Submitted and not finished (queued here or known to the scheduler)."""
        with self._lock:
            return request_id in self._inbox_ids or (
                self._scheduler is not None and request_id in self._scheduler.requests
            )

    @property
    def waiting(self) -> int:
        """Requests not started yet: in the inbox or in the scheduler's queue."""
        return len(self._inbox_ids) + (self._scheduler.num_waiting if self._scheduler is not None else 0)

    # -- engine side -----------------------------------------------------------------------------
    @contextmanager
    def taking(self) -> Iterator[list[Command]]:
        """The inbox's commands, in order. The door stays locked until the block ends, so a request the
        engine is handing to its scheduler is never in neither place (an operator's cancel would 404)."""
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._wake.clear()
            yield items
            self._inbox_ids.clear()

    def has_commands(self) -> bool:
        """Whether anything waits in the inbox (a request, a cancel, an operator's command): the engine
        then plans its next step after taking it, not ahead (rank/engine.py's chained steps)."""
        return bool(self._inbox)

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)

    def fail_live(self, message: str) -> int:
        """Answer every unfinished request with an error (any thread; used when the engine is stuck)."""
        with self._lock:
            victims: list[Any] = [c for c in self._inbox if isinstance(c, GenerationRequest)]
            if self.adapters is not None:
                for sub in victims:
                    self.adapters.release(sub.adapter)
            self._inbox.clear()
            self._inbox_ids.clear()
            if self._scheduler is not None:
                victims += list(self._scheduler.requests.values())
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

    def publish(self, snapshot: JobSnapshot) -> None:
        """The engine's newest view of the job; readers take whichever one is current, whole."""
        self.snapshot = snapshot

    def set_state(self, state: EngineState, failure: str | None = None) -> None:
        with self._lock:
            if self.state in (EngineState.FAILED, EngineState.STOPPED):
                return
            self.state = state
            if failure:
                self.failure = failure
        self._wake.set()

    def _command(self, command: Cancel | ClearCache) -> None:
        with self._lock:
            self._inbox.append(command)
        self._wake.set()
