"""Hit-rate history per KV tier, kept by the dashboard itself.

The server sends cumulative counters (tokens looked up, tokens found), so the hit rate it reports is
the average since start and barely moves. What an operator wants is the recent rate: hits over lookups
in each time slot, from the differences between successive polls. Slots match the server's
throughput history (5 s), so the two sparklines line up.
"""

from __future__ import annotations

from collections import deque

from cluster.snapshot import TierView


class HitHistory:
    def __init__(self, slot_s: float = 5.0, slots: int = 36) -> None:
        self.slot_s = slot_s
        self.slots = slots
        self._last: dict[str, tuple[int, int]] = {}
        self._buckets: dict[str, deque[list[int]]] = {}  # per tier: [slot index, hits, lookups]
        self._now_slot = 0

    def add(self, now: float, tiers: tuple[TierView, ...]) -> None:
        slot = int(now // self.slot_s)
        self._now_slot = slot
        for t in tiers:
            hits, queries = t.hit_tokens, t.query_tokens
            last_hits, last_queries = self._last.get(t.name, (hits, queries))
            self._last[t.name] = (hits, queries)
            dh, dq = hits - last_hits, queries - last_queries
            if dh < 0 or dq < 0:  # counters went back: rank 0 restarted
                dh, dq = 0, 0
            buckets = self._buckets.setdefault(t.name, deque(maxlen=self.slots))
            if buckets and buckets[-1][0] == slot:
                buckets[-1][1] += dh
                buckets[-1][2] += dq
            else:
                buckets.append([slot, dh, dq])

    def series(self, tier: str) -> list[float]:
        """Percent per slot, oldest first, one value per slot (0 where nothing was looked up)."""
        by_slot = {s: (h, q) for s, h, q in self._buckets.get(tier, ())}
        out = []
        for slot in range(self._now_slot - self.slots + 1, self._now_slot + 1):
            h, q = by_slot.get(slot, (0, 0))
            out.append(100.0 * h / q if q else 0.0)
        return out
