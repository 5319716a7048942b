"""LoRA adapters in mlx-lm's format (a folder with adapter_config.json and adapters.safetensors): checked,
fused at load, or kept unfused in slots (rank/lora_layers.py).

`inspect_adapter` reads only the JSON config and the safetensors header (stdlib, no MLX), so rank 0 can
refuse a bad adapter on any thread before anything is queued: every rank then loads the same file from
its own disk, and a refusal there would end the job. An adapter's identity is the sha256 of its two files:
the prefix cache and the SSD tier key blocks by it, so no block computed under one adapter is reused
under another.

Unfused adapters may not touch the embedding or the output head: under tensor parallelism the head is
vocabulary-parallel (rank/model_head.py) and a per-token LoRA on it would need a collective of its own.
A fused adapter (`--adapter-path`) may: it is folded into the weights before anything is split.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
_LAYER_PATH = re.compile(r"(^|\.)layers\.(\d+)\.")
_HEAD_NAMES = ("lm_head", "embed_tokens", "wte", "tok_embeddings", "embed_in", "embed_out", "output")
# Projections whose output is split under TP (column-parallel) and whose input is (row-parallel), by
# name, for a check made without the model (`targets` None); with the model's targets the kinds are exact.
_COLUMN_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_fc", "w1", "w3")
_ROW_NAMES = ("o_proj", "down_proj", "c_proj", "w2", "dense")
# Projections holding several outputs end to end (q, k, v; gate, up), split segment by segment under TP.
FUSED_NAMES = ("qkv_proj", "gate_up_proj", "qkvg_proj", "in_proj_qkv", "c_attn", "query_key_value", "Wqkv")
_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True, slots=True)
class TargetShape:
    """A linear an unfused adapter may modify, as the unsharded model has it: `kind` is how it is split
    under TP ("whole": not split, "column": by output, "row": by input, "fused": by output, segment by
    segment, which unfused adapters do not follow)."""

    in_features: int
    out_features: int
    kind: str


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What an adapter is, independent of the name it is served under."""

    rank: int
    scale: float
    targets: tuple[str, ...]  # module paths, e.g. model.layers.3.self_attn.q_proj
    digest: bytes  # sha256 of adapter_config.json, then adapters.safetensors

    @property
    def hexdigest(self) -> str:
        return self.digest.hex()


