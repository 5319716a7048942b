"""How long the dashboard takes to apply one /admin/state snapshot with many queued requests.

python -m tui.bench_refresh --rows 1000
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tui.app import OrchardApp


def snapshot(rows: int, tick: int) -> dict:
    queue = [
        {
            "request_id": f"cmpl-{i:032x}",
            "state": "running" if i < 8 else "waiting",
            "age_s": 1.0 + tick + i / 100,
            "prompt_tokens": 100 + i % 50,
            "generated_tokens": (tick + i) % 300,
            "tokens_per_s": 9.5,
            "client": "10.0.0.2",
        }
        for i in range(rows)
    ]
    ranks = [
        {
            "rank": r,
            "host": f"studio-{r + 1}",
            "pid": 100 + r,
            "state": "ok",
            "report_age_s": 0.4,
            "step": tick,
            "step_ms": 40.0,
            "median_step_ms": 40.0,
            "active_bytes": 1,
            "peak_bytes": 1,
            "rss_bytes": 2**30,
            "kv_blocks": 0,
            "kv_bytes": 0,
            "last_error": "",
        }
        for r in range(3)
    ]
    tier = {
        "tier": "ram",
        "blocks": 10,
        "capacity_blocks": 100,
        "bytes_used": 2**20,
        "capacity_bytes": 2**30,
        "hit_rate": 0.5,
        "evictions": 0,
    }
    return {
        "model": "m",
        "tensor_parallel": 3,
        "uptime_s": 10,
        "admission": "open",
        "queue": queue,
        "ranks": ranks,
        "batch": {"running": 8, "waiting": rows - 8, "max_batch": 8},
        "kv": {"tiers": [tier]},
        "throughput": {"output_tokens_per_s": 30.0, "history": [30.0] * 36},
        "totals": {"requests": {}},
    }


async def run(rows: int, rounds: int) -> None:
    app = OrchardApp("http://127.0.0.1:9", None, interval=60)
    async with app.run_test(size=(160, 50)) as pilot:
        timings = []
        for tick in range(rounds):
            snap = snapshot(rows, tick)
            start = time.perf_counter()
            app.apply(snap)
            await pilot.pause()
            timings.append((time.perf_counter() - start) * 1000)
        timings.sort()
        print(
            f"{rows} rows: first apply {timings[-1]:.0f} ms (adds every row), "
            f"in-place update p50 {timings[len(timings) // 2]:.0f} ms"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    asyncio.run(run(args.rows, args.rounds))


if __name__ == "__main__":
    main()
