"""Memory admission (cluster.memory): the running sequences' KV stays under the per-rank budget, with the
decode batch's padding counted; what can never fit is refused with what it needs and what the job has.

Real parts: the scheduler, and the leader loop on one rank with the tiny random-weight model, whose
executor's caches are measured (the arrays' bytes) after every step."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.bus import ControlBus
from cluster.config import ServingConfig
from cluster.engine_client import EngineClient
from cluster.memory import GIB, KvCost, KvMemory, default_budget
from cluster.requests import Admission, FinishReason, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import SampledToken, Scheduler, SchedulerConfig
from rank.engine import Leader
from rank.executor import Executor
from rank.models import load_model
from rank.transport import LocalTransport

CONTEXT = 512


def test_refusal_says_what_it_needs_and_what_the_job_has() -> None:
    mem = KvMemory(KvCost(token_bytes=1 << 20), budget_bytes=2 * GIB, context_length=32768)
    assert mem.refusal(1000, 500) is None  # 1,500 positions and 256 of growth room: 1.71 GiB
    why = mem.refusal(30000, 100)
    assert why is not None and "29.64 GiB" in why and "2.00 GiB per rank" in why and "at most 1792" in why
    config = ServingConfig("m", 32768, memory=mem)
    assert config.kv_refusal(30000, 100) == why and config.kv_refusal(10, 10) is None
    assert ServingConfig("m", 32768).kv_refusal(10**6, 10**6) is None  # no budget, nothing refused
    assert (
        config.kv_room(1000) == 792 and config.kv_room(1792) == 0 and ServingConfig("m", 1).kv_room(5) is None
    )
    assert mem.refusal(1000, config.kv_room(1000) or 0) is None and mem.refusal(1000, 793) is not None


def test_default_budget_leaves_weights_tier_and_margin() -> None:
    budget, how = default_budget(64 * GIB, 8 * GIB, 4 * GIB, ranks_on_host=2)
    assert budget == 32 * GIB - 8 * GIB - 4 * GIB - int(6.4 * GIB) and "margin" in how
    small, note = default_budget(4 * GIB, 3 * GIB, 1 * GIB)
    assert small == 4 * GIB // 10  # nothing left after weights, tier and margin: a tenth, and a warning
    assert "set --kv-budget" in note


def _submit(sched: Scheduler, rid: str, prompt: int, max_tokens: int) -> None:
    sched.add(
        GenerationRequest(rid, (7,) * prompt, SamplingParams(max_tokens=max_tokens), sink=lambda e: None)
    )


def test_the_padded_batch_decides_admission() -> None:
    """One long sequence beside short ones: each short row costs as much as the long one in the batch,
    so only as many join as the budget holds at that length; the others wait, first come first served,
    and start as rows finish. The budget is never passed."""
    # three rows of the long one's final 500 positions (and 256 of growth room each)
    mem = KvMemory(KvCost(token_bytes=1000), budget_bytes=3 * 756 * 1000, context_length=CONTEXT)
    sched = Scheduler(SchedulerConfig(8, 64, CONTEXT, idle_prefill_chunk=0), lambda ids: "", [], memory=mem)
    _submit(sched, "long", 480, 20)
    for i in range(7):
        _submit(sched, f"short{i}", 20, 8)
    done: set[str] = set()
    most = 0
    for _ in range(400):
        step = sched.schedule()
        view = mem.view()
        assert view.reserved_bytes <= view.budget_bytes and view.kv_bytes <= view.budget_bytes
        most = max(most, sched.num_running)
        events = sched.update(step, [SampledToken(5) for _ in step.rows])
        done.update(e.request_id for _, e in events if e.finished)
        if not sched.has_work():
            break
    assert len(done) == 8 and most == 3  # the long one and two short ones at a time
    assert mem.view().delayed >= 5


def test_a_request_that_can_never_fit_fails_at_once_and_the_queue_goes_on() -> None:
    """The API answers such a request with a 400 (`ServingConfig.kv_refusal`); one that reaches the
    queue anyway is failed with the same message, and never holds up the requests behind it."""
    small = KvMemory(KvCost(token_bytes=1000), budget_bytes=600 * 1000, context_length=CONTEXT)
    sched = Scheduler(SchedulerConfig(8, 64, CONTEXT, idle_prefill_chunk=0), lambda ids: "", [], memory=small)
    _submit(sched, "huge", 480, 20)  # 500 positions + 256 of growth room: over 600
    _submit(sched, "fits", 40, 8)
    step = sched.schedule()
    events = sched.update(step, [SampledToken(5) for _ in step.rows])
    refused = [e for _, e in events if e.request_id == "huge"]
    assert len(refused) == 1 and refused[0].finish_reason is FinishReason.ERROR
    assert refused[0].error_type == "invalid_request_error" and "per rank (--kv-budget)" in refused[0].error
    assert [r.request_id for r in sched.queue()] == ["fits"]


class _Measured(Executor):
    """The real executor; after every step, the bytes of every KV array it holds (the prefilling
    sequences' caches and the decode batch's)."""

    peak_kv = 0

    def execute(self, plan: Any) -> Any:
        out = super().execute(plan)
        caches = [c for seq in self.prefilling.values() for c in seq] + list(self.batch or [])
        held = sum(c.keys.nbytes + c.values.nbytes for c in caches if getattr(c, "keys", None) is not None)
        self.peak_kv = max(self.peak_kv, held)
        return out


def _run(
    model_dir: Path, budget_rows: int, prompts: list[tuple[int, int]]
) -> tuple[int, int, list[RequestEvent]]:
    model, _ = load_model(model_dir, None)
    executor = _Measured(model, True, block_tokens=8)
    assert executor.caps.geometry is not None
    cost = KvCost(executor.caps.geometry.bytes(1))
    budget = budget_rows * cost.bytes(CONTEXT)
    mem = KvMemory(cost, budget, CONTEXT)
    sched = Scheduler(SchedulerConfig(8, 256, CONTEXT, idle_prefill_chunk=0), lambda ids: "", [], memory=mem)
    client = EngineClient(max_waiting=100)
    leader = Leader(executor, sched, ControlBus(LocalTransport()), client)
    thread = threading.Thread(target=leader.run, daemon=True)
    thread.start()
    finals: list[RequestEvent] = []
    try:
        while client.state.value != "ready":
            time.sleep(0.01)
        for i, (n, m) in enumerate(prompts):
            prompt = tuple(3 + (i * 31 + j) % 250 for j in range(n))
            params = SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
            req = GenerationRequest(f"p{i}", prompt, params, sink=lambda e: e.finished and finals.append(e))
            assert client.submit(req) is Admission.ACCEPTED
        deadline = time.monotonic() + 240
        while len(finals) < len(prompts):
            assert time.monotonic() < deadline, f"{len(finals)} of {len(prompts)} finished"
            time.sleep(0.05)
    finally:
        leader.request_stop()
        thread.join(timeout=10)
    return executor.peak_kv, budget, finals


@pytest.mark.parametrize(
    "prompts",
    [
        pytest.param([(470, 30)] + [(24, 12)] * 7, id="one-near-context-plus-seven-short"),
        pytest.param([(440 + i, 40) for i in range(20)], id="twenty-near-context"),
    ],
)
def test_the_executor_stays_under_the_budget_and_everything_completes(tiny_model: Path, prompts: Any) -> None:
    peak, budget, finals = _run(tiny_model, 3, prompts)
    assert len(finals) == len(prompts)
    assert all(e.finish_reason is FinishReason.LENGTH for e in finals)
    assert 0 < peak <= budget, (peak, budget)
