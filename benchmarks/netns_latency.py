"""Per-token cost of link latency: a TP=2 job across two network namespaces (tests/netns.py), with
0, 1 and 5 ms of added delay on each link (tc netem), one greedy stream each. Needs root and iproute2.

    python benchmarks/netns_latency.py --model /path/to/model --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.netns import NamespaceHosts  # noqa: E402


def run_one(hosts: NamespaceHosts, model: str, tokens: int, delay_ms: float) -> dict[str, float]:
    for i in range(2):
        subprocess.run(["tc", "qdisc", "del", "dev", f"orv{i + 1}", "root"], capture_output=True)
        if delay_ms:
            tc = ["tc", "qdisc", "add", "dev", f"orv{i + 1}", "root", "netem", "delay", f"{delay_ms}ms"]
            out = subprocess.run(tc, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"tc netem is not available on this kernel ({out.stderr.strip()})")
    port = 8700 + int(delay_ms * 10)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [
        str(Path(sys.executable).parent / "mpirun"),
        *root,
        "--bind-to",
        "none",
        *hosts.mpirun_args(2),
        sys.executable,
        "-m",
        "rank",
        "--model",
        model,
        "--host",
        hosts.address(0),
        "--port",
        str(port),
        "--kv-ssd-dir",
        "none",
        "--step-timeout",
        "60",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{hosts.address(0)}:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        body = {
            "model": name,
            "prompt": "Latency test",
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
        stamps = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        return {
            "delay_ms": delay_ms,
            "itl_p50_ms": round(gaps[len(gaps) // 2] * 1000, 2),
            "tokens": len(stamps),
        }
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for i in range(2):
            hosts.kill_host(i)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory whose heads divide by 2")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    rows = []
    with NamespaceHosts(2, Path(tempfile.mkdtemp())) as hosts:
        for delay in (0.0, 1.0, 5.0):
            try:
                rows.append(run_one(hosts, args.model, args.tokens, delay))
            except SystemExit as exc:
                print(exc)
                break
    base = rows[0]["itl_p50_ms"]
    for row in rows:
        print(
            f"delay {row['delay_ms']:>4} ms per link: ITL p50 {row['itl_p50_ms']:7.2f} ms (+{row['itl_p50_ms'] - base:.2f})"
        )


if __name__ == "__main__":
    main()
