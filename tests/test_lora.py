"""LoRA adapters on the ranks (issue #18): fused at load (`--adapter-path`) and unfused in slots (`--lora`).

Synthetic adapters (tests/lora_check.py `build_adapter`: mlx-lm's `linear_to_lora_layers`, random B) on
the tiny model, plain and 4-bit:
- TP=1 greedy equals mlx-lm loaded with the adapter (`mlx_lm.load(path, adapter_path=...)`), token for
  token, fused and unfused (a quantized model fused is compared with mlx-lm's own fuse);
- a run mixing two adapters and the base in packed steps equals each request run alone (adapters of
  different ranks and layers: each token's columns of the joined A and B, rank.lora_layers);
- an adapter whose B is zero gives exactly the base output, fused and unfused; so do base tokens next to
  adapters;
- TP=2 (one real `mpirun`) equals TP=1;
- malformed adapters, and misuse of the slots, are refused with errors that say what is wrong.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from cluster.errors import AdapterError, ConfigError, EngineError
from cluster.messages import AdapterLoad, Admit, PrefillChunk, StepPlan
from rank import cpu_kernels, mlx_patch
from rank.lora import TargetShape, adapter_digest, adapter_slots, inspect_adapter, lora_flags
from rank.models import load_model, make_tiny_model
from tests.jobs import ROOT, mpirun_prefix
from tests.lora_check import REQUESTS, TOKENS, _executor, build_adapter, run_group, serve
from tests.tp_check import greedy

ATOL = 2e-4  # fp32: sums in another order (mixed passes, all-reduces); measured differences are far below
SECOND_KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def _quantize(src: Path, out: Path) -> Path:
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = mlx_load_model(src)
    model, qconfig = quantize_model(model, config, group_size=32, bits=4)
    save_model(out, model)
    save_config(qconfig, out / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    tiny = make_tiny_model(root / "tiny")
    return {
        "tiny": tiny,
        "q4": _quantize(tiny, root / "q4"),
        "first": build_adapter(tiny, root / "first", seed=1),
        "second": build_adapter(
            tiny, root / "second", seed=2, rank=8, scale=1.5, num_layers=3, keys=SECOND_KEYS
        ),
        "zero": build_adapter(tiny, root / "zero", seed=3, zero_b=True),
    }


def _restore(model: Any) -> None:
    cpu_kernels.install(model, "off")
    mlx_patch.restore(model)


@pytest.fixture(scope="module")
def tp1(dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """run_group's line for each model, in this process (TP=1)."""
    lines = {}
    for name in ("tiny", "q4"):
        lines[name] = run_group(dirs[name], dirs["first"], dirs["second"], None)
        model, _ = load_model(dirs[name], None)
        _restore(model)
    return lines


def _mlx_lm(model_dir: Path, adapter: Path | None, fuse: bool = False) -> Any:
    from mlx.utils import tree_unflatten
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    if fuse:  # as mlx_lm/fuse.py does
        fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
    return model


def _same(got: dict[str, Any], want: tuple[list[int], list[list[float]]], what: str) -> None:
    assert got["tokens"] == want[0], what
    np.testing.assert_allclose(np.array(got["logprobs"]), np.array(want[1]), atol=ATOL, rtol=0, err_msg=what)


@pytest.mark.parametrize("name", ["tiny", "q4"])
def test_tp1_equals_mlx_lm(name: str, dirs: dict[str, Path], tp1: dict[str, dict[str, Any]]) -> None:
    line = tp1[name]
    adapters = {0: None, 1: dirs["first"], 2: dirs["second"]}
    models = {slot: _mlx_lm(dirs[name], path) for slot, path in adapters.items()}
    fused = _mlx_lm(dirs[name], dirs["first"], fuse=name == "q4")  # float: mlx-lm's unfused adapter
    differs = False
    for req, (prompt, slot, _) in REQUESTS.items():
        want = greedy(models[slot], prompt, TOKENS)
        _same(line["alone"][req], want, f"{name} {req}: unfused, slot {slot}")
        _same(line["fused"][req], greedy(fused, prompt, TOKENS), f"{name} {req}: fused")
        differs |= slot != 0 and want[0] != greedy(models[0], prompt, TOKENS)[0]
    assert differs, "the adapters change no greedy token: they test nothing"


@pytest.mark.parametrize("name", ["tiny", "q4"])
@pytest.mark.parametrize("chunks", ["short", "long"])
def test_mixed_adapters_equal_each_alone(name: str, chunks: str, tp1: dict[str, dict[str, Any]]) -> None:
    line = tp1[name]
    assert line["packed"]
    for req in REQUESTS:
        alone = line["alone"][req]
        _same(line[f"mixed-{chunks}"][req], (alone["tokens"], alone["logprobs"]), f"{name} {req}")


