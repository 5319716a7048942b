"""Live quantized KV (`--kv-live-from`, rank.livequant): running caches quantized once they hold N positions.

Compared with mlx-lm's own generation with `kv_bits`/`quantized_kv_start` (its `maybe_quantize_kv_cache`),
token for token, for rows that cross N while decoding, prompts longer than N (chunked across it), mixed
batches of both kinds, and prefix-cache hits on either side of N (a hit must give the miss's tokens).

Real parts: the tiny random-weight model (rank.models.make_tiny_model), the executor and scheduler in the
leader loop on one rank, mlx-lm's generate_step; a TP=2 mpirun job over HTTP (marked cluster)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from cluster.bus import ControlBus
from cluster.engine_client import EngineClient
from cluster.kvindex import BlockIndex, root_hash
from cluster.memory import KvCost, KvMemory
from cluster.prefix import PrefixCache
from cluster.requests import Admission, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from cluster.speculation import SpecConfig, SpecController
from rank import cpu_kernels
from rank.engine import Leader
from rank.executor import Executor
from rank.kvquant import KvFormat
from rank.livequant import LiveBatch, LiveQuant
from rank.models import load_model
from rank.ragged import QuantizedRaggedKVCache
from rank.transport import LocalTransport

START = 40  # positions before a sequence's cache is quantized, in these tests
GROUP = 32  # the tiny model's head dimension is 32: the format fits groups of 32


def mlx_lm_greedy(
    model: object, prompt: list[int], n: int, bits: int | None = 8, start: int = START
) -> list[tuple[int, float]]:
    """mlx-lm's generation with a quantized KV cache from `start` positions on (`bits` None: never), each
    token with its logprob: its prompt chunks end at multiples of `start` (prefill_step_size), so it
    quantizes at exactly `start`, as Orchard does."""
    steps = generate_step(
        mx.array(prompt),
        model,  # type: ignore[arg-type]
        max_tokens=n,
        kv_bits=bits,
        kv_group_size=GROUP,
        quantized_kv_start=start,
        prefill_step_size=start,
    )
    return [(int(t), float(lp[int(t)])) for t, lp in steps]


def same_as_mlx_lm(model: object, prompt: list[int], got: list[tuple[int, float]], bits: int = 8, start: int = START) -> None:
    """`got` has mlx-lm's quantized run's tokens and logprobs (to float rounding), and where the sequence
    reached `start` in time to matter, those logprobs differ from the unquantized run's: the check could
    not pass were the cache never quantized (the tiny model's greedy tokens do not change at 8 or 4 bits)."""
    want = mlx_lm_greedy(model, prompt, len(got), bits, start)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)) < 1e-5
    if len(prompt) + len(got) > start + 2:
        plain = mlx_lm_greedy(model, prompt, len(got), None)
        assert max(abs(a - b) for (_, a), (_, b) in zip(plain, want, strict=True)) > 1e-4


