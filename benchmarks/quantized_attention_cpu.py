"""Does live quantized attention (`--kv-live-from`, rank.livequant) pay on this machine? A decode step of a
batch of rows at several context lengths, every row in the model's dtype against every row quantized
(8 bits, groups of 64: the default format), through the code the ranks run (rank.livequant.LiveBatch in
the packed-step seam), with Orchard's CPU kernels as configured (`auto`: on where MLX runs on a CPU) and
off (MLX's own attention, the Mac-relevant column). Also each row's KV bytes in both forms. The caches
hold random keys and values of the model's shapes (a step's cost does not depend on their values).

    .venv/bin/python benchmarks/quantized_attention_cpu.py --lengths 1024,4096,8192 --batch 4
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
from mlx_lm.models.cache import KVCache  # noqa: E402

from rank import cpu_kernels  # noqa: E402
from rank.livequant import LiveBatch, LiveQuant  # noqa: E402
from rank.model_caps import probe  # noqa: E402
from rank.model_head import find_inner  # noqa: E402
from rank.models import default_cache_dir, load_model, resolve_model  # noqa: E402


def cache_of(quantize: bool, heads: int, dim: int, length: int, dtype: mx.Dtype) -> object:
    """One sequence's cache of one layer holding `length` random positions, plain or quantized (8 bits,
    groups of 64, as `--kv-live-from` quantizes it)."""
    c = KVCache()
    k = mx.random.normal((1, heads, length, dim)).astype(dtype)
    c.update_and_fetch(k, k)
    return LiveQuant(1, 8, 64).quantize([c])[0] if quantize else c


def filled(quantize: bool, layers: int, heads: int, dim: int, length: int, rows: int, dtype: mx.Dtype) -> list[LiveBatch]:
    """Each layer's decode batch of `rows` rows of `length` positions, plain or quantized."""
    batch = [LiveBatch.merge([cache_of(quantize, heads, dim, length, dtype) for _ in range(rows)]) for _ in range(layers)]
    mx.eval([layer.state for layer in batch])
    return batch


def chunk_ms(model: object, quantize: bool, layers: int, heads: int, dim: int, length: int, chunk: int, dtype: mx.Dtype) -> float:
    """A prompt chunk of `chunk` positions of one sequence whose cache holds `length` (a prefilling
    sequence's own caches: mlx-lm's `KVCache`, or its `QuantizedKVCache` past --kv-live-from)."""
    caches = [cache_of(quantize, heads, dim, length, dtype) for _ in range(layers)]
    mx.eval([c.state for c in caches])  # type: ignore[attr-defined]
    tokens = mx.ones((1, chunk), dtype=mx.int32)
    t0 = time.perf_counter()
    mx.eval(model(tokens, cache=caches))  # type: ignore[operator]
    return (time.perf_counter() - t0) * 1000


def step_ms(model: object, cache: list[LiveBatch], rows: int, steps: int) -> float:
    tok = mx.ones((rows, 1), dtype=mx.int32)
    mx.eval(model(tok, cache=cache))  # type: ignore[operator]  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(tok, cache=cache))  # type: ignore[operator]  # (lengths stay: the same step again)
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--batch", type=int, default=4, help="rows decoding at once")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--chunk", type=int, default=256, help="prompt positions of the prefill chunk measured")
    p.add_argument("--repeats", type=int, default=2, help="measure each figure this many times, keep the best")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args()
    reexec_with_rank_environment(str(Path(__file__).resolve()), sys.argv[1:], "auto")
    model_dir = resolve_model(args.model, default_cache_dir(), lambda m: print(m, file=sys.stderr))
    model, _ = load_model(model_dir, None)
    g = probe(model, find_inner(model).inner).geometry
    assert g is not None
    out: dict[str, object] = {
        "model": model_dir.name,
        "device": str(mx.default_device()),
        "dtype": str(g.dtype),
        "batch": args.batch,
        "rows": [],
    }
    print(f"{model_dir.name} ({g.dtype}), {args.batch} rows, ms a decode step (best of {args.repeats})")
    print(
        f"{'context':>8} {'kernels':>8} {'plain':>8} {'8-bit':>8} {'ratio':>6} {'KV/row plain':>13} {'8-bit':>9}"
        f"   prefill chunk of {args.chunk}: plain, 8-bit"
    )
    for length in (int(n) for n in args.lengths.split(",")):
        caches = {q: filled(q, g.layers, g.heads, g.key_dim, length, args.batch, g.dtype) for q in (False, True)}
        per_row = {
            q: sum(x.nbytes for layer in c for part in layer.state for x in _leaves(part)) // args.batch
            for q, c in caches.items()
        }
        for setting in ("auto", "off"):
            kernels = cpu_kernels.install(model, setting)
            ms = {
                q: min(step_ms(model, c, args.batch, args.steps) for _ in range(args.repeats))
                for q, c in caches.items()
            }
            pf = {
                q: min(chunk_ms(model, q, g.layers, g.heads, g.key_dim, length, args.chunk, g.dtype) for _ in range(args.repeats))
                for q in (False, True)
            }
            row = {
                "context": length,
                "cpu_kernels": kernels,
                "plain_ms": round(ms[False], 2),
                "q8_ms": round(ms[True], 2),
                "ratio": round(ms[True] / ms[False], 3),
                "kv_bytes_per_row_plain": per_row[False],
                "kv_bytes_per_row_q8": per_row[True],
                "prefill_chunk": args.chunk,
                "prefill_plain_ms": round(pf[False], 1),
                "prefill_q8_ms": round(pf[True], 1),
            }
            out["rows"].append(row)  # type: ignore[union-attr]
            print(
                f"{length:8d} {'on' if kernels else 'off':>8} {ms[False]:8.1f} {ms[True]:8.1f} "
                f"{row['ratio']:6.2f} {per_row[False] / 2**20:10.1f} MiB {per_row[True] / 2**20:6.1f} MiB"
                f"   {pf[False]:8.0f} {pf[True]:8.0f} ms",
                flush=True,
            )
        del caches
    cpu_kernels.install(model, "auto")
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def _leaves(x: object) -> list[mx.array]:
    if isinstance(x, mx.array):
        return [x]
    if isinstance(x, (tuple, list)):
        return [leaf for item in x for leaf in _leaves(item)]
    return []


if __name__ == "__main__":
    main()
