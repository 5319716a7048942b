"""What LoRA adapters cost (issue #18): a fused adapter against the base model, and unfused adapters
(several requests across several adapters in one batch) against the base.

Two modes:
- `raw` (default; needs nothing else): Orchard's `Executor` driven by hand-written step plans, TP=1, on
  the model (default: the embedded SmolLM2) with synthetic adapters of rank --rank on every linear of
  every layer (tests/lora_check.py `build_adapter`, mlx-lm's own format). Runs, each --concurrency
  requests of --prompt-tokens prompt tokens and --max-tokens greedy tokens, all admitted at once:
    base          the model alone (no adapter slots: its layers as loaded)
    fused         --adapter-path: the first adapter fused at load
    slots-base    adapter slots held, every request on the base (what holding slots costs)
    one-adapter   every request on the first adapter
    mixed         requests spread round-robin across --adapters adapters
  and reports decode tokens/s (steps that only decode) and end-to-end tokens/s per run.
- `server`: against a running server started with `--lora NAME=DIR` flags: the same chat workload as
  serve_bench, with every request on the base model name, then spread across --models (twice, taking
  turns; the second round is reported).

    python benchmarks/lora_bench.py --json lora.json
    python benchmarks/lora_bench.py server --url http://127.0.0.1:8000 --base tiny --models a,b,c,d
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs import reexec_with_rank_environment
from serve_bench import Result, make_prompts, one, summarise

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=("raw", "server"), default="raw")
    p.add_argument("--model", help="raw: local mlx-lm model directory or GGUF (default: embedded SmolLM2)")
    p.add_argument("--cache-dir", type=Path, help="where converted models live (default: Orchard's cache)")
    p.add_argument("--adapters", type=int, default=4, help="raw: adapters of the mixed run")
    p.add_argument("--rank", type=int, default=8, help="raw: LoRA rank of the synthetic adapters")
    p.add_argument("--concurrency", type=int, default=8, help="requests served at once")
    p.add_argument("--prompt-tokens", type=int, default=64, help="raw: prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="raw: timed repetitions of each run (best kept)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server: the running job")
    p.add_argument("--base", help="server: the base model's name (default: the first of /v1/models)")
    p.add_argument("--models", default="", help="server: adapter model names, comma-separated")
    p.add_argument("--requests", type=int, default=16, help="server: requests per run")
    p.add_argument("--api-key")
    p.add_argument(
        "--blas", choices=("auto", "openblas", "none"), default=os.environ.get("ORCHARD_BLAS", "auto")
    )
    p.add_argument("--json", help="also write the figures here")
    return p


# -- raw: the executor alone ----------------------------------------------------------------------------


def _time_run(executor: Any, prompts: list[list[int]], slots: list[int], max_tokens: int) -> dict[str, float]:
    """All requests admitted at once, prompts prefilled whole (packed), then decoded together."""
    import mlx.core as mx

    from cluster.messages import Admit, PrefillChunk, StepPlan

    ids = list(range(len(prompts)))
    start = time.perf_counter()
    plan = StepPlan(
        0,
        admit=tuple(Admit(i, (), s) for i, s in zip(ids, slots, strict=True)),
        prefill=tuple(PrefillChunk(i, 0, tuple(p), True) for i, p in zip(ids, prompts, strict=True)),
    )
    out = executor.execute(plan)
    tokens = [int(t) for t in mx.argmax(out.logits, axis=-1).tolist()]
    decode_start = time.perf_counter()
    for step in range(1, max_tokens):
        out = executor.execute(StepPlan(step, decode_ids=tuple(ids), decode_tokens=tuple(tokens)))
        tokens = [int(t) for t in mx.argmax(out.logits, axis=-1).tolist()]
    end = time.perf_counter()
    executor.execute(StepPlan(max_tokens, release=tuple(ids)))
    n = len(prompts)
    return {
        "decode_tok_s": n * (max_tokens - 1) / (end - decode_start),
        "e2e_tok_s": n * max_tokens / (end - start),
        "prefill_s": decode_start - start,
    }


def _interleaved(
    runs: dict[str, tuple[Any, list[int]]], prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Each run `--repeat` times, taking turns (so drift in the machine's load hits every run alike);
    the best decode rate of each is kept."""
    for executor, slots in runs.values():
        _time_run(executor, prompts[:2], slots[:2], 4)  # warm-up
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeat):
        for name, (executor, slots) in runs.items():
            r = _time_run(executor, prompts, slots, args.max_tokens)
            if name not in best or r["decode_tok_s"] > best[name]["decode_tok_s"]:
                best[name] = r
    return best