class Engine:
    """The leader loop on one rank, live quantization from `start`, optionally a prefix cache."""

    def __init__(
        self,
        model_dir: Path,
        start: int = START,
        bits: int = 8,
        blocks: int = 0,
        chunk: int = 16,
        batch: int = 4,
        proposer: object | None = None,
    ) -> None:
        self.model, _ = load_model(model_dir, None)
        cpu_kernels.install(self.model, "off")  # the packed-step seam, MLX's attention (as mlx-lm's run)
        self.client = EngineClient(max_waiting=100)
        self.executor = Executor(
            self.model,
            True,
            block_tokens=8,
            kv_format=KvFormat(bits, 64),
            live_from=start,
            speculative=proposer is not None,
        )
        assert self.executor.live == LiveQuant(start, bits, GROUP)
        self.prefix = None
        if blocks:
            index = BlockIndex(8, blocks, self.executor.block_bytes)
            self.prefix = PrefixCache(index, root_hash("tiny", f"tp1|{self.executor.kv.name}"))
        spec = None
        if proposer is not None:  # every draft verified (a free verification), as tests/test_speculation.py
            spec = SpecController(SpecConfig("ngram", 4, base_ms=1e9, per_position_ms=1e-9), proposer)
        sched = Scheduler(
            SchedulerConfig(batch, chunk, 2048, idle_prefill_chunk=0, live_from=start),
            lambda ids: "",
            [],
            prefix_cache=self.prefix,
            spec=spec,
        )
        self.leader = Leader(self.executor, sched, ControlBus(LocalTransport()), self.client)
        self.thread = threading.Thread(target=self.leader.run, daemon=True)
        self.thread.start()
        while self.client.state.value != "ready":
            time.sleep(0.01)

    def submit(self, rid: str, prompt: list[int], n: int) -> list[RequestEvent]:
        events: list[RequestEvent] = []
        params = SamplingParams(temperature=0.0, max_tokens=n, logprobs=0)
        req = GenerationRequest(rid, tuple(prompt), params, sink=events.append)
        assert self.client.submit(req) is Admission.ACCEPTED
        return events

    def run(self, rid: str, prompt: list[int], n: int) -> list[tuple[int, float]]:
        return tokens(wait(self.submit(rid, prompt, n)))

    def stop(self) -> None:
        self.leader.request_stop()
        self.thread.join(timeout=10)


def wait(events: list[RequestEvent], timeout: float = 120) -> list[RequestEvent]:
    deadline = time.monotonic() + timeout
    while not (events and events[-1].finished):
        assert time.monotonic() < deadline, "request did not finish"
        time.sleep(0.01)
    return events


def tokens(events: list[RequestEvent]) -> list[tuple[int, float]]:
    """Each token with its logprob."""
    return [(lp.token_id, lp.logprob) for e in events for lp in e.logprobs]


def prompt_of(n: int, seed: int) -> list[int]:
    return [(seed * 31 + i * 7 + (i * i) % 13) % 250 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model: Path):  # type: ignore[no-untyped-def]
    eng = Engine(tiny_model)
    yield eng
    eng.stop()


def test_rows_crossing_the_length_while_decoding_equal_mlx_lm(engine: Engine) -> None:
    """Prompts shorter than START decode past it, several at once and staggered (rows of both kinds in
    one batch while some have crossed and others not)."""
    prompts = [prompt_of(n, s) for s, n in enumerate((10, 25, 33, 39))]
    streams = []
    for i, p in enumerate(prompts):
        streams.append(engine.submit(f"cross{i}", p, 30))
        time.sleep(0.05)
    for p, events in zip(prompts, streams, strict=True):
        same_as_mlx_lm(engine.model, p, tokens(wait(events)))


def test_prompts_longer_than_the_length_equal_mlx_lm(engine: Engine) -> None:
    """Prompts chunked across START (chunks of 16 end at 40, not 48), beside a short one."""
    prompts = [prompt_of(n, 10 + s) for s, n in enumerate((41, 40, 75, 12))]
    streams = [engine.submit(f"long{i}", p, 12) for i, p in enumerate(prompts)]
    for p, events in zip(prompts, streams, strict=True):
        same_as_mlx_lm(engine.model, p, tokens(wait(events)))


def test_4_bit_live_cache_equals_mlx_lm(tiny_model: Path) -> None:
    eng = Engine(tiny_model, start=24, bits=4)
    try:
        for i, n in enumerate((8, 30)):
            p = prompt_of(n, 40 + i)
            same_as_mlx_lm(eng.model, p, eng.run(f"q4-{i}", p, 24), bits=4, start=24)
    finally:
        eng.stop()


