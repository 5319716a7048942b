"""`--collectives`: the hostfile's collectives settings, the backend choice, the ring and JACCL set-up they
produce, and a real 2-rank job whose tensor collectives run on MLX's ring backend (beside MPI, which keeps
the control bus) with greedy output equal to one rank's.

JACCL cannot run here (RDMA over Thunderbolt 5 needs Macs with macOS 26.2+; this MLX has no JACCL
backend): its configuration and the environment MLX's JACCL init reads are tested, not the transport."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from cluster.hostfile import jaccl_topology, parse_hostfile, read_hostfile
from rank.collectives import (
    choose,
    jaccl_devices,
    jaccl_env,
    private_file,
    ring_address,
    ring_hostfile,
)
from tests.jobs import ROOT, Job, tiny_args

MESH = """\
# orchard: collectives=jaccl
studio-1.local slots=1  # orchard: addr=10.0.5.1 rdma=-,rdma_en4,rdma_en5
studio-2.local slots=1  # orchard: addr=10.0.5.2 rdma=rdma_en4,-,rdma_en3
studio-3.local slots=1  # orchard: addr=10.0.5.3 rdma=rdma_en5,rdma_en3,-
"""


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "hosts.txt"
    f.write_text(text)
    return f


def test_orchard_settings_live_in_comments_open_mpi_skips(tmp_path: Path) -> None:
    hf = read_hostfile(write(tmp_path, MESH))
    assert hf.collectives == "jaccl" and hf.jaccl_coordinator is None and hf.has_rdma
    assert [(h.host, h.slots, h.addr) for h in hf.hosts] == [
        ("studio-1.local", 1, "10.0.5.1"),
        ("studio-2.local", 1, "10.0.5.2"),
        ("studio-3.local", 1, "10.0.5.3"),
    ]
    assert hf.hosts[1].rdma == ("rdma_en4", None, "rdma_en3")
    assert [h.host for h in parse_hostfile(tmp_path / "hosts.txt")] == [h.host for h in hf.hosts]
    # a plain Open MPI hostfile still reads as before, with nothing configured
    plain = read_hostfile(ROOT / "hostfiles" / "studio.txt")
    assert plain.collectives is None and not plain.has_rdma and all(h.addr is None for h in plain.hosts)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a slots=1 # orchard: addr=studio\n", "addr= must be an IPv4 address"),
        ("a slots=1 # orchard: speed=fast\n", "unknown host setting 'speed'"),
        ("# orchard: collectives=nccl\na\n", "collectives= must be one of mpi, ring, jaccl"),
        ("# orchard: colectives=ring\na\n", "unknown job-wide orchard setting 'colectives'"),
        ("# orchard: jaccl-coordinator=10.0.5.1\na\n", "jaccl-coordinator= must be IP:PORT"),
        ("a # orchard: addr\n", "orchard settings are key=value"),
    ],
)
def test_bad_settings_name_the_line(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        read_hostfile(write(tmp_path, text))


def test_jaccl_topologies(tmp_path: Path) -> None:
    assert jaccl_topology(read_hostfile(write(tmp_path, MESH))) == ("mesh", [])
    # four Macs cabled in a ring: each reaches its two neighbours only
    ring = "".join(
        f"m{i} slots=1 # orchard: rdma={','.join('-' if j == i or (j - i) % 4 == 2 else f'en{j}' for j in range(4))}\n"
        for i in range(4)
    )
    assert jaccl_topology(read_hostfile(write(tmp_path, ring))) == ("ring", [])
    broken = MESH.replace("rdma=rdma_en4,-,rdma_en3", "rdma=rdma_en4,rdma_en9,rdma_en3").replace(
        "studio-3.local slots=1", "studio-3.local slots=2"
    )
    _, problems = jaccl_topology(read_hostfile(write(tmp_path, broken)))
    assert any("entry 2 is this host itself" in p for p in problems)
    assert any("slots=1 (got slots=2)" in p for p in problems)
    short = MESH.replace("rdma=rdma_en5,rdma_en3,-", "rdma=rdma_en5,-")
    assert (
        "lists 2 devices; it needs one per host of the file (3)"
        in jaccl_topology(read_hostfile(write(tmp_path, short)))[1][0]
    )
    gap = "a # orchard: rdma=-,x,-\nb # orchard: rdma=x,-,-\nc # orchard: rdma=-,-,-\n"
    assert "no RDMA device from a to c" in jaccl_topology(read_hostfile(write(tmp_path, gap)))[1][0]


def test_jaccl_config_generated_from_the_hostfile(tmp_path: Path) -> None:
    """What MLX's JACCL init reads (mlx/distributed/jaccl/lib): the device matrix file and the variables."""
    hf = read_hostfile(write(tmp_path, MESH))
    assert json.loads(jaccl_devices(hf)) == [
        [None, "rdma_en4", "rdma_en5"],
        ["rdma_en4", None, "rdma_en3"],
        ["rdma_en5", "rdma_en3", None],
    ]
    assert jaccl_env(hf, 2, "/tmp/devs.json") == {"MLX_RANK": "2", "MLX_IBV_DEVICES": "/tmp/devs.json"}
    coordinated = read_hostfile(write(tmp_path, "# orchard: jaccl-coordinator=10.0.5.1:32323\n" + MESH))
    assert jaccl_env(coordinated, 0, "d")["MLX_JACCL_COORDINATOR"] == "10.0.5.1:32323"
    ring = "".join(
        f"m{i} # orchard: rdma={','.join('-' if j in (i, (i + 2) % 4) else 'en' for j in range(4))}\n"
        for i in range(4)
    )
    assert jaccl_env(read_hostfile(write(tmp_path, ring)), 1, "d")["MLX_JACCL_RING"] == "1"


