"""Milliseconds of one `Executor.execute` on a tiny random llama: a decode step of a batch, and a packed
step (prompt chunks of new sequences plus the batch's decode rows in one pass). The model is small on
purpose: the Python work around the forward pass (the executor, the packing seam, per-layer hooks) is a
large share of the step, so a change that adds some shows here first.

    python benchmarks/step_micro.py                      # CPU kernels on, batch 8, 3 runs
    python benchmarks/step_micro.py --cpu-kernels off --runs 5 --json /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_once(args: argparse.Namespace, model_dir: Path) -> dict[str, float]:
    """One run: prefill the batch, then time decode steps and packed steps; medians in ms."""
    import mlx.core as mx
    from mlx_lm import load

    from cluster.messages import Admit, PrefillChunk, StepPlan
    from rank import cpu_kernels
    from rank.executor import Executor

    model, _ = load(str(model_dir))
    cpu_kernels.install(model, args.cpu_kernels)
    executor = Executor(model, want_logits=True)
    step = 0

    def plan(**kw: Any) -> StepPlan:
        nonlocal step
        step += 1
        return StepPlan(step, **kw)

    batch = list(range(1, args.batch + 1))
    prompts = {sid: tuple(3 + (sid * 13 + i * 7) % 200 for i in range(args.context)) for sid in batch}
    executor.execute(
        plan(
            admit=tuple(Admit(sid, ()) for sid in batch),
            prefill=tuple(PrefillChunk(sid, 0, prompts[sid], True) for sid in batch),
        )
    )
    tokens = tuple(5 + i for i in range(args.batch))
    decode, packed = [], []
    for _ in range(3):  # warm-up: compiled kernels, MLX's buffer cache
        executor.execute(plan(decode_ids=tuple(batch), decode_tokens=tokens))
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = executor.execute(plan(decode_ids=tuple(batch), decode_tokens=tokens))
        decode.append((time.perf_counter() - t0) * 1000)
        assert out.logits is not None
    new_id = 1000
    for i in range(args.steps + 2):
        ids = (new_id, new_id + 1)
        new_id += 2
        admit = tuple(Admit(sid, ()) for sid in ids)
        chunks = tuple(PrefillChunk(sid, 0, tuple(range(10, 10 + args.chunk // 2))) for sid in ids)
        t0 = time.perf_counter()
        executor.execute(plan(admit=admit, prefill=chunks, decode_ids=tuple(batch), decode_tokens=tokens))
        if i >= 2:  # the first two are warm-up
            packed.append((time.perf_counter() - t0) * 1000)
        executor.execute(plan(release=ids))
    mx.clear_cache()
    return {"decode_ms": statistics.median(decode), "packed_ms": statistics.median(packed)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-kernels", default="on", choices=("auto", "on", "off"))
    p.add_argument("--batch", type=int, default=8, help="decode rows")
    p.add_argument("--context", type=int, default=128, help="prompt tokens of each decode row")
    p.add_argument(
        "--chunk", type=int, default=64, help="prompt tokens of each packed sequence (half per step)"
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="steps timed per run (the median counts)")
    p.add_argument("--runs", type=int, default=3, help="runs (the median of the runs' medians is reported)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    from rank.models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "tiny", seed=7, layers=args.layers)
        runs = [run_once(args, model_dir) for _ in range(args.runs)]
    summary = {
        "cpu_kernels": args.cpu_kernels,
        "batch": args.batch,
        "runs": runs,
        "decode_ms": round(statistics.median(r["decode_ms"] for r in runs), 3),
        "packed_ms": round(statistics.median(r["packed_ms"] for r in runs), 3),
    }
    print(
        f"CPU kernels {args.cpu_kernels}: decode step of {args.batch} rows {summary['decode_ms']:.2f} ms, "
        f"packed step (2 chunks + {args.batch} rows) {summary['packed_ms']:.2f} ms "
        f"(median of {args.runs} runs' medians; per run: "
        + ", ".join(f"{r['decode_ms']:.2f}/{r['packed_ms']:.2f}" for r in runs)
        + ")"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
