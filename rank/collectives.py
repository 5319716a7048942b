"""Which MLX backend carries the tensor collectives (`--collectives mpi|ring|jaccl|auto`).

mpirun stays the launcher and the control bus stays on MPI (mpi4py); only MLX's group, the one every
shard and all-reduce is given, comes from the chosen backend. MLX 0.32 keeps one group per backend in a
process, so the MPI group (needed first: mpi4py runs on the MPI it started) and a ring or JACCL group live
side by side (tested: tests/test_collectives.py).

- `ring`: MLX's TCP ring. Every rank binds the address it talks over (its hostfile entry's `addr=`, else
  the host name resolved; 127.0.0.1 when all ranks share one host), never 0.0.0.0, on a free port of its
  own; the endpoints are gathered over MPI and written to a 0600 temp file (MLX_HOSTFILE) for MLX's init,
  removed right after.
- `jaccl`: RDMA over Thunderbolt 5 (macOS 26.2+), one rank per Mac, devices from the hostfile's `rdma=`
  (cluster/hostfile.py). JACCL's connection set-up side channel runs over MPI unless the hostfile names a
  `jaccl-coordinator=`.
- `auto`: JACCL when the hostfile lists RDMA devices and this MLX has JACCL; else the hostfile's
  `collectives=`; else MPI.

Rank 0 decides and tells the others over MPI, so every rank builds the same kind of group.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError
from cluster.hostfile import Hostfile, hostfile_from_text, jaccl_topology, read_hostfile
from rank.env import local_ranks

log = logging.getLogger("orchard")

CHOICES = ("auto", "mpi", "ring", "jaccl")
NEIGHBOURS = 3  # in a ring of up to 3 ranks every rank is a neighbour of rank 0 (sends reach it)
HOSTFILE_ENV = "ORCHARD_HOSTFILE"  # the launcher's --hostfile, for the ranks (mpirun -x)


@dataclass(frozen=True, slots=True)
class Choice:
    """The backend every rank uses, and why (logged by rank 0)."""

    backend: str
    reason: str


@dataclass(frozen=True, slots=True)
class TensorGroup:
    """MLX's group for the tensor collectives (None for one rank) and the backend it runs on.
    `point_to_point`: any rank can send to rank 0 (MPI; a JACCL mesh; a ring of up to 3 ranks, where
    every rank is rank 0's neighbour); otherwise the vocabulary gather is an all-gather
    (rank/executor.py)."""

    group: Any
    backend: str
    point_to_point: bool = True


def choose(
    requested: str, hostfile: Hostfile | None, jaccl_available: bool, one_host: bool, ranks: int = 2
) -> Choice:
    """The backend for `--collectives requested` (pure: rank 0 calls it, tests too)."""
    if requested not in CHOICES:
        raise ConfigError(f"--collectives must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "mpi":
        return Choice("mpi", "--collectives mpi")
    configured = hostfile.collectives if hostfile is not None else None
    fallback = "nothing faster configured"
    rdma = hostfile is not None and hostfile.has_rdma and configured in (None, "jaccl")
    if requested == "jaccl" or (requested == "auto" and rdma):
        why = _jaccl_unusable(hostfile, jaccl_available)
        if why is None:
            return Choice("jaccl", f"--collectives {requested}: the hostfile lists RDMA devices")
        if requested == "jaccl":
            raise ConfigError(f"--collectives jaccl: {why}")
        log.warning("the hostfile lists RDMA devices, but %s: not using JACCL", why)
        fallback = f"JACCL is configured but {why}"
    if requested == "ring" or (requested == "auto" and configured == "ring"):
        if hostfile is None and not one_host:
            raise ConfigError(
                "--collectives ring across hosts needs the hostfile (start with --hostfile, or export "
                f"{HOSTFILE_ENV}=FILE and pass `-x {HOSTFILE_ENV}` to mpirun): it names each host's address"
            )
        return Choice(
            "ring", "--collectives ring" if requested == "ring" else "the hostfile's collectives=ring"
        )
    if requested == "auto" and configured == "jaccl" and not rdma:
        raise ConfigError("the hostfile says collectives=jaccl but lists no rdma= devices")
    return Choice("mpi", f"--collectives auto: {fallback}")


def _jaccl_unusable(hostfile: Hostfile | None, available: bool) -> str | None:
    if hostfile is None or not hostfile.has_rdma:
        return "it needs a hostfile whose hosts list their RDMA devices (rdma=, see docs/collectives.md)"
    _, problems = jaccl_topology(hostfile)
    if problems:
        return "; ".join(problems)
    if not available:
        return "this MLX has no JACCL backend (macOS 26.2+ with MLX's Metal build; RDMA over Thunderbolt 5)"
    return None


def hostfile_from_env() -> Hostfile | None:
    path = os.environ.get(HOSTFILE_ENV)
    return read_hostfile(Path(path)) if path else None


def shared_hostfile(comm: Any) -> Hostfile | None:
    """Rank 0's hostfile (ORCHARD_HOSTFILE), sent to every rank: only the launching host needs the file."""
    sent: tuple[str, str] | str | None = None
    if comm.Get_rank() == 0:
        try:
            hostfile = hostfile_from_env()
            sent = (str(hostfile.path), hostfile.path.read_text()) if hostfile is not None else None
        except (ConfigError, OSError) as exc:
            sent = str(exc)
    sent = comm.bcast(sent, root=0)
    if isinstance(sent, str):
        raise ConfigError(sent)
    return hostfile_from_text(Path(sent[0]), sent[1]) if sent is not None else None


def ring_address(hostfile: Hostfile | None, one_host: bool) -> str:
    """The address this rank's ring socket binds: on one host loopback; else the first hostfile entry
    whose address (`addr=`, else its name resolved) belongs to this machine (a bind to it succeeds only
    here), so no rank order is assumed."""
    if one_host and (hostfile is None or all(h.addr is None for h in hostfile.hosts)):
        return "127.0.0.1"
    if hostfile is None:
        raise ConfigError(f"the ring backend across hosts needs the hostfile ({HOSTFILE_ENV})")
    tried = []
    for entry in hostfile.hosts:
        addr = entry.addr or _resolve(entry.host)
        tried.append(f"{entry.host}={addr}")
        if addr and _bindable(addr):
            return addr
    raise ConfigError(
        f"none of {hostfile.path}'s addresses is on this host ({', '.join(tried)}): give each host its "
        "address with `# orchard: addr=IP`"
    )


def check_jaccl_placement(hostfile: Hostfile, rank: int) -> None:
    """Row `rank` of the device matrix is the hostfile's host `rank`: JACCL runs one rank per Mac in file
    order (mpirun's default placement with slots=1). A rank on another Mac would open the wrong ports."""
    entry = hostfile.hosts[rank]
    addr = entry.addr or _resolve(entry.host)
    if addr is not None and not _bindable(addr):
        raise ConfigError(
            f"rank {rank} runs on {socket.gethostname()}, but line {entry.line} of {hostfile.path} "
            f"({entry.host}) lists its RDMA devices: start one rank per Mac in hostfile order (slots=1)"
        )


def _resolve(host: str) -> str | None:
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
    except (OSError, IndexError):
        return None


def _bindable(addr: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def ring_hostfile(endpoints: list[tuple[str, int]]) -> str:
    """MLX_HOSTFILE's content: per rank, a list of "ip:port" (one connection per neighbour)."""
    return json.dumps([[f"{addr}:{port}"] for addr, port in endpoints])


def jaccl_devices(hostfile: Hostfile) -> str:
    """MLX_IBV_DEVICES's content: rank i's row lists the device to each rank j (null: none, itself)."""
    return json.dumps([list(h.rdma) for h in hostfile.hosts])


def jaccl_env(hostfile: Hostfile, rank: int, devices_file: str) -> dict[str, str]:
    """The variables MLX's JACCL init reads (jaccl/lib: MLX_RANK, MLX_IBV_DEVICES, MLX_JACCL_COORDINATOR,
    MLX_JACCL_RING)."""
    topology, problems = jaccl_topology(hostfile)
    if problems:
        raise ConfigError("; ".join(problems))
    env = {"MLX_RANK": str(rank), "MLX_IBV_DEVICES": devices_file}
    if hostfile.jaccl_coordinator:
        env["MLX_JACCL_COORDINATOR"] = hostfile.jaccl_coordinator
    if topology == "ring":
        env["MLX_JACCL_RING"] = "1"
    return env


def private_file(text: str, prefix: str) -> str:
    """A 0600 temp file holding `text` (mkstemp creates it so): the ranks' endpoints are nobody else's."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def init_tensor_group(requested: str, mpi_group: Any, comm: Any) -> TensorGroup:
    """After MLX's MPI init and mpi4py: the group for the tensor collectives. `comm`: an mpi4py
    communicator of all ranks (collectives only)."""
    import mlx.core as mx

    rank = comm.Get_rank()
    hostfile = shared_hostfile(comm)
    one_host = len(set(comm.allgather(socket.gethostname()))) == 1
    choice: Choice | str
    if rank == 0:
        try:
            jaccl = mx.distributed.is_available("jaccl")
            choice = choose(requested, hostfile, jaccl, one_host, comm.Get_size())
            log.info("tensor collectives: %s (%s)", choice.backend, choice.reason)
            if choice.backend == "ring" and local_ranks() > (os.cpu_count() or 1):
                log.warning(
                    "MLX's ring busy-waits in its socket threads: with more ranks than cores on a host "
                    "(%d on %d) the waiting ranks starve the computing one (TP=3 on 2 cores: 100x slower "
                    "all-reduces, measured); use --collectives mpi here",
                    local_ranks(),
                    os.cpu_count() or 1,
                )
        except ConfigError as exc:
            choice = str(exc)
    else:
        choice = ""
    picked = comm.bcast(choice.backend if isinstance(choice, Choice) else f"!{choice}", root=0)
    if picked.startswith("!"):
        raise ConfigError(picked[1:])
    if picked == "mpi":
        return TensorGroup(mpi_group, "mpi")
    if picked == "ring":
        addr = ring_address(hostfile, one_host)
        endpoints = comm.allgather((addr, free_port(addr)))
        path = private_file(ring_hostfile(endpoints), "orchard-ring-")
        env = {"MLX_HOSTFILE": path, "MLX_RANK": str(rank)}
    else:
        assert hostfile is not None
        check_jaccl_placement(hostfile, rank)
        path = private_file(jaccl_devices(hostfile), "orchard-jaccl-")
        env = jaccl_env(hostfile, rank, path)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if picked == "ring":
            group = mx.distributed.init(backend="ring", strict=True)
        elif hostfile is not None and hostfile.jaccl_coordinator:
            group = mx.distributed.init(backend="jaccl", strict=True)
        else:
            group = mx.distributed.init(
                backend="jaccl", strict=True, all_gather_factory=_mpi_side_channel(comm)
            )
    finally:
        os.unlink(path)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if group.size() != comm.Get_size() or group.rank() != rank:
        raise ConfigError(
            f"the {picked} group sees rank {group.rank()} of {group.size()}, MPI rank {rank} of {comm.Get_size()}"
        )
    size = group.size()
    if picked == "ring":
        point_to_point = size <= NEIGHBOURS
    else:
        assert hostfile is not None
        point_to_point = size <= NEIGHBOURS or jaccl_topology(hostfile)[0] == "mesh"
    return TensorGroup(group, picked, point_to_point)


def _mpi_side_channel(comm: Any) -> Any:
    """JACCL's byte all-gather for exchanging RDMA connection details, over MPI (no port to open)."""

    def factory(_rank: int, _size: int) -> Any:
        def all_gather(src: bytes, n_bytes: int) -> bytes:
            parts = comm.allgather(bytes(src)[:n_bytes])
            return b"".join(parts)

        return all_gather

    return factory
