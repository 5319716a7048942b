"""Soak test: a mixed workload against a running Orchard job for --minutes while every rank's RSS is
sampled, to catch leaks (memory that grows with the number of requests served or cancelled).

    python benchmarks/soak.py --url http://127.0.0.1:8000 --minutes 10 --json soak.json
    python benchmarks/soak.py --minutes 1 --concurrency 2 --token "$(cat ~/.cache/orchard/admin-token)"

Workload (seeded): short (~20 words) and long (~600 words) chat prompts, streaming and not; a share of
the streams is cancelled mid-way by closing the connection. Bounded by --minutes and --max-requests, and
loopback only. RSS per rank comes from /admin/state (admin token from --token, ORCHARD_ADMIN_TOKEN or
<cache>/admin-token) every --sample-every seconds. Reports RSS at start, end and peak per rank and the
least-squares slope in MiB/min over the whole run and over its second half (past warm-up growth), also
with the rank's RAM prefix cache bytes taken out (that cache fills by design up to --kv-ram-gb), plus
the batch a few seconds after the last request (cancelled requests must not linger there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from serve_bench import words

MIB = 2**20
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(slots=True)
class Soak:
    """What the run saw: request outcomes and memory samples (seconds since start, {rank: (RSS, KV bytes)})."""

    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    output_tokens: int = 0
    samples: list[tuple[float, dict[int, tuple[int, int]]]] = field(default_factory=list)
    hosts: dict[int, str] = field(default_factory=dict)
    started: int = 0
    health_ms: list[float] = field(default_factory=list)  # /health latency, probed throughout
    health_failures: int = 0
    health_at: list[float] = field(default_factory=list)  # unix time of each probe
    # each probe's ms until the server's loop answered, and from then until the prober had the answer
    health_split: list[tuple[float, float]] = field(default_factory=list)
    # rank 0's event loop (/metrics): (unix time, worst lag of the last 10 s in ms, stalls >= 100 ms so far)
    loop: list[tuple[float, float, int]] = field(default_factory=list)

    def error(self, text: str, status: int = 0) -> None:
        self.outcomes["error"] += 1
        if status >= 500:
            self.outcomes["5xx"] += 1
        if len(self.errors) < 5:
            self.errors.append(text[:200])


def admin_token(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("ORCHARD_ADMIN_TOKEN"):
        return os.environ["ORCHARD_ADMIN_TOKEN"]
    from rank.models import default_cache_dir

    path = default_cache_dir() / "admin-token"
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"no admin token: pass --token (could not read {path}: {exc.strerror})") from exc


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, rng: random.Random, soak: Soak
) -> None:
    long = rng.random() < args.long_share
    stream = rng.random() < args.stream_share
    # a stream closed after a random number of chunks: while queued (0 read), mid-prefill, mid-decode
    cancel_after = rng.randint(1, max(1, args.max_tokens // 2)) if stream and rng.random() < args.cancel_share else 0
    text = words(rng, args.long_words if long else args.short_words)
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": f"{text}\nSummarise this."}],
        "max_tokens": rng.randint(8, args.max_tokens),
        "temperature": rng.choice((0.0, 0.7)),
        "stream": stream,
    }
    kind = f"{'long' if long else 'short'}-{'stream' if stream else 'plain'}"
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                soak.error(f"{kind}: HTTP {r.status_code} {r.text[:120]}", r.status_code)
                return
            soak.output_tokens += int(r.json().get("usage", {}).get("completion_tokens", 0))
            soak.outcomes["ok"] += 1
            return
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                soak.error(f"{kind}: HTTP {r.status_code} {(await r.aread())[:120]!r}", r.status_code)
                return
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if cancel_after and chunks >= cancel_after:
                        break  # leaving the block unread closes the connection: the server must cancel
            soak.output_tokens += chunks
        soak.outcomes["cancelled" if cancel_after and chunks >= cancel_after else "ok"] += 1
    except httpx.HTTPError as exc:
        soak.error(f"{kind}: {type(exc).__name__}: {exc}")


async def worker(
    client: httpx.AsyncClient, args: argparse.Namespace, seed: int, deadline: float, soak: Soak
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline and soak.started < args.max_requests:
        soak.started += 1
        await one_request(client, args, rng, soak)


async def state(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    r = await client.get("/admin/state", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    result: dict[str, Any] = r.json()
    return result


async def sampler(
    client: httpx.AsyncClient, token: str, every: float, start: float, stop: asyncio.Event, soak: Soak
) -> None:
    while True:
        try:
            ranks = (await state(client, token))["ranks"]
            # A rank that has not reported yet shows RSS 0: not a sample.
            memory = {r["rank"]: (r["rss_bytes"], r["kv_bytes"]) for r in ranks if r["rss_bytes"] > 0}
            soak.samples.append((time.monotonic() - start, memory))
            soak.hosts.update({r["rank"]: r["host"] for r in ranks})
            lag = await loop_lag(client, token)
            if lag is not None:
                soak.loop.append((time.time(), *lag))
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            print(f"soak: /admin/state failed: {exc}", file=sys.stderr)
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except asyncio.TimeoutError:
            continue


async def loop_lag(client: httpx.AsyncClient, token: str) -> tuple[float, int] | None:
    """Rank 0's event-loop lag from /metrics (api/looplag.py): worst of the last 10 s in ms, and stalls;
    None from a server without it."""
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    values = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("orchard_event_loop_lag_seconds", "orchard_event_loop_stalls_total"):
            values[name] = float(value)
    if len(values) < 2:
        return None
    return values["orchard_event_loop_lag_seconds"] * 1000, int(values["orchard_event_loop_stalls_total"])


def loop_at(soak: Soak, unix: float) -> float | None:
    """The event loop's worst lag in the 10 s window that covers `unix` (the first sample after it)."""
    for t, lag_ms, _ in soak.loop:
        if unix <= t <= unix + 10:
            return round(lag_ms, 1)
    return None