def test_the_backend_choice(tmp_path: Path) -> None:
    mesh = read_hostfile(write(tmp_path, MESH))
    assert choose("auto", None, False, True).backend == "mpi"
    assert choose("auto", mesh, True, False).backend == "jaccl"
    assert choose("mpi", mesh, True, False).backend == "mpi"
    assert choose("ring", None, False, True).backend == "ring"  # one host: loopback needs no hostfile
    with pytest.raises(ConfigError, match="ring across hosts needs the hostfile"):
        choose("ring", None, False, False)
    with pytest.raises(ConfigError, match="this MLX has no JACCL backend"):
        choose("jaccl", mesh, False, False)
    with pytest.raises(ConfigError, match="needs a hostfile whose hosts list their RDMA devices"):
        choose("jaccl", None, True, False)
    # auto: JACCL configured but unavailable here falls back to what the hostfile says, else MPI
    fallback = choose("auto", mesh, False, False)
    assert fallback.backend == "mpi" and "this MLX has no JACCL backend" in fallback.reason
    ring_file = read_hostfile(write(tmp_path, "# orchard: collectives=ring\na # orchard: addr=10.0.0.1\n"))
    assert choose("auto", ring_file, False, False).backend == "ring"
    with pytest.raises(ConfigError, match="says collectives=jaccl but lists no rdma"):
        choose("auto", read_hostfile(write(tmp_path, "# orchard: collectives=jaccl\na\n")), True, False)
    with pytest.raises(ConfigError, match="--collectives must be one of"):
        choose("nccl", None, False, True)


def test_ring_binds_the_hosts_address_never_any(tmp_path: Path) -> None:
    assert ring_address(None, one_host=True) == "127.0.0.1"
    # the entry whose address is on this machine, wherever it is listed (no rank order assumed)
    hf = read_hostfile(write(tmp_path, "a # orchard: addr=192.0.2.7\nb # orchard: addr=127.0.0.1\n"))
    assert ring_address(hf, one_host=False) == "127.0.0.1"
    nowhere = read_hostfile(write(tmp_path, "a # orchard: addr=192.0.2.7\n"))
    with pytest.raises(ConfigError, match="addresses is on this host"):
        ring_address(nowhere, one_host=False)
    assert json.loads(ring_hostfile([("10.0.0.1", 5000), ("10.0.0.2", 5001)])) == [
        ["10.0.0.1:5000"],
        ["10.0.0.2:5001"],
    ]
    path = private_file("[]", "orchard-test-")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.unlink(path)


