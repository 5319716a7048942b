"""CPU use of each rank of a running job while it is idle, read from /proc (Linux).

python benchmarks/idle_cpu.py --port 8000 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8000, help="the job's --port, to find its rank processes")
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    out = subprocess.run(
        ["pgrep", "-f", f"python -m rank --port {args.port}"], capture_output=True, text=True
    )
    pids = [int(x) for x in out.stdout.split()]
    pids = [pid for pid in pids if "python" in open(f"/proc/{pid}/cmdline").read().split("\0")[0]]
    hz = os.sysconf("SC_CLK_TCK")
    before = {pid: cpu_ticks(pid) for pid in pids}
    time.sleep(args.seconds)
    for pid in pids:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        rank = next(
            (e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"OMPI_COMM_WORLD_RANK=")), "0"
        )
        used = (cpu_ticks(pid) - before[pid]) / hz / args.seconds * 100
        print(f"rank {rank} (pid {pid}): {used:.2f}% of a core over {args.seconds:g} s idle")


if __name__ == "__main__":
    main()
