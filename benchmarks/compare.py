"""Orchard against mlx_lm.server (and optionally the raw engine ceiling) on the same model, ranks and
workload, printed side by side.

    python benchmarks/compare.py --np 1 --workload distinct --json
    python benchmarks/compare.py --np 3 --workload shared-prefix --raw --json results.json
    python benchmarks/compare.py --requests 4 --max-tokens 8 --servers orchard --raw   # quick check

Like for like: every system gets only what keeps it on its fastest path. No request carries a `seed`
(mlx_lm.server serves a seeded request on its sequential path), and each server's batched rate is checked
against its own single-stream rate on the same prompts: a server whose rate at --concurrency does not
exceed its single-stream rate did not batch, and its column is marked INVALID with the reason (decode rates:
the streams decoding at once over the time per output token, against one stream's; see batching_verdict).
Orchard runs twice (`--kernels both`, the default): with its Linux-only CPU kernels (numpy attention,
rank/cpu_kernels.py) and with `--cpu-kernels off`. On a Mac neither system has those kernels, so the
Mac-relevant comparison is the "kernels off" column; both get the same OpenBLAS with the same kernels.

Workloads (serve_bench's prompt generator, seed 0): `distinct` is 8 concurrent ~150-token chats;
`shared-prefix` is a burst of 8 concurrent chats about one ~1,500-word document. Orchard starts with an
empty KV cache (a fresh SSD folder, or none with --kv-ssd none), so nothing is cached before the burst.

Both servers run with the same --np (under the venv's mpirun with the launcher's flags; one rank runs
alone, as `python -m rank` fails under a one-process mpirun) and the same converted model folder
(rank.models.resolve_model), one after the other on free loopback ports so they never compete for cores.
mlx_lm.server gets the environment our ranks give themselves (rank.env: MLX_MPI_LIBNAME, OpenBLAS preload,
OMPI_MCA_mpi_yield_when_idle) and is addressed as "default_model" (its /v1/models may not answer). Each
server gets one untimed warm-up request unrelated to the workload. Every process started is stopped at
the end, also on errors and Ctrl-C. Ratios are Orchard / other: above 1 is better for tok/s and req/s,
worse for latencies. The raw engine ignores EOS (exactly --max-tokens per request); servers stop at EOS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import serve_bench
from jobs import (
    Job,
    StopOnSignal,
    free_port,
    job_command,
    log_dir,
    run_to_end,
    start_mlx_lm,
    start_orchard,
    stop_all,
)

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (
    ("output tok/s", "output_tok_s"),
    ("requests/s", "requests_s"),
    ("TTFT p50 ms", "ttft_p50_ms"),
    ("TTFT p90 ms", "ttft_p90_ms"),
    ("ITL p50 ms", "itl_p50_ms"),
    ("TPOT p50 ms", "tpot_p50_ms"),
    ("E2E p50 ms", "e2e_p50_ms"),
    ("output tokens", "output_tokens"),
    ("errors", "errors"),
    ("peak decoding streams", "peak_decoding_streams"),
)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench_namespace(args: argparse.Namespace, url: str, model: str, seed: int | None = None) -> argparse.Namespace:
    """The arguments serve_bench.run reads, from ours (`seed`: the prompts' seed, default --seed)."""
    return argparse.Namespace(
        url=url,
        model=model,
        api_key=None,
        workload=args.workload,
        requests=args.requests,
        concurrency=args.concurrency,
        rate=0.0,
        prompt_tokens=args.prompt_tokens,
        prefix_tokens=args.prefix_tokens,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed if seed is None else seed,
        send_seed=args.send_seed,
        timeout=args.bench_timeout,
        max_duration=args.bench_timeout,
        ignore_eos=eos_ids(args.model_dir) if getattr(args, "ignore_eos", False) else None,
    )


def eos_ids(model_dir: Path) -> list[int]:
    """The model's end tokens, from its config (what both servers stop on)."""
    config = json.loads((model_dir / "config.json").read_text())
    eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    try:
        tok = json.loads((model_dir / "tokenizer_config.json").read_text())
        for added in tok.get("added_tokens_decoder", {}).items():
            if added[1].get("content") in ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"):
                ids.append(int(added[0]))
    except (OSError, ValueError):
        pass
    return sorted({int(i) for i in ids})


def warm_up(url: str, model: str, timeout: float) -> None:
    """One short untimed chat unrelated to the workload (first-call allocations, lazy imports)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
    if r.status_code != 200:
        raise SystemExit(f"warm-up request to {url} failed: HTTP {r.status_code} {r.text[:200]}")


def measure_server(
    start: Callable[[int], Job], model: str, args: argparse.Namespace, jobs: list[Job]
) -> dict[str, Any]:
    """Start a server, wait for it, warm it up, run serve_bench's workload, then the same prompts one at
    a time (the batching check), stop it."""
    job = start(free_port())
    jobs.append(job)
    say(f"{job.name}: starting on {job.url} (log {job.log_path})")
    ready = job.wait_ready(args.ready_timeout, say)
    say(f"{job.name}: ready after {ready:.1f} s; warm-up, then {args.requests} requests")
    for _ in range(args.warmup):
        warm_up(job.url, model, args.bench_timeout)
    runs = []
    for i in range(args.repeat):  # new prompts each time (seed + i): nothing cached from the run before
        runs.append(asyncio.run(serve_bench.run(bench_namespace(args, job.url, model, args.seed + i))))
        if args.repeat > 1:
            say(f"{job.name}: run {i + 1}/{args.repeat}: {runs[-1]['output_tok_s']} output tok/s")
    summary = median_of(runs)
    bench = bench_namespace(args, job.url, model)
    summary["ready_s"] = round(ready, 1)
    say(f"{job.name}: {summary['output_tok_s']} output tok/s, {summary['errors']} errors")
    if args.concurrency > 1 and args.single_requests > 0:
        bench.concurrency, bench.requests = 1, min(args.single_requests, args.requests)
        say(f"{job.name}: the batching check: {bench.requests} of the same prompts one at a time")
        single = asyncio.run(serve_bench.run(bench))
        summary["single_stream_tok_s"] = single["output_tok_s"]
        summary["single_stream_itl_p50_ms"] = single["itl_p50_ms"]
        summary.update(
            batching_verdict(
                summary["output_tok_s"],
                single["output_tok_s"],
                summary["peak_decoding_streams"],
                args.concurrency,
                summary.get("tpot_p50_ms"),
                single.get("itl_p50_ms"),
            )
        )
        if not summary["valid"]:
            say(f"{job.name}: INVALID: {summary['invalid_reason']}")
    job.stop()
    return summary


def batching_verdict(
    batched: float,
    single: float,
    peak_streams: int,
    concurrency: int,
    tpot_ms: float | None = None,
    single_itl_ms: float | None = None,
) -> dict[str, Any]:
    """A server that batches decodes several streams in one step: its streams' tokens together come faster
    than one stream's alone, and several requests stream at once. One that does not (mlx_lm.server given
    a `seed`, or any sequential server) is no peer to compare with.

    The decode rates decide (the streams that decoded at once over the batched run's time per output
    token, against 1 over the single stream's inter-token latency) when both are known; the output rates
    (prefill included) otherwise. The output rates mislead on a shared document: the single streams run
    after the burst, against a warm prompt cache (Orchard's prefix cache, mlx_lm.server's prompt cache),
    while the burst prefilled the document cold."""
    reasons = []
    decode = None
    if tpot_ms and single_itl_ms and peak_streams > 1:
        decode = round((peak_streams * 1000 / tpot_ms) / (1000 / single_itl_ms), 2)
        if not decode > 1:
            reasons.append(
                f"{peak_streams} streams at {tpot_ms} ms a token decode no faster than one at {single_itl_ms} ms"
            )
    elif not batched > single:
        reasons.append(
            f"{batched} tok/s at {concurrency} concurrent does not exceed its single-stream {single} tok/s"
        )
    if peak_streams <= 1:
        reasons.append("no two requests ever streamed tokens at the same time")
    gain = round(batched / single, 2) if single else None
    if not reasons:
        return {"valid": True, "batching_gain": gain, "decode_batching_gain": decode}
    reason = "; ".join(reasons) + ": it did not batch (a per-request seed, or a sequential path)"
    return {"valid": False, "invalid_reason": reason, "batching_gain": gain, "decode_batching_gain": decode}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of repeated runs: each number the median of the runs' (errors: their sum), and the
    headline figures of every run beside it (`<metric>_runs`). A single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, bool) or not all(isinstance(v, int | float) for v in values):
            continue
        out[key] = sum(values) if key == "errors" else round(statistics.median(values), 2)  # type: ignore[arg-type]
        if key in REPEATED:
            out[f"{key}_runs"] = values
    out["repeats"] = len(runs)
    return out


REPEATED = ("output_tok_s", "ttft_p50_ms", "itl_p50_ms", "tpot_p50_ms", "e2e_p50_ms")


def measure_raw(args: argparse.Namespace, model_dir: Path, logs: Path) -> dict[str, Any] | None:
    runs = []
    for i in range(args.repeat):  # the servers' prompts, run for run
        name = f"raw-engine-np{args.np}-kernels-{os.environ.get('ORCHARD_CPU_KERNELS', 'auto')}-{i + 1}"
        out = logs / f"{name}.json"
        script = Path(__file__).resolve().parent / "raw_engine.py"
        flags = ["--model", str(model_dir), "--workload", args.workload, "--requests", str(args.requests)]
        flags += ["--concurrency", str(args.concurrency), "--prompt-tokens", str(args.prompt_tokens)]
        flags += ["--prefix-tokens", str(args.prefix_tokens), "--max-tokens", str(args.max_tokens)]
        flags += ["--temperature", str(args.temperature), "--seed", str(args.seed + i), "--warmup", str(args.warmup)]
        env = dict(os.environ)
        cmd = job_command(args.np, [sys.executable, str(script), *flags, "--json", str(out)], env)
        say(f"raw engine: {args.requests} requests on {args.np} rank(s) (log {logs / name}.log)")
        job = run_to_end(name, cmd, args.bench_timeout, logs, env)
        if not out.exists():
            say(f"raw engine failed (exit {job.proc.returncode}):\n{job.log_tail()}")
            return None
        runs.append(json.loads(out.read_text()))
        say(f"raw engine: {runs[-1]['output_tok_s']} output tok/s")
    return median_of(runs)


def ratio(a: Any, b: Any) -> str:
    try:
        return f"{float(a) / float(b):.2f}" if float(b) else "n/a"
    except (TypeError, ValueError):
        return "n/a"


def table(results: dict[str, dict[str, Any] | None]) -> str:
    """One column per system measured, then Orchard / mlx_lm.server for each Orchard column (the "kernels
    off" one is the Mac-relevant claim) and Orchard / raw engine with the same kernels."""
    names = list(results)
    peer = results.get("mlx_lm.server") or {}
    ratios: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for name in names:
        if not name.startswith("orchard"):
            continue
        orch = results[name] or {}
        suffix = name[len("orchard") :]
        if peer:
            ratios.append((f"{name}/mlx_lm", orch, peer))
        raw = results.get(f"raw engine{suffix}") or {}
        if raw:
            ratios.append((f"{name}/raw", orch, raw))
    head = ("metric", *names, *(r[0] for r in ratios))
    rows = [head]
    for label, key in ROWS:
        cells = [str((results[n] or {}).get(key, "n/a")) if results[n] else "FAILED" for n in names]
        rows.append((label, *cells, *(ratio(a.get(key), b.get(key)) for _, a, b in ratios)))
    checks = [_verdict(results[n]) for n in names]
    rows.append(
        ("single-stream tok/s", *(str((results[n] or {}).get("single_stream_tok_s", "-")) for n in names))
    )
    rows.append(("batched?", *checks))
    rows = [r + ("",) * (len(head) - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    )


def _verdict(result: dict[str, Any] | None) -> str:
    if not result or "valid" not in result:
        return "-"
    if not result["valid"]:
        return "NO: INVALID"
    decode = result.get("decode_batching_gain")
    return f"yes ({decode}x decode)" if decode else f"yes ({result.get('batching_gain')}x)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=1, help="ranks for every server and the raw engine")
    p.add_argument("--model", help="local mlx-lm directory or llama GGUF (default: embedded SmolLM2)")
    p.add_argument("--workload", choices=("distinct", "shared-prefix"), default="distinct")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=120, help="approximate words per distinct prompt")
    p.add_argument("--prefix-tokens", type=int, default=1500, help="approximate words of the shared document")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--send-seed",
        action="store_true",
        help="send --seed in every request: shows the batching check catching mlx_lm.server's sequential path",
    )
    p.add_argument("--servers", default="orchard,mlx_lm", help="comma-separated subset of orchard,mlx_lm")
    p.add_argument("--raw", action="store_true", help="also run raw_engine.py for the ceiling")
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="servers get logit_bias -100 on the model's end tokens, so every request yields --max-tokens "
        "like the raw engine (default: on with --raw, else off: natural EOS)",
    )
    p.add_argument(
        "--kv-ssd",
        choices=("fresh", "none"),
        default="fresh",
        help="Orchard's SSD tier: empty temp dir or off",
    )
    p.add_argument(
        "--kernels",
        choices=("both", "auto", "on", "off"),
        default="both",
        help="Orchard's Linux-only CPU kernels (rank/cpu_kernels.py), for Orchard and the raw engine alike: "
        "both (default) measures each with and without them (--cpu-kernels auto and off); mlx_lm.server "
        "runs stock mlx-lm, as users would run it",
    )
    p.add_argument(
        "--single-requests",
        type=int,
        default=3,
        help="requests sent one at a time to each server after the run: its single-stream rate, which its "
        "batched rate must exceed (0: skip the check)",
    )
    p.add_argument("--orchard-args", default="", help="more flags for python -m rank (one string)")
    p.add_argument("--mlx-lm-args", default="", help="more flags for mlx_lm server (one string)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed runs per system, on new prompts each (--seed, --seed + 1, ...: the same for every "
        "system); figures are the runs' medians, each run's headline figures kept beside them. A busy "
        "2-core machine moves a single run by 10%%",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up requests per server")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a server may take to start")
    p.add_argument("--bench-timeout", type=float, default=900.0, help="seconds one workload run may take")
    p.add_argument(
        "--json", nargs="?", const="auto", help="write everything here (no value: benchmarks/results/)"
    )
    return p


