"""vLLM's extensions end to end on the real leader loop (one rank, no MPI) with the embedded SmolLM2:
prompt logprobs equal mlx-lm's own forward pass, n > 1 shares the prompt's blocks, the stopping
extensions act on real tokens. (The scheduler's side of each, without a model: tests/test_scheduler.py.)"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cluster.bus import ControlBus
from cluster.engine_client import EngineClient
from cluster.kvindex import BlockIndex, root_hash
from cluster.prefix import PrefixCache
from cluster.requests import Admission, FinishReason, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from rank import cpu_kernels
from rank.engine import Leader
from rank.executor import Executor
from rank.leader_setup import _keeping_special
from rank.models import load_model
from rank.tokenizer import ChatTokenizer
from rank.transport import LocalTransport

BLOCK = 16


@pytest.fixture(scope="module")
def smollm(cache_dir: Path) -> Path:
    from rank.models import resolve_model

    return resolve_model(None, cache_dir, print)


class LocalEngine:
    """The leader loop wired as rank.leader_setup wires it (decode variant, prompt-logprob sink)."""

    def __init__(self, model_dir: Path, chunk: int = 32, cache_blocks: int = 0, max_batch: int = 4) -> None:
        self.model, _ = load_model(model_dir, None)
        cpu_kernels.install(self.model)  # as rank.startup does: the packed-step seam (and the CPU kernels)
        self.tokenizer = ChatTokenizer(model_dir)
        self.client = EngineClient(max_waiting=100)
        self.executor = Executor(self.model, True, block_tokens=BLOCK)
        prefix = None
        if cache_blocks:
            index = BlockIndex(BLOCK, cache_blocks, self.executor.block_bytes)
            prefix = PrefixCache(index, root_hash("smollm", "tp1"))
        self.scheduler = Scheduler(
            SchedulerConfig(max_batch, chunk, 2048, idle_prefill_chunk=0),
            self.tokenizer.decode,
            self.tokenizer.eos_token_ids,
            prefix_cache=prefix,
            decode_special=_keeping_special(self.tokenizer),
        )
        self.leader = Leader(self.executor, self.scheduler, ControlBus(LocalTransport()), self.client)
        self.thread = threading.Thread(target=self.leader.run, daemon=True)
        self.thread.start()
        while self.client.state.value != "ready":
            time.sleep(0.01)

    def submit(self, rid: str, prompt: list[int], params: SamplingParams, fork_of: str = "") -> list[RequestEvent]:
        events: list[RequestEvent] = []
        req = GenerationRequest(rid, tuple(prompt), params, sink=events.append, fork_of=fork_of)
        assert self.client.submit(req) is Admission.ACCEPTED
        return events

    def submit_n(self, rid: str, prompt: list[int], params: SamplingParams, n: int) -> list[list[RequestEvent]]:
        """What the route does for n > 1: "<rid>", then "<rid>-1".. forked from it."""
        return [self.submit(rid if i == 0 else f"{rid}-{i}", prompt, params, rid if i else "") for i in range(n)]

    def stop(self) -> None:
        self.leader.request_stop()
        self.thread.join(timeout=10)


def wait_all(streams: list[list[RequestEvent]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(s and s[-1].finished for s in streams):
        assert time.monotonic() < deadline, "requests did not finish"
        time.sleep(0.01)


def tokens(events: list[RequestEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def reference_prompt_logprobs(model: object, prompt: list[int]) -> mx.array:
    """mlx-lm's own forward pass over the whole prompt, log-softmaxed: row p predicts token p + 1."""
    logits = model(mx.array(prompt)[None])[0].astype(mx.float32)  # type: ignore[operator]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def smol(smollm: Path):  # type: ignore[no-untyped-def]
    """The embedded model, for what needs a real one (a chat that ends, special tokens)."""
    eng = LocalEngine(smollm, chunk=32, cache_blocks=256)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def engine(tiny_model: Path):  # type: ignore[no-untyped-def]
    """The tiny random model: the same code paths at a fraction of the cost."""
    eng = LocalEngine(tiny_model, chunk=32, cache_blocks=256)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    """Several chunks, several blocks and a partial last block."""
    return [(11 * i + 5) % 200 + 1 for i in range(75)]


