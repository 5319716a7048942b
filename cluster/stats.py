"""Engine statistics, gathered once per step in one place and read by /health (and later /metrics,
/admin/state and the TUI): nobody recomputes them."""

from __future__ import annotations

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
