"""Load generator for any OpenAI-compatible endpoint (Orchard, mlx_lm.server, ...).

Streams chat completions at a fixed concurrency (or request rate), bounded in count and time, and reports vLLM `bench serve`'s metrics: TTFT, TPOT (per request, excluding the first token),
ITL (every gap between streamed chunks) and E2E latency as p50/p90/p99, output tokens/s, requests/s.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --concurrency 8 --requests 16
    python benchmarks/serve_bench.py --workload shared-prefix --prefix-tokens 1500 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = (
    "orchard apple tree branch leaf root soil rain summer harvest basket ladder cider blossom bee honey "
    "river stone bridge valley mountain cloud wind morning evening lantern market bread cheese wine"
).split()


@dataclass
class Result:
    ok: bool
    start: float = 0.0  # perf_counter when the request was sent
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_prompts(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    rng = random.Random(args.seed)
    shared = words(rng, args.prefix_tokens) if args.workload == "shared-prefix" else ""
    prompts = []
    for i in range(args.requests):
        if shared:
            content = f"Read this document:\n{shared}\n\nQuestion {i}: which word appears most often? {words(rng, 8)}"
        else:
            content = f"Request {i}. {words(rng, args.prompt_tokens)}. Summarise the text above."
        prompts.append([{"role": "user", "content": content}])
    return prompts


async def one(
    client: httpx.AsyncClient, args: argparse.Namespace, model: str, messages: list[dict[str, str]]
) -> Result:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if getattr(args, "send_seed", False):
        # Off by default: mlx_lm.server serves any request with a seed on its sequential path
        # (`_is_batchable` requires seed None), so sending one measures a server that is not batching.
        body["seed"] = args.seed
    if getattr(args, "ignore_eos", None):  # every request generates exactly max_tokens, like the raw engine
        body["logit_bias"] = {str(t): -100 for t in args.ignore_eos}
    start = time.perf_counter()
    last = start
    res = Result(ok=False, start=start)
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"])[:200]
                    return res
                if data.get("usage"):
                    res.output_tokens = data["usage"]["completion_tokens"]
                    res.prompt_tokens = data["usage"]["prompt_tokens"]
                if data.get("choices") and (data["choices"][0].get("delta", {}).get("content")):
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
        res.e2e = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most requests streaming tokens at one instant (between their first and last token): 1 for a
    server that serves requests one after another, however many were sent at once."""
    edges = sorted([(a, 1) for a, b in spans if b > a] + [(b, -1) for a, b in spans if b > a])
    peak = now = 0
    for _, step in edges:  # at equal times -1 sorts first: touching spans do not overlap
        now += step
        peak = max(peak, now)
    return peak


def summarise(results: list[Result], wall: float) -> dict[str, object]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    summary: dict[str, object] = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "duration_s": round(wall, 3),
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tok_s": round(out_tokens / wall, 2) if wall else 0.0,
        "requests_s": round(len(ok) / wall, 3) if wall else 0.0,
    }
    for name, vals in (
        ("ttft", [r.ttft for r in ok]),
        ("tpot", tpot),
        ("itl", itl),
        ("e2e", [r.e2e for r in ok]),
    ):
        for q in (0.5, 0.9, 0.99):
            summary[f"{name}_p{int(q * 100)}_ms"] = round(pct(vals, q) * 1000, 1)
        summary[f"{name}_mean_ms"] = round(statistics.fmean(vals) * 1000, 1) if vals else float("nan")
    summary["peak_decoding_streams"] = peak_overlap([(r.start + r.ttft, r.start + r.e2e) for r in ok])
    first_errors = [r.error for r in results if not r.ok][:3]
    if first_errors:
        summary["first_errors"] = first_errors
    return summary


async def run(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, headers=headers) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = make_prompts(args)
        sem = asyncio.Semaphore(args.concurrency)
        deadline = time.perf_counter() + args.max_duration

        async def guarded(i: int, messages: list[dict[str, str]]) -> Result:
            if args.rate > 0:
                await asyncio.sleep(i / args.rate)
            async with sem:
                if time.perf_counter() > deadline:
                    return Result(ok=False, error="skipped: --max-duration reached")
                return await one(client, args, model, messages)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(i, m) for i, m in enumerate(prompts)))
        wall = time.perf_counter() - start
    summary = summarise(list(results), wall)
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    summary["model"] = model
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the first from /v1/models)")
    p.add_argument("--api-key")
    p.add_argument("--workload", choices=("distinct", "shared-prefix"), default="distinct")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--rate", type=float, default=0.0, help="requests per second (0: all at once, bounded by concurrency)"
    )
    p.add_argument("--prompt-tokens", type=int, default=120, help="approximate words per distinct prompt")
    p.add_argument("--prefix-tokens", type=int, default=1500, help="approximate words of the shared document")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")
    p.add_argument(
        "--send-seed",
        action="store_true",
        help="also send --seed in every request (puts mlx_lm.server on its sequential, unbatched path)",
    )
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument(
        "--max-duration", type=float, default=900.0, help="stop starting requests after this many seconds"
    )
    p.add_argument("--json", help="also write the summary here")
    p.add_argument(
        "--ignore-eos",
        type=int,
        action="append",
        metavar="TOKEN_ID",
        help="suppress this end token with logit_bias -100 so every request yields --max-tokens (repeatable)",
    )
    args = p.parse_args()
    summary = asyncio.run(run(args))
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key != "config":
            print(f"{key:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
