"""How long the dashboard takes to apply one /admin/state snapshot with a long queue.

    python -m tui.bench_refresh [--rows 1000] [--rounds 20]

Runs the real App headless (Textual's test driver, no server: the poller is off) and feeds it synthetic
snapshots: every row's age changes each round, running rows also change their token counts, and
`--churn` requests (default 8, a full batch) finish each round and are replaced by new ones. "apply" is the time to update the widgets from
a snapshot (what the poller does per answer); "apply+paint" adds the next screen refresh.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from cluster.snapshot import (
    BatchView,
    HistogramView,
    JobSnapshot,
    LatencyView,
    RankView,
    RequestRow,
    ThroughputView,
    TierView,
    Totals,
)
from tui.app import OrchardApp


def snapshot(rows: int, tick: int, churn: int = 8, max_batch: int = 8) -> JobSnapshot:
    """`churn`: requests that finished since the last round, replaced by as many new ones."""
    first = tick * churn
    queue = tuple(
        RequestRow(
            request_id=f"cmpl-{i:032x}",
            state="running" if n < max_batch else "waiting",
            age_s=(rows - n) * 0.5 + tick,
            prompt_tokens=100 + i % 500,
            generated_tokens=(tick * 9 + i) % 1500 if n < max_batch else 0,
            tokens_per_s=9.5 + (tick + i) % 7 if n < max_batch else 0.0,
            client="10.0.0.2",
        )
        for n, i in enumerate(range(first, first + rows))
    )
    tier = TierView(
        "ram", 10 + tick, 19284, 2**20, 2**31, 131072, 100 * tick, 50 * tick, 50 * tick, 0.5, 0, 0
    )
    ranks = tuple(
        RankView(
            r, f"studio-{r + 1}", 100 + r, "ok", 0.4, tick, 40.0, 40.0, 2**28, 2**29, 2**30, 0, 0, "", None
        )
        for r in range(4)
    )
    empty = HistogramView.empty()
    return JobSnapshot(
        model="bench", tensor_parallel=4, context_length=2048, uptime_s=60.0 + tick, engine="ready",
        admission="open", failure=None, batch=BatchView(max_batch, rows - max_batch, max_batch),
        last_step_ms=40.0, throughput=ThroughputView(80.0, 5, (80.0,) * 36),
        totals=Totals(0, 0, {"stop": tick}), queue=queue, tiers=(tier,), ranks=ranks, steps=tick,
        sequences_on_ranks=max_batch, latency=LatencyView(empty, empty, empty), published_unix=1e9 + tick,
    )  # fmt: skip


async def measure(
    rows: int = 1000, rounds: int = 20, churn: int = 8, size: tuple[int, int] = (160, 50)
) -> dict[str, float]:
    """Milliseconds: the first apply (adds every row), then median and worst in-place applies, with
    and without the repaint that follows."""
    app = OrchardApp("http://127.0.0.1:9", None, autopoll=False)
    async with app.run_test(size=size) as pilot:
        start = time.perf_counter()
        app.apply_snapshot(snapshot(rows, 0, churn))
        first = (time.perf_counter() - start) * 1000
        await pilot.pause()
        app.queue.move_cursor(row=rows - 1)  # the newest request: it stays queued longest
        selected = app.queue.selected_key()
        applies, painted = [], []
        for tick in range(1, rounds + 1):
            snap = snapshot(rows, tick, churn)
            start = time.perf_counter()
            app.apply_snapshot(snap)
            applies.append((time.perf_counter() - start) * 1000)
            await pilot.pause()
            painted.append((time.perf_counter() - start) * 1000)
            assert app.queue.row_count == rows, app.queue.row_count
            if any(r.request_id == selected for r in snap.queue):
                assert app.queue.selected_key() == selected, "the cursor moved off the selected request"
    return {
        "rows": rows,
        "first_apply_ms": first,
        "apply_p50_ms": statistics.median(applies),
        "apply_max_ms": max(applies),
        "apply_paint_p50_ms": statistics.median(painted),
        "apply_paint_max_ms": max(painted),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--churn", type=int, default=8, help="requests replaced per round")
    args = p.parse_args()
    r = asyncio.run(measure(args.rows, args.rounds, args.churn))
    print(
        f"{args.rows} queued requests, {args.churn} replaced per round: first apply {r['first_apply_ms']:.1f} ms (adds every row); "
        f"in-place apply p50 {r['apply_p50_ms']:.1f} ms, max {r['apply_max_ms']:.1f} ms; "
        f"apply + repaint p50 {r['apply_paint_p50_ms']:.1f} ms, max {r['apply_paint_max_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
