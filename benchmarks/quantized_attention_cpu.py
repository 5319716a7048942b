"""Does live quantized attention (mlx-lm's `QuantizedKVCache`) pay on this machine? One sequence's decode
step at several context lengths with a plain `KVCache` against an 8-bit `QuantizedKVCache`, on the model
as a rank runs it (OpenBLAS and Orchard's CPU kernels where MLX runs on the CPU). The caches are filled
with random keys and values of the model's shapes (the step's cost does not depend on their values).

    .venv/bin/python benchmarks/quantized_attention_cpu.py --lengths 1024,4096,8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from jobs import reexec_with_rank_environment  # noqa: E402
from mlx_lm.models.cache import KVCache, QuantizedKVCache  # noqa: E402

from rank import cpu_kernels  # noqa: E402
from rank.model_caps import probe  # noqa: E402
from rank.model_head import find_inner  # noqa: E402
from rank.models import default_cache_dir, load_model, resolve_model  # noqa: E402


def filled(kind: str, layers: int, heads: int, dim: int, length: int, dtype: mx.Dtype) -> list[object]:
    caches: list[object] = []
    for _ in range(layers):
        c = KVCache() if kind == "plain" else QuantizedKVCache(group_size=64, bits=8)
        k = mx.random.normal((1, heads, length, dim)).astype(dtype)
        c.update_and_fetch(k, k)
        caches.append(c)
    mx.eval([c.keys for c in caches])  # type: ignore[attr-defined]
    return caches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    reexec_with_rank_environment(str(Path(__file__).resolve()), sys.argv[1:], "auto")
    model_dir = resolve_model(args.model, default_cache_dir(), lambda m: print(m, file=sys.stderr))
    model, _ = load_model(model_dir, None)
    kernels = cpu_kernels.install(model, "auto")
    g = probe(model, find_inner(model).inner).geometry
    assert g is not None
    out = {"model": model_dir.name, "device": str(mx.default_device()), "cpu_kernels": kernels}
    for length in (int(n) for n in args.lengths.split(",")):
        for kind in ("plain", "q8"):
            cache = filled(kind, g.layers, g.heads, g.key_dim, length, g.dtype)
            tok = mx.array([[1]])
            mx.eval(model(tok, cache=cache))  # type: ignore[operator]  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                mx.eval(model(tok, cache=cache))  # type: ignore[operator]
            ms = (time.perf_counter() - t0) / args.steps * 1000
            out[f"{kind} @ {length}"] = round(ms, 2)
            print(f"{kind:5s} context {length:6d}: {ms:7.2f} ms a decode step", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