def health_prober(url: str, every: float) -> int:
    """/health on a connection of its own, as a load balancer would probe it, until standard input closes;
    one line per probe on standard output: "<unix time> <ms> <status> <ms until the server answered> <ms
    after it>" (status 0: no answer; the split is nan from a server whose /health has no "time"). Run as a
    process of its own (`--probe-health`): in the load generator's process, the GIL taken by 200 streams'
    parsing would be timed as server delay (a thread there saw up to 265 ms that the server never spent)."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            sent, t0 = time.time(), time.perf_counter()
            answered = float("nan")  # the server's clock when its loop answered (the same host's clock)
            try:
                r = client.get("/health")
                status = r.status_code
                answered = float(r.json().get("time", "nan"))
            except (httpx.HTTPError, ValueError):
                status = 0
            ms = (time.perf_counter() - t0) * 1000
            # the probe's time split at the server's answer: before it (the request reaching the loop and the
            # handler) and after it (the answer reaching this process and it being scheduled to read it)
            to_server = (answered - sent) * 1000
            print(f"{sent:.3f} {ms:.2f} {status} {to_server:.2f} {ms - to_server:.2f}", flush=True)
            stop.wait(every)
    return 0


def start_prober(url: str, every: float, nice: int = 0, realtime: bool = False) -> subprocess.Popen[str]:
    """The prober's process; `nice` < 0 or `realtime` (SCHED_FIFO; root only) put it ahead of the load on a
    shared machine, as a load balancer on its own host would be: on 2 cores beside 3 ranks and 200 streams
    its own wait for a core otherwise counts as the server's answer time (it sleeps between probes, so
    it takes nothing from the server)."""
    cmd = [sys.executable, __file__, "--url", url, "--health-every", str(every), "--probe-health"]

    def before() -> None:
        if nice:
            os.nice(nice)
        if realtime:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))

    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=before if nice or realtime else None,  # noqa: PLW1509 (no threads yet here)
    )


def stop_prober(proc: subprocess.Popen[str], soak: Soak) -> None:
    out, _ = proc.communicate("", timeout=30)  # closing its stdin ends it
    for line in out.splitlines():
        when, ms, status, to_server, back = line.split()
        soak.health_ms.append(float(ms))
        soak.health_at.append(float(when))
        soak.health_split.append((float(to_server), float(back)))
        if status != "200":
            soak.health_failures += 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def leak_check(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    """After the run: no sequence left on the ranks or in the batch, and no RAM block still referenced
    (clearing the tier drops every unreferenced block: whatever stays is held by a request that is gone)."""
    headers = {"Authorization": f"Bearer {token}"}
    r = await client.delete("/admin/cache/ram", headers=headers, timeout=10)
    cleared = r.status_code == 200
    await asyncio.sleep(1.5)  # the engine clears between steps; the snapshot is at most 0.1 s old
    after = await state(client, token)
    ram = next((t for t in after["kv"]["tiers"] if t["tier"] == "ram"), None)
    return {
        "running": after["batch"]["running"],
        "waiting": after["batch"]["waiting"],
        "sequences_on_ranks": after.get("sequences_on_ranks"),
        "ram_blocks_after_clear": None if ram is None or not cleared else ram["blocks"],
    }


def slope_mib_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, bytes) in MiB per minute."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return float("nan")
    return sum((t - mt) * (v - mv) for t, v in points) / var * 60 / MIB


def rss_report(soak: Soak) -> list[dict[str, Any]]:
    rows = []
    ranks = sorted({r for _, sample in soak.samples for r in sample})
    for rank in ranks:
        points = [(t, float(s[rank][0])) for t, s in soak.samples if rank in s]
        # RSS not explained by the RAM prefix cache, which grows by design up to --kv-ram-gb.
        other = [(t, float(s[rank][0] - s[rank][1])) for t, s in soak.samples if rank in s]
        kv_end = next(s[rank][1] for _, s in reversed(soak.samples) if rank in s)
        half = points[0][0] + (points[-1][0] - points[0][0]) / 2
        rows.append(
            {
                "rank": rank,
                "host": soak.hosts.get(rank, "?"),
                "samples": len(points),
                "rss_start_mib": round(points[0][1] / MIB, 1),
                "rss_end_mib": round(points[-1][1] / MIB, 1),
                "rss_peak_mib": round(max(v for _, v in points) / MIB, 1),
                "slope_mib_min": round(slope_mib_min(points), 2),
                "slope_second_half_mib_min": round(slope_mib_min([p for p in points if p[0] >= half]), 2),
                "kv_cache_end_mib": round(kv_end / MIB, 1),
                "slope_without_kv_mib_min": round(slope_mib_min(other), 2),
                "slope_without_kv_second_half_mib_min": round(
                    slope_mib_min([p for p in other if p[0] >= half]), 2
                ),
            }
        )
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    token = admin_token(args.token)
    soak = Soak()
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as client:
        first = await state(client, token)  # fails early on a wrong token or URL
        args.model = args.model or first["model"]
        start = time.monotonic()
        deadline = start + args.minutes * 60
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(client, token, args.sample_every, start, stop, soak))
        probing = start_prober(args.url, args.health_every, args.probe_nice, args.probe_realtime)
        uptime = float(first.get("uptime_s", 0.0))
        print(
            f"soak: {args.minutes} min against {args.url} ({args.model}, up {uptime:.0f} s), "
            f"{args.concurrency} at once",
            file=sys.stderr,
        )
        if uptime > 300:  # a soak of a fresh server meant: a leftover one may still hold the port
            print(f"soak: note: this server has been up {uptime / 60:.1f} min already", file=sys.stderr)
        await asyncio.gather(
            *(worker(client, args, args.seed + i, deadline, soak) for i in range(args.concurrency))
        )
        wall = time.monotonic() - start
        await asyncio.sleep(args.settle)  # let cancellations and the last replies settle
        stop.set()
        await sampling
        stop_prober(probing, soak)
        after = await state(client, token)
        leaks = await leak_check(client, token)
    return {
        "url": args.url,
        "prober": {"nice": args.probe_nice, "realtime": args.probe_realtime, "every_s": args.health_every},
        "model": args.model,
        "server_uptime_at_start_s": round(uptime, 1),
        "minutes": round(wall / 60, 2),
        "requests": soak.started,
        "outcomes": dict(soak.outcomes),
        "output_tokens": soak.output_tokens,
        "first_errors": soak.errors,
        "batch_after": after.get("batch"),
        "leaks_after": leaks,
        "health": {
            "probes": len(soak.health_ms),
            "failures": soak.health_failures,
            "p50_ms": round(percentile(soak.health_ms, 0.5), 1),
            "p99_ms": round(percentile(soak.health_ms, 0.99), 1),
            "max_ms": round(max(soak.health_ms, default=float("nan")), 1),
            "over_100ms": sum(1 for v in soak.health_ms if v > 100),
            "slowest": [
                {**x, "loop_lag_10s_ms": loop_at(soak, x["unix"])}
                for x in sorted(
                    (
                        {"unix": t, "ms": round(v, 1), "to_answer_ms": round(a, 1), "after_answer_ms": round(b, 1)}
                        for t, v, (a, b) in zip(soak.health_at, soak.health_ms, soak.health_split, strict=True)
                    ),
                    key=lambda x: -x["ms"],
                )[:10]
            ],
            # a slow probe is the server's when the time until its answer is long, the prober's (its wait
            # for a core on a shared machine) when the time after it is
            "over_100ms_before_answer": sum(1 for a, _ in soak.health_split if a > 100),
            "over_100ms_after_answer": sum(1 for _, b in soak.health_split if b > 100),
        },
        "event_loop": {
            "stalls_over_100ms": soak.loop[-1][2] if soak.loop else None,
            "worst_lag_ms": round(max((lag for _, lag, _ in soak.loop), default=0.0), 1) if soak.loop else None,
        },
        "ranks": rss_report(soak),
        "samples": [
            {
                "t_s": round(t, 1),
                "rss": {str(k): v[0] for k, v in s.items()},
                "kv": {str(k): v[1] for k, v in s.items()},
            }
            for t, s in soak.samples
        ],
        "config": {k: v for k, v in vars(args).items() if k != "token"},
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['requests']} requests in {report['minutes']} min: {report['outcomes']}")
    print(f"output tokens {report['output_tokens']}; batch after: {report['batch_after']}")
    print(f"leaks after: {report['leaks_after']}")
    print(f"/health: {report['health']}")
    print(f"event loop: {report['event_loop']}")
    for error in report["first_errors"]:
        print(f"  error: {error}")
    cols = ("rank", "host", "samples", "rss_start_mib", "rss_end_mib", "rss_peak_mib", "slope_mib_min")
    cols += ("slope_second_half_mib_min", "kv_cache_end_mib", "slope_without_kv_mib_min")
    cols += ("slope_without_kv_second_half_mib_min",)
    heads = ("rank", "host", "samples", "RSS start MiB", "end MiB", "peak MiB", "MiB/min", "2nd half")
    heads += ("KV end MiB", "RSS-KV MiB/min", "2nd half")
    print(
        "RSS per rank (slopes: least squares; RSS-KV leaves out the RAM prefix cache, which grows by design)"
    )
    rows = [heads] + [tuple(str(r[c]) for c in cols) for r in report["ranks"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token", help="admin token (default: ORCHARD_ADMIN_TOKEN or <cache>/admin-token)")
    p.add_argument("--model", help="model id (default: the job's, from /admin/state)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=5000, help="stop starting requests after this many")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--short-words", type=int, default=20)
    p.add_argument("--long-words", type=int, default=600)
    p.add_argument("--long-share", type=float, default=0.2, help="share of long prompts")
    p.add_argument("--stream-share", type=float, default=0.7, help="share of streaming requests")
    p.add_argument("--cancel-share", type=float, default=0.3, help="share of streams closed mid-way")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--health-every", type=float, default=0.25, help="seconds between /health probes")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the last request")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--probe-health", action="store_true", help=argparse.SUPPRESS)  # the prober process
    p.add_argument(
        "--probe-realtime",
        action="store_true",
        help="run the /health prober SCHED_FIFO (root): stands in for a load balancer on a host of its own",
    )
    p.add_argument(
        "--probe-nice",
        type=int,
        default=0,
        help="niceness of the /health prober (negative, as root: ahead of the load generator on a shared machine)",
    )
    args = p.parse_args()
    if urlparse(args.url).hostname not in LOOPBACK:
        raise SystemExit(f"--url {args.url}: the soak test only targets loopback addresses")
    if args.probe_health:
        return health_prober(args.url, args.health_every)
    report = asyncio.run(run(args))
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if report["outcomes"].get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
