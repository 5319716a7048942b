"""Engine statistics, gathered once per step in one place and read by /health (and later /metrics,
/admin/state and the TUI): nobody recomputes them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    state: str = "starting"
    running: int = 0  # sequences prefilling or decoding
    waiting: int = 0  # admitted to the queue, not started
    max_batch: int = 0
    sequences_on_ranks: int = 0  # sequences whose KV the ranks hold (rank 0's executor mirrors all)
    steps: int = 0
    generated_tokens: int = 0
    last_step_ms: float = 0.0

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.running

    def to_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "running": self.running,
            "waiting": self.waiting,
            "max_batch": self.max_batch,
            "free_slots": self.free_slots,
            "sequences_on_ranks": self.sequences_on_ranks,
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "last_step_ms": round(self.last_step_ms, 2),
        }


# Latency buckets in seconds (Prometheus convention: base units), from 5 ms to 5 minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative-bucket histogram written by the engine thread; readers take `snapshot()`."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self._counts[i] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative (upper bound, count) pairs ending with +Inf, the sum and the count."""
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), list(self._counts), strict=True):
            running += n
            out.append((bound, running))
        return out, self.sum, self.count


@dataclass(slots=True, frozen=True)
class RequestRow:
    """One line of the queue in /admin/state and the TUI."""

    request_id: str
    state: str
    age_s: float
    prompt_tokens: int
    generated_tokens: int
    tokens_per_s: float
    client: str

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class ServingStats:
    """Every serving statistic, in one place. Written only by the engine thread; read by /metrics,
    /admin/state and the TUI through their own snapshots."""

    HISTORY_SECONDS = 300

    def __init__(self) -> None:
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.outcomes: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._history: list[tuple[int, int]] = []  # (unix second, tokens generated in it)

    def record_tokens(self, now_unix: float, n: int) -> None:
        self.generated_tokens += n
        sec = int(now_unix)
        if self._history and self._history[-1][0] == sec:
            self._history[-1] = (sec, self._history[-1][1] + n)
        else:
            self._history.append((sec, n))
            cutoff = sec - self.HISTORY_SECONDS
            while self._history and self._history[0][0] < cutoff:
                self._history.pop(0)

    def record_outcome(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def throughput(self, now_unix: float, window: int = 10) -> float:
        sec = int(now_unix)
        return sum(n for s, n in self._history if sec - window <= s < sec) / window

    def history(self, now_unix: float, seconds: int = 180, step: int = 5) -> list[float]:
        """Output tokens/s averaged over `step`-second slots, oldest first, for the last `seconds`."""
        end = int(now_unix)
        slots = [0] * (seconds // step)
        for s, n in list(self._history):
            idx = (s - (end - seconds)) // step
            if 0 <= idx < len(slots):
                slots[idx] += n
        return [round(x / step, 2) for x in slots]
