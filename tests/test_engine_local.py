"""The real leader loop on one rank (no MPI) with the tiny model: continuous batching must not change
greedy output, whatever joins or leaves the batch around a request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from cluster.bus import ControlBus
from cluster.engine_client import EngineClient
from cluster.kvindex import BlockIndex, root_hash
from cluster.prefix import PrefixCache
from cluster.requests import Admission, FinishReason, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from rank.engine import Leader
from rank.executor import Executor
from rank.models import load_model
from rank.tokenizer import ChatTokenizer
from rank.transport import LocalTransport


def reference_greedy(model: object, prompt: list[int], n: int) -> list[int]:
    """Plain one-sequence generation: the model, a KV cache and argmax."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]  # type: ignore[operator]
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits, axis=-1).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)[:, -1]  # type: ignore[operator]
    return out


class LocalEngine:
    def __init__(
        self, model_dir: Path, max_batch: int, chunk: int, cache_blocks: int = 0, block: int = 8
    ) -> None:
        self.model, config = load_model(model_dir, None)
        self.tokenizer = ChatTokenizer(model_dir)
        self.client = EngineClient(max_waiting=100)
        self.executor = Executor(self.model, True, block_tokens=block)
        self.prefix = None
        if cache_blocks:
            index = BlockIndex(block, cache_blocks, self.executor.block_bytes)
            self.prefix = PrefixCache(index, root_hash("tiny", "tp1"))
        sched = Scheduler(
            SchedulerConfig(max_batch, chunk, 2048, idle_prefill_chunk=0),  # every prompt in `chunk` steps
            self.tokenizer.decode,
            [],
            prefix_cache=self.prefix,
        )
        self.leader = Leader(self.executor, sched, ControlBus(LocalTransport()), self.client)
        self.thread = threading.Thread(target=self.leader.run, daemon=True)
        self.thread.start()
        while self.client.state.value != "ready":
            time.sleep(0.01)

    def submit(self, rid: str, prompt: list[int], params: SamplingParams) -> list[RequestEvent]:
        events: list[RequestEvent] = []
        req = GenerationRequest(rid, tuple(prompt), params, sink=events.append)
        assert self.client.submit(req) is Admission.ACCEPTED
        return events

    def stop(self) -> None:
        self.leader.request_stop()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine(tiny_model: Path):  # type: ignore[no-untyped-def]
    eng = LocalEngine(tiny_model, max_batch=3, chunk=7)
    yield eng
    eng.stop()


def wait_all(streams: list[list[RequestEvent]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(s and s[-1].finished for s in streams):
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.01)


def test_batched_greedy_equals_single_sequence(engine: LocalEngine) -> None:
    prompts = [
        engine.tokenizer.encode(t) for t in ("Hello there", "a", "The quick brown fox jumps", "xyz " * 9)
    ]
    lengths = [12, 5, 20, 9]
    streams = []
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        streams.append(engine.submit(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n)))
        time.sleep(0.05 * i)  # staggered: later requests join a batch already decoding
    wait_all(streams)
    for p, n, events in zip(prompts, lengths, streams, strict=True):
        got = [t for e in events for t in e.token_ids]
        assert got == reference_greedy(engine.model, p, n)
        assert events[-1].finish_reason is FinishReason.LENGTH
        assert events[-1].completion_tokens == n


def test_same_seed_same_output_different_seed_differs(engine: LocalEngine) -> None:
    prompt = engine.tokenizer.encode("seeded sampling")
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    a = engine.submit("s1", prompt, params)
    b = engine.submit("s2", prompt, params)
    c = engine.submit("s3", prompt, SamplingParams(temperature=1.0, seed=99, max_tokens=16))
    wait_all([a, b, c])
    ta, tb, tc = ([t for e in s for t in e.token_ids] for s in (a, b, c))
    assert ta == tb
    assert ta != tc


def test_cancel_frees_the_slot(engine: LocalEngine) -> None:
    prompt = engine.tokenizer.encode("long running")
    events = engine.submit("long", prompt, SamplingParams(temperature=0.0, max_tokens=2000))
    while not events:
        time.sleep(0.01)
    engine.client.cancel("long")
    wait_all([events])
    assert events[-1].finish_reason is FinishReason.CANCELLED
    deadline = time.monotonic() + 5
    while engine.leader.executor.num_sequences and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.leader.executor.num_sequences == 0
    assert engine.leader.executor.batch is None