def adapter_digest(path: Path) -> bytes:
    """sha256 of the two files: the adapter's content, whatever its folder is called."""
    h = hashlib.sha256(b"orchard adapter v1\n")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(f"{name}\n".encode())
        with open(path / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.digest()


def _require_files(path: Path) -> None:
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: no such folder")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise AdapterError(
                f"adapter {path}: {name} is missing (mlx-lm's format: {CONFIG_FILE} + {WEIGHTS_FILE})"
            )


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {path}: {CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {path}: {CONFIG_FILE} is not a JSON object")
    return config


def _lora_parameters(path: Path, config: dict[str, Any]) -> tuple[int, float]:
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(
            f"adapter {path}: fine_tune_type {kind!r} cannot be served unfused (only 'lora'); "
            "serve it fused with --adapter-path"
        )
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"adapter {path}: {CONFIG_FILE} has no lora_parameters object")
    if "scale" not in params:
        hint = " (it has 'alpha': mlx-lm's LoRA config uses 'scale')" if "alpha" in params else ""
        raise AdapterError(f"adapter {path}: lora_parameters has no 'scale'{hint}")
    rank, scale = params.get("rank"), params["scale"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"adapter {path}: lora_parameters.rank must be a positive integer, not {rank!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise AdapterError(f"adapter {path}: lora_parameters.scale must be a number, not {scale!r}")
    return rank, float(scale)


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header: tensor names, dtypes and shapes, without reading any tensor."""
    file = path / WEIGHTS_FILE
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            (size,) = struct.unpack("<Q", raw)
            if size > min(file.stat().st_size, 1 << 27):
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {path}: {WEIGHTS_FILE} is not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"adapter {path}: {WEIGHTS_FILE} has a malformed header")
    header.pop("__metadata__", None)
    return header


def _pairs(path: Path, header: dict[str, Any], rank: int) -> dict[str, tuple[list[int], list[int]]]:
    """Target module path -> (shape of A, shape of B), every tensor checked to be a float LoRA matrix."""
    halves: dict[str, dict[str, list[int]]] = {}
    for name, meta in header.items():
        target, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b") or not target:
            raise AdapterError(f"adapter {path}: {name} is not a LoRA matrix (lora_a / lora_b)")
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or len(shape) != 2:
            raise AdapterError(f"adapter {path}: {name} is not a matrix (shape {shape})")
        if meta.get("dtype") not in _FLOAT_DTYPES:
            raise AdapterError(
                f"adapter {path}: {name} has dtype {meta.get('dtype')} (float32/16 or bfloat16)"
            )
        halves.setdefault(target, {})[leaf] = shape
    if not halves:
        raise AdapterError(f"adapter {path}: {WEIGHTS_FILE} holds no LoRA matrices")
    pairs = {}
    for target, both in sorted(halves.items()):
        if set(both) != {"lora_a", "lora_b"}:
            raise AdapterError(f"adapter {path}: {target} has only {', '.join(both)}")
        a, b = both["lora_a"], both["lora_b"]
        if a[1] != rank or b[0] != rank:
            raise AdapterError(
                f"adapter {path}: {target} has A {tuple(a)} and B {tuple(b)}, not rank {rank} as configured"
            )
        pairs[target] = (a, b)
    return pairs


def _kind_by_name(target: str) -> str:
    leaf = target.rsplit(".", 1)[-1]
    if leaf in FUSED_NAMES:
        return "fused"
    return "column" if leaf in _COLUMN_NAMES else "row" if leaf in _ROW_NAMES else "whole"


def _check_target(
    path: Path,
    target: str,
    a: list[int],
    b: list[int],
    model_config: dict[str, Any],
    world_size: int,
    targets: Mapping[str, TargetShape] | None,
) -> None:
    leaf = target.rsplit(".", 1)[-1]
    layer = _LAYER_PATH.search(target)
    if leaf in _HEAD_NAMES or layer is None:
        raise AdapterError(
            f"adapter {path}: it modifies {target}: adapters on the embedding or the output head cannot be "
            "served unfused (the head is split by vocabulary across ranks); serve it fused with --adapter-path"
        )
    text = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else {}
    layers = (text or model_config).get("num_hidden_layers") or model_config.get("num_hidden_layers")
    if isinstance(layers, int) and int(layer.group(2)) >= layers:
        raise AdapterError(f"adapter {path}: {target} is past this model's {layers} layers")
    if targets is not None:
        shape = targets.get(target)
        if shape is None:
            raise AdapterError(
                f"adapter {path}: {target} is not a linear layer of this model that an adapter can modify "
                "(unknown key, or an unsupported layer such as a mixture of experts' switch layer)"
            )
        if (a[0], b[1]) != (shape.in_features, shape.out_features):
            raise AdapterError(
                f"adapter {path}: {target} maps {a[0]} -> {b[1]} features, but this model's layer maps "
                f"{shape.in_features} -> {shape.out_features} (an adapter for another model?)"
            )
        kind = shape.kind
    else:
        kind = _kind_by_name(target)
    if kind == "fused" and world_size > 1:
        raise AdapterError(
            f"adapter {path}: {target} is a fused projection split segment by segment across "
            f"{world_size} ranks: serve this adapter fused (--adapter-path) or on one rank"
        )
    split = b[1] if kind == "column" else a[0] if kind == "row" else 0
    if split and world_size > 1 and split % world_size:
        what = "output" if kind == "column" else "input"
        raise AdapterError(
            f"adapter {path}: {target}'s {what} width {split} is not divisible by {world_size} ranks"
        )


def inspect_adapter(
    path: Path,
    model_config: dict[str, Any],
    world_size: int,
    targets: Mapping[str, TargetShape] | None = None,
) -> AdapterInfo:
    """Check an adapter for serving unfused on `world_size` ranks, before anything is queued; raises
    AdapterError with what is wrong. `targets` (the running executor's `lora_targets`) makes the check
    exact: every key a linear of this model, every shape that linear's; without it, keys and widths are
    checked from the model's config and the usual projection names."""
    path = Path(path).expanduser()
    _require_files(path)
    rank, scale = _lora_parameters(path, read_config(path))
    pairs = _pairs(path, read_header(path), rank)
    for target, (a, b) in pairs.items():
        _check_target(path, target, a, b, model_config, world_size, targets)
    return AdapterInfo(rank, scale, tuple(pairs), adapter_digest(path))


def load_matrices(path: Path) -> dict[str, tuple[Any, Any]]:
    """Target module path -> (A, B) as mlx arrays, as the file holds them (call inspect_adapter first)."""
    import mlx.core as mx

    try:
        weights = mx.load(str(path / WEIGHTS_FILE))
    except Exception as exc:  # MLX raises RuntimeError/ValueError on a broken file
        raise AdapterError(f"adapter {path}: cannot read {WEIGHTS_FILE}: {exc}") from None
    assert isinstance(weights, dict)
    targets = {name.rpartition(".")[0] for name in weights}
    return {t: (weights[f"{t}.lora_a"], weights[f"{t}.lora_b"]) for t in sorted(targets)}


def fuse_adapter(model: Any, path: Path, dequantize: bool = False) -> str:
    """`--adapter-path`: mlx-lm's own `load_adapters` onto the unsharded (lazy) model, then each LoRA
    layer's own `fuse` as mlx_lm/fuse.py does, so the served model is a plain model (no cost per token)
    that shards like the base. Returns the adapter's digest (hex) for the KV cache keys."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    path = Path(path).expanduser()
    _require_files(path)
    config = read_config(path)
    try:
        load_adapters(model, str(path))
    except (ValueError, KeyError, TypeError, AttributeError, FileNotFoundError) as exc:
        raise AdapterError(f"adapter {path} does not fit this model: {type(exc).__name__}: {exc}") from None
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused and config.get("fine_tune_type", "lora") != "full":  # a full fine-tune loads weights
        raise AdapterError(f"adapter {path} modifies no layer of this model")
    model.update_modules(tree_unflatten(fused))
    return adapter_digest(path).hex()


@dataclass(frozen=True, slots=True)
class NamedAdapter:
    """An unfused adapter loaded at start-up (`--lora NAME=DIR`): served as model `name` from `slot`."""

    name: str
    slot: int
    path: Path
    info: AdapterInfo


def lora_flags(values: list[str]) -> tuple[tuple[str, Path], ...]:
    """`--lora NAME=DIR` values as (name, folder), in flag order: flag i is slot i + 1 on every rank."""
    from cluster.errors import ConfigError

    out: list[tuple[str, Path]] = []
    for value in values:
        name, sep, folder = value.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise ConfigError(f"--lora {value!r}: expected NAME=DIR")
        if name in (n for n, _ in out):
            raise ConfigError(f"--lora {name} is given twice")
        out.append((name, Path(folder).expanduser()))
    return tuple(out)


def adapter_slots(lora: list[str], max_loras: int) -> int:
    """Unfused adapter slots a job holds (0: none, and no layer is wrapped)."""
    from cluster.errors import ConfigError

    given = len(lora_flags(lora))
    if max_loras < 0:
        raise ConfigError("--max-loras must be 0 (as many as --lora gives) or more")
    if max_loras and max_loras < given:
        raise ConfigError(f"--max-loras {max_loras} is fewer than the {given} --lora adapters given")
    return max_loras or given
