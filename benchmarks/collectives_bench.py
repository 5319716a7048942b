"""Per all-reduce latency of MLX's tensor-collective backends, MPI against MLX's TCP ring, one rank per
"host" (network namespaces, tests/netns.py) with 0, 1 and 5 ms of added one-way delay on the links
(tests/netdelay.py's userspace forwarder: this kernel has no netem), and on loopback in one namespace.
Needs root and iproute2 for the namespaces (`--where loopback` does not).

Each job initialises both backends in every rank the way `python -m rank --collectives ring` does
(rank/collectives.py: MPI first, mpi4py, then the ring on the hostfile's `addr=`), then times `all_sum`
of three sizes, backends interleaved: one decode row's hidden state of the embedded SmolLM2 (576 fp32),
a decode step of 8 rows, and a 256-token prefill chunk (576 KB). Rank 0 times every all-reduce; the
figures are medians over every all-reduce of every round. "delays" is (latency at d ms - latency at 0 ms)
/ d: how many one-way link delays one all-reduce pays.

    python benchmarks/collectives_bench.py                        # TP=2 and TP=3, 0/1/5 ms, 3 rounds
    python benchmarks/collectives_bench.py --np 2 --rounds 5 --out /tmp/coll.json
    python benchmarks/collectives_bench.py --where loopback       # one host, no namespaces
    mpirun -np 2 python benchmarks/collectives_bench.py --worker  # one measurement, JSON from rank 0
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"row": 576, "step8": 8 * 576, "prefill256": 256 * 576}


def worker(iters: int, blocks: int) -> None:
    """One job: both backends side by side, interleaved in `blocks` blocks of `iters` all-reduces each."""
    from rank.env import across_hosts_mca, find_libmpi

    os.environ.setdefault("MLX_MPI_LIBNAME", find_libmpi() or "")
    for name, value in across_hosts_mca(os.environ).items():  # as `python -m rank` does
        os.environ.setdefault(name, value)
    import mlx.core as mx

    mpi_group = mx.distributed.init(backend="mpi", strict=True)
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI

    from rank.collectives import init_tensor_group

    comm = MPI.COMM_WORLD.Dup()
    ring = init_tensor_group("ring", mpi_group, comm).group
    groups = {"mpi": mpi_group, "ring": ring}
    times: dict[str, list[float]] = {f"{b}/{s}": [] for s in SIZES for b in groups}
    for name, size in SIZES.items():
        x = mx.ones((size,), dtype=mx.float32)
        for b, g in groups.items():  # warm up both, and check they agree
            y = mx.distributed.all_sum(x, group=g)
            for _ in range(4):
                mx.eval(mx.distributed.all_sum(x, group=g))
            if y[0].item() != comm.Get_size():
                raise SystemExit(f"{b} all_sum gave {y[0].item()}")
        for _ in range(blocks):
            for b, g in groups.items():
                comm.Barrier()
                for _ in range(iters):
                    t = time.perf_counter()
                    mx.eval(mx.distributed.all_sum(x, group=g))
                    times[f"{b}/{name}"].append(time.perf_counter() - t)
    comm.Barrier()
    if comm.Get_rank() == 0:
        print("RESULT " + json.dumps(times), flush=True)


def mpirun(
    np: int, extra: list[str], env_names: list[str], iters: int, blocks: int
) -> dict[str, list[float]]:
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [str(Path(sys.executable).parent / "mpirun"), *root, "--bind-to", "none", *extra]
    for name in env_names:
        cmd += ["-x", name]
    cmd += [sys.executable, str(Path(__file__).resolve()), "--worker", "--iters", str(iters)]
    cmd += ["--blocks", str(blocks)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise RuntimeError(f"job failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def iterations(delay_ms: float) -> tuple[int, int]:
    """(all-reduces per block, blocks): fewer when each costs milliseconds."""
    return (200, 5) if delay_ms == 0 else (40, 3) if delay_ms <= 1 else (12, 3)


def summarise(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in sorted(samples.items())}


def run_loopback(np: int, rounds: int) -> dict[str, float]:
    merged: dict[str, list[float]] = {}
    extra = ["--oversubscribe", "-np", str(np), "--mca", "mpi_yield_when_idle", "1"]
    os.environ.pop("ORCHARD_HOSTFILE", None)
    for _ in range(rounds):
        for k, v in mpirun(np, extra, [], *iterations(0)).items():
            merged.setdefault(k, []).extend(v)
    return summarise(merged)


def run_namespaces(
    np: int, delays: list[float], rounds: int, workdir: Path, mpi_args: list[str]
) -> dict[str, dict[str, float]]:
    from tests.netdelay import DelayedLinks, steer_btl
    from tests.netns import NamespaceHosts

    merged: dict[str, dict[str, list[float]]] = {}
    with NamespaceHosts(np, workdir) as hosts, DelayedLinks(hosts.names, mtu=65000) as links:
        yield_idle = ["--mca", "mpi_yield_when_idle", "1"] if np > (os.cpu_count() or 1) else []
        # The same file for mpirun (which skips comments) and the ranks: the ring binds the delayed links.
        delayed = workdir / "hostfile-delayed"
        delayed.write_text(
            "".join(f"{hosts.address(i)} slots=1  # orchard: addr={links.address(i)}\n" for i in range(np))
        )
        bridge = hosts.hostfile  # no addr=: the ring binds the bridge addresses, as MPI does
        plain = hosts.mpirun_args(np)
        setups = [("bridge", bridge, plain, 0.0)]
        setups += [(f"{d:g} ms", delayed, steer_btl(plain, links.cidr), d) for d in delays]
        for r in range(rounds):
            for label, hostfile, args, delay in setups:
                links.set_delay(delay)
                os.environ["ORCHARD_HOSTFILE"] = str(hostfile)
                args = [a if a != str(hosts.hostfile) else str(hostfile) for a in args]
                names = ["ORCHARD_HOSTFILE", "ORCHARD_MPI_TUNING"]
                got = mpirun(np, [*yield_idle, *mpi_args, *args], names, *iterations(delay))
                for k, v in got.items():
                    merged.setdefault(label, {}).setdefault(k, []).extend(v)
                print(f"  round {r + 1}/{rounds} TP={np} {label}: {summarise(got)}", flush=True)
        links.set_delay(0.0)
    return {label: summarise(samples) for label, samples in merged.items()}


def delays_per_op(rows: dict[str, dict[str, float]], delays: list[float]) -> dict[str, dict[str, float]]:
    base = rows["0 ms"]
    out: dict[str, dict[str, float]] = {}
    for d in delays:
        if d:
            out[f"{d:g} ms"] = {k: round((rows[f"{d:g} ms"][k] - base[k]) / (d * 1000), 2) for k in base}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=200, help=argparse.SUPPRESS)
    p.add_argument("--blocks", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--np", default="2,3", help="rank counts, comma-separated")
    p.add_argument("--delays", default="0,1,5", help="one-way delays in ms, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="jobs per setting, interleaved")
    p.add_argument("--where", choices=("both", "loopback", "namespaces"), default="both")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    p.add_argument("--mpirun-args", default="", help="more mpirun flags for the namespace jobs (MCA tuning)")
    p.add_argument(
        "--mpi-tuning",
        choices=("on", "off"),
        default="on",
        help="Orchard's Open MPI settings for jobs across hosts (rank/env.py ACROSS_HOSTS_MCA); off: Open MPI's own",
    )
    args = p.parse_args()
    if args.worker:
        worker(args.iters, args.blocks)
        return
    delays = [float(d) for d in args.delays.split(",")]
    os.environ["ORCHARD_MPI_TUNING"] = args.mpi_tuning
    result: dict[str, object] = {
        "sizes_fp32": SIZES,
        "rounds": args.rounds,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "unit": "us per all_sum, median (rank 0)",
        "mpirun_args": args.mpirun_args,
        "mpi_tuning": args.mpi_tuning,
    }
    for np in [int(n) for n in args.np.split(",")]:
        if args.where in ("both", "loopback"):
            result[f"tp{np}_loopback"] = run_loopback(np, args.rounds)
            print(f"TP={np} loopback: {result[f'tp{np}_loopback']}", flush=True)
        if args.where in ("both", "namespaces"):
            workdir = Path(tempfile.mkdtemp(prefix="coll-bench-"))
            rows = run_namespaces(np, delays, args.rounds, workdir, shlex.split(args.mpirun_args))
            result[f"tp{np}_namespaces"] = rows
            if 0.0 in delays:
                result[f"tp{np}_delays_per_all_reduce"] = delays_per_op(rows, delays)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
