"""Pure health and accounting logic with a fake clock."""

from __future__ import annotations

from cluster.health import DEAD, OK, SLOW, UNRESPONSIVE, HealthTable, RankReport
from cluster.ledger import RequestLedger
from cluster.requests import FinishReason, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from cluster.stats import Histogram, ServingStats


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rank_states() -> None:
    clock = Clock()
    table = HealthTable(clock, timeout=5.0)
    for r in range(3):
        table.register(r, f"h{r}", 100 + r)
    for step in range(10):
        for r in range(3):
            table.update(RankReport(r, f"h{r}", 100 + r, step=step, step_ms=20.0))
    table.update(RankReport(1, "h1", 101, step=11, step_ms=400.0))  # far above its median
    table.mark_dead(2, "rank 2 did not receive step 12")
    states = {h.rank: h.state for h in table.snapshot()}
    assert states == {0: OK, 1: SLOW, 2: DEAD}
    clock.t += 6
    assert table.snapshot()[0].state == UNRESPONSIVE
    assert not table.all_ok()


def test_ledger_latencies_and_rows() -> None:
    stats = ServingStats()
    ledger = RequestLedger(stats)
    sched = Scheduler(SchedulerConfig(), decode=lambda ids: "", eos_token_ids=())
    req = sched.add(
        GenerationRequest("r1", (1, 2, 3), SamplingParams(), sink=lambda e: None, client="10.0.0.1", arrival=1.0)
    )
    ledger.arrived(req)
    ledger.on_event(req, RequestEvent("r1", token_ids=(5,)), now=1.5, now_unix=1000.0)
    ledger.on_event(req, RequestEvent("r1", token_ids=(6,)), now=1.6, now_unix=1000.1)
    req.output += [5, 6]  # what the scheduler appended for those events
    rows = ledger.rows(sched.queue(), now=2.0)
    assert rows[0].prompt_tokens == 3 and rows[0].generated_tokens == 2 and rows[0].client == "10.0.0.1"
    assert rows[0].state == "waiting" and rows[0].tokens_per_s == 4.0  # 2 tokens since the first at 1.5
    done = RequestEvent(
        "r1", token_ids=(7,), finish_reason=FinishReason.LENGTH, prompt_tokens=3, completion_tokens=3
    )
    ledger.on_event(req, done, now=1.7, now_unix=1000.2)
    sched.cancel("r1")  # the scheduler forgets it once it finished
    assert stats.ttft.count == 1 and abs(stats.ttft.sum - 0.5) < 1e-9
    assert stats.itl.count == 2 and stats.e2e.count == 1
    assert stats.outcomes == {"length": 1} and stats.generated_tokens == 3
    assert ledger.rows(sched.queue(), now=2.0) == ()


def test_histogram_is_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    buckets, total, count = h.snapshot()
    assert buckets == [(0.1, 1), (1.0, 3), (float("inf"), 4)] and count == 4 and total == 6.05


def test_arrival_is_stamped_at_submission() -> None:
    """A request submitted while the engine is inside a long step waits for it: that wait counts toward
    its time to first token, so the client stamps arrival, not the engine when it next looks."""
    from cluster.engine_client import EngineClient, EngineState

    clock = Clock()
    client = EngineClient(max_waiting=4, clock=clock)
    client.state = EngineState.READY
    req = GenerationRequest("r1", (1, 2), SamplingParams(), sink=lambda e: None)
    client.submit(req)
    assert req.arrival == 100.0
    clock.t += 3  # the engine takes it after a 3 s step
    with client.taking() as commands:
        assert [c.arrival for c in commands] == [100.0]  # type: ignore[union-attr]
