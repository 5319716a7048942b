"""Several "Macs" on one Linux machine: network namespaces joined by a bridge, each with its own address
and hostname, and an ssh stand-in that mpirun uses to start its daemons inside them (the recipe of
shared/ENVIRONMENT.md). Needs root and iproute2; everything is removed again, even when a test fails."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
BRIDGE = "orbr0"
LOCK_FILE = "/tmp/orchard-netns.lock"

AGENT = """#!/bin/sh
# ssh stand-in for mpirun: `agent [options] HOST CMD...` runs CMD inside HOST's namespace, with its own
# hostname (Open MPI tells hosts apart by hostname).
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-l|-i|-F) shift 2;;
    -*) shift;;
    *) break;;
  esac
done
host=$1; shift
ns=$(grep -F "$host " "{table}" | cut -d' ' -f2)
[ -n "$ns" ] || {{ echo "agent: unknown host $host" >&2; exit 255; }}
exec ip netns exec "$ns" unshare --uts sh -c "hostname $ns; $*"
"""


def available() -> str | None:
    """Why the namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian iproute2 / util-linux)"
    probe = subprocess.run(["ip", "netns", "add", "orprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "orprobe"], capture_output=True)
    return None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@dataclass
class NamespaceHosts:
    n: int
    workdir: Path
    names: list[str] = field(default_factory=list)

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> NamespaceHosts:
        # One set of test hosts per machine at a time: the names are fixed, and a second user (a benchmark,
        # another test run) would delete this one's namespaces. Wait for the other to finish instead.
        self._lock = open(LOCK_FILE, "w")  # noqa: SIM115 - held until __exit__
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            return self._create()
        except BaseException:
            self.__exit__()
            raise

    def _create(self) -> NamespaceHosts:
        self.cleanup()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        table = []
        for i in range(self.n):
            ns, host_if, ns_if = f"orhost{i + 1}", f"orv{i + 1}", f"orp{i + 1}"
            sh("ip", "netns", "add", ns)
            self.names.append(ns)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            sh("ip", "link", "set", ns_if, "netns", ns)
            sh("ip", "link", "set", host_if, "master", BRIDGE)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", ns_if)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            table.append(f"{self.address(i)} {ns}")
        (self.workdir / "hosts.table").write_text("\n".join(table) + "\n")
        self.agent = self.workdir / "agent"
        self.agent.write_text(
            AGENT.replace("{table}", str(self.workdir / "hosts.table")).replace("{{", "{").replace("}}", "}")
        )
        self.agent.chmod(0o755)
        self.hostfile = self.workdir / "hostfile"
        self.hostfile.write_text("".join(f"{self.address(i)} slots=1\n" for i in range(self.n)))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.cleanup()
        finally:
            self._lock.close()  # releases the lock

    def cleanup(self) -> None:
        for i in range(8):
            ns = f"orhost{i + 1}"
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"orv{i + 1}"], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)

    def mpirun_args(self, np: int) -> list[str]:
        return [
            "--prtemca",
            "plm_ssh_agent",
            str(self.agent),
            "--hostfile",
            str(self.hostfile),
            "-np",
            str(np),
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            f"{SUBNET}.0/24",
            "--mca",
            "oob_tcp_if_include",
            f"{SUBNET}.0/24",
        ]

    def rx_bytes(self, i: int) -> int:
        """Bytes host i received on its link (the namespace side of its veth pair)."""
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                f"orhost{i + 1}",
                "cat",
                f"/sys/class/net/orp{i + 1}/statistics/rx_bytes",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout)

    def kill_host(self, i: int) -> None:
        for pid in subprocess.run(
            ["ip", "netns", "pids", f"orhost{i + 1}"], capture_output=True, text=True
        ).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
