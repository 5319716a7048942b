"""Speculative decoding's speed (issue 16): Orchard with `--spec off|ngram|draft` on input-grounded and
chat workloads, at 1 and 8 concurrent streams, at TP=1 and TP=2, against `mlx_lm.server --draft-model`.

    python benchmarks/spec_bench.py --json                                 # the full run (~15 min)
    python benchmarks/spec_bench.py --draft-model DIR --modes off,draft    # another draft model
    python benchmarks/spec_bench.py --quick --modes off,ngram --np 1       # a short check of the plumbing
    python benchmarks/spec_bench.py --np 2 --workloads rewrite --concurrency 1

Workloads (benchmarks/data/spec/, shipped, no downloads): `rewrite` gives a ~300-word text or program and
asks for it back with one small change (the answer mostly copies the input); `quote` gives a ~450-word
document and asks for one paragraph verbatim; `chat` is serve_bench's distinct prompts (what compare.py
sends), where little can be drafted. Greedy (temperature 0), no `seed` (mlx_lm.server serves a seeded
request on its sequential path). Concurrency 1 sends the first --single prompts one after another;
concurrency 8 sends 8 distinct prompts at once.

Each mode gets a fresh server (`python -m rank --np N --spec MODE`, started by jobs.py exactly as
compare.py does, with the launcher's mpirun for N > 1 and no SSD tier), one untimed warm-up, then every
workload at every concurrency in the same order. Prompts repeat between the 1- and 8-stream runs, so the
prefix cache serves part of the 8-stream prefill in every mode alike. The peer is mlx_lm.server at TP=1
with the same draft (--num-draft-tokens = --spec-tokens) and the BLAS our ranks use (jobs.rank_environment),
one stream (it turns batching off with a draft model). TP=2 runs off and ngram by default (--tp-modes): 2
ranks on this machine's 2 cores, one core each. A TP size that does not divide the model's heads (the
embedded SmolLM2 has 9 and 3 KV: TP=2 does not) serves pad_heads.py's equivalent copy with zero heads
added. Without --draft-model, make_draft.py's 6-layer layer-skip draft of the model is made for the run.

Correctness rides along: at temperature 0 each prompt's text with speculation must equal its text with
`--spec off` at the same TP and concurrency; a difference is a bug and is printed as MISMATCH (exit 1).
Differences between systems, TP sizes or concurrencies are reported too, as information (float order).

Figures: tok/s is completion tokens (usage) / wall time of the whole workload; TTFT and TPOT (time per
output token after the first, per request) are p50 over requests; "x off" is tok/s over the same cell's
`--spec off`. Metrics whose names mention spec/draft/accept are read from /metrics before and after each
cell; their differences land in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import serve_bench
from compare import say, warm_up
from jobs import Job, StopOnSignal, free_port, log_dir, start_mlx_lm, start_orchard, stop_all
from openai import APIError, AsyncOpenAI
from pad_heads import pad_model
from spec_report import WORKLOADS, Cell, best_of, compare_texts, markdown, peer_lines, tp_lines

DATA = Path(__file__).resolve().parent / "data" / "spec"
RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = {"rewrite": 128, "quote": 128, "chat": 64}  # a full run in ~15 min on 2 cores
ADMIN = "spec-bench-" + os.urandom(6).hex()
METRIC = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+([-+0-9.eEinfa]+)$")


@dataclass(frozen=True, slots=True)
class Prompt:
    """One user message of a workload; `index` identifies it across modes for the text comparison."""

    workload: str
    index: int
    content: str


def load_prompts(workload: str, count: int) -> list[Prompt]:
    """The first `count` prompts of a workload (at most 8)."""
    if workload == "chat":
        ns = argparse.Namespace(
            seed=0, workload="distinct", requests=count, prompt_tokens=100, prefix_tokens=0
        )
        return [Prompt("chat", i, m[0]["content"]) for i, m in enumerate(serve_bench.make_prompts(ns))]
    manifest = json.loads((DATA / "prompts.json").read_text())[workload][:count]
    prompts = []
    for i, item in enumerate(manifest):
        text = (DATA / item["file"]).read_text()
        if workload == "rewrite":
            content = (
                f"Rewrite the text below with one change: {item['change']}. Change nothing else and "
                f"answer with the whole rewritten text only.\n\n{text}"
            )
        else:
            content = (
                f"Read this document:\n\n{text}\nQuote the paragraph about {item['topic']} verbatim, "
                "word for word, and nothing else."
            )
        prompts.append(Prompt(workload, i, content))
    return prompts


async def stream_one(
    client: AsyncOpenAI, model: str, prompt: Prompt, max_tokens: int
) -> tuple[serve_bench.Result, str]:
    """One streamed greedy chat through the official client: serve_bench's timings, and the text."""
    start = time.perf_counter()
    res = serve_bench.Result(ok=False, start=start)
    parts: list[str] = []
    last = start
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt.content}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage:
                res.output_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                now = time.perf_counter()
                if parts:
                    res.itl.append(now - last)
                else:
                    res.ttft = now - start
                last = now
                parts.append(delta)
        res.e2e = time.perf_counter() - start
        res.output_tokens = res.output_tokens or len(parts)
        res.ok = True
    except APIError as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res, "".join(parts)


