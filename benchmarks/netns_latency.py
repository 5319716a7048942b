"""Per-token cost of link latency: a tensor-parallel job across network namespaces (tests/netns.py), one
rank per namespace, with 0, 1 and 5 ms of added one-way delay on the links between them, greedy streams.
Needs root and iproute2.

The delay comes from `tc netem` on the veth links when the kernel has sch_netem; otherwise from
tests/netdelay.py: a TUN device in every namespace on 10.78.0.0/24 and a userspace forwarder that holds
each packet for the delay, with MPI's data path (btl tcp) steered onto that subnet. The forwarder is one
more hop through userspace, so its 0 ms row is measured too, beside the plain bridge: the cost of the
delay is the difference to the forwarder's own 0 ms row. The job stays up while the delay is switched, and
the delays are interleaved over several rounds so drift hits them all alike.

Per delay: the client's inter-token gaps (p50, p90, mean), each stream's decode time per token (median over
streams), and rank 0's own inter-token latency (sum/count of its /metrics histogram, so HTTP delivery
cannot blur it); ping RTT between the first two hosts, packets per token on the delayed links. Client
ITL p50 is only meaningful when tokens arrive one by one: when they come in bursts (see the JSON's p50 of
0.02 ms at fast step rates) read the means. Machine load from other processes shows straight in the
figures on 2 cores: the load averages before and after are recorded.

    python benchmarks/netns_latency.py                    # the tiny test model, TP=2
    python benchmarks/netns_latency.py --model embedded   # the default model of `python -m rank`, TP=3
    python benchmarks/netns_latency.py --model /path/to/model --np 2 --out results.json
    python benchmarks/netns_latency.py --collectives ring  # tensor collectives on MLX's ring (TCP)

With `--collectives ring` the ring binds each host's address on the links that carry the delay (the
hostfile's `# orchard: addr=`, rank/collectives.py), as MPI's data path does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.netdelay import DelayedLinks, netem_available, ping_ms, steer_btl, tcp_throughput  # noqa: E402
from tests.netns import BRIDGE, NamespaceHosts  # noqa: E402

PORT = 8700
ADMIN = {"Authorization": "Bearer bench"}


class Job:
    def __init__(self, hosts: NamespaceHosts, np: int, model_args: list[str], net_args: list[str], log: Path):
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        cmd = [
            str(Path(sys.executable).parent / "mpirun"),
            *root,
            "--bind-to",
            "none",
            *net_args,
            sys.executable,
            "-m",
            "rank",
            *model_args,
            "--host",
            hosts.address(0),
            "--port",
            str(PORT),
            "--kv-ssd-dir",
            "none",
            "--step-timeout",
            "60",
            "--admin-token",
            "bench",
        ]
        self.hosts, self.np, self.log = hosts, np, log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = f"http://{hosts.address(0)}:{PORT}"

    def wait_ready(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"job exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return str(httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"])
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"job not ready after {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for i in range(self.np):
            self.hosts.kill_host(i)
        self._log.close()


def server_itl(url: str) -> tuple[float, float]:
    """Sum (s) and count of the inter-token latencies rank 0's engine recorded (its /metrics histogram):
    when the token was made, whatever the HTTP side's delivery did to it."""
    values = {}
    for line in httpx.get(url + "/metrics", headers=ADMIN, timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("orchard_inter_token_latency_seconds_") and not name.endswith("_created"):
            values[name.rsplit("_", 1)[1]] = float(value)
    return values.get("sum", 0.0), values.get("count", 0.0)


PLAIN = False  # --plain-greedy: streams without logprobs or logit bias (argmax steps, chained at TP=2)
TEMPERATURE = 0.0  # --temperature: plain streams that sample (StepPlan.draws: picks gathered, chained)


def stream(url: str, model: str, prompt: str, tokens: int) -> dict[str, list[float]]:
    """One greedy stream: time to first token and the gaps between token chunks (s)."""
    body: dict[str, object] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "logit_bias": {"0": -100, "2": -100},  # no end of text: every stream runs to max_tokens
    }
    if PLAIN:  # each rank sends only its best entry per row (StepPlan.argmax); counted from `usage`
        del body["logprobs"], body["return_tokens_as_token_ids"], body["logit_bias"]
        body["ignore_eos"] = True
        body["stream_options"] = {"include_usage": True}
        body["temperature"] = TEMPERATURE
    usage = 0
    stamps: list[float] = []
    counts: list[int] = []
    itl_before = server_itl(url)
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk["choices"]
            if PLAIN:
                usage = (chunk.get("usage") or {}).get("completion_tokens") or usage
                got = 1 if choices and choices[0].get("text") else 0
            else:
                got = len((choices[0].get("logprobs") or {}).get("tokens") or []) if choices else 0
            if got:
                stamps.append(time.perf_counter())
                counts.append(got)
    itl_after = server_itl(url)
    return {
        "server_itl_sum": [itl_after[0] - itl_before[0]],
        "server_itl_count": [itl_after[1] - itl_before[1]],
        "ttft": [stamps[0] - start],
        "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "decode_s": [stamps[-1] - stamps[0]],
        "tokens": [float(usage if PLAIN else sum(counts))],
    }