def test_hits_past_the_length_give_the_miss_tokens_bit_for_bit(tiny_model: Path) -> None:
    """A prefix hit of 72 positions (past START) loads the quantized numbers the miss held: the same tokens
    and logprobs, bit for bit; one of 32 (below it) loads dequantized blocks, and quantizes at START like
    the miss."""
    eng = Engine(tiny_model, blocks=256)
    try:
        doc = prompt_of(80, 77)
        miss = eng.run("miss", doc, 16)
        computed = eng.executor.prefill_tokens
        hit = eng.run("hit", doc, 16)
        assert eng.executor.prefill_tokens - computed <= 8  # loaded from blocks, not recomputed
        assert hit == miss  # logprobs too: bit for bit
        same_as_mlx_lm(eng.model, doc, miss)
        short = prompt_of(36, 78)
        short_miss, short_hit = eng.run("short-miss", short, 20), eng.run("short-hit", short, 20)
        # below START a hit computes from dequantized blocks, as without live quantization: same tokens,
        # logprobs within the blocks' rounding (docs/kv-quantization.md)
        assert [t for t, _ in short_hit] == [t for t, _ in short_miss]
        assert all(len(parts) == 6 for parts in eng.executor.blocks.values())
    finally:
        eng.stop()


@pytest.mark.parametrize("wrong", [False, True])
def test_speculation_verifies_no_draft_across_the_length(tiny_model: Path, wrong: bool) -> None:
    """Drafts of the true continuation (all accepted) or wrong ones (all rolled back): a row below START
    verifies none past it, so every position is computed as without drafts: mlx-lm's tokens."""
    from tests.test_speculation import Oracle

    class Counting(Oracle):
        drafted = 0

        def propose(self, req, k: int) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
            out = super().propose(req, k)
            Counting.drafted += len(out)
            return out

    prompts = [prompt_of(n, 90 + s) for s, n in enumerate((12, 30, 37, 52))]
    truth: dict[tuple[int, ...], list[int]] = {}
    eng = Engine(tiny_model, proposer=Counting(truth, wrong))
    try:
        truth.update({tuple(p): [t for t, _ in mlx_lm_greedy(eng.model, p, 28)] + [0] * 16 for p in prompts})
        streams = [eng.submit(f"spec{i}", p, 28) for i, p in enumerate(prompts)]
        for p, events in zip(prompts, streams, strict=True):
            got = tokens(wait(events))
            want = mlx_lm_greedy(eng.model, p, 28)
            assert [t for t, _ in got] == [t for t, _ in want]
            assert max(abs(a - b) for (_, a), (_, b) in zip(got, want, strict=True)) < 1e-4
        assert eng.executor.speculates and eng.executor.live is not None and Counting.drafted > 20
    finally:
        eng.stop()


def test_live_batch_keeps_rows_in_order_through_moves_filters_and_joins() -> None:
    """LiveBatch's bookkeeping against the rows it was given: every operation keeps each row's numbers."""
    mx.random.seed(0)

    def single(n: int, quant: bool):  # type: ignore[no-untyped-def]
        from mlx_lm.models.cache import KVCache

        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, n, 32)), mx.random.normal((1, 2, n, 32)))
        return c.to_quantized(32, 8) if quant else c

    caches = [single(n, q) for n, q in ((5, False), (50, True), (7, False), (44, True))]
    batch = LiveBatch.merge(caches)
    assert batch.lengths == [5, 50, 7, 44] and batch.flags == [False, True, False, True]
    batch.filter([3, 0, 2, 1])
    assert batch.lengths == [44, 5, 7, 50]
    batch.advance([1, 1, 1, 1])
    with pytest.raises(ValueError):
        batch.set_length(1, 40)  # a row is rolled back, never forward
    assert batch.lengths[1] == 6 and batch.quantize_rows(LiveQuant(6, 8, 32)) == 2
    assert batch.flags == [True, True, True, True] and batch.plain is None
    assert batch.lengths == [45, 6, 8, 51]
    row = batch.quant.extract(1)  # type: ignore[union-attr]
    want = caches[0].to_quantized(32, 8)
    for got, ref in zip(row.keys, want.keys, strict=True):
        assert mx.array_equal(got[:, :, :5], ref[:, :, :5]).item()
    batch.filter([2, 0])
    assert batch.lengths == [8, 45]
    assert isinstance(batch.quant, QuantizedRaggedKVCache)


