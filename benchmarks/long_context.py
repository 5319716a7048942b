"""A long prompt under the KV budget: a random-weight model with a long context (rank.models.make_tiny_model,
byte-level: one token a character) served at TP=N through `python -m rank`, one prompt near the context;
TTFT, and each rank's peak memory and the accounted KV against `--kv-budget` from /admin/state.

    .venv/bin/python benchmarks/long_context.py --np 2 --context 32768 --prompt 30000 --kv-budget 0.25
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs import free_port  # noqa: E402

TOKEN = "long-context-bench"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--prompt", type=int, default=30000, help="prompt tokens")
    p.add_argument("--kv-budget", type=float, default=0.25, help="GiB per rank")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from rank.models import make_tiny_model

    model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny-long", seed=7, context=args.context)
    port = free_port()
    cmd = [
        sys.executable, "-m", "rank", "--np", str(args.np), "--model", str(model), "--port", str(port),
        "--kv-ssd-dir", "none", "--kv-budget", str(args.kv_budget), "--admin-token", TOKEN,
        "--prefill-chunk", str(args.prefill_chunk), "--idle-prefill-chunk", str(args.prefill_chunk),
        "--max-tokens", "64", "--step-timeout", "600",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the job did not start")
            time.sleep(0.5)
        prompt = "".join("orchard "[i % 8] for i in range(args.prompt - 1))
        body = {"model": "tiny-long", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        first = None
        peak_state: dict = {}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=1800) as r:
            status = r.status_code
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - t0
        state = httpx.get(f"http://127.0.0.1:{port}/admin/state", headers=auth, timeout=10).json()
        time.sleep(2.5)  # the ranks' next reports carry their peaks
        state = httpx.get(f"http://127.0.0.1:{port}/admin/state", headers=auth, timeout=10).json()
        peak_state = {
            f"rank{r['rank']}_mlx_peak_mib": round(r["peak_bytes"] / 2**20, 1) for r in state["ranks"]
        }
        peak_state.update(
            {f"rank{r['rank']}_rss_mib": round(r["rss_bytes"] / 2**20, 1) for r in state["ranks"]}
        )
        over = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={**body, "stream": False, "prompt": prompt + prompt[:4000], "max_tokens": 1},
            timeout=60,
        )
        figures = {
            "np": args.np,
            "context": args.context,
            "prompt_tokens": args.prompt,
            "status": status,
            "ttft_s": round(first or 0.0, 2),
            "kv_budget_mib": round(state["memory"]["budget_bytes"] / 2**20, 1),
            "memory": state["memory"],
            **peak_state,
            "over_context_or_budget_status": over.status_code,
            "over_message": over.json().get("error", {}).get("message", "")[:200],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