def raw(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from rank import cpu_kernels
    from rank.executor import Executor
    from rank.models import default_cache_dir, load_model, resolve_model
    from tests.lora_check import build_adapter

    model_dir = resolve_model(args.model, args.cache_dir or default_cache_dir(), progress=print)
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    adapters = [
        build_adapter(model_dir, tmp / f"a{i}", seed=i, rank=args.rank, num_layers=10_000, b_std=0.01)
        for i in range(args.adapters)
    ]
    rng = np.random.default_rng(0)
    vocab = 200  # ordinary byte/word tokens of any vocabulary
    prompts = [[int(t) for t in rng.integers(3, vocab, args.prompt_tokens)] for _ in range(args.concurrency)]
    base_slots = [0] * args.concurrency

    def executor(model: Any, max_loras: int = 0) -> Executor:
        cpu_kernels.install(model)
        return Executor(model, want_logits=True, block_tokens=32, max_loras=max_loras)

    base_model, _ = load_model(model_dir, None)
    fused_model, _ = load_model(model_dir, None, adapter_path=adapters[0])
    model, _ = load_model(model_dir, None)
    slotted = executor(model, max_loras=len(adapters))
    for slot, path in enumerate(adapters, start=1):
        slotted.load_adapter(slot, path)
    runs = {
        "base": (executor(base_model), base_slots),
        "fused": (executor(fused_model), base_slots),
        "slots-base": (slotted, base_slots),
        "one-adapter": (slotted, [1] * args.concurrency),
        "mixed": (slotted, [1 + i % len(adapters) for i in range(args.concurrency)]),
    }
    results = _interleaved(runs, prompts, args)
    base = results["base"]["decode_tok_s"]
    for r in results.values():
        r["decode_vs_base"] = r["decode_tok_s"] / base
    return {"mode": "raw", "model": model_dir.name, "config": vars_json(args), "runs": results}


# -- server: a running job --------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace, models: list[str]) -> dict[str, object]:
    import httpx

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = make_prompts(args)
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=600.0) as client:

        async def guarded(i: int, messages: list[dict[str, str]]) -> Result:
            async with gate:
                return await one(client, args, models[i % len(models)], messages)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(i, m) for i, m in enumerate(prompts)))
        return summarise(list(results), time.perf_counter() - start)


def server(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    base = args.base or httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    names = [m for m in args.models.split(",") if m]
    if not names:
        raise SystemExit("server mode needs --models NAME,NAME,... (the server's --lora names)")
    args.workload, args.prefix_tokens, args.temperature, args.seed = "distinct", 0, 0.0, 0
    runs: dict[str, dict[str, object]] = {}
    for _ in range(2):  # twice, taking turns: the first round warms the job up (shapes, caches)
        runs["base"] = asyncio.run(_serve(args, [base]))
        runs["mixed"] = asyncio.run(_serve(args, names))
    return {"mode": "server", "base": base, "models": names, "config": vars_json(args), "runs": runs}


def vars_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def main() -> int:
    reexec_with_rank_environment(__file__, sys.argv[1:], build_parser().parse_args().blas)
    args = build_parser().parse_args()
    report = raw(args) if args.mode == "raw" else server(args)
    for name, run in report["runs"].items():
        print(name, json.dumps(run))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
