"""How healthy the link to rank 0 is, as the operator should read it, and when to poll next.

Kept apart from the App so the backoff and the wording can be reasoned about (and tested) without a
terminal: `live`, `stale 4 s` (an answer is overdue), `reconnecting 3/6` (backing off), and after the
last step of the backoff `reconnecting 9, every 10 s` (it never gives up: a restarted job comes back).
"""

from __future__ import annotations

from dataclasses import dataclass

from tui.client import AdminError

MAX_RETRIES = 6
MAX_DELAY = 10.0


@dataclass(frozen=True, slots=True)
class Status:
    text: str
    level: str  # "success", "warning", "error" or "info": a theme colour, never a literal one
    detail: str = ""


class Link:
    def __init__(self, interval: float, max_retries: int = MAX_RETRIES, max_delay: float = MAX_DELAY) -> None:
        self.interval = interval
        self.max_retries = max_retries
        self.max_delay = max(max_delay, interval)
        self.failures = 0
        self.last_ok: float | None = None
        self.error: AdminError | None = None

    @property
    def up(self) -> bool:
        return self.error is None and self.last_ok is not None

    def stale_after(self) -> float:
        """An answer later than this is news: the server is slow or stuck, not just between polls."""
        return max(1.0, 3 * self.interval)

    def ok(self, now: float) -> str | None:
        """Record an answer; returns an event line when this ends an outage."""
        event = None
        if self.error is not None:
            gone = f" after {now - self.last_ok:.0f} s" if self.last_ok is not None else ""
            event = f"connection back{gone}"
        self.failures, self.error, self.last_ok = 0, None, now
        return event

    def failed(self, error: AdminError) -> tuple[float, str | None]:
        """Record a failed poll: the delay before the next one, and an event line when the failure is
        new (the first one, or a different message) so a dead server does not flood the log."""
        new = self.error is None or self.error.message != error.message
        self.failures += 1
        self.error = error
        delay = min(self.max_delay, self.interval * 2 ** (self.failures - 1))
        if self.failures > self.max_retries or error.kind == "auth":
            delay = self.max_delay  # a refused token does not fix itself quickly
        return delay, (error.message if new else None)

    def status(self, now: float) -> Status:
        stale = f"stale {now - self.last_ok:.0f} s" if self.last_ok is not None else ""
        if self.error is not None:
            if self.error.kind == "auth":
                text = "token refused"
            elif self.failures <= self.max_retries:
                text = f"reconnecting {self.failures}/{self.max_retries}"
            else:
                text = f"reconnecting {self.failures}, every {self.max_delay:.0f} s"
            if stale:
                text += f" · {stale}"
            return Status(text, "error", self.error.message)
        if self.last_ok is None:
            return Status("connecting…", "info")
        if now - self.last_ok > self.stale_after():
            return Status(stale, "warning", "the server is slow to answer")
        return Status("live", "success")
