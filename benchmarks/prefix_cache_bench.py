"""TTFT of a long shared prompt: cold, warm (RAM tier) and after a restart of the whole job (SSD tier).

Starts the job itself (through `python -m rank --np N`), so the restart is real: every rank exits and a
new job reads the blocks back from disk.

    python benchmarks/prefix_cache_bench.py --np 3 --doc-tokens 2000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

WORDS = "orchard apple tree branch leaf root soil rain summer harvest basket ladder cider blossom".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: argparse.Namespace, port: int, kv: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "rank",
        "--np",
        str(args.np),
        "--port",
        str(port),
        "--kv-ssd-dir",
        kv,
        *args.extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("the job did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


def ttft(port: int, model: str, prompt: str) -> tuple[float, int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start_t = time.perf_counter()
    first, prompt_tokens = None, 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if first is None and data.get("choices") and data["choices"][0]["text"]:
                first = time.perf_counter() - start_t
            if data.get("usage"):
                prompt_tokens = data["usage"]["prompt_tokens"]
    return (first or time.perf_counter() - start_t), prompt_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=2000, help="approximate length of the shared document")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("extra", nargs="*", help="more flags for python -m rank (after --)")
    args = p.parse_args()
    doc = " ".join(WORDS[i % len(WORDS)] + str(i % 7) for i in range(int(args.doc_tokens / 1.6)))
    kv = tempfile.mkdtemp(prefix="orchard-bench-kv-")
    port = free_port()
    proc = start(args, port, kv)
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    cold, n = ttft(port, model, doc + "\nQuestion: which fruit is named first?")
    warm, _ = ttft(port, model, doc + "\nQuestion: how many words are there?")
    time.sleep(3)  # let every rank finish writing and acknowledge the blocks
    stop(proc)
    proc = start(args, port, kv)
    ssd, _ = ttft(port, model, doc + "\nQuestion: what grows in the soil?")
    stop(proc)
    figures = {
        "np": args.np,
        "prompt_tokens": n,
        "ttft_cold_s": round(cold, 3),
        "ttft_warm_ram_s": round(warm, 3),
        "ttft_after_restart_ssd_s": round(ssd, 3),
        "ram_speedup": round(cold / warm, 1),
        "ssd_speedup": round(cold / ssd, 1),
        "machine": f"{os.cpu_count()} cores, {os.uname().sysname}",
    }
    for k, v in figures.items():
        print(f"{k:<26} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
