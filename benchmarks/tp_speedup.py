"""Tensor-parallel speedup of Orchard on a compute-bound model: the same workload at 1 and 2 ranks.

Generates a deterministic random-weight llama (rank.models.make_tiny_model; default hidden 1024, 16
layers, 16 heads, 8 KV heads, FFN 2816, fp32: about 190M parameters, 0.76 GB) and runs serve_bench's
`distinct` workload, 8 concurrent streams, against `python -m rank` at each --ranks value in turn, with
the SSD tier off. Prints output tok/s per rank count and the ratio to the first.

    python benchmarks/tp_speedup.py                       # 1 and 2 ranks, 8 streams of 32 tokens
    python benchmarks/tp_speedup.py --ranks 1,2 --raw --json benchmarks/results/tp-speedup.json
    python benchmarks/tp_speedup.py --model-dir /tmp/llama-1024 --max-tokens 8 --requests 8   # quick

The model's tokenizer is byte-level and its output random bytes, which servers hold back until they form
text: streamed TTFT/ITL are not meaningful here, output tok/s (from the usage counts) and E2E are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from compare import measure_raw, measure_server, ratio, say
from jobs import Job, StopOnSignal, log_dir, start_orchard, stop_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts to measure")
    p.add_argument("--model-dir", type=Path, help="generate (or reuse) the model here (default: a temp dir)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--prompt-tokens", type=int, default=8, help="approximate words per prompt (bytes are tokens)"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="also run raw_engine.py at each rank count")
    p.add_argument("--orchard-args", default="", help="more flags for python -m rank (one string)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--bench-timeout", type=float, default=900.0)
    p.add_argument("--json", help="write the figures here")
    return p


def ensure_model(args: argparse.Namespace) -> Path:
    from rank.models import make_tiny_model

    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads}
    shape["ffn"] = args.ffn
    path = args.model_dir / ("llama-" + "-".join(f"{k}{v}" for k, v in shape.items()) + f"-seed{args.seed}")
    if (path / "config.json").exists():
        say(f"reusing {path}")
        return path
    say(f"generating a random-weight llama {shape} in {path}")
    return make_tiny_model(path, seed=args.seed, **shape)


def main() -> int:
    args = build_parser().parse_args()
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    # What compare's helpers read from their arguments:
    args.workload, args.prefix_tokens, args.temperature, args.kv_ssd = "distinct", 0, 0.0, "none"
    args.send_seed = False  # like for like: no per-request seed (compare.py)
    args.single_requests = 0  # no batching check: the servers compared here are Orchard alone
    temp = args.model_dir is None
    if temp:
        args.model_dir = Path(tempfile.mkdtemp(prefix="orchard-tp-model-"))
    logs = log_dir()
    jobs: list[Job] = []
    rows: list[dict[str, Any]] = []
    try:
        model_dir = ensure_model(args)
        extra = ["--served-model-name", model_dir.name, *shlex.split(args.orchard_args)]
        with StopOnSignal():
            for np in ranks:
                args.np = np
                summary = measure_server(
                    lambda port, np=np: start_orchard(np, str(model_dir), port, logs, "none", extra),
                    model_dir.name,
                    args,
                    jobs,
                )
                row = {"ranks": np, "orchard": summary}
                if args.raw:
                    row["raw"] = measure_raw(args, model_dir, logs)
                rows.append(row)
    except KeyboardInterrupt:
        say("interrupted: stopping every process started")
        return 130
    finally:
        stop_all(jobs)
        if temp:
            shutil.rmtree(args.model_dir, ignore_errors=True)
    base = rows[0]["orchard"]["output_tok_s"] if rows else 0
    print(
        f"\n{args.requests} requests at concurrency {args.concurrency}, {args.max_tokens} tokens, {model_dir.name}"
    )
    print(f"{'ranks':>5}  {'output tok/s':>12}  {'speedup':>7}  {'E2E p50 ms':>10}  {'errors':>6}  raw tok/s")
    for row in rows:
        s, raw = row["orchard"], row.get("raw") or {}
        speedup = ratio(s["output_tok_s"], base)
        print(
            f"{row['ranks']:>5}  {s['output_tok_s']:>12}  {speedup:>7}  {s['e2e_p50_ms']:>10}  {s['errors']:>6}"
            f"  {raw.get('output_tok_s', 'n/a')}"
        )
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps({"config": config, "rows": rows}, indent=2))
        say(f"wrote {args.json}")
    return 1 if any(r["orchard"]["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