def main() -> int:
    args = build_parser().parse_args()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if set(servers) - {"orchard", "mlx_lm"}:
        raise SystemExit(f"--servers: unknown {sorted(set(servers) - {'orchard', 'mlx_lm'})}")
    from cluster.errors import OrchardError
    from rank.models import check_tensor_parallel, default_cache_dir, resolve_model

    try:
        model_dir = resolve_model(args.model, default_cache_dir(), progress=say)
        check_tensor_parallel(json.loads((model_dir / "config.json").read_text()), args.np)
    except OrchardError as exc:
        raise SystemExit(f"compare: {exc}") from exc
    args.model_dir = model_dir
    if args.ignore_eos is None:
        args.ignore_eos = args.raw
    kernels = ["auto", "off"] if args.kernels == "both" else [args.kernels]
    logs = log_dir()
    kv = tempfile.mkdtemp(prefix="orchard-bench-kv-") if args.kv_ssd == "fresh" else "none"
    say(f"model {model_dir}, np {args.np}, workload {args.workload}, logs in {logs}")
    results: dict[str, dict[str, Any] | None] = {}
    jobs: list[Job] = []
    try:
        with StopOnSignal():
            for k in kernels if "orchard" in servers else []:
                os.environ["ORCHARD_CPU_KERNELS"] = k  # read by Orchard's ranks
                extra = ["--served-model-name", model_dir.name, *shlex.split(args.orchard_args)]
                if args.kv_ssd == "fresh":
                    shutil.rmtree(kv, ignore_errors=True)  # every run starts with nothing cached
                results[_column("orchard", k, kernels)] = measure_server(
                    lambda port, extra=extra: start_orchard(args.np, str(model_dir), port, logs, kv, extra),
                    model_dir.name,
                    args,
                    jobs,
                )
            if "mlx_lm" in servers:
                os.environ.pop("ORCHARD_CPU_KERNELS", None)
                extra = shlex.split(args.mlx_lm_args)
                results["mlx_lm.server"] = measure_server(
                    lambda port: start_mlx_lm(args.np, model_dir, port, logs, extra),
                    "default_model",
                    args,
                    jobs,
                )
            for k in kernels if args.raw else []:
                os.environ["ORCHARD_CPU_KERNELS"] = k
                results[_column("raw engine", k, kernels)] = measure_raw(args, model_dir, logs)
    except KeyboardInterrupt:
        say("interrupted: stopping every process started")
        return 130
    finally:
        stop_all(jobs)
        if kv != "none":
            shutil.rmtree(kv, ignore_errors=True)
    runs = f", medians of {args.repeat} runs" if args.repeat > 1 else ""
    print(
        f"\n{args.workload}, {args.requests} requests at concurrency {args.concurrency}, np {args.np}, "
        f"{model_dir.name}{runs}"
    )
    print(table(results))
    if args.json:
        path = (
            Path(args.json)
            if args.json != "auto"
            else RESULTS / f"compare-{args.workload}-np{args.np}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model_dir": str(model_dir),
            "machine": f"{os.cpu_count()} cores",
            "results": results,
        }
        path.write_text(json.dumps(report, indent=2))
        say(f"wrote {path}")
    invalid = [name for name, r in results.items() if r and r.get("valid") is False]
    for name in invalid:
        print(f"INVALID {name}: {results[name]['invalid_reason']}")  # type: ignore[index]
    return 1 if invalid or any(r is None or r.get("errors") for r in results.values()) else 0


def _column(system: str, kernels: str, measured: list[str]) -> str:
    return f"{system} (kernels off)" if kernels == "off" and len(measured) > 1 else system


if __name__ == "__main__":
    sys.exit(main())
