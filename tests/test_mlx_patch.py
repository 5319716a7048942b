"""The mlx-lm seam: installed only on the mlx-lm version it was written for, whole or not at all, undone
cleanly, and saying in one log line what it left alone. Another version is passed in, as a rank would see
it after an upgrade; mlx-lm itself is not touched."""

from __future__ import annotations

import logging
import sys
import types

import mlx.core as mx
import numpy as np
import pytest

from rank import cpu_kernels, mlx_patch, packing


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("0.32.0", None),
        ("0.32.2", None),
        ("0.32.17.dev3", None),
        ("0.33.0", "mlx-lm 0.33.0 is newer than the 0.32 this patch was written for"),
        ("1.0", "mlx-lm 1.0 is newer than the 0.32 this patch was written for"),
        ("0.31.9", "mlx-lm 0.31.9 is older than the 0.32 this patch was written for"),
        (
            "unknown",
            "mlx-lm 'unknown' is not a version this patch can compare with the 0.32 it was written for",
        ),
    ],
)
def test_version_check(version: str, problem: str | None) -> None:
    assert mlx_patch.version_problem(version) == problem


def test_the_installed_mlx_lm_is_the_one_the_patch_was_written_for() -> None:
    import mlx_lm

    assert mlx_patch.version_problem(mlx_lm.__version__) is None


def _mlx_lm_functions(module: types.ModuleType) -> tuple[bool, bool]:
    from mlx_lm.models import activations, base

    return (
        module.scaled_dot_product_attention is base.scaled_dot_product_attention,
        module.swiglu is activations.swiglu,
    )


def test_another_version_leaves_mlx_lm_alone_and_says_so(tiny_model, caplog) -> None:
    from mlx_lm import load

    from cluster.messages import Admit, PrefillChunk, StepPlan
    from rank.executor import Executor

    model, _ = load(str(tiny_model))
    module = sys.modules[type(model).__module__]
    tokens = mx.array([[1 + (i * 5) % 90 for i in range(40)]], dtype=mx.int32)
    mlx_patch.restore(model)
    want = np.array(model(tokens))
    try:
        assert cpu_kernels.install(model, "on") and packing.seam_installed(model)
        with caplog.at_level(logging.INFO, logger="rank.mlx_patch"):
            patched = mlx_patch.install(
                model, cpu_kernels.attention_for, cpu_kernels.swiglu, version="0.33.0"
            )
        assert patched == mlx_patch.Patched(False, False, False, patched.note)
        assert [r.getMessage() for r in caplog.records] == [
            "mlx-lm 0.33.0 is newer than the 0.32 this patch was written for: packed steps and CPU kernels "
            "off, mlx-lm's own code runs"
        ]
        assert caplog.records[0].levelno == logging.WARNING
        assert _mlx_lm_functions(module) == (True, True)
        assert not any(isinstance(a.rope, packing.SegmentRoPE) for a in packing.attentions(model))
        assert not packing.seam_installed(model)
        np.testing.assert_array_equal(np.array(model(tokens)), want)
        executor = Executor(model, want_logits=True)  # runs one pass per sequence
        assert not executor._packs
        plan = StepPlan(
            1,
            admit=(Admit(1, ()), Admit(2, ())),
            prefill=(PrefillChunk(1, 0, (3, 4, 5), True), PrefillChunk(2, 0, (6, 7), True)),
        )
        assert executor.execute(plan).row_ids == [1, 2]
    finally:
        mlx_patch.restore(model)


def test_install_is_idempotent_and_restore_puts_mlx_lm_back(tiny_model) -> None:
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    module = sys.modules[type(model).__module__]
    try:
        for _ in range(2):
            patched = mlx_patch.install(model, cpu_kernels.attention_for, cpu_kernels.swiglu)
            assert patched == mlx_patch.Patched(True, True, True)
            assert all(not isinstance(a.rope.inner, packing.SegmentRoPE) for a in packing.attentions(model))
        assert module.swiglu is cpu_kernels.swiglu
        assert mlx_patch.install(model) == mlx_patch.Patched(True, False, False)  # the seam, MLX's kernels
        assert _mlx_lm_functions(module) == (False, True) and packing.seam_installed(model)
    finally:
        mlx_patch.restore(model)
    assert _mlx_lm_functions(module) == (True, True) and not packing.seam_installed(model)


class _Layer:
    def __init__(self, module_name: str, with_rope: bool) -> None:
        attention = type("Attention", (), {"__module__": module_name})  # defined where the model is
        self.self_attn = attention()
        if with_rope:
            self.self_attn.rope = lambda x, offset=0: x


def _model_in(module_name: str, with_rope: bool) -> object:
    """A stand-in model whose classes live in `module_name`, as mlx-lm's models live in theirs."""
    cls = type("Model", (), {"__module__": module_name})
    model = cls()
    model.layers = [_Layer(module_name, with_rope), _Layer(module_name, with_rope)]  # type: ignore[attr-defined]
    return model


def test_a_missing_attribute_is_said_once_and_nothing_breaks(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="rank.mlx_patch")
    bare = types.ModuleType("orchard_test_bare_model")  # no scaled_dot_product_attention at all
    monkeypatch.setitem(sys.modules, bare.__name__, bare)
    patched = mlx_patch.install(_model_in(bare.__name__, True), cpu_kernels.attention_for, cpu_kernels.swiglu)
    assert (patched.packing, patched.attention, patched.swiglu) == (False, False, False)
    assert [r.getMessage() for r in caplog.records] == [
        "orchard_test_bare_model has no scaled_dot_product_attention: packed steps and CPU kernels off, "
        "mlx-lm's own code runs"
    ]
    caplog.clear()

    def own_attention(*args, **kwargs):
        raise AssertionError("not called here")

    ropeless = types.ModuleType("orchard_test_ropeless_model")  # attention, but no layer with a rope
    ropeless.scaled_dot_product_attention = own_attention  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, ropeless.__name__, ropeless)
    model = _model_in(ropeless.__name__, False)
    try:
        patched = mlx_patch.install(model, cpu_kernels.attention_for, cpu_kernels.swiglu)
        assert patched == mlx_patch.Patched(
            False,
            True,
            False,
            "orchard_test_ropeless_model has no attention layer with a rope: packed steps off",
        )
        assert [r.getMessage() for r in caplog.records] == [patched.note]
        assert not packing.seam_installed(model)
    finally:
        mlx_patch.restore(model)
    assert ropeless.scaled_dot_product_attention is own_attention
