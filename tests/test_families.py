"""Every mlx-lm family Orchard serves, at TP=1, against mlx-lm's own forward pass.

For each family of tests/families.py (a tiny random-weight model built from mlx-lm's own classes):
- the executor's head is the model's own (softcaps, logit scaling, tied or untied as the checkpoint says);
- greedy tokens and their logprobs served by the real `Scheduler` and `Executor` (the leader's step:
  schedule, execute, sample, update) equal mlx-lm's own `model(inputs, cache)` with its own
  `make_prompt_cache`, one sequence at a time: for a sequence served alone, and for several sequences of
  different lengths served concurrently (joining the decode batch at different steps, prompt chunks
  packed with decode rows where the model packs, one of them hitting the prefix cache where the model
  keeps prefix blocks);
- what steps aside for the model (batched decode, prefix blocks, packed steps) is what we expect;
- an upstream bug we work around (gemma2's batched decode mask) fails without the workaround.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from cluster.kvindex import BlockIndex, root_hash
from cluster.prefix import PrefixCache
from cluster.requests import GenerationRequest, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from rank import cpu_kernels, mlx_patch
from rank.executor import Executor
from rank.models import load_model
from rank.sampler import Sampler
from tests.families import FAMILIES, VOCAB, build

BLOCK = 8  # prefix-cache block tokens
NEW_TOKENS = 6
LOGPROB_ATOL = 2e-4

# (batched decode, prefix blocks, packed steps) each family gets, and why not where not
EXPECTED_CAPS = {
    "llama": (True, True, True),
    "mistral": (True, True, True),  # declares a 4096 window its layers never apply: still packs
    "llama_sliding": (True, False, False),  # rotating windows
    "qwen2": (True, True, True),  # declares a window with use_sliding_window false: still packs
    "qwen3": (True, True, True),
    "qwen3_moe": (True, True, True),
    "glm4_moe": (True, True, True),
    "gemma2": (True, True, False),  # its own attention, not mlx-lm's function
    "gemma3": (True, False, False),  # sliding windows from sliding_window_pattern
    "phi3": (True, True, True),
    "olmo2": (True, True, True),
    "granite": (True, True, True),
    "starcoder2": (True, True, True),
    "smollm3": (True, True, True),
    "glm4": (True, True, True),
    "mixtral": (True, True, True),
    "minimax": (True, True, True),
    "gpt_oss": (True, False, False),  # sliding windows and attention sinks
    "deepseek_v3": (True, True, False),  # MLA works on the cached latent before attending
    "ministral3": (True, True, False),  # its attention scaling reads the cache offset itself
    "qwen3_5": (True, False, False),  # linear-attention state (ArraysCache)
}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Builds a family's model once per session, on first use."""
    root = tmp_path_factory.mktemp("families")

    @functools.cache
    def built(family: str) -> Path:
        return build(family, root / family, seed=1)

    return built


def test_every_family_is_covered() -> None:
    assert set(EXPECTED_CAPS) == set(FAMILIES)


