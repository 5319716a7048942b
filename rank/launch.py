"""`python -m rank --np N [--hostfile F] ...`: start the job under the venv's mpirun with the flags this
platform needs, and make SIGTERM / Ctrl-C mean "drain".

Why a launcher: Open MPI's mpirun answers SIGTERM or SIGINT by killing every rank about 0.25 s later
(SIGCONT, SIGTERM, SIGKILL; measured with Open MPI 5.0), so no drain can happen. It forwards SIGUSR1
untouched, and rank 0 drains on SIGUSR1. The launcher runs mpirun in its own session (the terminal's
Ctrl-C reaches only the launcher), turns the first SIGTERM/SIGINT into SIGUSR1 for mpirun, and a second
one into mpirun's SIGTERM (stop now).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def mpirun_command(np: int | None, hostfile: str | None, rank_args: list[str]) -> list[str]:
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun) if mpirun.exists() else (shutil.which("mpirun") or "mpirun")]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    # ULFM: a dead rank becomes an error on the survivors instead of mpirun killing them at once, so
    # rank 0 can answer its clients and name the rank before the job ends.
    cmd += ["--bind-to", "none", "--with-ft", "ulfm"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    else:
        cmd.append("--oversubscribe")  # --np on this machine may exceed its cores (TP=3 on 2 cores)
    if np:
        cmd += ["-np", str(np)]
    for name in (
        "ORCHARD_CACHE",
        "ORCHARD_API_KEYS",
        "ORCHARD_ADMIN_TOKEN",
        "ORCHARD_BLAS",
        "ORCHARD_STATUS_FILE",
        "ORCHARD_PULSE_PORT",
    ):
        if name in os.environ:
            cmd += ["-x", name]
    return cmd + [sys.executable, "-m", "rank", *rank_args]


def launch(np: int | None, hostfile: str | None, rank_args: list[str]) -> int:
    # Under ULFM mpirun exits 0 even after MPI_Abort; rank 0 leaves its exit code in this file instead.
    fd, status_file = tempfile.mkstemp(prefix="orchard-status-")
    os.close(fd)
    os.environ["ORCHARD_STATUS_FILE"] = status_file
    cmd = mpirun_command(np, hostfile, rank_args)
    print("orchard: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        code = _run(cmd)
        text = Path(status_file).read_text().strip()
        return code or (int(text) if text.isdigit() else 0)
    finally:
        os.unlink(status_file)


def _run(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, start_new_session=True)
    signals_seen = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            print(
                f"orchard: {signal.Signals(signum).name}: draining the job (again to stop now)",
                file=sys.stderr,
            )
            proc.send_signal(signal.SIGUSR1)
        else:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            return proc.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue


def split_launch_args(argv: list[str]) -> tuple[int | None, str | None, list[str]] | None:
    """(np, hostfile, rest) when argv asks to launch; None when this process is a rank."""
    np: int | None = None
    hostfile: str | None = None
    rest: list[str] = []
    it = iter(range(len(argv)))
    skip = False
    for i in it:
        if skip:
            skip = False
            continue
        arg = argv[i]
        for flag in ("--np", "--hostfile"):
            if arg == flag and i + 1 < len(argv):
                value, skip = argv[i + 1], True
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if flag == "--np":
                np = int(value)
            else:
                hostfile = value
            break
        else:
            rest.append(arg)
    if np is None and hostfile is None:
        return None
    return np, hostfile, rest