def test_zero_b_is_exactly_the_base(dirs: dict[str, Path]) -> None:
    prompt = REQUESTS["one"][0]
    model, _ = load_model(dirs["tiny"], None)
    try:
        executor = _executor(model, None, max_loras=2)
        executor.load_adapter(1, dirs["zero"])
        executor.load_adapter(2, dirs["first"])
        base = serve(executor, {"r": (prompt, 0, 0)}, 16)["r"]
        zero = serve(executor, {"r": (prompt, 1, 0)}, 16)["r"]
        assert zero == base  # y + 0: bit for bit
        mixed = serve(executor, {"b": (prompt, 0, 0), "z": (prompt, 1, 0), "f": (prompt, 2, 0)}, 7)
        assert mixed["b"] == base and mixed["z"] == base  # a mixed pass's zero columns, too
        assert mixed["f"]["logprobs"] != base["logprobs"]
    finally:
        _restore(model)
    model, _ = load_model(dirs["tiny"], None, adapter_path=dirs["zero"])
    try:
        assert serve(_executor(model, None), {"r": (prompt, 0, 0)}, 16)["r"] == base
    finally:
        _restore(model)


@pytest.mark.cluster
def test_tp2_equals_tp1(dirs: dict[str, Path], tp1: dict[str, dict[str, Any]]) -> None:
    cmd = mpirun_prefix(2) + ["-x", "OMPI_MCA_mpi_yield_when_idle=1", sys.executable]
    cmd += [str(ROOT / "tests" / "lora_check.py")]
    for name in ("tiny", "q4"):
        cmd += [str(dirs[name]), str(dirs["first"]), str(dirs["second"])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [line["model"] for line in lines] == ["tiny", "q4"]
    for line in lines:
        want = tp1[line["model"]]
        for run in ("fused", "alone", "mixed-short", "mixed-long"):
            for req, got in line[run].items():
                w = want[run][req]
                _same(got, (w["tokens"], w["logprobs"]), f"{line['model']} {run} {req}: TP=2")


# -- refusals -----------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "adapter_config.json").read_text())


def _write_config(path: Path, config: dict[str, Any]) -> None:
    (path / "adapter_config.json").write_text(json.dumps(config))


def _tiny_config(dirs: dict[str, Path]) -> dict[str, Any]:
    return json.loads((dirs["tiny"] / "config.json").read_text())


def test_inspect_reports_the_adapter(dirs: dict[str, Path]) -> None:
    info = inspect_adapter(dirs["second"], _tiny_config(dirs), 2)
    assert (info.rank, info.scale) == (8, 1.5)
    assert len(info.targets) == 3 * len(SECOND_KEYS)
    assert all(".layers.0." not in t for t in info.targets)  # num_layers 3: the last three
    assert info.digest == adapter_digest(dirs["second"]) != adapter_digest(dirs["first"])


def test_malformed_adapters_are_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    config = _tiny_config(dirs)

    def refused(path: Path, match: str, world: int = 1, targets: Any = None) -> None:
        with pytest.raises(AdapterError, match=match):
            inspect_adapter(path, config, world, targets)

    refused(tmp_path / "nowhere", "no such folder")
    missing = _copy(dirs["first"], tmp_path / "missing")
    (missing / "adapters.safetensors").unlink()
    refused(missing, "adapters.safetensors is missing")
    broken = _copy(dirs["first"], tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    refused(broken, "not valid JSON")
    alpha = _copy(dirs["first"], tmp_path / "alpha")
    c = _config(alpha)
    c["lora_parameters"] = {"rank": 4, "alpha": 16}
    _write_config(alpha, c)
    refused(alpha, "has 'alpha'")
    dora = _copy(dirs["first"], tmp_path / "dora")
    _write_config(dora, {**_config(dora), "fine_tune_type": "dora"})
    refused(dora, "fine_tune_type 'dora'")
    wrong_rank = _copy(dirs["first"], tmp_path / "rank")
    c = _config(wrong_rank)
    c["lora_parameters"]["rank"] = 16
    _write_config(wrong_rank, c)
    refused(wrong_rank, "not rank 16")
    garbage = _copy(dirs["first"], tmp_path / "garbage")
    (garbage / "adapters.safetensors").write_bytes(b"\xff" * 64)
    refused(garbage, "not a safetensors file")


def _with_tensors(src: Path, dst: Path, extra: dict[str, mx.array]) -> Path:
    path = _copy(src, dst)
    weights = mx.load(str(path / "adapters.safetensors"))
    assert isinstance(weights, dict)
    mx.save_safetensors(str(path / "adapters.safetensors"), {**weights, **extra})
    return path


def test_head_unknown_keys_and_splits_are_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    config = _tiny_config(dirs)
    head = _with_tensors(
        dirs["first"],
        tmp_path / "head",
        {"lm_head.lora_a": mx.zeros((256, 4)), "lm_head.lora_b": mx.zeros((4, 259))},
    )
    with pytest.raises(AdapterError, match="embedding or the output head"):
        inspect_adapter(head, config, 1)
    model, _ = load_model(dirs["tiny"], None)
    targets = _executor(model, None, max_loras=1).lora_targets
    _restore(model)
    unknown = _with_tensors(
        dirs["first"],
        tmp_path / "unknown",
        {
            "model.layers.0.self_attn.rotary.lora_a": mx.zeros((256, 4)),
            "model.layers.0.self_attn.rotary.lora_b": mx.zeros((4, 256)),
        },
    )
    inspect_adapter(unknown, config, 1)  # by name alone it might be a layer
    with pytest.raises(AdapterError, match="rotary is not a linear layer of this model"):
        inspect_adapter(unknown, config, 1, targets)
    other = _copy(dirs["first"], tmp_path / "other")
    small = make_tiny_model(tmp_path / "small", hidden=128, heads=4, kv_heads=2, ffn=256)
    build_adapter(small, other, seed=4)
    with pytest.raises(AdapterError, match="an adapter for another model"):
        inspect_adapter(other, config, 1, targets)
    with pytest.raises(AdapterError, match="not divisible by 3 ranks"):
        inspect_adapter(dirs["first"], config, 3)
    split = {t: TargetShape(s.in_features, s.out_features, "row") for t, s in targets.items()}
    with pytest.raises(AdapterError, match=r"input width \d+ is not divisible by 3 ranks"):
        inspect_adapter(dirs["first"], config, 3, split)


def test_fused_adapter_that_does_not_fit_is_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    small = make_tiny_model(tmp_path / "small", hidden=128, heads=4, kv_heads=2, ffn=256)
    with pytest.raises(AdapterError, match="does not fit this model"):
        load_model(small, None, adapter_path=dirs["first"])
    with pytest.raises(AdapterError, match="no such folder"):
        load_model(small, None, adapter_path=tmp_path / "nowhere")


def test_slots_are_checked(dirs: dict[str, Path]) -> None:
    model, _ = load_model(dirs["tiny"], None)
    try:
        executor = _executor(model, None, max_loras=1)
        with pytest.raises(EngineError, match="outside 1..1"):
            executor.load_adapter(2, dirs["first"])
        with pytest.raises(EngineError, match="empty adapter slot 1"):
            executor.execute(StepPlan(0, admit=(Admit(7, (), 1),)))
        wrong = AdapterLoad(1, str(dirs["first"]), adapter_digest(dirs["second"]))
        with pytest.raises(AdapterError, match="differs from rank 0's copy"):
            executor.execute(StepPlan(1, adapter_load=(wrong,)))
        load = AdapterLoad(1, str(dirs["first"]), adapter_digest(dirs["first"]))
        chunk = PrefillChunk(8, 0, (5, 6, 7), True)
        executor.execute(StepPlan(2, adapter_load=(load,), admit=(Admit(8, (), 1),), prefill=(chunk,)))
        with pytest.raises(EngineError, match="unloaded while sequences use it"):
            executor.execute(StepPlan(3, adapter_unload=(1,)))
        executor.execute(StepPlan(4, release=(8,)))
        executor.execute(StepPlan(5, adapter_unload=(1,)))
        assert executor.lora is not None and not executor.lora.loaded
        with pytest.raises(EngineError, match="no adapter slots"):
            _executor(model, None).load_adapter(1, dirs["first"])
    finally:
        _restore(model)


def test_lora_flags() -> None:
    assert lora_flags(["a=/x", "b=y"]) == (("a", Path("/x")), ("b", Path("y")))
    assert adapter_slots(["a=/x", "b=y"], 0) == 2 and adapter_slots([], 4) == 4 and adapter_slots([], 0) == 0
    for bad in (["a"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(ConfigError):
            lora_flags(bad)
    with pytest.raises(ConfigError, match="fewer than the 2"):
        adapter_slots(["a=/x", "b=y"], 1)