@dataclass(slots=True)
class Served:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def reference(model: Any, prompt: tuple[int, ...], n: int) -> Served:
    """mlx-lm alone: its own cache, its own forward, argmax, log-softmax."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[0, -1]
    out = Served()
    for _ in range(n):
        logits = logits.astype(mx.float32)
        token = int(np.array(mx.argmax(logits)))
        out.tokens.append(token)
        out.logprobs.append(float((logits[token] - mx.logsumexp(logits)).item()))
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return out


class Engine:
    """The leader's step loop (rank.engine.Leader._step) in the test's thread, steps counted, so
    requests arrive at chosen steps."""

    def __init__(self, executor: Executor, chunk: int, prefix: bool, spec: Any = None) -> None:
        self.executor = executor
        cache = None
        if prefix:
            index = BlockIndex(BLOCK, 64, executor.block_bytes)
            cache = PrefixCache(index, root_hash("family", "tp1"))
        # while nothing decodes, chunks of 3 blocks (one store of several blocks); then short chunks
        config = SchedulerConfig(
            max_batch=4, prefill_chunk=chunk, context_length=1024, idle_prefill_chunk=3 * BLOCK
        )
        self.scheduler = Scheduler(config, lambda ids: "", [], prefix_cache=cache, spec=spec)
        self.sampler = Sampler()
        self.steps = 0

    def serve(self, prompts: dict[str, tuple[int, ...]], arrivals: dict[str, int]) -> dict[str, Served]:
        served = {rid: Served() for rid in prompts}
        done: set[str] = set()
        start = self.steps
        while len(done) < len(prompts):
            for rid, at in arrivals.items():
                if at == self.steps - start:
                    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0)
                    self.scheduler.add(GenerationRequest(rid, prompts[rid], params, sink=lambda e: None))
            step = self.scheduler.schedule()
            out = self.executor.execute(step.plan)
            sampled = ()
            if out.row_ids:
                assert out.row_ids == [
                    r.seq_id for r, w in zip(step.rows, step.widths, strict=True) for _ in range(w)
                ]
                assert out.logits is not None
                if step.drafts:  # speculation: runs of accepted drafts and one more token
                    sampled = self.sampler.sample_runs(step.rows, out.logits, step.drafts)  # type: ignore[assignment]
                else:
                    sampled = self.sampler.sample(step.rows, out.logits)  # type: ignore[assignment]
            for req, event in self.scheduler.update(step, sampled):
                served[req.request_id].tokens += event.token_ids
                served[req.request_id].logprobs += [lp.logprob for lp in event.logprobs]
                if event.finished:
                    done.add(req.request_id)
            self.steps += 1
            assert self.steps - start < 500, "requests did not finish"
        self.executor.execute(self.scheduler.schedule().plan)  # the finished sequences' release
        assert self.executor.num_sequences == 0
        return served


def _prompt(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(3, 259, n))


SHARED = _prompt(100, 3 * BLOCK)  # three full blocks: the prefix-cache hit
PROMPTS = {
    "warm": SHARED + _prompt(1, 5),  # served alone first: stores the shared blocks
    "hit": SHARED + _prompt(2, 7),
    "short": _prompt(3, 5),
    "long": _prompt(4, 40),
    "mid": _prompt(5, 13),
}
ARRIVALS = {"long": 0, "short": 0, "mid": 2, "hit": 3}  # steps of the concurrent phase


def _assert_same(got: Served, want: Served, what: str) -> None:
    assert got.tokens == want.tokens, what
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=LOGPROB_ATOL, err_msg=what)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_served_equals_mlx_lm(family: str, family_dir) -> None:  # type: ignore[no-untyped-def]
    model, _ = load_model(family_dir(family), None)
    mlx_patch.restore(model)
    mlx_patch.undo_fixes(model)
    want = {rid: reference(model, p, NEW_TOKENS) for rid, p in PROMPTS.items()}
    assert len({tuple(w.tokens) for w in want.values()}) > 1, "a degenerate model tests nothing"

    cpu_kernels.install(model)  # as rank.startup does: the packing seam (and the CPU kernels on a CPU)
    try:
        executor = Executor(model, want_logits=True, block_tokens=BLOCK)
        caps = executor.caps
        assert (caps.batch_decode, caps.prefix_blocks, caps.packable) == EXPECTED_CAPS[family], caps.reason
        assert executor._packs == caps.packable
        engine = Engine(executor, chunk=6, prefix=caps.prefix_blocks)
        alone = engine.serve({"warm": PROMPTS["warm"]}, {"warm": 0})
        _assert_same(alone["warm"], want["warm"], f"{family}: a sequence served alone")
        before = executor.prefill_tokens
        concurrent = {rid: PROMPTS[rid] for rid in ARRIVALS}
        got = engine.serve(concurrent, ARRIVALS)
        for rid in concurrent:
            _assert_same(got[rid], want[rid], f"{family}: {rid} served with others")
        computed = executor.prefill_tokens - before
        total = sum(len(p) for p in concurrent.values())
        assert computed == (total - len(SHARED) if caps.prefix_blocks else total)
        assert bool(executor.blocks) == caps.prefix_blocks
        assert (executor.packed_passes > 0) == caps.packable
    finally:
        cpu_kernels.install(model, "off")
        mlx_patch.restore(model)


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_decode_without_batching_equals_mlx_lm(family: str, family_dir) -> None:  # type: ignore[no-untyped-def]
    """The fallback for caches that cannot be batched (none of mlx-lm 0.32's families needs it): each
    decode row in a pass of its own, with its own caches."""
    model, _ = load_model(family_dir(family), None)
    want = {rid: reference(model, PROMPTS[rid], NEW_TOKENS) for rid in ARRIVALS}
    executor = Executor(model, want_logits=True, block_tokens=BLOCK)
    executor.caps = dataclasses.replace(
        executor.caps, batch_decode=False, packable=False, prefix_blocks=False
    )
    executor._packs = False
    got = Engine(executor, chunk=6, prefix=False).serve({rid: PROMPTS[rid] for rid in ARRIVALS}, ARRIVALS)
    for rid in ARRIVALS:
        _assert_same(got[rid], want[rid], f"{family}: {rid} decoded one by one")
    assert executor.batch is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_is_the_models_own(family: str, family_dir) -> None:  # type: ignore[no-untyped-def]
    """Hidden states through the executor's head are the model's logits exactly, tied or not as the
    checkpoint says; vocabulary slices (the TP head) put together are the same logits."""
    path = family_dir(family)
    model, _ = load_model(path, None)
    executor = Executor(model, want_logits=True)
    head = executor.head
    weights = mx.load(str(path / "model.safetensors"))
    assert isinstance(weights, dict)
    assert head.tied == (not any(k.endswith("lm_head.weight") for k in weights))
    tokens = mx.array([PROMPTS["long"]])
    want = model(tokens)[0]
    hidden = executor.inner(tokens)[0]
    np.testing.assert_array_equal(np.array(head(hidden)), np.array(want))
    vocab = head.vocab_rows
    cut = vocab // 2 + 3
    parts = [head.vocab_slice(0, cut)(hidden), head.vocab_slice(cut, vocab)(hidden)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=-1)), np.array(want), atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "granite", "glm4", "gpt_oss", "deepseek_v3"])
def test_a_plain_tied_projection_would_be_wrong(family: str, family_dir) -> None:  # type: ignore[no-untyped-def]
    """What the head replaced: the inner model then the embedding as the projection (the default when a
    config has no `tie_word_embeddings`) loses gemma2's softcap and granite's scaling, and ignores the
    `lm_head` of glm4, gpt_oss and deepseek_v3."""
    model, _ = load_model(family_dir(family), None)
    executor = Executor(model, want_logits=True)
    hidden = executor.inner(mx.array([PROMPTS["mid"]]))[0]
    plain = executor.inner.embed_tokens.as_linear(hidden)
    assert not np.allclose(np.array(plain), np.array(executor.head(hidden)), atol=1e-2)


def test_gemma2_batched_decode_needs_the_workaround(family_dir) -> None:  # type: ignore[no-untyped-def]
    """mlx-lm 0.32's gemma2 adds a (B, 1, L, S) batch mask to (B, kv_heads, repeats, L, S) scores: three
    sequences fail to broadcast against two KV heads, and two sequences broadcast silently onto the KV
    heads (each sequence's padding masks the other's keys). `mlx_patch.fix_upstream` gives the mask the
    repeats axis; the batch then decodes as each sequence alone."""
    model, _ = load_model(family_dir("gemma2"), None)
    assert model.layers[0].self_attn.n_kv_heads == 2 and model.layers[0].self_attn.repeats == 2
    prompts = [PROMPTS["short"], PROMPTS["mid"], PROMPTS["long"]]
    tokens = [7, 9, 11]

    def batched_decode(n: int) -> mx.array:
        caches = []
        for p in prompts[:n]:
            cache = make_prompt_cache(model)
            model(mx.array(p)[None], cache=cache)
            caches.append(cache)
        batch = [layer[0].merge(list(layer)) for layer in zip(*caches, strict=True)]
        return model(mx.array(tokens[:n])[:, None], cache=batch)[:, -1]

    alone = []
    for p, token in zip(prompts, tokens, strict=True):
        cache = make_prompt_cache(model)
        model(mx.array(p)[None], cache=cache)
        alone.append(np.array(model(mx.array([[token]]), cache=cache)[0, -1]))

    mlx_patch.undo_fixes(model)
    with pytest.raises(ValueError, match="broadcast"):
        mx.eval(batched_decode(3))
    assert not np.allclose(np.array(batched_decode(2)), np.stack(alone[:2]), atol=1e-3)
    try:
        assert mlx_patch.fix_upstream(model) == ("gemma2 batched mask",)
        for n in (2, 3):
            np.testing.assert_allclose(np.array(batched_decode(n)), np.stack(alone[:n]), atol=1e-4)
    finally:
        mlx_patch.undo_fixes(model)


def test_mla_blocks_go_to_disk_and_back(family_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """DeepSeek's cache keeps keys (latent) and values (RoPE key) of different widths; a block is stored
    as two arrays of one shape, which the SSD tier writes and reads as they are."""
    from rank.ssd import SsdBlockStore

    model, _ = load_model(family_dir("deepseek_v3"), None)
    geometry = Executor(model, want_logits=True).caps.geometry
    assert geometry is not None and geometry.key_dim != geometry.value_dim
    rng = np.random.default_rng(0)
    keys = mx.array(
        rng.standard_normal((geometry.layers, geometry.heads, BLOCK, geometry.key_dim)), mx.float32
    )
    values = mx.array(
        rng.standard_normal((geometry.layers, geometry.heads, BLOCK, geometry.value_dim)), mx.float32
    )
    first, second = geometry.pack(keys, values)
    assert first.shape == second.shape and first.nbytes + second.nbytes == geometry.bytes(BLOCK)
    store = SsdBlockStore(tmp_path / "rank0")
    try:
        assert store.save(b"\x01" * 16, first, second)
        store.close()
        store = SsdBlockStore(tmp_path / "rank0")
        loaded = store.load(b"\x01" * 16)
    finally:
        store.close()
    assert loaded is not None
    k, v = geometry.unpack(*loaded)
    np.testing.assert_array_equal(np.array(k), np.array(keys))
    np.testing.assert_array_equal(np.array(v), np.array(values))


class _Oracle:
    """Drafts mlx-lm's own continuation, every third draft wrong: rows accept different numbers."""

    def __init__(self, want: dict[tuple[int, ...], list[int]]) -> None:
        self.want = want

    def propose(self, req: Any, k: int) -> tuple[int, ...]:
        truth = self.want[req.prompt_tokens][len(req.output) : len(req.output) + k]
        return tuple(t if (len(req.output) + i) % 3 else (t + 1) % VOCAB for i, t in enumerate(truth))

    def forget(self, req: Any) -> None:
        pass


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_speculation_equals_mlx_lm(family: str, family_dir) -> None:  # type: ignore[no-untyped-def]
    """Speculative decoding (#16) on every family whose caches can roll rows back: drafts verified in the
    batch (ragged caches, rank/ragged.py) give mlx-lm's own tokens; other families decode without it."""
    from cluster.speculation import SpecConfig, SpecController

    model, _ = load_model(family_dir(family), None)
    mlx_patch.restore(model)
    mlx_patch.undo_fixes(model)
    want = {p: reference(model, p, NEW_TOKENS + 8) for p in PROMPTS.values()}
    cpu_kernels.install(model)
    try:
        executor = Executor(model, want_logits=True, block_tokens=BLOCK, speculative=True)
        if not executor.speculates:
            assert not executor.caps.prefix_blocks  # only models without plain KV caches step aside
            return
        oracle = _Oracle({p: w.tokens for p, w in want.items()})
        spec = SpecController(SpecConfig("ngram", 3, base_ms=1e9, per_position_ms=1e-9), oracle)
        engine = Engine(executor, chunk=6, prefix=executor.caps.prefix_blocks, spec=spec)
        concurrent = {rid: PROMPTS[rid] for rid in ARRIVALS}
        got = engine.serve(concurrent, ARRIVALS)
        for rid, p in concurrent.items():
            assert got[rid].tokens == want[p].tokens[:NEW_TOKENS], f"{family}: {rid} with speculation"
        assert engine.scheduler.spec is not None
    finally:
        cpu_kernels.install(model, "off")
        mlx_patch.restore(model)
