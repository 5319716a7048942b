"""Open MPI hostfiles: `host [slots=N] ...` per line, `#` comments. The first host gets rank 0.

Orchard's own settings (which tensor collectives to use, and what they need) live in comments that start
with `orchard:`, so the same file still goes to `mpirun --hostfile` unchanged (Open MPI skips comments):

    # orchard: collectives=jaccl                          <- job-wide settings, a line of their own
    studio-1.local slots=1  # orchard: addr=10.0.5.1 rdma=-,rdma_en4,rdma_en5
    studio-2.local slots=1  # orchard: addr=10.0.5.2 rdma=rdma_en4,-,rdma_en3
    studio-3.local slots=1  # orchard: addr=10.0.5.3 rdma=rdma_en5,rdma_en3,-

Per host: `addr=IP`, the host's address on the link the tensor collectives cross (MLX's ring backend binds
it; default: the host name, resolved); `rdma=D0,D1,...`, one entry per host of the file in file order: the
RDMA device (as `ibv_devices` names it) through which this host reaches that one, `-` for itself or for a
pair without a cable. Job-wide: `collectives=mpi|ring|jaccl` (what `--collectives auto` picks),
`jaccl-coordinator=IP:PORT` (JACCL's TCP side channel; default: over MPI, nothing to open). See
docs/collectives.md.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ConfigError

BACKENDS = ("mpi", "ring", "jaccl")
_MARK = "orchard:"


@dataclass(slots=True, frozen=True)
class HostEntry:
    host: str
    slots: int
    line: int
    addr: str | None = None  # `addr=`: where the tensor collectives reach this host (None: `host`)
    rdma: tuple[str | None, ...] = ()  # `rdma=`: per host of the file, the device to it (None: no link)


@dataclass(slots=True, frozen=True)
class Hostfile:
    """A hostfile with Orchard's settings (see the module docstring)."""

    path: Path
    hosts: tuple[HostEntry, ...]
    collectives: str | None = None  # `collectives=`: the backend `--collectives auto` takes
    jaccl_coordinator: str | None = None  # `jaccl-coordinator=IP:PORT`; None: JACCL's side channel is MPI

    @property
    def has_rdma(self) -> bool:
        return any(h.rdma for h in self.hosts)


def parse_hostfile(path: Path) -> list[HostEntry]:
    return list(read_hostfile(path).hosts)


def read_hostfile(path: Path) -> Hostfile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read hostfile {path}: {exc.strerror}") from exc
    return hostfile_from_text(path, text)


def hostfile_from_text(path: Path, text: str) -> Hostfile:
    """`text` read as the hostfile `path` (rank 0 reads the file and sends the text to the other ranks:
    only the launching host needs the file)."""
    hosts: list[HostEntry] = []
    job: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line, _, comment = raw.partition("#")
        line, comment = line.strip(), comment.strip()
        settings = _settings(path, number, comment[len(_MARK) :]) if comment.startswith(_MARK) else {}
        if not line:
            for key, value in settings.items():
                if key not in ("collectives", "jaccl-coordinator"):
                    raise ConfigError(f"{path}:{number}: unknown job-wide orchard setting {key!r}")
                job[key] = value
            continue
        host, *options = line.split()
        slots = 1
        for opt in options:
            key, _, value = opt.partition("=")
            if key == "slots":
                if not value.isdigit() or int(value) < 1:
                    raise ConfigError(f"{path}:{number}: slots must be a positive integer, got {value!r}")
                slots = int(value)
        for key in settings:
            if key not in ("addr", "rdma"):
                raise ConfigError(f"{path}:{number}: unknown host setting {key!r} (addr=, rdma=)")
        addr = settings.get("addr")
        if addr is not None:
            try:
                ipaddress.IPv4Address(addr)
            except ValueError:
                raise ConfigError(f"{path}:{number}: addr= must be an IPv4 address, got {addr!r}") from None
        devices = settings["rdma"].split(",") if "rdma" in settings else []
        rdma = tuple(None if d in ("-", "") else d for d in devices)
        hosts.append(HostEntry(host, slots, number, addr, rdma))
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no hosts")
    collectives = job.get("collectives")
    if collectives is not None and collectives not in BACKENDS:
        raise ConfigError(f"{path}: collectives= must be one of {', '.join(BACKENDS)}, got {collectives!r}")
    coordinator = job.get("jaccl-coordinator")
    if coordinator is not None:
        _check_endpoint(path, coordinator)
    return Hostfile(path, tuple(hosts), collectives, coordinator)


def _settings(path: Path, number: int, text: str) -> dict[str, str]:
    out = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise ConfigError(f"{path}:{number}: orchard settings are key=value, got {item!r}")
        out[key] = value
    return out


def _check_endpoint(path: Path, endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        ok = port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{path}: jaccl-coordinator= must be IP:PORT, got {endpoint!r}")


def jaccl_topology(hostfile: Hostfile) -> tuple[str, list[str]]:
    """("mesh" | "ring", problems) of the hostfile's RDMA devices: a mesh needs a device from every host
    to every other one, a ring (MLX_JACCL_RING) from each host to its two neighbours in file order. JACCL
    runs one rank per Mac, so every host has one slot."""
    hosts, n = hostfile.hosts, len(hostfile.hosts)
    problems = []
    if n < 2:
        problems.append("JACCL needs at least two hosts")
    for i, h in enumerate(hosts):
        where = f"{hostfile.path}:{h.line} ({h.host})"
        if h.slots != 1:
            problems.append(f"{where}: JACCL runs one rank per Mac, so slots=1 (got slots={h.slots})")
        if len(h.rdma) != n:
            problems.append(
                f"{where}: rdma= lists {len(h.rdma)} devices; it needs one per host of the file ({n})"
            )
        elif h.rdma[i] is not None:
            problems.append(f"{where}: rdma= entry {i + 1} is this host itself: write '-'")
    if problems:
        return "mesh", problems

    def linked(i: int, j: int) -> bool:
        return hosts[i].rdma[j] is not None

    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if all(linked(i, j) for i, j in pairs):
        return "mesh", []
    neighbours = [(i, (i + d) % n) for i in range(n) for d in (1, -1)]
    missing = [(i, j) for i, j in neighbours if not linked(i, j)]
    if not missing:
        return "ring", []
    listed = ", ".join(f"{hosts[i].host} to {hosts[j].host}" for i, j in missing[:3])
    return "ring", [
        f"{hostfile.path}: no RDMA device from {listed} (a ring needs each host's two neighbours)"
    ]