def test_memory_charges_quantized_positions_at_their_bytes() -> None:
    """Positions past --kv-live-from cost the quantized bytes (8 bits, groups of 64, fp32 model: 72 of
    256 bytes); a row is charged the larger of its plain phase (with the moment it holds both forms) and
    its quantized one; rows that never get there stay plain, padded only to their own group's longest."""
    plain = KvCost(token_bytes=256, step=0)
    live = KvCost(token_bytes=256, step=0, live_from=1000, quant_token_bytes=72)
    budget = 4_000_000
    a, b = KvMemory(plain, budget, 100_000), KvMemory(live, budget, 100_000)
    assert a.room(0) == 15_625
    assert b.room(0) == budget // 72  # quantized at its longest: more than its plain phase and the copy
    assert b.need(10, 100) == 110 * 256  # never reaches the length: as without
    assert b.need(1000, 100) == 1000 * 256 + 1000 * 72  # both forms for a moment at 1000
    # the short row stays plain, padded to 1000 while the long one is plain too; the long one costs the
    # larger of its two phases
    assert b.reserved([5000, 10]) == 1000 * 256 + 5000 * 72
    assert b.reserved([500, 10]) == 2 * 500 * 256
    assert b.reserved([5000, 2000]) == 2 * 5000 * 72
    assert "at most 55555 positions" in (b.refusal(60_000, 10) or "")
    assert live.batch([5000, 10, 20]) == 5000 * 72 + 2 * 20 * 256  # each form padded to its own longest


# -- over HTTP: a TP=2 job against TP=1 ---------------------------------------------------------------
SERVED = ["z" * 300, "The cat sat on the mat. " * 3, "abc abc abc", "def f(x): return x\n" * 4]


def served(url: str, prompt: str, n: int) -> list[tuple[int, float]]:
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.completions.create(
        model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    return [(int(t.split(":")[1]), float(p)) for t, p in zip(lp.tokens, lp.token_logprobs, strict=True)]


@pytest.mark.cluster
def test_tp2_job_with_live_quantization_equals_tp1(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Concurrent requests over HTTP, prompts on both sides of --kv-live-from 40 and decoding across it,
    the CPU kernels as configured by default: TP=2 gives TP=1's tokens, and its logprobs differ from a job
    without live quantization (it did quantize). /metrics and /admin/state say how many caches are
    quantized."""
    import httpx

    from tests.jobs import tiny_args

    flags = ("--kv-live-from", "40", "--prefill-chunk", "16", "--admin-token", "live-admin")
    tp2 = job_factory.start(2, tiny_args(tiny_model, *flags), "live-tp2")
    tp1 = job_factory.start(1, tiny_args(tiny_model, *flags), "live-tp1")
    off = job_factory.start(1, tiny_args(tiny_model, "--prefill-chunk", "16"), "live-off")

    def together(url: str) -> list[list[tuple[int, float]]]:
        with cf.ThreadPoolExecutor(len(SERVED)) as pool:
            return [f.result() for f in [pool.submit(served, url, p, 40) for p in SERVED]]

    a, b, plain = together(tp2.url), together(tp1.url), together(off.url)
    assert [[t for t, _ in r] for r in a] == [[t for t, _ in r] for r in b]
    for x, y in zip(a, b, strict=True):
        assert max(abs(p - q) for (_, p), (_, q) in zip(x, y, strict=True)) < 1e-3
    assert max(abs(p - q) for x, y in zip(b, plain, strict=True) for (_, p), (_, q) in zip(x, y, strict=True)) > 1e-4
    state = httpx.get(tp2.url + "/admin/state", headers={"Authorization": "Bearer live-admin"}, timeout=30).json()
    assert state["memory"]["live_from"] == 40 and state["memory"]["quantized"] == 0  # all finished
    text = httpx.get(tp2.url + "/metrics", headers={"Authorization": "Bearer live-admin"}, timeout=30).text
    assert "orchard_kv_live_quantized_sequences 0.0" in text
    for job in (tp2, tp1, off):
        job.stop()
