"""`python -m rank --check-hostfile FILE`: before starting a job across Macs, check every host.

For each host (through ssh, as mpirun will reach it): reachable without a password, the same venv path,
the same Orchard and MLX versions, the MPI library present, and the same model files (fingerprint). When
the hostfile configures the tensor collectives (`# orchard:` settings, cluster/hostfile.py): each host's
`addr=` is its own, and for JACCL the devices form a mesh or ring, every listed RDMA device exists there
(`ibv_devices`) and that host's MLX has JACCL.
Prints a table and, for each problem, how to fix it; exits non-zero when anything would break the job.
`python -m rank.preflight` is the probe each host runs (JSON on stdout).
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError
from cluster.hostfile import HostEntry, Hostfile, jaccl_topology, read_hostfile


def rdma_devices() -> list[str] | None:
    """Device names `ibv_devices` lists (macOS 26.2+ with RDMA enabled), or None without the tool."""
    try:
        out = subprocess.run(["ibv_devices"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.splitlines()
    return [ln.split()[0] for ln in lines[2:] if ln.split()] if out.returncode == 0 else None


def _bindable(addr: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


def probe(model: str | None, addr: str | None = None) -> dict[str, Any]:
    """What this host has, as JSON-able facts."""
    from rank.env import find_libmpi
    from rank.models import default_cache_dir, fingerprint, resolve_model

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "orchard": version("mlx-orchard"),
        "mlx": version("mlx"),
        "mpi": bool(find_libmpi()),
        "rdma_devices": rdma_devices(),
    }
    if addr:
        facts["addr_here"] = _bindable(addr)
    try:
        import mlx.core as mx

        facts["jaccl"] = bool(mx.distributed.is_available("jaccl"))
    except Exception:  # no MLX: the version check above says so
        facts["jaccl"] = False
    try:
        # download=None: a preflight looks in this host's Hugging Face cache, it never fetches gigabytes
        facts["model"] = fingerprint(
            resolve_model(model, default_cache_dir(), lambda _: None, download=None)
        )[:12]
    except Exception as exc:  # report, do not crash: the table says what is wrong
        facts["model"] = f"error: {exc}"
    return facts


def check_host_names(hostfile: Path, hosts: list[HostEntry]) -> None:
    """A host name goes to ssh as an argument: one that starts with '-' would be read as an option
    ("-oProxyCommand=..." runs a command), and whitespace or control characters are never part of a name."""
    for entry in hosts:
        if entry.host.startswith("-"):
            why = "starts with '-' (ssh would read it as an option)"
        elif any(ch.isspace() or not ch.isprintable() for ch in entry.host):
            why = "contains whitespace or control characters"
        else:
            continue
        raise ConfigError(f"{hostfile}:{entry.line}: host name {entry.host!r} {why}")


def ssh_command(ssh: str, host: str, remote: list[str]) -> list[str]:
    """ssh's argv for one host: "--" ends ssh's options, so the name is a destination whatever it is."""
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    return [*shlex.split(ssh), *options, "--", host, shlex.join(remote)]


def check(hostfile: Path, model: str | None, ssh: str = "ssh") -> int:
    try:
        settings = read_hostfile(hostfile)
        hosts = list(settings.hosts)
        check_host_names(hostfile, hosts)
    except ConfigError as exc:
        print(f"orchard: {exc}", file=sys.stderr)
        return 2
    local = probe(model)
    remote_cmd = [local["python"], "-m", "rank.preflight"] + (["--model", model] if model else [])
    rows: list[tuple[str, ...]] = []
    fixes: list[str] = []
    for rank, entry in enumerate(hosts):
        addr = ["--addr", entry.addr] if entry.addr else []
        cmd = ssh_command(ssh, entry.host, remote_cmd + addr)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            out = subprocess.CompletedProcess(cmd, 255, "", str(exc))
        facts: dict[str, Any] | None = None
        if out.returncode == 0:
            try:
                facts = json.loads(out.stdout.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                facts = None
        if facts is None:
            reason = (out.stderr.strip().splitlines() or ["no answer"])[-1]
            if out.returncode == 255:
                rows.append((str(rank), entry.host, "unreachable", "-", "-", "-", "FAIL"))
                fixes.append(
                    f"{entry.host}: ssh failed ({reason}). Fix: ssh-copy-id {entry.host}, and check the name resolves"
                )
            else:
                rows.append((str(rank), entry.host, "no venv", "-", "-", "-", "FAIL"))
                fixes.append(
                    f"{entry.host}: {local['python']} did not run ({reason}). Fix: put this checkout at the "
                    f"same path there and run `make setup`"
                )
            continue
        problems = []
        for key, label in (("orchard", "Orchard"), ("mlx", "MLX")):
            if facts[key] != local[key]:
                problems.append(
                    f"{label} {facts[key]} here vs {local[key]} on this Mac: run `git pull && make setup` on both"
                )
        if not facts["mpi"]:
            problems.append("no MPI library in the venv: run `make setup` there")
        if facts["model"] != local["model"]:
            problems.append(
                f"model files differ ({facts['model']} vs {local['model']}): copy the model folder to the same path"
            )
        problems += link_problems(settings, rank, facts)
        status = "ok" if not problems else "FAIL"
        rows.append(
            (
                str(rank),
                entry.host,
                facts["hostname"],
                facts["orchard"],
                facts["mlx"],
                str(facts["model"]),
                status,
            )
        )
        fixes += [f"{entry.host}: {p}" for p in problems]
    _, jaccl = jaccl_topology(settings) if settings.has_rdma else ("", [])
    fixes += [f"{p}: fix the rdma= lists (docs/collectives.md)" for p in jaccl]
    header = ("rank", "host", "hostname", "orchard", "mlx", "model", "status")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    if fixes:
        print("\nProblems:")
        for fix in fixes:
            print(f"  - {fix}")
        return 1
    print(
        f"\nall {len(rows)} hosts ready; rank 0 is {hosts[0].host}; tensor collectives: {collectives_line(settings)}"
    )
    return 0


def link_problems(settings: Hostfile, index: int, facts: dict[str, Any]) -> list[str]:
    """What keeps host `index` from the tensor collectives its hostfile line configures."""
    entry = settings.hosts[index]
    problems = []
    if entry.addr and facts.get("addr_here") is False:
        problems.append(f"addr={entry.addr} is not an address of this host: give the address of its own link")
    if entry.rdma:
        found = facts.get("rdma_devices")
        wanted = [d for d in entry.rdma if d is not None]
        if found is None:
            problems.append(
                "no `ibv_devices` here: RDMA over Thunderbolt needs macOS 26.2+, and `rdma_ctl enable` run "
                "once in recovery mode"
            )
        elif missing := [d for d in wanted if d not in found]:
            problems.append(
                f"RDMA device(s) {', '.join(missing)} not listed by ibv_devices ({', '.join(found) or 'none'}): "
                "check the Thunderbolt 5 cable and port, and that `rdma_ctl enable` was run in recovery"
            )
        if not facts.get("jaccl", False):
            problems.append(
                "this host's MLX has no JACCL backend: it needs macOS 26.2+ and MLX's Metal build (pip install mlx)"
            )
    return problems


def collectives_line(settings: Hostfile) -> str:
    """What `--collectives auto` will use with this hostfile, once every check passed."""
    if settings.has_rdma and settings.collectives in (None, "jaccl"):
        return f"jaccl ({jaccl_topology(settings)[0]})"
    return settings.collectives or "mpi"


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m rank.preflight", description="print this host's facts as JSON"
    )
    p.add_argument("--model")
    p.add_argument("--addr", help="check that this address belongs to this host (a hostfile's addr=)")
    args = p.parse_args()
    print(json.dumps(probe(args.model, args.addr)))


if __name__ == "__main__":
    main()
