"""A layer-skip self-draft: a model folder cut to some of its decoder layers, for `--draft-model`
(benchmarks/make_draft.py writes one for the embedded SmolLM2; tests build one from a tiny model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cluster.errors import ModelError
from rank.draft import config_text


def write_layer_skip_draft(src: Path, out: Path, layers: int, keep_last: int = 0) -> Path:
    """A self-draft: the model in `src` cut to `layers` of its decoder layers (the first `layers -
    keep_last` and the last `keep_last`), sharing its embedding, final norm, head and tokenizer files. No
    training: the skipped layers' residual updates are simply left out. Written to `out` as a plain mlx-lm
    folder (one model.safetensors); returns `out`."""
    import mlx.core as mx

    config = json.loads((src / "config.json").read_text())
    text = config_text(config)
    total = int(text["num_hidden_layers"])
    if not 1 <= layers < total or not 0 <= keep_last <= layers:
        raise ModelError(f"{src} has {total} layers: a layer-skip draft keeps 1 to {total - 1} of them")
    kept_layers = [*range(layers - keep_last), *range(total - keep_last, total)]
    renumber = {old: new for new, old in enumerate(kept_layers)}
    weights: dict[str, Any] = {}
    for shard in sorted(src.glob("*.safetensors")):
        loaded = mx.load(str(shard))
        assert isinstance(loaded, dict)
        weights.update(loaded)
    kept: dict[str, Any] = {}
    for name, value in weights.items():
        layer, head, tail = _layer_of(name)
        if layer < 0:
            kept[name] = value
        elif layer in renumber:
            kept[f"{head}.{renumber[layer]}.{tail}"] = value
    if not any(_layer_of(name)[0] >= 0 for name in weights):
        raise ModelError(f"{src}: no weight is named like a layer (model.layers.N.*): cannot cut it")
    text["num_hidden_layers"] = layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = [text["layer_types"][i] for i in kept_layers]
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    mx.save_safetensors(str(out / "model.safetensors"), kept, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _layer_of(name: str) -> tuple[int, str, str]:
    """The decoder layer a weight belongs to (`layers.N.` in its name; -1: none) and the name's text
    before and after N."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1]), ".".join(parts[: i + 1]), ".".join(parts[i + 2 :])
    return -1, name, ""
