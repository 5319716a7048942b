"""What changed between two snapshots that an operator should notice.

The admin API has no event stream; the dashboard derives events by comparing successive polls. Only
transitions are reported (a rank turning slow, a drain, a burst of errors), never steady state, so
the log stays readable under load.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.snapshot import JobSnapshot

RANK_LEVEL = {"ok": "success", "slow": "warning", "unresponsive": "error", "dead": "error"}


@dataclass(frozen=True, slots=True)
class Event:
    level: str  # "info", "success", "warning", "error"
    text: str


def diff(old: JobSnapshot | None, new: JobSnapshot) -> list[Event]:
    if old is None:
        return [
            Event(
                "success",
                f"connected: {new.model}, TP={new.tensor_parallel}, engine {new.engine}, "
                f"admission {new.admission}",
            )
        ]
    events: list[Event] = []
    if new.uptime_s + 1 < old.uptime_s:
        events.append(Event("warning", f"rank 0 restarted (uptime {new.uptime_s:.0f} s)"))
    if old.engine != new.engine:
        level = "error" if new.engine == "failed" else "warning" if new.engine != "ready" else "success"
        events.append(Event(level, f"engine {old.engine} → {new.engine}"))
    if old.admission != new.admission:
        level = "success" if new.admission == "open" else "warning"
        events.append(Event(level, f"admission {old.admission} → {new.admission}"))
    if new.failure and new.failure != old.failure:
        events.append(Event("error", f"failure: {new.failure}"))
    events += _ranks(old, new)
    for outcome, level in (("error", "error"), ("cancelled", "warning")):
        n = new.totals.requests.get(outcome, 0) - old.totals.requests.get(outcome, 0)
        if n > 0:
            events.append(
                Event(level, f"{n} request(s) ended: {outcome} (total {new.totals.requests[outcome]})")
            )
    before = {t.name: t for t in old.tiers}
    for t in new.tiers:
        b = before.get(t.name)
        if b is None:
            events.append(Event("info", f"KV tier {t.name} appeared"))
        elif b.enabled and not t.enabled:
            events.append(Event("error", f"KV tier {t.name} disabled: {t.disabled_reason or '?'}"))
        elif not b.enabled and t.enabled:
            events.append(Event("success", f"KV tier {t.name} enabled"))
        elif b.blocks > 0 and t.blocks == 0 and t.evictions > b.evictions:
            events.append(Event("warning", f"KV tier {t.name} emptied ({b.blocks} blocks dropped)"))
    return events


def _ranks(old: JobSnapshot, new: JobSnapshot) -> list[Event]:
    events = []
    before = {r.rank: r for r in old.ranks}
    for r in new.ranks:
        b = before.pop(r.rank, None)
        where = f"rank {r.rank} ({r.host}, pid {r.pid})"
        if b is None:
            events.append(Event(RANK_LEVEL.get(r.state, "info"), f"{where} joined: {r.state}"))
            continue
        if b.state != r.state:
            text = f"{where} {b.state} → {r.state}"
            if r.state == "slow":
                text += f" (step {r.step_ms:.1f} ms, median {r.median_step_ms:.1f} ms)"
            elif r.state == "unresponsive":
                text += f" (not heard from for {r.beat_age_s:.0f} s)"
            events.append(Event(RANK_LEVEL.get(r.state, "info"), text))
        if r.last_error and r.last_error != b.last_error:
            events.append(Event("error", f"{where}: {r.last_error}"))
    for r in before.values():
        events.append(Event("error", f"rank {r.rank} ({r.host}) left the snapshot"))
    return events
