"""The launcher's pure parts: which argv launches, the mpirun command it builds, and what it says about a
host mpirun lost (real jobs through the launcher are in test_lifecycle, test_failstop, test_multihost)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from rank.launch import LOST_DAEMON, lost_host_report, move_secrets, mpirun_command, split_launch_args


def test_split_launch_args() -> None:
    assert split_launch_args(["--port", "9000"]) is None  # a rank, not a launch
    got = split_launch_args(
        ["--np", "3", "--port", "9000", "--mpirun-args", "--mca btl_tcp_if_include 'bridge 0'", "--log-level=debug"]
    )
    assert got == (3, None, ["--port", "9000", "--log-level=debug"], ["--mca", "btl_tcp_if_include", "bridge 0"])
    assert split_launch_args(["--hostfile=hosts.txt"]) == (None, "hosts.txt", [], [])


def test_mpirun_command_puts_extra_flags_before_the_program() -> None:
    cmd = mpirun_command(2, "h.txt", ["--port", "1"], ["--mca", "btl", "tcp,self"])
    program = cmd.index("-m")
    assert cmd[program - 3 : program - 1] == ["btl", "tcp,self"]
    assert cmd[program:] == ["-m", "rank", "--port", "1"]
    assert ["--hostfile", "h.txt"] == cmd[cmd.index("--hostfile") : cmd.index("--hostfile") + 2]
    assert "--with-ft" in cmd and "--oversubscribe" not in cmd


def test_both_prrte_wordings_of_a_lost_host_are_recognised() -> None:
    lines = [
        "  Remote daemon: [prterun-vm-19393@0,2] on node studio-2",
        "  Remote host:   studio-3",
        "  Local host:    vm",
    ]
    assert [m.group(1) for ln in lines if (m := LOST_DAEMON.search(ln))] == ["studio-2", "studio-3"]


def test_lost_host_report_names_the_ranks_that_ran_there(tmp_path: Path) -> None:
    table = tmp_path / "ranks.json"
    table.write_text(json.dumps([{"rank": 0, "host": "a", "pid": 1}, {"rank": 1, "host": "b", "pid": 2}]))
    assert lost_host_report(["b", "b"], table) == [
        "lost host b, where rank 1 (pid 2) ran: its processes or its link died, so the job ended"
    ]
    table.write_text("")  # rank 0 never got to write it
    assert lost_host_report(["b"], table) == [
        "lost host b (which ranks ran there is unknown): its processes or its link died, so the job ended"
    ]


def test_secrets_travel_in_the_environment_not_on_mpiruns_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-file\n")
    argv = ["--np", "2", "--port", "1", "--api-key", "sk-one", "--api-key=sk-two", "--admin-token", "adm-tok"]
    argv += ["--metrics-token", "met-tok"]
    launching = split_launch_args([*argv, "--api-key-file", str(keys)])
    assert launching is not None
    np, hostfile, rank_args, extra = launching
    rest, moved = move_secrets(rank_args, {"ORCHARD_API_KEYS": "sk-env"})
    assert moved == {
        "ORCHARD_API_KEYS": "sk-env,sk-one,sk-two",
        "ORCHARD_ADMIN_TOKEN": "adm-tok",
        "ORCHARD_METRICS_TOKEN": "met-tok",
    }
    cmd = mpirun_command(np, hostfile, rest, extra, env=moved)
    secrets = ("sk-one", "sk-two", "sk-env", "adm-tok", "met-tok")
    assert not any(secret in arg for arg in cmd for secret in secrets)
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"] == [
        "ORCHARD_API_KEYS",
        "ORCHARD_ADMIN_TOKEN",
        "ORCHARD_METRICS_TOKEN",
    ]
    assert cmd[cmd.index("-m") :] == ["-m", "rank", "--port", "1", "--api-key-file", str(keys)]
    # each rank's own parsing finds them where the launcher put them (mpirun -x copies the variables)
    from rank.cli import api_keys, build_parser

    for name, value in moved.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(cmd[cmd.index("-m") + 2 :])
    assert args.admin_token == "adm-tok" and args.metrics_token == "met-tok"
    assert sorted(api_keys(args)) == ["sk-env", "sk-file", "sk-one", "sk-two"]


def test_without_secrets_nothing_moves() -> None:
    assert move_secrets(["--port", "1", "--admin-token-file", "t"], {"ORCHARD_API_KEYS": "k"}) == (
        ["--port", "1", "--admin-token-file", "t"],
        {},
    )
    with pytest.raises(ConfigError, match="comma"):
        move_secrets(["--api-key", "a,b"], {})


def test_a_job_whose_rank_failed_is_ended_when_mpirun_hangs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank left its failure code in the status file, but mpirun does not end (seen under ULFM on a
    loaded machine after two ranks aborted at once): the launcher ends it after the grace period, even
    when it ignores SIGTERM, and exits with the rank's code. Real processes; `mpirun` here is a Python
    process that hangs."""
    import signal
    import sys
    import time

    from rank import launch

    status = tmp_path / "status"
    status.write_text("2")
    monkeypatch.setattr(launch, "FAILED_JOB_GRACE_S", 1.0)
    hang = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
    t0 = time.monotonic()
    try:
        code, lost = launch._run([sys.executable, "-c", hang], status)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert (code, lost) == (2, [])
    assert time.monotonic() - t0 < 10  # grace 1 s, SIGTERM ignored for 2 s, then SIGKILL