def greedy_tokens(events: list[RequestEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_prefix_cache_hit_equals_miss_and_saves_prefill(tiny_model: Path) -> None:
    eng = LocalEngine(tiny_model, max_batch=4, chunk=16, cache_blocks=64, block=8)
    try:
        doc = eng.tokenizer.encode("A shared system prompt, long enough to span several cache blocks. " * 2)
        params = SamplingParams(temperature=0.0, max_tokens=12)
        first = eng.submit("m1", doc, params)
        wait_all([first])
        computed = eng.executor.prefill_tokens
        again = eng.submit("m2", doc, params)
        wait_all([again])
        assert greedy_tokens(again) == greedy_tokens(first) == reference_greedy(eng.model, doc, 12)
        recomputed = eng.executor.prefill_tokens - computed
        assert (
            recomputed <= len(doc) % 8 + 8
        )  # only the last, partial block (and at least one token) recomputed
        other = doc + eng.tokenizer.encode(" and a different question?")
        third = eng.submit("m3", other, params)
        wait_all([third])
        assert greedy_tokens(third) == reference_greedy(eng.model, other, 12)
        stats = eng.prefix.index.stats  # type: ignore[union-attr]
        assert stats.hit_tokens >= 2 * (len(doc) // 8 - 1) * 8 and stats.blocks <= 64
    finally:
        eng.stop()


def test_burst_sharing_a_document_prefills_it_once(tiny_model: Path) -> None:
    eng = LocalEngine(tiny_model, max_batch=8, chunk=32, cache_blocks=256, block=8)
    try:
        doc = eng.tokenizer.encode("Document: " + "the orchard has apple trees and pear trees. " * 4)
        prompts = [doc + eng.tokenizer.encode(f" Question {i}?") for i in range(6)]
        streams = [
            eng.submit(f"b{i}", p, SamplingParams(temperature=0.0, max_tokens=4))
            for i, p in enumerate(prompts)
        ]
        wait_all(streams)
        for p, events in zip(prompts, streams, strict=True):
            assert greedy_tokens(events) == reference_greedy(eng.model, p, 4)
        # The document is computed once; each request adds its own tail (< 2 blocks past the shared part).
        assert eng.executor.prefill_tokens < len(doc) + 6 * 24
    finally:
        eng.stop()


def test_tiny_capacity_evicts_and_stays_correct(tiny_model: Path) -> None:
    eng = LocalEngine(tiny_model, max_batch=2, chunk=64, cache_blocks=3, block=8)
    try:
        for i in range(5):
            prompt = eng.tokenizer.encode(f"Prompt number {i}: " + "words " * 12)
            events = eng.submit(f"e{i}", prompt, SamplingParams(temperature=0.0, max_tokens=6))
            wait_all([events])
            assert greedy_tokens(events) == reference_greedy(eng.model, prompt, 6)
            index = eng.prefix.index  # type: ignore[union-attr]
            assert len(index) <= 3 and len(eng.executor.blocks) <= 3
        assert index.stats.evictions > 0
    finally:
        eng.stop()


def test_an_idle_engine_waits_for_a_burst_the_api_is_still_preparing(tiny_model: Path) -> None:
    """While the HTTP side reports requests on their way (api/prompts.py), an idle engine holds the first
    one back briefly so the burst starts in one step; a lone request starts after BURST_QUIET_S (10 ms:
    requests of one client's burst come in a few ms apart, before the HTTP side counts the next)."""
    eng = LocalEngine(tiny_model, max_batch=4, chunk=64)
    try:
        warm = eng.submit("warm", eng.tokenizer.encode("warm up"), SamplingParams(temperature=0, max_tokens=2))
        wait_all([warm])
        time.sleep(0.2)  # and its release step
        preparing = [0]
        eng.client.preparing = lambda: preparing[0]
        steps = eng.leader.steps
        preparing[0] = 2  # two more are being tokenized
        params = SamplingParams(temperature=0, max_tokens=2)
        first = eng.submit("b0", eng.tokenizer.encode("first of a burst"), params)
        time.sleep(0.02)
        assert eng.leader.steps == steps and not first  # held: its companions are on their way
        rest = [eng.submit(f"b{i}", eng.tokenizer.encode(f"burst {i}"), params) for i in (1, 2)]
        preparing[0] = 0
        wait_all([first, *rest])
        started = eng.leader.steps
        assert started - steps <= 3  # one prefill step for all three, then their decode steps
        preparing[0] = 5  # stuck high: the wait is bounded
        t0 = time.monotonic()
        late = eng.submit("lone", eng.tokenizer.encode("alone"), SamplingParams(temperature=0, max_tokens=1))
        wait_all([late], timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        eng.stop()
