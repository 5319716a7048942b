"""What constrained decoding costs: N concurrent requests with a JSON schema against the same N without
one, through the real leader loop in-process (scheduler, executor, sampler; no HTTP, one rank).

Every request produces exactly --max-tokens tokens, so both sides do the same work: the free ones ignore
EOS, the constrained ones follow a schema long enough (an array of --items objects) that they reach
max_tokens before the grammar completes. Runs alternate (free, constrained, free, ...) so a neighbour's
load on a shared machine falls on both. Reported: decode tok/s of each (tokens after each request's first,
over the time from the last first token to the last token), the cost in percent, and the grammar's mask
time per step: the worker's fill (mean, max) and how long sampling waited for it (the part the forward
pass did not hide).

    python benchmarks/constrained_bench.py                       # embedded SmolLM2, 8 concurrent
    python benchmarks/constrained_bench.py --rounds 3 --json constrained.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from jobs import reexec_with_rank_environment

from rank.cli import add_cpu_kernels_argument


def item_schema(items: int) -> dict[str, Any]:
    row = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "qty": {"type": "integer", "minimum": 0, "maximum": 999},
            "colour": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "qty", "colour"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": row, "minItems": items, "maxItems": items}},
        "required": ["items"],
        "additionalProperties": False,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local mlx-lm model directory or GGUF (default: embedded SmolLM2)")
    p.add_argument("--cache-dir", type=Path, help="where converted models live (default: Orchard's cache)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--items", type=int, default=40, help="array length of the schema (keeps it unfinished)")
    p.add_argument("--rounds", type=int, default=2, help="free and constrained runs each, alternating")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", help="write the figures here")
    p.add_argument(
        "--blas", choices=("auto", "openblas", "none"), default=os.environ.get("ORCHARD_BLAS", "auto")
    )
    add_cpu_kernels_argument(p, "Orchard's CPU kernels, as `python -m rank` uses them (default auto)")
    return p


class Engine:
    """The leader loop on one rank, as rank/leader_setup.py builds it (grammar runtime included)."""

    def __init__(self, model_dir: Path, max_batch: int, kernels: str) -> None:
        from cluster.bus import ControlBus
        from cluster.engine_client import EngineClient
        from cluster.scheduler import Scheduler, SchedulerConfig
        from rank import cpu_kernels
        from rank.engine import Leader
        from rank.executor import Executor
        from rank.grammar import GrammarRuntime
        from rank.models import load_model
        from rank.tokenizer import ChatTokenizer
        from rank.transport import LocalTransport

        model, _ = load_model(model_dir, None)
        self.kernels = "on" if cpu_kernels.install(model, kernels) else "off"
        self.tokenizer = ChatTokenizer(model_dir)
        self.client = EngineClient(max_waiting=1000)
        sched = Scheduler(
            SchedulerConfig(max_batch, 256, 4096), self.tokenizer.decode, self.tokenizer.eos_token_ids
        )
        self.grammar = GrammarRuntime(self.tokenizer)
        self.leader = Leader(
            Executor(model, True), sched, ControlBus(LocalTransport()), self.client, grammar=self.grammar
        )
        self.thread = threading.Thread(target=self.leader.run, daemon=True)
        self.thread.start()
        while self.client.state.value != "ready":
            time.sleep(0.01)

    def run(self, prompts: list[list[int]], params: Any, constraint: Any) -> dict[str, float]:
        from cluster.requests import Admission, GenerationRequest

        firsts: dict[int, float] = {}
        lasts: dict[int, float] = {}
        counts: dict[int, int] = {}
        finished: set[int] = set()
        done = threading.Event()
        lock = threading.Lock()

        def sink_for(i: int) -> Any:
            def sink(event: Any) -> None:
                now = time.perf_counter()
                with lock:
                    n = len(event.token_ids)
                    if n and i not in firsts:
                        firsts[i] = now
                    counts[i] = counts.get(i, 0) + n
                    lasts[i] = now
                    if event.finished:
                        finished.add(i)
                        if len(finished) == len(prompts):
                            done.set()

            return sink

        before = _copy(self.grammar.stats)
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            rid = f"b{i}-{time.monotonic_ns()}"
            sub = GenerationRequest(rid, tuple(prompt), params, sink_for(i), constraint=constraint)
            assert self.client.submit(sub) is Admission.ACCEPTED
        if not done.wait(1800):
            raise RuntimeError(f"requests did not finish: {counts}")
        start, end = max(firsts.values()), max(lasts.values())
        decoded = sum(counts.values()) - len(prompts)  # tokens after each request's first
        after = self.grammar.stats
        steps = after.steps - before.steps
        return {
            "decode_tok_s": decoded / (end - start),
            "wall_s": end - t0,
            "tokens": float(sum(counts.values())),
            "mask_steps": float(steps),
            "mask_fill_ms_mean": 1000 * (after.fill_s - before.fill_s) / steps if steps else 0.0,
            "mask_fill_ms_max": 1000 * after.fill_max_s if steps else 0.0,
            "mask_wait_ms_mean": 1000 * (after.wait_s - before.wait_s) / steps if steps else 0.0,
        }

    def stop(self) -> None:
        self.leader.request_stop()
        self.thread.join(timeout=10)
        self.grammar.close()


def _copy(stats: Any) -> Any:
    from rank.grammar import MaskStats

    return MaskStats(stats.steps, stats.rows, stats.fill_s, stats.fill_max_s, stats.wait_s)


def apply_cost(rows: int, vocab: int, temperature: float, reps: int = 30) -> tuple[float, float]:
    """The sampler's time for `rows` rows without and with masks (ms, medians of interleaved runs): what
    applying the masks adds on the engine thread, which the forward pass does not hide."""
    import mlx.core as mx
    import numpy as np

    from cluster.constraints import json_object_constraint
    from cluster.requests import Request, SamplingParams
    from cluster.textstream import IncrementalDetokenizer, StopMatcher
    from rank.grammar import StepMasks
    from rank.sampler import Sampler

    def req(constraint: Any) -> Request:
        sampling = SamplingParams(temperature=temperature, seed=1)
        detok = IncrementalDetokenizer(lambda ids: "")
        return Request(
            "r", 1, (1,), sampling, lambda e: None, "", detok, StopMatcher(()), 0.0, constraint=constraint
        )

    free = [req(None) for _ in range(rows)]
    constrained = [req(json_object_constraint()) for _ in range(rows)]
    logits = mx.random.normal((rows, vocab))
    bits = (
        np.random.default_rng(0).integers(-(2**31), 2**31, size=(rows, (vocab + 31) // 32)).astype(np.int32)
    )
    sampler = Sampler()
    plain: list[float] = []
    masked: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sampler.sample(free, logits)
        t1 = time.perf_counter()
        sampler.sample(constrained, logits, StepMasks(list(range(rows)), bits, vocab))
        plain.append(t1 - t0)
        masked.append(time.perf_counter() - t1)
    return 1000 * statistics.median(plain), 1000 * statistics.median(masked)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cluster.constraints import check, json_schema_constraint
    from cluster.requests import SamplingParams
    from rank.env import blas_in_use
    from rank.models import default_cache_dir, resolve_model

    model_dir = resolve_model(args.model, args.cache_dir or default_cache_dir(), print)
    engine = Engine(model_dir, args.concurrency, args.cpu_kernels)
    constraint = json_schema_constraint(item_schema(args.items), strict=True)
    check(constraint, engine.tokenizer)
    ask = "List {n} things in a shop as JSON, with a name, a quantity and a colour each. Shop number {i}."
    prompts = [
        engine.tokenizer.encode_chat([{"role": "user", "content": ask.format(n=args.items, i=i)}])
        for i in range(args.concurrency)
    ]
    common = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    free_params = SamplingParams(ignore_eos=True, **common)  # type: ignore[arg-type]
    json_params = SamplingParams(**common)  # type: ignore[arg-type]
    engine.run(prompts[:2], SamplingParams(max_tokens=4), None)  # warm up (shapes, caches)
    engine.run(prompts[:2], SamplingParams(max_tokens=4), constraint)
    free: list[dict[str, float]] = []
    constrained: list[dict[str, float]] = []
    try:
        for r in range(args.rounds):
            free.append(engine.run(prompts, free_params, None))
            constrained.append(engine.run(prompts, json_params, constraint))
            print(
                f"round {r + 1}: free {free[-1]['decode_tok_s']:.1f} tok/s, "
                f"constrained {constrained[-1]['decode_tok_s']:.1f} tok/s, "
                f"mask fill {constrained[-1]['mask_fill_ms_mean']:.2f} ms/step "
                f"(waited {constrained[-1]['mask_wait_ms_mean']:.2f} ms)"
            )
    finally:
        engine.stop()
    vocab = int(engine.grammar.vocab)
    plain_ms, masked_ms = apply_cost(args.concurrency, vocab, args.temperature)
    print(f"sampler, {args.concurrency} rows of {vocab}: {plain_ms:.2f} ms free, {masked_ms:.2f} ms masked")
    f = statistics.median(x["decode_tok_s"] for x in free)
    c = statistics.median(x["decode_tok_s"] for x in constrained)
    return {
        "model": model_dir.name,
        "blas": blas_in_use(),
        "cpu_kernels": engine.kernels,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "free_decode_tok_s": round(f, 2),
        "constrained_decode_tok_s": round(c, 2),
        "cost_percent": round(100 * (f - c) / f, 1),
        "mask_fill_ms_mean": round(statistics.mean(x["mask_fill_ms_mean"] for x in constrained), 3),
        "mask_fill_ms_max": round(max(x["mask_fill_ms_max"] for x in constrained), 3),
        "mask_wait_ms_mean": round(statistics.mean(x["mask_wait_ms_mean"] for x in constrained), 3),
        "sample_ms_free": round(plain_ms, 3),
        "sample_ms_masked": round(masked_ms, 3),
        "rounds": {"free": free, "constrained": constrained},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    reexec_with_rank_environment(os.path.abspath(__file__), argv, args.blas)
    summary = run(args)
    print(
        f"{summary['model']} x{summary['concurrency']}: free {summary['free_decode_tok_s']} tok/s, "
        f"json_schema {summary['constrained_decode_tok_s']} tok/s, cost {summary['cost_percent']} %; "
        f"mask fill {summary['mask_fill_ms_mean']} ms/step (max {summary['mask_fill_ms_max']}), "
        f"sampling waited {summary['mask_wait_ms_mean']} ms/step; sampler {summary['sample_ms_free']} ms "
        f"free, {summary['sample_ms_masked']} ms masked"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