def summary(samples: list[dict[str, list[float]]]) -> dict[str, float]:
    gaps = sorted(g for s in samples for g in s["gaps"])
    tokens = sum(t for s in samples for t in s["tokens"])
    decode = sum(d for s in samples for d in s["decode_s"])
    return {
        "itl_p50_ms": round(gaps[len(gaps) // 2] * 1000, 2),
        "itl_p90_ms": round(gaps[int(len(gaps) * 0.9)] * 1000, 2),
        "itl_mean_ms": round(statistics.fmean(gaps) * 1000, 2),
        # each stream's decode time per token, the median over streams: robust to bursty delivery
        "per_token_ms_stream_p50": round(
            statistics.median(s["decode_s"][0] / max(1.0, s["tokens"][0] - 1) for s in samples) * 1000, 2
        ),
        "server_itl_mean_ms": round(
            sum(x for s in samples for x in s["server_itl_sum"])
            / max(1.0, sum(x for s in samples for x in s["server_itl_count"]))
            * 1000,
            2,
        ),
        "decode_tok_s": round((tokens - len(samples)) / decode, 2),
        "ttft_p50_ms": round(statistics.median(t for s in samples for t in s["ttft"]) * 1000, 1),
        "tokens": int(tokens),
        "streams": len(samples),
    }


def run_delays(
    job: Job,
    model: str,
    delays: list[float],
    rounds: int,
    tokens: int,
    set_delay: Callable[[float], None],
    ping: Callable[[], list[float]],
    packets: Callable[[], int] | None = None,
) -> dict[float, dict[str, float]]:
    """Interleaved rounds over the delays on one running job; ping RTT between rank 0 and rank 1 for each.
    `packets`: packets the delayed links carried since the last call."""
    set_delay(0.0)
    stream(job.url, model, "Warm up", 8)
    samples: dict[float, list[dict[str, list[float]]]] = {d: [] for d in delays}
    rtts: dict[float, list[float]] = {d: [] for d in delays}
    carried: dict[float, int] = dict.fromkeys(delays, 0)
    for r in range(rounds):
        for delay in delays:
            set_delay(delay)
            rtts[delay] += ping()
            if packets:
                packets()
            samples[delay].append(stream(job.url, model, f"Latency test {r} at {delay} ms:", tokens))
            if packets:
                carried[delay] += packets()
            print(f"  round {r + 1}/{rounds}, {delay} ms: {summary(samples[delay][-1:])}", flush=True)
    set_delay(0.0)
    out = {}
    for delay in delays:
        out[delay] = {"delay_ms": delay, **summary(samples[delay])}
        if rtts[delay]:
            out[delay]["ping_rtt_p50_ms"] = round(statistics.median(rtts[delay]), 3)
        if packets:
            out[delay]["packets_per_token"] = round(carried[delay] / out[delay]["tokens"], 1)
    return out


def set_netem(hosts: NamespaceHosts, np: int, delay_ms: float) -> None:
    for i in range(np):
        subprocess.run(["tc", "qdisc", "del", "dev", f"orv{i + 1}", "root"], capture_output=True)
        if delay_ms:
            tc = ["tc", "qdisc", "add", "dev", f"orv{i + 1}", "root", "netem", "delay", f"{delay_ms}ms"]
            subprocess.run(tc, check=True, capture_output=True, text=True)


def namespaces_in_use() -> list[str]:
    """The test namespaces and bridge that exist already: another run's (tests/test_multihost.py uses the
    same names, and NamespaceHosts removes whatever it finds) or a crashed run's leftovers."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    found = [line.split()[0] for line in listed if line.startswith("orhost")]
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
        found.append(BRIDGE)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (the random-weight test model), 'embedded' (`python -m rank`'s default) or a model directory",
    )
    p.add_argument("--np", type=int, help="ranks, one per namespace (default: 2; 3 for the embedded model)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    p.add_argument("--rounds", type=int, default=3, help="streams per delay, interleaved")
    p.add_argument("--delays", default="0,1,5", help="one-way delays per link in ms, comma-separated")
    p.add_argument("--method", choices=["auto", "netem", "tun"], default="auto")
    p.add_argument(
        "--yield-when-idle",
        choices=["auto", "on", "off"],
        default="auto",
        help="ranks sched_yield while they wait in MPI (mpi_yield_when_idle); auto: on when there are more "
        "ranks than cores, which real hosts (each with its own cores) never have",
    )
    p.add_argument(
        "--mtu",
        type=int,
        default=65000,
        help="MTU of the delayed links (the forwarder's cost is per packet, a link's is not: large packets "
        "keep it out of the figures; the veth links carry 64 KB GSO packets too)",
    )
    p.add_argument(
        "--force", action="store_true", help="remove test namespaces that exist already instead of stopping"
    )
    p.add_argument("--out", type=Path, help="JSON file to add this run to (a list of runs per model)")
    p.add_argument(
        "--plain-greedy",
        action="store_true",
        help="streams without logprobs or logit bias: each rank sends rank 0 only its best entry per row, "
        "and at TP=2 the next plan goes out while a step runs (--chain-steps)",
    )
    p.add_argument("--chain-steps", choices=["on", "off"], default="on", help="the job's --chain-steps")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="with --plain-greedy: the streams sample at this temperature (no seed, no other parameter), "
        "so each rank sends rank 0 the best entry of its slice plus the row's Gumbel noise",
    )
    p.add_argument(
        "--collectives",
        choices=["mpi", "ring"],
        default="mpi",
        help="the job's --collectives: the MLX backend of the tensor collectives (the control bus stays MPI)",
    )
    args = p.parse_args()
    busy = namespaces_in_use()
    if busy and not args.force:
        raise SystemExit(
            f"{', '.join(busy)} exist already: another run (tests/test_multihost.py?) is using them, or a crashed "
            "one left them behind. Wait for it, or pass --force to remove them."
        )
    delays = [float(d) for d in args.delays.split(",")]
    if delays[0] != 0.0:
        delays.insert(0, 0.0)
    workdir = Path(tempfile.mkdtemp(prefix="netns-latency-"))
    label = args.model
    if args.model == "tiny":
        from rank.models import make_tiny_model

        model_args = ["--model", str(make_tiny_model(workdir / "tiny", seed=7))]
    elif args.model == "embedded":
        model_args = []
    else:
        model_args = ["--model", args.model]
        label = Path(args.model).name
    np = args.np or (3 if args.model == "embedded" else 2)
    method = args.method
    if method == "auto":
        method = "netem" if netem_available() else "tun"
    elif method == "netem" and not netem_available():
        raise SystemExit("this kernel has no sch_netem (tc qdisc ... netem fails): use --method tun")
    yield_when_idle = args.yield_when_idle == "on" or (
        args.yield_when_idle == "auto" and np > (os.cpu_count() or 1)
    )
    extra = ["--mca", "mpi_yield_when_idle", "1"] if yield_when_idle else []
    model_args += ["--collectives", args.collectives, "--chain-steps", args.chain_steps]
    global PLAIN, TEMPERATURE
    PLAIN = args.plain_greedy
    TEMPERATURE = args.temperature
    if TEMPERATURE and not PLAIN:
        raise SystemExit("--temperature needs --plain-greedy (streams with logprobs gather the slices)")
    extra += ["-x", "ORCHARD_HOSTFILE"]  # the ranks read each host's address for the ring from it
    print(f"{label}: TP={np}, delay by {method}, {args.rounds} x {args.tokens} tokens per delay", flush=True)
    result: dict[str, object] = {
        "model": label,
        "np": np,
        "method": "tc netem on the veth links"
        if method == "netem"
        else "TUN + userspace forwarder (tests/netdelay.py)",
        "tokens_per_stream": args.tokens,
        "delayed_link_mtu": args.mtu if method == "tun" else None,
        "rounds": args.rounds,
        "mpi_yield_when_idle": yield_when_idle,
        "collectives": args.collectives,
        "plain_greedy": args.plain_greedy,
        "chain_steps": args.chain_steps,
        "temperature": args.temperature,
        "machine": f"{os.cpu_count()} cores, {platform.system()}",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    with NamespaceHosts(np, workdir) as hosts:
        os.environ["ORCHARD_HOSTFILE"] = str(hosts.hostfile)
        bridge_ping = lambda: ping_ms(hosts.names[0], hosts.address(1), count=5)  # noqa: E731
        if method == "netem":
            job = Job(hosts, np, model_args, [*extra, *hosts.mpirun_args(np)], workdir / "job-netem.log")
            try:
                name = job.wait_ready()
                rows = run_delays(
                    job,
                    name,
                    delays,
                    args.rounds,
                    args.tokens,
                    lambda d: set_netem(hosts, np, d),
                    bridge_ping,
                )
            finally:
                job.stop()
                set_netem(hosts, np, 0.0)
            result["rows"] = list(rows.values())
        else:
            print("bridge, no forwarder:", flush=True)
            job = Job(hosts, np, model_args, [*extra, *hosts.mpirun_args(np)], workdir / "job-bridge.log")
            try:
                name = job.wait_ready()
                bridge = run_delays(job, name, [0.0], args.rounds, args.tokens, lambda d: None, bridge_ping)
            finally:
                job.stop()
            result["bridge"] = {
                "throughput_MBps": round(tcp_throughput(hosts.names[0], hosts.names[1], hosts.address(1)), 1),
                **bridge[0.0],
            }
            with DelayedLinks(hosts.names, mtu=args.mtu) as links:
                links_ping = lambda: ping_ms(hosts.names[0], links.address(1), count=5)  # noqa: E731
                throughput = {}
                for delay in delays:
                    links.set_delay(delay)
                    throughput[delay] = round(
                        tcp_throughput(hosts.names[0], hosts.names[1], links.address(1)), 1
                    )
                links.set_delay(0.0)
                links.stats(reset=True)
                seen = [0]

                def carried() -> int:
                    total = int(links.stats()["packets"])
                    seen[0], delta = total, total - seen[0]
                    return delta

                print("delayed links:", flush=True)
                delayed = workdir / "hostfile-delayed"  # mpirun skips the comments; the ring binds addr=
                delayed.write_text(
                    "".join(
                        f"{hosts.address(i)} slots=1  # orchard: addr={links.address(i)}\n" for i in range(np)
                    )
                )
                os.environ["ORCHARD_HOSTFILE"] = str(delayed)
                net = steer_btl(hosts.mpirun_args(np), links.cidr)
                job = Job(hosts, np, model_args, [*extra, *net], workdir / "job-tun.log")
                try:
                    name = job.wait_ready()
                    rows = run_delays(
                        job, name, delays, args.rounds, args.tokens, links.set_delay, links_ping, carried
                    )
                finally:
                    job.stop()
                result["forwarder"] = {**links.stats(), "tun_kernel_drops": links.kernel_drops()}
            for delay, row in rows.items():
                row["throughput_MBps"] = throughput[delay]
            result["rows"] = list(rows.values())
            if result["forwarder"]["packets"] < 1000:  # type: ignore[index]
                raise SystemExit(f"the job's traffic did not cross the delayed links: {result['forwarder']}")
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    base = rows[0.0]
    keys = ("itl_p50_ms", "itl_mean_ms", "server_itl_mean_ms", "per_token_ms_stream_p50")
    for row in rows.values():
        for key in keys:
            row["added_" + key] = round(row[key] - base[key], 2)
    print(json.dumps(result, indent=2))
    print("ms per token         ITL p50 (client)   ITL mean (client)  engine ITL mean    stream median   RTT")
    table = [("bridge, no forwarder", result["bridge"])] if "bridge" in result else []
    table += [(f"{row['delay_ms']:g} ms each way", row) for row in rows.values()]
    for title, row in table:  # type: ignore[assignment]
        cells = [
            f"{row[k]:7.2f}" + (f" ({row['added_' + k]:+6.2f})" if "added_" + k in row else " " * 9)  # type: ignore[index,operator]
            for k in keys
        ]
        print(f"{title:21}" + "  ".join(cells) + f"  {row.get('ping_rtt_p50_ms')}")  # type: ignore[union-attr]
    if args.out:
        runs = json.loads(args.out.read_text()) if args.out.exists() else {}
        runs.setdefault(label, []).append(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