def check_prompt_logprobs(model: object, prompt: list[int], first: RequestEvent, k: int) -> None:
    got = first.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    ref = np.array(reference_prompt_logprobs(model, prompt))
    for p in range(1, len(prompt)):
        entry, row = got[p], ref[p - 1]
        assert entry is not None and entry.token_id == prompt[p]
        assert abs(entry.logprob - row[prompt[p]]) < 1e-4, p
        assert [t for t, _ in entry.top] == np.argsort(-row, kind="stable")[:k].tolist(), p
        assert all(abs(lp - row[t]) < 1e-4 for t, lp in entry.top), p


def test_prompt_logprobs_equal_mlx_lm_across_chunks(smol: LocalEngine) -> None:
    text = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid, and"
    prompt = smol.tokenizer.encode(text * 2)
    assert 32 < len(prompt) < 64  # two chunks
    events = smol.submit("pl", prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3))
    wait_all([events])
    check_prompt_logprobs(smol.model, prompt, events[0], 3)
    assert all(not e.prompt_logprobs for e in events[1:])  # the first event only


def test_prompt_logprobs_computed_despite_a_cached_prefix_and_beside_other_rows(
    engine: LocalEngine, prompt: list[int]
) -> None:
    """The prompt is in the prefix cache now: a request with prompt logprobs computes it anyway, packed
    in one step with another request's chunks and decode rows."""
    warm = engine.submit("warm", prompt, SamplingParams(temperature=0.0, max_tokens=1))
    wait_all([warm])
    other = engine.submit("other", prompt[:20], SamplingParams(temperature=0.0, max_tokens=30))
    time.sleep(0.05)
    before, packed = engine.executor.prefill_tokens, engine.executor.packed_passes
    events = engine.submit("pl2", prompt, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0))
    wait_all([events, other])
    assert engine.executor.prefill_tokens - before >= len(prompt)
    assert engine.executor.packed_passes > packed  # its chunks shared passes with the other's rows
    check_prompt_logprobs(engine.model, prompt, events[0], 0)
    # a one-token prompt: nothing precedes its token
    one = engine.submit("pl3", prompt[:1], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
    wait_all([one])
    assert one[0].prompt_logprobs == (None,)


def test_n_greedy_siblings_share_the_prompt_and_agree(engine: LocalEngine, prompt: list[int]) -> None:
    fresh = prompt[::-1]  # not in the cache yet
    before = engine.executor.prefill_tokens
    streams = engine.submit_n("g", fresh, SamplingParams(temperature=0.0, max_tokens=8), 3)
    wait_all(streams)
    outs = [tokens(s) for s in streams]
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 8
    # the first prefills the prompt; each sibling at most its last (partial or kept) block
    assert engine.executor.prefill_tokens - before <= len(fresh) + 2 * BLOCK


def test_n_seeded_siblings_differ_and_reproduce(engine: LocalEngine, prompt: list[int]) -> None:
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=6)
    first = engine.submit_n("s", prompt, params, 3)
    wait_all(first)
    again = engine.submit_n("t", prompt, params, 3)
    wait_all(again)
    a, b = [tokens(s) for s in first], [tokens(s) for s in again]
    assert a == b
    assert len({tuple(x) for x in a}) == 3
    alone = engine.submit("u", prompt, params)  # the first choice is the request's own seed
    wait_all([alone])
    assert tokens(alone) == a[0]


def test_n_siblings_with_prompt_logprobs_copy_the_first(engine: LocalEngine, prompt: list[int]) -> None:
    fresh = prompt[5:]
    streams = engine.submit_n("e", fresh, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1), 3)
    wait_all(streams)
    firsts = [s[0].prompt_logprobs for s in streams]
    assert firsts[0] == firsts[1] == firsts[2]
    check_prompt_logprobs(engine.model, fresh, streams[0][0], 1)


