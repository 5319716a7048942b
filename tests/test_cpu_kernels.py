"""The CPU kernels against MLX's own: attention on every mask and shape the engine produces (a prompt
prefilled from position 0, a later chunk of a prompt whose queries are the last L of T keys, a batched
decode step with left padding, grouped-query heads, half precision), SwiGLU, and a whole real model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from rank import cpu_kernels, packing


def _qkv(
    batch: int, heads: int, kv: int, q_len: int, t_len: int, dtype: mx.Dtype = mx.float32, seed: int = 0
):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((batch, heads, q_len, 16), dtype=np.float32)).astype(dtype)
    k = mx.array(rng.standard_normal((batch, kv, t_len, 16), dtype=np.float32)).astype(dtype)
    v = mx.array(rng.standard_normal((batch, kv, t_len, 16), dtype=np.float32)).astype(dtype)
    return q, k, v


def _check(q: mx.array, k: mx.array, v: mx.array, mask, atol: float = 1e-5) -> None:
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = cpu_kernels.attention(q, k, v, 0.25, mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=atol)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("block_scores", [cpu_kernels.BLOCK_SCORES, 3 * 40 * 7])  # one block; many
def test_causal_prefill_matches_mlx(monkeypatch: pytest.MonkeyPatch, block_scores: int, workers: int) -> None:
    monkeypatch.setattr(cpu_kernels, "_workers", lambda: workers)
    monkeypatch.setattr(cpu_kernels, "BLOCK_SCORES", block_scores)
    monkeypatch.setattr(cpu_kernels, "QUERY_BLOCK", 7 if block_scores < 10**4 else 256)
    _check(*_qkv(1, 6, 2, 40, 40), "causal")  # a whole prompt
    _check(*_qkv(1, 6, 2, 25, 90), "causal")  # a later chunk: 65 positions already in the cache
    _check(*_qkv(2, 4, 4, 9, 30), None)


@pytest.mark.parametrize("workers", [1, 2])
def test_boolean_and_additive_masks_match_mlx(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setattr(cpu_kernels, "_workers", lambda: workers)
    from mlx_lm.models.base import create_causal_mask

    q, k, v = _qkv(3, 6, 3, 1, 50)  # a decode step of 3 sequences, left-padded by 0, 7 and 20
    mask = create_causal_mask(1, offset=49, left_padding=mx.array([0, 7, 20]))
    _check(q, k, v, mask)
    additive = mx.where(mask, 0.0, -1e9).astype(mx.float32)
    _check(q, k, v, additive)
    q, k, v = _qkv(1, 4, 2, 12, 12)
    _check(q, k, v, create_causal_mask(12))


def test_a_row_that_sees_no_key_stays_finite() -> None:
    q, k, v = _qkv(1, 2, 2, 1, 10)
    mask = mx.array(np.zeros((1, 1, 1, 10), dtype=bool))
    assert np.isfinite(np.array(cpu_kernels.attention(q, k, v, 0.25, mask))).all()


def test_models_with_windows_or_sinks_are_not_packed(tiny_model, tmp_path) -> None:
    """Sliding-window layers (rotating caches) and attention sinks need masks a packed row does not carry;
    a window the config declares but no layer applies does not matter."""
    from mlx_lm import load

    from rank.model_caps import probe
    from tests.families import build

    def packable(model) -> bool:  # type: ignore[no-untyped-def]
        return probe(model, model.model).packable

    model, _ = load(str(tiny_model))
    try:
        cpu_kernels.install(model, "off")
        assert packable(model)
        model.model.layers[0].self_attn.sinks = mx.zeros((4,))
        assert not packable(model)
        del model.model.layers[0].self_attn.sinks
        for family, packs in (("llama_sliding", False), ("gpt_oss", False), ("mistral", True)):
            other, _ = load(str(build(family, tmp_path / family)))
            cpu_kernels.install(other, "off")
            assert packable(other) is packs, family
            cpu_kernels.install(other, "off")
    finally:
        for attn in packing.attentions(model):
            attn.rope = attn.rope.inner


def test_values_narrower_than_keys_match_mlx() -> None:
    """MLA's prefill attends with values of another width than the keys (DeepSeek: 128 against 192)."""
    q, k, _ = _qkv(1, 4, 4, 20, 20)
    v = mx.array(np.random.default_rng(3).standard_normal((1, 4, 20, 8), dtype=np.float32))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    got = cpu_kernels.attention(q, k, v, 0.25, "causal")
    assert got.shape == want.shape == (1, 4, 20, 8)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_half_precision_is_returned_in_its_dtype() -> None:
    _check(*_qkv(1, 4, 2, 20, 20, dtype=mx.float16), "causal", atol=2e-3)
    from mlx_lm.models.base import create_causal_mask

    q, k, v = _qkv(2, 4, 2, 1, 30, dtype=mx.bfloat16)
    additive = mx.where(create_causal_mask(1, offset=29, left_padding=mx.array([0, 9])), 0.0, -1e9)
    _check(q, k, v, additive.astype(mx.bfloat16), atol=2e-2)


