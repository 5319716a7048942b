"""The raw engine ceiling: serve_bench's workload run straight through mlx-lm's BatchGenerator, with no
HTTP, no scheduler and no server. What a server on the same model and ranks could at best reach.

Same prompts as serve_bench (its `make_prompts`, same seed and lengths), the chat template applied with
the model's tokenizer, at most --concurrency sequences in the batch (a finished one is replaced by the next
request, like serve_bench's semaphore). EOS is IGNORED: every request produces exactly --max-tokens tokens,
whereas servers stop at EOS (compare output tokens, not only rates). No prefix cache: a shared document is
prefilled once per request.

    python benchmarks/raw_engine.py --requests 8 --concurrency 8 --max-tokens 32
    python benchmarks/raw_engine.py --workload shared-prefix --prefix-tokens 1500 --json raw.json
    mpirun --oversubscribe -np 3 .venv/bin/python benchmarks/raw_engine.py   # TP=3, sharded like Orchard

Under mpirun every rank loads its shard (rank.models.load_model) and runs the same steps; rank 0 reports.
The process gives itself the environment `python -m rank` does (MLX_MPI_LIBNAME, OpenBLAS preload,
OMPI_MCA_mpi_yield_when_idle when ranks share a host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import reexec_with_rank_environment
from serve_bench import Result, make_prompts, summarise

from rank.cli import add_cpu_kernels_argument


@dataclass(slots=True)
class Sequence:
    """One request in the batch: its admission time and the arrival of each token."""

    index: int
    prompt_tokens: int
    admitted: float
    first: float = 0.0
    last: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0

    def token(self, now: float) -> None:
        if self.tokens == 0:
            self.first = now
        else:
            self.itl.append(now - self.last)
        self.last = now
        self.tokens += 1

    def result(self) -> Result:
        return Result(
            ok=True,
            ttft=self.first - self.admitted,
            e2e=self.last - self.admitted,
            itl=self.itl,
            output_tokens=self.tokens,
            prompt_tokens=self.prompt_tokens,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local mlx-lm model directory or llama GGUF (default: embedded SmolLM2)")
    p.add_argument("--cache-dir", type=Path, help="where converted models live (default: Orchard's cache)")
    p.add_argument("--workload", choices=("distinct", "shared-prefix"), default="distinct")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8, help="sequences in the batch at once")
    p.add_argument("--prompt-tokens", type=int, default=120, help="approximate words per distinct prompt")
    p.add_argument("--prefix-tokens", type=int, default=1500, help="approximate words of the shared document")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens every request produces (EOS ignored)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-step-size", type=int, default=2048, help="BatchGenerator's prefill chunk")
    p.add_argument("--warmup", type=int, default=1, help="short untimed batches first (0: none)")
    p.add_argument(
        "--blas", choices=("auto", "openblas", "none"), default=os.environ.get("ORCHARD_BLAS", "auto")
    )
    add_cpu_kernels_argument(
        p,
        "Orchard's CPU kernels (rank/cpu_kernels.py), as `python -m rank` uses them (default auto, like Orchard)",
    )
    p.add_argument("--json", help="also write the figures here (rank 0)")
    return p


def init_group() -> Any:
    """The TP group under mpirun (None alone), initialised as `python -m rank` does."""
    from rank.env import under_mpi

    if not under_mpi():
        return None
    import mlx.core as mx

    group = mx.distributed.init(backend="mpi", strict=True)
    return group if group.size() > 1 else None


def encode_prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    return [
        list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        for messages in make_prompts(args)
    ]


def generate(
    model: Any, prompts: list[list[int]], args: argparse.Namespace
) -> tuple[list[Sequence], Any, float]:
    """Run every prompt with at most `concurrency` in the batch; (sequences, BatchStats, wall seconds)."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    gen = BatchGenerator(
        model,
        max_tokens=args.max_tokens,
        stop_tokens=None,  # EOS ignored: exactly max_tokens per request
        sampler=make_sampler(args.temperature),
        completion_batch_size=args.concurrency,
        prefill_batch_size=args.concurrency,
        prefill_step_size=args.prefill_step_size,
    )
    waiting = deque(enumerate(prompts))
    active: dict[int, Sequence] = {}
    done: list[Sequence] = []

    def admit(now: float) -> None:
        while waiting and len(active) < args.concurrency:
            i, tokens = waiting.popleft()
            (uid,) = gen.insert([tokens], [args.max_tokens])
            active[uid] = Sequence(i, len(tokens), now)

    start = time.perf_counter()
    with gen.stats() as stats:
        admit(start)
        while active:
            _, responses = gen.next()
            now = time.perf_counter()
            for r in responses:
                seq = active[r.uid]
                seq.token(now)
                if r.finish_reason is not None:
                    done.append(active.pop(r.uid))
            admit(now)
    wall = time.perf_counter() - start
    gen.close()
    return sorted(done, key=lambda s: s.index), stats, wall


