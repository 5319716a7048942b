"""Quality of quantized prefix-cache blocks: mean negative log-likelihood per token of text the repository
ships (README.md, docs/ARCHITECTURE.md), the continuation of each window computed from a prefix loaded from stored
blocks (rank.kvquant, through the executor's own store and load), against the same continuation computed
over the full-precision prefix.

Per format: mean NLL (nats/token) of the continuation tokens, its difference from full precision, and the
share of positions whose greedy (top-1) token is the same. The bound for 8 bits: within 0.005 nats/token
and at least 97% top-1 agreement.

    .venv/bin/python benchmarks/kv_quality.py                 # the embedded SmolLM2-135M
    .venv/bin/python benchmarks/kv_quality.py --model DIR --windows 16 --prefix 512 --continuation 256
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
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from rank import cpu_kernels  # noqa: E402
from rank.executor import Executor  # noqa: E402
from rank.kvquant import KvFormat  # noqa: E402
from rank.models import default_cache_dir, load_model, resolve_model  # noqa: E402
from rank.tokenizer import ChatTokenizer  # noqa: E402


def shipped_text() -> str:
    parts = [ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md"]
    return "\n\n".join(p.read_text() for p in parts if p.exists())


def prefix_cache(model: object, prefix: list[int]) -> list[object]:
    cache = make_prompt_cache(model)
    model(mx.array(prefix)[None], cache=cache)  # type: ignore[operator]
    mx.eval([c.keys for c in cache])
    return cache


def loaded_prefix(executor: Executor, cache: list[object]) -> list[object]:
    """The prefix's K/V (`cache`, a multiple of the block size) as a hit loads it: stored as blocks in
    the executor's format and read back, through the executor's own code. As a served hit does, the
    prefix's last position is left out, to be recomputed over the loaded blocks."""
    executor.blocks.clear()
    executor.prefilling[1] = cache
    n = cache[0].offset // executor.block_tokens  # type: ignore[attr-defined]
    ids = tuple(range(1, n + 1))
    executor._store(1, 0, ids)
    del executor.prefilling[1]
    loaded = executor._cache_from_blocks(ids)
    keep = n * executor.block_tokens - 1
    for c in loaded:
        c.keys, c.values, c.offset = c.keys[..., :keep, :], c.values[..., :keep, :], keep
    return loaded


def score(logits: mx.array, targets: list[int]) -> tuple[mx.array, mx.array]:
    """Per position: NLL of the target and the greedy token."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    t = mx.array(targets)
    nll = -mx.take_along_axis(logp, t[:, None], axis=-1)[:, 0]
    return nll, mx.argmax(logits, axis=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or repo id (default: the embedded SmolLM2-135M)")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--prefix", type=int, default=512, help="prefix tokens (a multiple of --block)")
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--formats", default="8:64,4:64,8:32", help="bits:group_size, comma-separated")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    reexec_with_rank_environment(str(Path(__file__).resolve()), sys.argv[1:], "auto")  # OpenBLAS, as a rank
    model_dir = resolve_model(args.model, default_cache_dir(), lambda m: print(m, file=sys.stderr))
    model, _ = load_model(model_dir, None)
    cpu_kernels.install(model, "auto")  # the attention and SiLU a rank runs on a CPU
    tokens = ChatTokenizer(model_dir).encode(shipped_text())
    span = args.prefix + args.continuation
    windows = min(args.windows, len(tokens) // span)
    print(f"{model_dir.name}: {len(tokens)} tokens of shipped text, {windows} windows of {args.prefix} + "
          f"{args.continuation}", file=sys.stderr)  # fmt: skip
    asked = (f.split(":") for f in args.formats.split(","))
    formats = [KvFormat(16)] + [KvFormat(int(b), int(g)) for b, g in asked]
    executors = [Executor(model, True, block_tokens=args.block, kv_format=kv) for kv in formats]
    sums = {e.kv.name: [0.0, 0, 0] for e in executors}  # NLL sum, top-1 agreements, tokens
    t0 = time.perf_counter()
    for w in range(windows):
        window = tokens[w * span : (w + 1) * span]
        prefix, rest = window[: args.prefix], window[args.prefix :]
        cache = prefix_cache(model, prefix)
        feed = mx.array([prefix[-1], *rest])[None]
        reference = None
        for executor in executors:  # kv16 first: the reference
            loaded = loaded_prefix(executor, cache)
            logits = model(feed, cache=loaded)[0, :-1].astype(mx.float32)  # type: ignore[operator]
            nll, top = score(logits, rest)
            mx.eval(nll, top)
            reference = top if reference is None else reference
            acc = sums[executor.kv.name]
            acc[0] += nll.sum().item()
            acc[1] += int((top == reference).sum().item())
            acc[2] += len(rest)
        print(f"window {w + 1}/{windows} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    results: dict[str, dict[str, float]] = {}
    for executor in executors:
        total_nll, agree, total = sums[executor.kv.name]
        results[executor.kv.name] = {
            "nll": total_nll / total,
            "top1_agreement": agree / total,
            "tokens": total,
            "block_bytes": executor.block_bytes,
        }
    base = results["kv16"]
    for name, r in results.items():
        r["dnll"] = r["nll"] - base["nll"]
        r["blocks_per_byte_vs_kv16"] = base["block_bytes"] / r["block_bytes"]
        print(
            f"{name:7s} NLL {r['nll']:.5f} nats/token  dNLL {r['dnll']:+.5f}  top-1 agreement "
            f"{r['top1_agreement']:.2%}  ({r['tokens']} tokens; block {r['block_bytes']} B, "
            f"{r['blocks_per_byte_vs_kv16']:.2f}x the blocks of kv16 per byte)"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": model_dir.name, "results": results}, indent=2))


if __name__ == "__main__":
    main()
