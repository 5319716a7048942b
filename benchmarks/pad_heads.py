"""An equivalent copy of a llama-family model with more attention heads, so that a rank count that does
not divide its heads can split it: the embedded SmolLM2-135M has 9 query and 3 KV heads (TP=1 or 3 only);
padded to 12 and 4 it splits at TP=2 (6 and 2 heads per rank), which is how the speculation benchmark
measures TP=2 with one core per rank on this 2-core machine.

Each added KV group has zero keys, values and queries, and the added query heads' columns of o_proj are
zero, so they add exactly 0 to every layer's output: the padded model computes the same function (only
the order of float additions inside the larger matmuls may differ). The cost is the padded heads'
attention work (about 8% more FLOPs per layer for SmolLM2).

    python benchmarks/pad_heads.py MODEL_DIR OUT_DIR --kv-heads 4
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def pad_model(src: Path, dst: Path, kv_heads: int) -> Path:
    """Write the padded copy of `src` to `dst` (reused when its config already says `kv_heads`)."""
    config = json.loads((src / "config.json").read_text())
    heads, kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    if kv_heads < kv or heads % kv:
        raise SystemExit(f"pad_heads: cannot pad {heads} heads / {kv} KV heads to {kv_heads} KV heads")
    group = heads // kv  # query heads per KV head; mlx maps query head h to KV head h // group
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    padded = {**config, "num_attention_heads": group * kv_heads, "num_key_value_heads": kv_heads}
    padded["head_dim"] = head_dim
    if (dst / "config.json").exists() and json.loads((dst / "config.json").read_text()) == padded:
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    extra_q, extra_kv = (kv_heads - kv) * group * head_dim, (kv_heads - kv) * head_dim
    for path in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(path))
        for name, w in list(tensors.items()):
            if name.endswith("self_attn.q_proj.weight"):
                tensors[name] = np.concatenate([w, np.zeros((extra_q, w.shape[1]), w.dtype)], axis=0)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
                tensors[name] = np.concatenate([w, np.zeros((extra_kv, w.shape[1]), w.dtype)], axis=0)
            elif name.endswith("self_attn.o_proj.weight"):
                tensors[name] = np.concatenate([w, np.zeros((w.shape[0], extra_q), w.dtype)], axis=1)
            elif "self_attn" in name and name.endswith(("_proj.bias", "_proj.scales", "_proj.biases")):
                raise SystemExit(f"pad_heads: {name}: only unquantized, bias-free attention is handled")
        save_file(tensors, str(dst / path.name), metadata={"format": "mlx"})
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, dst / path.name)
    (dst / "config.json").write_text(json.dumps(padded, indent=2))  # last: marks the copy complete
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--kv-heads", type=int, default=4)
    args = p.parse_args()
    print(pad_model(args.model, args.out, args.kv_heads))


if __name__ == "__main__":
    main()