def figures(
    seqs: list[Sequence], stats: Any, wall: float, args: argparse.Namespace, tp: int
) -> dict[str, Any]:
    summary: dict[str, Any] = summarise([s.result() for s in seqs], wall)
    steps = max(1, stats.generation_steps)
    summary.update(
        {
            "tensor_parallel": tp,
            "eos_ignored": True,
            "prefill_s": round(stats.prompt_time, 3),
            "prefill_tok_s": round(stats.prompt_tps, 1),
            "decode_steps": stats.generation_steps,
            # One step yields one token for every sequence in the batch: the ITL ceiling.
            "decode_step_ms": round(stats.decode_time / steps * 1000, 2),
            "decode_tok_s": round(stats.decode_tps, 2),
            "peak_memory_gb": round(stats.peak_memory, 3),
        }
    )
    return summary


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The figures on rank 0, None on the other ranks."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from rank import cpu_kernels
    from rank.env import blas_in_use
    from rank.models import default_cache_dir, load_model, resolve_model

    group = init_group()
    leader = group is None or group.rank() == 0
    say = print if leader else (lambda *_a, **_k: None)
    model_dir = resolve_model(args.model, args.cache_dir or default_cache_dir(), progress=say)
    t0 = time.perf_counter()
    model, _config = load_model(model_dir, group)
    tp = group.size() if group is not None else 1
    kernels = "on" if cpu_kernels.install(model, args.cpu_kernels) else "off"
    say(
        f"loaded {model_dir.name} (TP={tp}, BLAS {blas_in_use()}, CPU kernels {kernels}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    tokenizer = load_tokenizer(model_dir)
    prompts = encode_prompts(args, tokenizer)
    mx.random.seed(args.seed)
    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency, "max_tokens": 4})
        for _ in range(args.warmup):
            generate(model, [p[:32] for p in prompts[: args.concurrency]], warm)
    say(
        f"running {len(prompts)} requests, batch {args.concurrency}, {args.max_tokens} tokens each (EOS ignored)"
    )
    seqs, stats, wall = generate(model, prompts, args)
    if not leader:
        return None
    summary = figures(seqs, stats, wall, args, tp)
    summary["model"] = str(model_dir)
    summary["cpu_kernels"] = kernels
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return summary


TABLE = (
    ("output tok/s", "output_tok_s", ""),
    ("requests/s", "requests_s", ""),
    ("output tokens", "output_tokens", ""),
    ("prompt tokens", "prompt_tokens", ""),
    ("prefill time", "prefill_s", "s"),
    ("prefill tok/s", "prefill_tok_s", ""),
    ("decode step (ITL ceiling)", "decode_step_ms", "ms"),
    ("TTFT-equivalent p50", "ttft_p50_ms", "ms"),
    ("TTFT-equivalent p90", "ttft_p90_ms", "ms"),
    ("ITL p50", "itl_p50_ms", "ms"),
    ("TPOT p50", "tpot_p50_ms", "ms"),
    ("E2E p50", "e2e_p50_ms", "ms"),
    ("wall", "duration_s", "s"),
)


def print_table(summary: dict[str, Any]) -> None:
    print(f"raw engine, TP={summary['tensor_parallel']}, EOS ignored ({summary['model']})")
    for label, key, unit in TABLE:
        print(f"  {label:<27} {summary.get(key, 'n/a')} {unit}".rstrip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    reexec_with_rank_environment(os.path.abspath(__file__), argv, args.blas)
    from cluster.errors import OrchardError

    try:
        summary = run(args)
    except OrchardError as exc:
        print(f"raw_engine: {exc}", file=sys.stderr)
        return 2
    if summary is None:
        return 0
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