async def run_workload(
    url: str, model: str, prompts: list[Prompt], concurrency: int, max_tokens: int, timeout: float
) -> tuple[dict[str, Any], dict[int, str]]:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=timeout, max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p: Prompt) -> tuple[serve_bench.Result, str]:
        async with sem:
            return await stream_one(client, model, p, max_tokens)

    start = time.perf_counter()
    done = await asyncio.gather(*(guarded(p) for p in prompts))
    wall = time.perf_counter() - start
    await client.close()
    summary = serve_bench.summarise([r for r, _ in done], wall)
    summary["output_tokens_per_request"] = [r.output_tokens for r, _ in done]
    return summary, {p.index: text for p, (_, text) in zip(prompts, done, strict=True)}


def spec_metrics(url: str) -> dict[str, float]:
    """Orchard's speculation counters from /metrics (empty for servers without them)."""
    try:
        r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    except httpx.HTTPError:
        return {}
    found = {}
    for line in r.text.splitlines() if r.status_code == 200 else []:
        m = METRIC.match(line)
        if m and re.search(r"spec|draft|accept", m.group(1)) and not m.group(1).endswith("_created"):
            found[m.group(1)] = float(m.group(2))
    return found


def measure(
    args: argparse.Namespace,
    start: Callable[[int], Job],
    jobs: list[Job],
    system: str,
    mode: str,
    np: int,
    model: str,
    concurrencies: list[int],
    rnd: int,
) -> list[Cell]:
    """Start one server, warm it up, run every workload at every concurrency, stop it."""
    job = start(free_port())
    jobs.append(job)
    say(f"{system} {mode} np{np}: starting on {job.url} (log {job.log_path})")
    ready = job.wait_ready(args.ready_timeout, say)
    say(f"  ready after {ready:.1f} s")
    warm_up(job.url, model, args.timeout)
    cells = []
    for workload in args.workloads:
        for conc in concurrencies:
            prompts = load_prompts(workload, args.single if conc == 1 else conc)
            max_tokens = args.max_tokens or MAX_TOKENS[workload]
            before, load = spec_metrics(job.url), os.getloadavg()[0]
            t0 = time.monotonic()
            summary, texts = asyncio.run(
                run_workload(job.url, model, prompts, conc, max_tokens, args.timeout)
            )
            after = spec_metrics(job.url)
            delta = {
                k: round(v - before.get(k, 0.0), 3) if k.endswith("_total") else v for k, v in after.items()
            }
            cell = Cell(system, mode, np, workload, conc, summary, texts, delta, rnd, round(load, 2))
            cells.append(cell)
            say(
                f"  {workload} c{conc}: {cell.tok_s} tok/s, TTFT p50 {summary['ttft_p50_ms']} ms, "
                f"{summary['output_tokens']} tokens, {summary['errors']} errors ({time.monotonic() - t0:.0f} s)"
            )
    job.stop()
    return cells


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local mlx-lm directory (default: the embedded SmolLM2)")
    p.add_argument(
        "--draft-model",
        type=Path,
        help="draft model folder (default: make_draft.py's layer-skip draft of the model, --draft-layers)",
    )
    p.add_argument("--draft-layers", type=int, default=6, help="layers of the draft made when none is given")
    p.add_argument("--np", help="TP sizes, comma-separated (default: 1,2; --quick: 1)")
    p.add_argument("--modes", default="off,ngram,draft", help="subset of off,ngram,draft (off always runs)")
    p.add_argument(
        "--tp-modes",
        default="off,ngram",
        help="the modes at TP>1 (default off,ngram: the layer-skip draft does not pay for SmolLM2, see "
        "make_draft.py, and leaving it out keeps the full run near 15 minutes)",
    )
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--concurrency", default="1,8", help="comma-separated; 8 at most (8 prompts each)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every server this many times, interleaved; tables keep each cell's best round",
    )
    p.add_argument("--single", type=int, default=2, help="prompts sent one after another at concurrency 1")
    p.add_argument("--spec-tokens", type=int, default=4, help="--spec-tokens and mlx_lm's --num-draft-tokens")
    p.add_argument("--max-tokens", type=int, default=0, help=f"per request (0: per workload, {MAX_TOKENS})")
    p.add_argument(
        "--peer",
        help="mlx_lm.server modes at TP=1, one stream: off, draft or none (default: draft; --quick: none)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="defaults for a short check: TP=1, one prompt single-stream, 32 tokens, no peer",
    )
    p.add_argument("--orchard-args", default="", help="more flags for python -m rank (one string)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--json", nargs="?", const="auto", help="write everything here (no value: results/)")
    return p


