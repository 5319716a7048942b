"""The launcher's pure parts: which argv launches, the mpirun command it builds, and what it says about a
host mpirun lost (real jobs through the launcher are in test_lifecycle, test_failstop, test_multihost)."""

from __future__ import annotations

import json
from pathlib import Path

from rank.launch import LOST_DAEMON, lost_host_report, mpirun_command, split_launch_args


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
