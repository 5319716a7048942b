"""Tensor parallelism per family (issue #21): every tiny family model (tests/families.py), and quantized
ones made by mlx-lm's own `quantize_model`, split across 2 ranks by `rank.models.load_model` (mlx-lm's
`shard()` or Orchard's plans in rank/shard_plans.py) decode exactly as mlx-lm's own forward of the
unsplit model, each sequence alone: the same greedy tokens and the same logprobs over the whole
vocabulary at every step. Twice: through the split model's own forward, and served by Orchard's
`Executor` (vocabulary-parallel head; several sequences of different lengths; packed steps and a
prefix-cache hit where the model allows them).

One real 2-rank `mpirun` serves the whole matrix (tests/tp_check.py loads each model in turn); models
are built once per session. The checks of a plan (head counts, quantization groups) run without MPI.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import ShardingError
from tests import families
from tests.jobs import ROOT, mpirun_prefix
from tests.tp_check import PROMPT, SERVED, TOKENS, greedy

# Families whose head counts a 2-rank job splits; qwen3_5's tiny vocabulary (259) does not split, which
# mlx-lm's own shard() requires of it: it runs here with a vocabulary of 260 (checkpoints pad theirs).
SPLIT = [f for f in families.FAMILIES if f != "qwen3_5"] + ["qwen3_5_vocab260", "gemma3_multimodal"]
# mlx-lm's quantize_model (group size 32): mlx-lm's shard() (llama), a fused qkv (phi3), experts (mixtral),
# a norm across heads (olmo2). qwen3_moe's 32-wide experts are one quantization group: refused whole.
QUANTIZED = {
    "llama-q4": ("llama", 4),
    "phi3-q4": ("phi3", 4),
    "mixtral-q4": ("mixtral", 4),
    "olmo2-q8": ("olmo2", 8),
}
REFUSED_QUANTIZED = {"qwen3_moe-q4": ("qwen3_moe", 4)}
DEQUANTIZED = ["phi3-q4", "qwen3_moe-q4"]  # --dequantize: plain float32 linears, any split works again
ATOL = 2e-4  # fp32 all-reduces sum in another order: measured differences are below 5e-5


def _build_config(name: str, config: dict[str, Any], out: Path) -> Path:
    """A model of a config of our own, built as tests/families.py builds its families (its table is
    borrowed for the call and restored)."""
    families.FAMILIES[name] = config
    try:
        return families.build(name, out)
    finally:
        del families.FAMILIES[name]


def _build_variant(name: str, base: str, out: Path, **text_config: Any) -> Path:
    """A family with a few config fields changed."""
    config = copy.deepcopy(families.FAMILIES[base])
    config.get("text_config", config).update(text_config)
    return _build_config(name, config, out)


def _quantize(src: Path, out: Path, bits: int, group_size: int = 32) -> Path:
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(src)
    model, qconfig = quantize_model(model, config, group_size=group_size, bits=bits)
    save_model(out, model)
    save_config(qconfig, out / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


@pytest.fixture(scope="session")
def tp_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    dirs = {f: families.build(f, root / f) for f in families.FAMILIES}
    dirs["qwen3_5_vocab260"] = _build_variant(
        "qwen3_5_vocab260", "qwen3_5", root / "qwen3_5_vocab260", vocab_size=260
    )
    # Gemma 3 as mlx-community ships 4B and larger: the multimodal wrapper, loaded text-only
    wrapper = {
        "model_type": "gemma3",
        "vocab_size": families.VOCAB,
        "text_config": families.FAMILIES["gemma3"],
    }
    dirs["gemma3_multimodal"] = _build_config(
        "gemma3_multimodal", copy.deepcopy(wrapper), root / "gemma3_multimodal"
    )
    for name, (family, bits) in {**QUANTIZED, **REFUSED_QUANTIZED}.items():
        dirs[name] = _quantize(dirs[family], root / name, bits)
    return dirs


def _run(name: str, dequantized: bool = False) -> str:
    return name + (" --dequantize" if dequantized else "")


@pytest.fixture(scope="session")
def tp2(tp_models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Every model's line from one 2-rank job, keyed by `_run`."""
    plain = [*SPLIT, "qwen3_5", *QUANTIZED, *REFUSED_QUANTIZED]
    cmd = mpirun_prefix(2) + [
        "-x",
        "OMPI_MCA_mpi_yield_when_idle=1",
        sys.executable,
        str(ROOT / "tests" / "tp_check.py"),
    ]
    cmd += [str(tp_models[m]) for m in plain] + ["--dequantize"] + [str(tp_models[m]) for m in DEQUANTIZED]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {_run(line["model"], line["dequantized"]): line for line in lines}


def _assert_same(line: dict[str, Any], model_dir: Path) -> None:
    """Against one rank and no Orchard code: mlx-lm's own load and forward (a quantized model as it
    ships), each prompt alone."""
    from mlx_lm.utils import load_model

    assert "error" not in line, line.get("error")
    model, _ = load_model(model_dir)
    runs = [("forward", PROMPT, line["forward"])] + [
        (f"served {n}", p, line["served"][n]) for n, p in SERVED.items()
    ]
    for what, prompt, got in runs:
        tokens, logprobs = greedy(model, prompt, TOKENS)
        assert got["tokens"] == tokens, what
        np.testing.assert_allclose(
            np.array(got["logprobs"]), np.array(logprobs), atol=ATOL, rtol=0, err_msg=what
        )
        if what.startswith("served "):  # the same plans marked plain greedy: each rank sent its best entry
            assert line["served_argmax"][what.removeprefix("served ")]["tokens"] == tokens, f"{what}, argmax"
    ways = line["served"]["ways"]
    assert ways["packed"] == ways["packable"], ways