def model_per_tp(model: str | None, nps: list[int], scratch: Path) -> tuple[Path, dict[int, Path]]:
    """The model folder, and the folder each TP size serves: the model itself, or its copy padded with
    zero attention heads (pad_heads.py, the same function) when the size does not divide its heads, as
    TP=2 does not divide the embedded SmolLM2's 9 query and 3 KV heads."""
    from cluster.errors import OrchardError, ShardingError
    from rank.models import check_tensor_parallel, default_cache_dir, resolve_model

    models = {}
    try:
        model_dir = resolve_model(model, default_cache_dir(), progress=say)
        config = json.loads((model_dir / "config.json").read_text())
        for n in nps:
            try:
                check_tensor_parallel(config, n)
                models[n] = model_dir
            except ShardingError:
                kv = -(-int(config["num_key_value_heads"]) // n) * n
                say(f"TP={n}: serving {model_dir.name} padded to {kv} KV heads (pad_heads.py)")
                models[n] = pad_model(model_dir, scratch / f"{model_dir.name}-kv{kv}", kv)
                check_tensor_parallel(json.loads((models[n] / "config.json").read_text()), n)
    except OrchardError as exc:
        raise SystemExit(f"spec_bench: {exc}") from exc
    return model_dir, models


def server_command(job: Job) -> str:
    """The command line a job ran (its log's first line), without its port and admin tokens."""
    line = job.log_path.read_text().splitlines()[0]
    return re.sub(r"--port \d+", "--port P", re.sub(r"--admin-token \S+", "--admin-token T", line))


def split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return f"{platform.node()}: {os.cpu_count()} cores {cpu}, {platform.system()} {platform.release()}"


def main() -> int:
    args = build_parser().parse_args()
    if args.quick:
        args.single, args.max_tokens = 1, args.max_tokens or 32
    nps = [int(x) for x in split(args.np or ("1" if args.quick else "1,2"))]
    concs = [int(x) for x in split(args.concurrency)]
    args.workloads = split(args.workloads)
    modes = ["off", *(m for m in split(args.modes) if m != "off")]
    tp_modes = ["off", *(m for m in split(args.tp_modes) if m != "off" and m in modes)]
    peer_modes = split(args.peer or ("none" if args.quick else "draft"))
    if set(args.workloads) - set(WORKLOADS) or set(modes + peer_modes) - {"off", "ngram", "draft"}:
        raise SystemExit(f"unknown workload or mode in {args.workloads} {modes} {peer_modes}")
    if "ngram" in peer_modes:
        raise SystemExit("mlx_lm.server has no n-gram lookup: --peer takes off and draft")
    if max(concs) > 8:
        raise SystemExit("--concurrency: 8 prompts per workload ship")
    scratch = tempfile.mkdtemp(prefix="spec-bench-models-")
    atexit.register(shutil.rmtree, scratch, True)  # padded model, draft: ~0.7 GB
    model_dir, models = model_per_tp(args.model, nps, Path(scratch))
    if args.draft_model is None and "draft" in modes + peer_modes:
        args.draft_model = Path(scratch) / f"draft-{args.draft_layers}-layers"
        say(f"no --draft-model: make_draft.py cuts the model to its first {args.draft_layers} layers")
        script = str(Path(__file__).resolve().parent / "make_draft.py")
        make = [sys.executable, script, "--model", str(model_dir), "--out", str(args.draft_model)]
        make += ["--layers", str(args.draft_layers)]
        subprocess.run(make, check=True, stdout=subprocess.DEVNULL)
    has_spec = (
        "--spec"
        in subprocess.run([sys.executable, "-m", "rank", "--help"], capture_output=True, text=True).stdout
    )
    if not has_spec:
        if modes != ["off"]:
            raise SystemExit("python -m rank has no --spec here: only --modes off can run (a baseline)")
        say("python -m rank has no --spec: measuring this commit as the baseline (no spec flags)")
    logs = log_dir()
    say(
        f"model {model_dir}, TP {nps}, modes {modes} (TP>1: {tp_modes}), peer {peer_modes or 'none'}, logs in {logs}"
    )
    say(f"machine {machine()}; at TP=2 each rank gets one of the 2 cores (all the machine has)")
    cells: list[Cell] = []
    jobs: list[Job] = []
    began = time.monotonic()
    if os.getloadavg()[0] > 1.0:
        say(
            f"the machine is busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): noisy figures"
        )
    try:
        with StopOnSignal():
            for rnd, n in ((r, n) for r in range(args.rounds) for n in nps):
                for mode in modes if n == 1 else tp_modes:
                    spec = ["--spec", mode, "--spec-tokens", str(args.spec_tokens)] if has_spec else []
                    if mode == "draft":
                        spec += ["--draft-model", str(args.draft_model)]
                    extra = ["--served-model-name", model_dir.name, "--admin-token", ADMIN, *spec]
                    extra += shlex.split(args.orchard_args)
                    start = partial(
                        start_orchard, n, str(models[n]), logs=logs, kv_ssd_dir="none", extra=extra
                    )
                    cells += measure(args, start, jobs, "orchard", mode, n, model_dir.name, concs, rnd)
                if n != nps[-1]:
                    continue
                for mode in peer_modes:
                    draft = [
                        "--draft-model",
                        str(args.draft_model),
                        "--num-draft-tokens",
                        str(args.spec_tokens),
                    ]
                    extra = draft if mode == "draft" else []
                    start = partial(start_mlx_lm, 1, model_dir, logs=logs, extra=extra)
                    cells += measure(args, start, jobs, "mlx_lm.server", mode, 1, "default_model", [1], rnd)
    except KeyboardInterrupt:
        say("interrupted: stopping every process started")
        return 130
    finally:
        stop_all(jobs)
    bugs, info = compare_texts(cells)
    print(
        f"\n{model_dir.name}, --spec-tokens {args.spec_tokens}, {machine()}, {time.monotonic() - began:.0f} s\n"
    )
    shown = best_of(cells)
    if args.rounds > 1:
        print(f"each cell's best of {args.rounds} rounds")
    print(markdown(shown))
    for line in [*tp_lines(shown), *peer_lines(shown)]:
        print(line)
    for line in info[:10]:
        print(f"differs (information): {line}")
    if len(info) > 10:
        print(f"... {len(info) - 10} more differences (information) in the JSON")
    for line in bugs:
        print(f"MISMATCH (a bug: speculation changed greedy output): {line}")
    for line in sorted({server_command(j) for j in jobs}):
        print(f"server: {line}")
    errors = sum(int(c.summary.get("errors", 0)) for c in cells)
    if args.json:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(args.json) if args.json != "auto" else RESULTS / f"spec-bench-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        commands = {f"{j.name}:{j.port}": server_command(j) for j in jobs}
        report = {
            "argv": sys.argv,
            "machine": machine(),
            "model_dir": str(model_dir),
            "models": {n: str(d) for n, d in models.items()},
            "server_commands": commands,
            "mismatches": bugs,
            "differences": info,
            "cells": [asdict(c) for c in cells],
        }
        path.write_text(json.dumps(report, indent=2, default=str))
        say(f"wrote {path}")
    return 1 if bugs or errors else 0


if __name__ == "__main__":
    sys.exit(main())