def test_swiglu_matches_mlx_lm() -> None:
    from mlx_lm.models.activations import swiglu

    gate = mx.array(np.concatenate([np.linspace(-120, 120, 2001), [0.0, -1e-8, 1e-8]]).astype(np.float32))
    x = mx.array(np.random.default_rng(1).standard_normal(gate.shape).astype(np.float32))
    want, got = np.array(swiglu(gate, x)), np.array(cpu_kernels.swiglu(gate, x))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
    assert np.isfinite(got).all()
    # half precision: as close to the exact SiLU of the rounded input as the output's own rounding
    small = mx.array(np.linspace(-8, 8, 4001).astype(np.float32))
    for dtype, tol in ((mx.bfloat16, 8e-3), (mx.float16, 1e-3)):
        g = small.astype(dtype)
        rounded = np.array(g.astype(mx.float32), dtype=np.float64)
        exact = rounded / (1 + np.exp(-rounded))
        half = np.array(cpu_kernels.swiglu(g, mx.ones_like(g)).astype(mx.float32))
        seen = np.abs(exact) > 1e-3
        assert np.max(np.abs(half - exact)[seen] / np.abs(exact)[seen]) < tol


def test_install_routes_only_large_attention_and_can_be_turned_off(tiny_model, monkeypatch) -> None:
    """Installed on a real model, logits equal MLX's; small attention calls still go to MLX's kernel."""
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    module = __import__(type(model).__module__, fromlist=["x"])
    tokens = mx.array([[1 + (i * 7) % 90 for i in range(300)]], dtype=mx.int32)
    assert not cpu_kernels.install(model, "off")
    want = model(tokens)
    calls: list[int] = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    assert cpu_kernels.install(model, "on")
    assert module.swiglu is cpu_kernels.swiglu
    try:
        got = model(tokens)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)
        assert calls and set(calls) == {300}
        calls.clear()
        model(tokens[:, :8])  # 8 x 8 scores a head: below the threshold, MLX's kernel
        assert calls == []
    finally:
        cpu_kernels.install(model, "off")
    from mlx_lm.models.activations import swiglu

    assert module.swiglu is swiglu  # off: MLX's SiLU, and MLX's attention behind the packing seam
    calls.clear()
    np.testing.assert_allclose(np.array(model(tokens)), np.array(want), atol=1e-6)
    assert calls == []


def test_packed_prefill_equals_one_pass_per_sequence(tiny_model) -> None:
    """A step's prompt chunks of several sequences in one forward pass (rows of one batch, right-padded)
    give the logits and the KV caches that one pass per sequence gives, and decoding goes on the same."""
    from mlx_lm import load

    from cluster.messages import Admit, PrefillChunk, StepPlan
    from rank.executor import Executor

    model, _ = load(str(tiny_model))
    prompts = {1: tuple(range(3, 43)), 2: tuple(range(50, 150)), 3: (7, 8, 9, 10, 11), 4: tuple(range(9, 99))}

    def chunk(sid: int, start: int, end: int) -> PrefillChunk:
        return PrefillChunk(sid, start, prompts[sid][start:end], end == len(prompts[sid]))

    plans = [
        StepPlan(1, admit=(Admit(2, ()),), prefill=(chunk(2, 0, 30),)),
        StepPlan(
            2,
            admit=(Admit(1, ()), Admit(3, ())),
            prefill=(chunk(1, 0, 40), chunk(2, 30, 100), chunk(3, 0, 5)),
        ),
        StepPlan(3, decode_ids=(1, 2, 3), decode_tokens=(5, 6, 7)),
        # a prompt chunk and the decode rows in one pass (rows reordered on the way)
        StepPlan(
            4,
            admit=(Admit(4, ()),),
            prefill=(chunk(4, 0, 90),),
            decode_ids=(3, 1, 2),
            decode_tokens=(8, 9, 10),
        ),
        StepPlan(5, decode_ids=(1, 2, 3, 4), decode_tokens=(11, 12, 13, 14)),
    ]
    results = []
    module = __import__(type(model).__module__, fromlist=["x"])
    plain = module.scaled_dot_product_attention
    try:
        for setting in ("plain", "off", "on"):  # one pass per sequence; packed with MLX's kernels; ours
            if setting != "plain":
                cpu_kernels.install(model, setting)
            executor = Executor(model, want_logits=True)
            assert executor._packs == (setting != "plain")
            outs = [executor.execute(p) for p in plans]
            keys = [np.array(executor.batch[layer].keys) for layer in (0, len(model.layers) - 1)]
            results.append(([o.row_ids for o in outs], [np.array(o.logits) for o in outs[1:]], keys))
    finally:
        cpu_kernels.install(model, "off")
        for attn in packing.attentions(model):
            attn.rope = attn.rope.inner
        module.scaled_dot_product_attention = plain
    (ids_a, logits_a, keys_a) = results[0]
    for ids_b, logits_b, keys_b in results[1:]:
        assert ids_a == ids_b == [[], [1, 2, 3], [1, 2, 3], [4, 3, 1, 2], [1, 2, 3, 4]]
        for a, b in zip(logits_a + keys_a, logits_b + keys_b, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-4)