def test_cancelling_the_first_does_not_strand_siblings(engine: LocalEngine, prompt: list[int]) -> None:
    fresh = [t + 1 for t in prompt]
    streams = engine.submit_n("c", fresh, SamplingParams(temperature=0.0, max_tokens=4), 3)
    engine.client.cancel("c")
    wait_all(streams)
    assert streams[0][-1].finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH)
    assert all(s[-1].finish_reason is FinishReason.LENGTH for s in streams[1:])


def test_ignore_eos_min_tokens_and_stop_token_ids(smol: LocalEngine) -> None:
    chat = smol.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    eos = sorted(smol.tokenizer.eos_token_ids)
    plain = smol.submit("eos", chat, SamplingParams(temperature=0.0, max_tokens=200))
    wait_all([plain])
    n = len(tokens(plain))
    assert plain[-1].finish_reason is FinishReason.STOP and tokens(plain)[-1] in eos and n < 200
    ignored = smol.submit("ign", chat, SamplingParams(temperature=0.0, max_tokens=n + 5, ignore_eos=True))
    wait_all([ignored])
    assert ignored[-1].finish_reason is FinishReason.LENGTH and len(tokens(ignored)) == n + 5
    assert tokens(ignored)[:n] == tokens(plain)
    # the greedy answer's second token as a stop id: finishes there, its text not in the output
    ids = tokens(plain)
    stop_id = ids[1]
    by_id = smol.submit("sid", chat, SamplingParams(temperature=0.0, max_tokens=50, stop_token_ids=(stop_id,)))
    wait_all([by_id])
    assert by_id[-1].finish_reason is FinishReason.STOP and tokens(by_id) == ids[:2]
    assert "".join(e.text for e in by_id) == smol.tokenizer.decode(ids[:1])


def test_skip_special_tokens_false_keeps_them(smol: LocalEngine) -> None:
    chat = smol.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    skipped = smol.submit("sk", chat, params)
    kept = smol.submit("kp", chat, replace(params, skip_special_tokens=False))
    wait_all([skipped, kept])
    assert tokens(skipped) == tokens(kept)
    text_kept, text_skipped = ("".join(e.text for e in s) for s in (kept, skipped))
    assert "<|im_end|>" in text_kept and "<|im_end|>" not in text_skipped
    assert text_kept.replace("<|im_end|>", "").replace("<|im_start|>", "") == text_skipped


@pytest.mark.cluster
def test_prompt_logprobs_at_tp2_equal_mlx_lm(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """A 2-rank job (vocabulary-parallel head, prompt chunks of 8 over the bus) answers completions'
    echo+logprobs with mlx-lm's own log-softmax of the unsharded model."""
    import httpx
    from mlx_lm.utils import load_model as mlx_load

    from tests.jobs import tiny_args

    job = job_factory.start(
        2, tiny_args(tiny_model, "--prefill-chunk", "8", "--idle-prefill-chunk", "0"), "ext-tp2"
    )
    prompt = [(7 * i + 3) % 200 + 1 for i in range(30)]
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
        "return_tokens_as_token_ids": True,  # byte tokens: several decode to the same text
    }
    r = httpx.post(job.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]
    model, _ = mlx_load(tiny_model)
    ref = np.array(reference_prompt_logprobs(model, prompt))
    assert got["token_logprobs"][0] is None
    want = [float(ref[p - 1, prompt[p]]) for p in range(1, len(prompt))]
    np.testing.assert_allclose(got["token_logprobs"][1 : len(prompt)], want, atol=1e-4, rtol=0)
    assert got["tokens"][: len(prompt)] == [f"token_id:{t}" for t in prompt]
    for p in range(1, len(prompt)):
        top = {int(k.split(":")[1]): v for k, v in got["top_logprobs"][p].items()}
        assert len(top) == 2
        for t, v in top.items():
            assert abs(v - ref[p - 1, t]) < 1e-4
        assert min(top.values()) >= np.sort(ref[p - 1])[-2] - 1e-4  # they are the two most likely
