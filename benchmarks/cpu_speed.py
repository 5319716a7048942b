"""What each Linux CPU speed-up buys on one forward pass of a model: prefill of a long prompt and one
decode step of a batch at that length, with no server around it.

Each configuration runs in a child process of its own, because OpenBLAS reads its kernel choice at load:

- `openblas`: OpenBLAS preloaded with the kernels it picks itself, MLX's own attention and SiLU;
- `+coretype`: plus the kernels `python -m rank` chooses for this CPU (rank.env.openblas_coretype);
- `+cpu-kernels`: plus Orchard's attention and SiLU (rank/cpu_kernels.py), i.e. what `python -m rank`
  runs by default.

    python benchmarks/cpu_speed.py                       # embedded model, 1,555-token prompt, batch 8
    python benchmarks/cpu_speed.py --tokens 512 --batch 4 --json benchmarks/results/cpu-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = ("openblas", "+coretype", "+cpu-kernels")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In the child: load, prefill, decode; the figures as a dict."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    from rank import cpu_kernels
    from rank.env import blas_in_use
    from rank.models import default_cache_dir, load_model, resolve_model

    model_dir = resolve_model(args.model, default_cache_dir(), progress=lambda *_: None)
    model, _ = load_model(model_dir, None)
    kernels = cpu_kernels.install(model, "on" if args.config == "+cpu-kernels" else "off")
    tokens = mx.array([[(i * 37) % 4000 + 10 for i in range(args.tokens)]], dtype=mx.int32)
    prefill = []
    for _ in range(args.repeat):
        cache = [KVCache() for _ in model.layers]
        start = time.perf_counter()
        for s in range(0, args.tokens, args.chunk):
            mx.eval(model.model(tokens[:, s : s + args.chunk], cache=cache))
        prefill.append(time.perf_counter() - start)
    batch = [BatchKVCache.merge([layer] * args.batch) for layer in cache]
    step = mx.array([[11]] * args.batch, dtype=mx.int32)
    for _ in range(3):
        mx.eval(model(step, cache=batch))
    start = time.perf_counter()
    for _ in range(args.steps):
        mx.eval(model(step, cache=batch))
    decode_ms = (time.perf_counter() - start) / args.steps * 1000
    return {
        "config": args.config,
        "blas": blas_in_use(),
        "coretype": os.environ.get("OPENBLAS_CORETYPE", "(OpenBLAS's own)"),
        "cpu_kernels": kernels,
        "prefill_tokens": args.tokens,
        "prefill_chunk": args.chunk,
        "prefill_s": round(min(prefill), 2),
        "prefill_tok_s": round(args.tokens / min(prefill), 1),
        "decode_batch": args.batch,
        "decode_step_ms": round(decode_ms, 1),
    }


def child_env(config: str) -> dict[str, str]:
    from jobs import rank_environment  # type: ignore[import-not-found]

    env = rank_environment(1)
    if config == "openblas":
        env.pop("OPENBLAS_CORETYPE", None)
    return env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local mlx-lm directory or llama GGUF (default: embedded SmolLM2)")
    p.add_argument("--tokens", type=int, default=1555, help="prompt length")
    p.add_argument("--chunk", type=int, default=1024, help="prefill tokens per forward pass")
    p.add_argument("--batch", type=int, default=8, help="sequences in the decode step")
    p.add_argument("--steps", type=int, default=10, help="decode steps timed")
    p.add_argument("--repeat", type=int, default=2, help="prefills timed (the best counts)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    p.add_argument("--config", help=argparse.SUPPRESS)  # set in the child
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.config:
        print(json.dumps(measure(args)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = []
    for config in args.configs.split(","):
        argv = list(sys.argv[1:])
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--config", config],
            env=child_env(config),
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{config:13s} prefill {r['prefill_tokens']} tokens {r['prefill_s']:6.2f} s "
            f"({r['prefill_tok_s']:6.1f} tok/s)   decode step at batch {r['decode_batch']}: "
            f"{r['decode_step_ms']:6.1f} ms   [{r['coretype']}, CPU kernels {'on' if r['cpu_kernels'] else 'off'}]",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
