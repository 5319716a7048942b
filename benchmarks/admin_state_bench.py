"""How fast /admin/state answers with many queued requests (issue: it must stay fast at 1,000).

Starts `--requests` streaming requests that stay queued, times `--samples` GETs of /admin/state, prints
p50/p99 and the body size, then disconnects every stream (the server cancels them).

    python benchmarks/admin_state_bench.py --url http://127.0.0.1:8000 --token $(cat ~/.cache/orchard/admin-token)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx


async def hold(client: httpx.AsyncClient, model: str, i: int, stop: asyncio.Event) -> None:
    body = {"model": model, "prompt": f"queued {i}", "max_tokens": 2000, "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                if stop.is_set():
                    return
    except httpx.HTTPError:
        return


async def main_async(args: argparse.Namespace) -> None:
    limits = httpx.Limits(max_connections=args.requests + 10)
    async with httpx.AsyncClient(base_url=args.url, timeout=120, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(hold(client, model, i, stop)) for i in range(args.requests)]
        auth = {"Authorization": f"Bearer {args.token}"}
        while True:
            state = (await client.get("/admin/state", headers=auth)).json()
            if len(state["queue"]) >= args.requests * 0.95:
                break
            await asyncio.sleep(0.5)
        times, size = [], 0
        for _ in range(args.samples):
            t = time.perf_counter()
            r = await client.get("/admin/state", headers=auth)
            times.append((time.perf_counter() - t) * 1000)
            size = len(r.content)
        times.sort()
        print(f"queued requests   {len(state['queue'])}")
        print(f"/admin/state p50  {statistics.median(times):.1f} ms")
        print(f"/admin/state p99  {times[int(len(times) * 0.99) - 1]:.1f} ms")
        print(f"body size         {size / 1024:.0f} KiB")
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token", required=True, help="the admin token")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--samples", type=int, default=50)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