def test_the_ring_serves_any_number_of_ranks(tmp_path: Path) -> None:
    """MLX's ring links neighbours only: beyond 3 ranks the vocabulary gather is an all-gather (below)."""
    assert choose("ring", None, False, True, ranks=3).backend == "ring"
    assert choose("ring", None, False, True, ranks=4).backend == "ring"
    ring_file = read_hostfile(write(tmp_path, "# orchard: collectives=ring\nlocalhost slots=8\n"))
    assert choose("auto", ring_file, False, True, ranks=5).backend == "ring"


@pytest.mark.cluster
def test_ring_tp2_greedy_equals_tp1_token_for_token(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_cluster import PROMPTS, greedy_ids

    single = job_factory.start(1, tiny_args(tiny_model), "coll-tp1")
    expected = [greedy_ids(single, p) for p in PROMPTS]
    single.stop()
    job: Job = job_factory.start(2, tiny_args(tiny_model, "--collectives", "ring"), "coll-ring-tp2")
    assert [greedy_ids(job, p) for p in PROMPTS] == expected
    assert "tensor collectives: ring (--collectives ring)" in job.log()
    job.stop()


@pytest.mark.cluster
def test_ring_tp4_gathers_the_vocabulary_from_non_neighbours(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Rank 2 of a 4-rank ring is no neighbour of rank 0: its logits slice (or its greedy pick) comes by
    all-gather. Rows with logprobs gather slices, plain greedy ones picks: both equal one rank's tokens."""
    from tests.test_cluster import PROMPTS, client, greedy_ids

    def texts(job: Job) -> list[str]:  # greedy without logprobs: the ranks send their picks
        return [
            client(job).completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text
            for p in PROMPTS[:2]
        ]

    single = job_factory.start(1, tiny_args(tiny_model), "coll-tp1-for-4")
    expected = [greedy_ids(single, p, n=8) for p in PROMPTS[:2]], texts(single)
    single.stop()
    job: Job = job_factory.start(4, tiny_args(tiny_model, "--collectives", "ring"), "coll-ring-tp4")
    assert ([greedy_ids(job, p, n=8) for p in PROMPTS[:2]], texts(job)) == expected  # slices, then picks
    assert "tensor collectives: ring (--collectives ring)" in job.log()
    job.stop()


FAKE_SSH = """#!/bin/sh
while [ "$1" = "-o" ]; do shift 2; done
[ "$1" = "--" ] && shift
host=$1; shift
case "$host" in
  mac-rdma*) echo '{"hostname": "'$host'", "python": "x", "orchard": "%(orchard)s", "mlx": "%(mlx)s", '\
'"mpi": true, "model": "%(model)s", "rdma_devices": ["rdma_en3", "rdma_en4"], "jaccl": true}';;
  *) exec sh -c "$*";;
esac
"""


def run_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """`--check-hostfile` with an ssh stand-in: "mac-rdma*" answers like a Mac with RDMA enabled and
    JACCL in its MLX (no such Mac here), any other name runs the real probe on this machine."""
    from rank.preflight import probe

    local = probe(None)
    ssh = tmp_path / "ssh"
    ssh.write_text(FAKE_SSH % {k: local[k] for k in ("orchard", "mlx", "model")})
    ssh.chmod(0o755)
    hostfile = write(tmp_path, text)
    cmd = [sys.executable, "-m", "rank", "--check-hostfile", str(hostfile), "--ssh", str(ssh)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_check_hostfile_passes_a_jaccl_mesh(tmp_path: Path) -> None:
    text = "mac-rdma1 slots=1 # orchard: rdma=-,rdma_en3\nmac-rdma2 slots=1 # orchard: rdma=rdma_en4,-\n"
    out = run_check(tmp_path, text)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tensor collectives: jaccl (mesh)" in out.stdout


def test_check_hostfile_names_what_keeps_jaccl_from_running(tmp_path: Path) -> None:
    # this Linux machine as the second "Mac": no ibv_devices, no JACCL in its MLX, and not 192.0.2.9
    text = (
        "mac-rdma1 slots=1 # orchard: rdma=-,rdma_en3,rdma_en9\n"
        "localhost slots=1 # orchard: addr=192.0.2.9 rdma=rdma_en3,-,rdma_en4\n"
        "mac-rdma3 slots=1 # orchard: rdma=rdma_en3,rdma_en4,-\n"
    )
    out = run_check(tmp_path, text)
    assert out.returncode == 1
    assert "mac-rdma1: RDMA device(s) rdma_en9 not listed by ibv_devices (rdma_en3, rdma_en4)" in out.stdout
    assert "localhost: no `ibv_devices` here" in out.stdout and "rdma_ctl enable" in out.stdout
    assert "localhost: this host's MLX has no JACCL backend" in out.stdout
    assert "localhost: addr=192.0.2.9 is not an address of this host" in out.stdout
    gap = "mac-rdma1 slots=2 # orchard: rdma=-,rdma_en3\nmac-rdma2 slots=1 # orchard: rdma=rdma_en4,-\n"
    out = run_check(tmp_path, gap)
    assert out.returncode == 1 and "JACCL runs one rank per Mac, so slots=1 (got slots=2)" in out.stdout


@pytest.mark.cluster
def test_ring_across_two_hosts_configured_by_the_hostfile(
    job_factory, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Two namespace "Macs": the hostfile's job-wide `collectives=ring` makes `auto` pick the ring, each
    rank binds its own host's address (found from the hostfile, no rank order assumed), and mpirun reads
    the same file (it skips the orchard comments)."""
    from tests.netns import NamespaceHosts, available

    if available() is not None:
        pytest.skip(str(available()))
    from tests.test_multihost import PROMPTS, greedy_ids

    single = job_factory.start(1, tiny_args(tiny_model), "coll-single")
    expected = [greedy_ids(single, p) for p in PROMPTS]
    single.stop()
    with NamespaceHosts(2, tmp_path) as hosts:
        hosts.hostfile.write_text(
            "# orchard: collectives=ring\n"
            + "".join(f"{hosts.address(i)} slots=1  # rank {i}\n" for i in range(2))
        )
        mpirun = [*hosts.mpirun_args(2), "-x", "ORCHARD_HOSTFILE"]
        env = {"ORCHARD_HOSTFILE": str(hosts.hostfile)}
        job: Job = job_factory.start(
            2, tiny_args(tiny_model), "coll-ring-netns", env=env, mpirun_extra=mpirun, host=hosts.address(0)
        )
        assert [greedy_ids(job, p) for p in PROMPTS] == expected
        assert "tensor collectives: ring (the hostfile's collectives=ring)" in job.log()
        job.stop()


def test_open_mpi_is_tuned_for_links_between_hosts_only() -> None:
    """Recursive doubling with eager messages up to 1 MiB: one link delay per all-reduce at every size
    (measured: benchmarks/collectives_bench.py); a job on one host keeps Open MPI's shared-memory defaults."""
    from rank.env import across_hosts_mca

    across = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    mca = across_hosts_mca(across)
    assert mca["OMPI_MCA_coll_tuned_allreduce_algorithm"] == "3"
    assert mca["OMPI_MCA_btl_tcp_eager_limit"] == "1048576"
    assert across_hosts_mca({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}) == {}
    assert across_hosts_mca({}) == {}
    assert across_hosts_mca({**across, "ORCHARD_MPI_TUNING": "off"}) == {}


def test_a_jaccl_rank_must_run_on_its_hostfile_line(tmp_path: Path) -> None:
    from rank.collectives import check_jaccl_placement

    hf = read_hostfile(
        write(tmp_path, "localhost # orchard: rdma=-,en3\nelsewhere # orchard: addr=192.0.2.8 rdma=en3,-\n")
    )
    check_jaccl_placement(hf, 0)  # localhost is here
    with pytest.raises(ConfigError, match=r"line 2 of .* \(elsewhere\) lists its RDMA devices"):
        check_jaccl_placement(hf, 1)
