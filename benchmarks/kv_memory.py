"""Peak KV memory per rank with and without memory admission (cluster.memory), on the real leader loop and
executor on one rank (every rank of a TP job holds the same share, so one rank's figures are each rank's).

Two workloads: one prompt near the context length beside seven short ones (the decode batch pads every
row to the longest), and twenty near-context prompts at once. For each, without a budget ("before"), with
`--budget-rows` rows of the full context as the budget ("after"), and with the same budget and running
caches quantized past `--live-from` positions ("live", `--kv-live-from`, 8 bits): the most KV the
executor's caches held after any step (the arrays' bytes), MLX's peak memory, the accounted peak, the
most sequences running at once, and the time to finish.

    .venv/bin/python benchmarks/kv_memory.py --max-context 2048           # the embedded SmolLM2-135M
    .venv/bin/python benchmarks/kv_memory.py --tiny --max-context 512     # the tiny random model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from jobs import reexec_with_rank_environment  # noqa: E402

from cluster.bus import ControlBus  # noqa: E402
from cluster.engine_client import EngineClient  # noqa: E402
from cluster.memory import KvCost, KvMemory  # noqa: E402
from cluster.requests import Admission, GenerationRequest, RequestEvent, SamplingParams  # noqa: E402
from cluster.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from rank import cpu_kernels  # noqa: E402
from rank.engine import Leader  # noqa: E402
from rank.executor import Executor  # noqa: E402
from rank.kvquant import KvFormat  # noqa: E402
from rank.livequant import LiveBatch  # noqa: E402
from rank.models import default_cache_dir, load_model, make_tiny_model, resolve_model  # noqa: E402
from rank.transport import LocalTransport  # noqa: E402

MIB = 2**20


class Measured(Executor):
    """The executor, measuring after every step the bytes of every KV array it holds."""

    peak_kv = 0
    most_running = 0

    def execute(self, plan: Any) -> Any:
        out = super().execute(plan)
        caches = [c for seq in self.prefilling.values() for c in seq] + list(self.batch or [])
        self.peak_kv = max(self.peak_kv, sum(_held(c) for c in caches))
        self.most_running = max(self.most_running, self.num_sequences)
        return out


def _held(cache: Any) -> int:
    """Bytes of a layer cache's arrays: plain, quantized (parts), or a live batch's two groups."""
    if isinstance(cache, LiveBatch):
        return sum(_held(g) for g in (cache.plain, cache.quant) if g is not None)
    total = 0
    for side in (getattr(cache, "keys", None), getattr(cache, "values", None)):
        parts = side if isinstance(side, (tuple, list)) else [side] if side is not None else []
        total += sum(int(p.nbytes) for p in parts)
    return total


def run(
    model: Any, context: int, prompts: list[tuple[int, int]], budget: int | None, live_from: int | None = None
) -> dict[str, float]:
    kv = KvFormat(8, 64) if live_from else None
    executor = Measured(model, True, block_tokens=32, kv_format=kv, live_from=live_from)
    geometry = executor.caps.geometry
    assert geometry is not None
    if executor.live is not None:
        cost = KvCost(geometry.bytes(1), live_from=live_from, quant_token_bytes=geometry.stored_bytes(executor.kv, 1))
    else:
        cost = KvCost(geometry.bytes(1))
    memory = KvMemory(cost, budget, context) if budget else None
    config = SchedulerConfig(8, 256, context, live_from=executor.live.start if executor.live else None)
    sched = Scheduler(config, lambda ids: "", [], memory=memory)
    client = EngineClient(max_waiting=100)
    leader = Leader(executor, sched, ControlBus(LocalTransport()), client)
    thread = threading.Thread(target=leader.run, daemon=True)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    thread.start()
    finals: list[RequestEvent] = []
    accounted = 0
    t0 = time.perf_counter()
    try:
        while client.state.value != "ready":
            time.sleep(0.01)
        for i, (n, m) in enumerate(prompts):
            prompt = tuple(3 + (i * 31 + j * 7) % 5000 for j in range(n))
            params = SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
            req = GenerationRequest(f"p{i}", prompt, params, sink=lambda e: e.finished and finals.append(e))
            assert client.submit(req) is Admission.ACCEPTED
        while len(finals) < len(prompts):
            if memory is not None:
                accounted = max(accounted, memory.view().kv_bytes)
            time.sleep(0.01)
    finally:
        leader.request_stop()
        thread.join(timeout=30)
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "completed": len(finals),
        "peak_kv_mib": round(executor.peak_kv / MIB, 1),
        "mlx_peak_over_weights_mib": round((mx.get_peak_memory() - base) / MIB, 1),
        "accounted_peak_mib": round(accounted / MIB, 1),
        "most_running": executor.most_running,
        "budget_mib": round(budget / MIB, 1) if budget else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or repo id (default: the embedded SmolLM2-135M)")
    p.add_argument("--tiny", action="store_true", help="the tiny random-weight test model instead")
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--budget-rows", type=int, default=3, help="the budget: this many rows of the context")
    p.add_argument("--live-from", type=int, default=256, help="--kv-live-from of the \"live\" runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    reexec_with_rank_environment(str(Path(__file__).resolve()), sys.argv[1:], "auto")  # OpenBLAS, as a rank
    if args.tiny:
        model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=7)
    else:
        model_dir = resolve_model(args.model, default_cache_dir(), lambda m: print(m, file=sys.stderr))
    model, _ = load_model(model_dir, None)
    cpu_kernels.install(model, "auto")  # the attention and SiLU a rank runs on a CPU
    ctx = args.max_context
    workloads = {
        "one near-context + seven short": [(ctx - 80, 64)] + [(48, 32)] * 7,
        "twenty near-context": [(ctx - 100 - i, 64) for i in range(20)],
    }
    probe = Executor(model, True)
    assert probe.caps.geometry is not None
    cost = KvCost(probe.caps.geometry.bytes(1))
    budget = args.budget_rows * cost.bytes(ctx)
    out: dict[str, Any] = {"model": model_dir.name, "context": ctx, "token_bytes": cost.token_bytes}
    for name, prompts in workloads.items():
        for mode, b, live in (("before", None, None), ("after", budget, None), ("live", budget, args.live_from)):
            r = run(model, ctx, prompts, b, live)
            out[f"{name} / {mode}"] = r
            print(f"{name:32s} {mode:6s} {json.dumps(r)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