@pytest.mark.cluster
@pytest.mark.parametrize("family", SPLIT)
def test_tp2_equals_tp1(family: str, tp_models: dict[str, Path], tp2: dict[str, dict[str, Any]]) -> None:
    _assert_same(tp2[_run(family)], tp_models[family])


@pytest.mark.cluster
@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_tp2_equals_tp1(
    name: str, tp_models: dict[str, Path], tp2: dict[str, dict[str, Any]]
) -> None:
    assert json.loads((tp_models[name] / "config.json").read_text())["quantization"]["group_size"] == 32
    _assert_same(tp2[_run(name)], tp_models[name])


@pytest.mark.cluster
@pytest.mark.parametrize("name", DEQUANTIZED)
def test_dequantized_tp2_equals_quantized_tp1(
    name: str, tp_models: dict[str, Path], tp2: dict[str, dict[str, Any]]
) -> None:
    """--dequantize keeps the checkpoint's values (float32 copies of the quantized weights)."""
    _assert_same(tp2[_run(name, dequantized=True)], tp_models[name])


@pytest.mark.cluster
def test_served_runs_used_the_batching_tricks(tp2: dict[str, dict[str, Any]]) -> None:
    """The served comparison is not vacuous: most families packed steps and hit the prefix cache."""
    ways = {name: line["served"]["ways"] for name, line in tp2.items() if "served" in line}
    assert sum(w["packed"] for w in ways.values()) >= 10
    assert sum(w["prefix_hit"] for w in ways.values()) >= 10
    assert ways["phi3"]["packed"] and ways["mixtral"]["prefix_hit"]
    argmax = {name: line["served_argmax"]["ways"] for name, line in tp2.items() if "served" in line}
    assert sum(w["argmax_gather"] for w in argmax.values()) >= 10  # the greedy gather: picks, not slices


@pytest.mark.cluster
def test_refusals_name_the_reason(tp2: dict[str, dict[str, Any]]) -> None:
    assert "vocab_size 259" in tp2["qwen3_5"]["error"]
    refused = tp2["qwen3_moe-q4"]["error"]
    assert "quantization groups of 32" in refused and "--dequantize" in refused


# -- plans without MPI: the checks that refuse a model before anything changes ---------------------------


class _Group:
    """What the checks ask of a group (they raise before any collective)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n

    def rank(self) -> int:
        return 0


def test_every_family_mlx_lm_does_not_shard_has_a_plan() -> None:
    from mlx_lm.utils import _get_classes

    from rank.shard_plans import plan_for

    for family, config in families.FAMILIES.items():
        model_class, _ = _get_classes(copy.deepcopy(config))
        assert hasattr(model_class, "shard") or plan_for(config["model_type"]) is not None, family


def test_head_counts_that_do_not_divide_are_refused_before_sharding(tmp_path: Path) -> None:
    from rank.models import load_model

    model_dir = _build_variant("gemma2_kv1", "gemma2", tmp_path / "gemma2", num_key_value_heads=1)
    with pytest.raises(ShardingError, match="4 attention heads and 1 KV heads: run 1 ranks"):
        load_model(model_dir, _Group(2))


def test_plan_refuses_quantization_groups_split_across_ranks(tmp_path: Path) -> None:
    from mlx_lm.utils import load_model

    from rank.shard_plans import check_plan, plan_for

    plan = plan_for("phi3")
    assert plan is not None
    fine, _ = load_model(_quantize(families.build("phi3", tmp_path / "phi3"), tmp_path / "q32", 4), lazy=True)
    check_plan(fine, plan, 2)  # o_proj's 64 inputs: 32 a rank, one whole group each
    coarse, _ = load_model(_quantize(tmp_path / "phi3", tmp_path / "q64", 4, group_size=64), lazy=True)
    with pytest.raises(ShardingError, match="o_proj is quantized in groups of 64.*--dequantize"):
        check_plan(coarse, plan, 2)


def test_family_without_shard_or_plan_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rank import shard_plans
    from rank.models import load_model

    monkeypatch.delitem(shard_plans.PLANS, "granite")
    with pytest.raises(ShardingError, match="'granite' cannot be split across ranks"):
        load_model(families.build("granite", tmp_path / "granite"), _Group(2))


def test_dequantize_loads_float32_copies_of_the_quantized_weights(tp_models: dict[str, Path]) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_load_model

    from rank.models import load_model

    messages: list[str] = []
    model, _ = load_model(tp_models["mixtral-q4"], None, dequantize_weights=True, log=messages.append)
    assert any("dequantized to float32" in m for m in messages)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert not {k for k in kinds if k.startswith("Quantized")}, kinds
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    assert {v.dtype for _, v in params} == {mx.float32}
    quantized, _ = mlx_load_model(tp_models["mixtral-q4"])
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    tokens, logprobs = greedy(model, PROMPT, TOKENS)
    want_tokens, want_logprobs = greedy(quantized, PROMPT, TOKENS)
    assert tokens == want_tokens
    np.testing.assert_allclose(np.array(logprobs), np.array(want_logprobs), atol=ATOL, rtol=0)
