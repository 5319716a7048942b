"""`python -m rank --np N [--hostfile F] ...`: start the job under the venv's mpirun with the flags this
platform needs, and make SIGTERM / Ctrl-C mean "drain".

Why a launcher: Open MPI's mpirun answers SIGTERM or SIGINT by killing every rank about 0.25 s later
(SIGCONT, SIGTERM, SIGKILL; measured with Open MPI 5.0), so no drain can happen. It forwards SIGUSR1
untouched, and rank 0 drains on SIGUSR1. The launcher runs mpirun in its own session (the terminal's
Ctrl-C reaches only the launcher), turns the first SIGTERM/SIGINT into SIGUSR1 for mpirun, and a second
one into mpirun's SIGTERM (stop now).

Secrets (`--api-key`, `--admin-token`) never go on the mpirun command line: any user of a host can read
a process's argv (ps), and the launcher prints the command. They travel in the environment instead
(`mpirun -x NAME` names the variable, not its value), where the ranks' flags already look for them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError

log = logging.getLogger("orchard.launch")

SECRET_FLAGS = frozenset({"--api-key", "--admin-token", "--metrics-token"})


def _long_options() -> list[str]:
    from rank.cli import build_parser

    return [s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")]


def _secret_flag(arg: str, options: list[str]) -> str | None:
    """The secret flag `arg` names, as argparse reads it: its exact name, or a prefix of that flag alone
    (argparse takes an unambiguous abbreviation for the flag, so it must not slip through either)."""
    name = arg.split("=", 1)[0]
    if not name.startswith("--") or name == "--":
        return None
    hits = [name] if name in options else [o for o in options if o.startswith(name)]
    return hits[0] if len(hits) == 1 and hits[0] in SECRET_FLAGS else None


def move_secrets(rank_args: list[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(rank args without `--api-key` / `--admin-token`, the environment variables that carry them):
    ORCHARD_API_KEYS (added to the keys already there) and ORCHARD_ADMIN_TOKEN (a flag beats the
    environment, as in the ranks' own parsing)."""
    options = _long_options()
    rest: list[str] = []
    keys = [k.strip() for k in env.get("ORCHARD_API_KEYS", "").split(",") if k.strip()]
    token: str | None = None
    metrics: str | None = None
    i = 0
    while i < len(rank_args):
        arg = rank_args[i]
        flag = _secret_flag(arg, options)
        if flag is None:
            rest.append(arg)
            i += 1
            continue
        if "=" in arg:
            value, i = arg.split("=", 1)[1], i + 1
        elif i + 1 < len(rank_args):
            value, i = rank_args[i + 1], i + 2
        else:
            raise ConfigError(f"{flag} needs a value")
        if flag == "--admin-token":
            token = value
        elif flag == "--metrics-token":
            metrics = value
        elif "," in value:
            raise ConfigError("an API key with a comma cannot travel to the ranks: put it in --api-key-file")
        else:
            keys.append(value)
    moved = {}
    if len(rest) != len(rank_args):
        if keys:
            moved["ORCHARD_API_KEYS"] = ",".join(dict.fromkeys(keys))
        if token is not None:
            moved["ORCHARD_ADMIN_TOKEN"] = token
        if metrics is not None:
            moved["ORCHARD_METRICS_TOKEN"] = metrics
    return rest, moved


def mpirun_command(
    np: int | None,
    hostfile: str | None,
    rank_args: list[str],
    extra: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """mpirun's argv; every ORCHARD_* variable set in `env` (default: ours) goes to the ranks by name."""
    env = os.environ if env is None else env
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
        "ORCHARD_METRICS_TOKEN",
        "ORCHARD_BLAS",
        "ORCHARD_STATUS_FILE",
        "ORCHARD_RANKS_FILE",
        "ORCHARD_PULSE_PORT",
        "ORCHARD_HOSTFILE",  # rank 0 reads the hostfile's collectives settings (rank/collectives.py)
        "ORCHARD_COLLECTIVES",
        "ORCHARD_MPI_TUNING",  # off: Open MPI's own settings across hosts (rank/env.py)
    ):
        if name in env:
            cmd += ["-x", name]
    return cmd + list(extra or []) + [sys.executable, "-m", "rank", *rank_args]


def launch(np: int | None, hostfile: str | None, rank_args: list[str], extra: list[str] | None = None) -> int:
    try:
        rank_args, moved = move_secrets(rank_args, os.environ)
    except ConfigError as exc:
        print(f"orchard: {exc}", file=sys.stderr, flush=True)
        return 2
    os.environ.update(moved)
    if hostfile:
        os.environ["ORCHARD_HOSTFILE"] = str(Path(hostfile).resolve())
    # Under ULFM mpirun exits 0 even after MPI_Abort; rank 0 leaves its exit code in this file instead,
    # and which rank runs where in the other (to name the ranks of a host mpirun reports lost).
    files = []
    for name, prefix in (("ORCHARD_STATUS_FILE", "orchard-status-"), ("ORCHARD_RANKS_FILE", "orchard-ranks-")):
        fd, path = tempfile.mkstemp(prefix=prefix)
        os.close(fd)
        os.environ[name] = path
        files.append(path)
    cmd = mpirun_command(np, hostfile, rank_args, extra)
    print("orchard: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        code, lost = _run(cmd, Path(files[0]))
        for line in lost_host_report(lost, Path(files[1])):
            print(f"orchard: {line}", file=sys.stderr, flush=True)
        return code or _failure_code(Path(files[0])) or (1 if lost else 0)
    finally:
        for path in files:
            os.unlink(path)


def tell_launcher(variable: str, text: str) -> None:
    """Rank 0's side: leave `text` in the launcher's file named by `variable`. It exists only when rank 0
    runs on the launcher's host (the usual case: start the job from the first host); elsewhere, say so
    and go on."""
    path = os.environ.get(variable)
    if not path:
        return
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        log.warning("cannot leave the launcher %s (%s): %s", path, variable, exc.strerror)


# PRRTE's two wordings: "Remote daemon: [prterun-x@0,2] on node studio-2" (lost while running) and
# "Remote host:   studio-2" (a daemon that died before it had reported back).
LOST_DAEMON = re.compile(r"Remote (?:daemon:\s*\S+\s+on node|host:)\s+(\S+)")


def _host_key(name: str) -> str:
    """PRRTE may drop the domain: "studio-2" for "Studio-2.local" (an IPv4 address stays as it is)."""
    name = str(name)
    return name if name.replace(".", "").isdigit() else name.split(".")[0].lower()


def lost_host_report(hosts: list[str], ranks_file: Path) -> list[str]:
    """What to say about hosts mpirun lost, naming the ranks that ran there (rank 0 wrote the table)."""
    try:
        table = json.loads(ranks_file.read_text() or "[]")
    except (OSError, ValueError):
        table = []
    out = []
    for host in dict.fromkeys(hosts):
        ranks = [r for r in table if _host_key(r.get("host", "")) == _host_key(host)]
        who = ", ".join(f"rank {r['rank']} (pid {r['pid']})" for r in ranks)
        where = f", where {who} ran" if who else " (which ranks ran there is unknown)"
        out.append(f"lost host {host}{where}: its processes or its link died, so the job ended")
    return out


# How long mpirun gets to end on its own once a rank has left a failure code in the status file (a rank
# that could not start aborts, the watchdog exits rank 0): under ULFM mpirun hangs after two ranks call
# MPI_Abort at once (every time here when both ranks of a job fail to start together, as in
# tests/test_ssd_hardening.py), and then ignores SIGTERM.
FAILED_JOB_GRACE_S = 10.0


def _failure_code(status_file: Path | None) -> int:
    try:
        text = status_file.read_text().strip() if status_file is not None else ""
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _run(cmd: list[str], status_file: Path | None = None) -> tuple[int, list[str]]:
    """Run mpirun, passing its output through and noting every host it reports lost. Once a rank has
    written a failure code to `status_file`, mpirun gets FAILED_JOB_GRACE_S to end, then is ended."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lost: list[str] = []

    def relay(source: Any, sink: Any) -> None:  # PRRTE prints its notices on either stream
        for raw in iter(source.readline, b""):
            try:
                sink.buffer.write(raw)
                sink.flush()
            except Exception:  # our own output closed or gone: keep draining, or mpirun would block
                pass
            match = LOST_DAEMON.search(raw.decode(errors="replace"))
            if match:
                lost.append(match.group(1))

    readers = [
        threading.Thread(target=relay, args=(proc.stdout, sys.stdout), daemon=True),
        threading.Thread(target=relay, args=(proc.stderr, sys.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    signals_seen = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal signals_seen
        if signum == signal.SIGUSR1:  # the ranks' own drain signal: pass it on (its default would kill
            proc.send_signal(signal.SIGUSR1)  # the launcher alone and orphan mpirun and every rank)
            return
        signals_seen += 1
        if signals_seen == 1:
            print(
                f"orchard: {signal.Signals(signum).name}: draining the job (again to stop now)",
                file=sys.stderr,
            )
            proc.send_signal(signal.SIGUSR1)
        else:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)
    failed_at: float | None = None
    while True:
        try:
            code = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if failed_at is None:
            failed_at = time.monotonic() if _failure_code(status_file) else None
        elif time.monotonic() - failed_at > FAILED_JOB_GRACE_S:
            print(
                f"orchard: a rank failed and mpirun has not ended {FAILED_JOB_GRACE_S:g} s later: ending it",
                file=sys.stderr,
                flush=True,
            )
            _end_group(proc)
            proc.wait()
            code = _failure_code(status_file)
            break
    for reader in readers:
        reader.join(timeout=5)
    return code, lost


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """mpirun and whatever it started in its session: SIGTERM, then SIGKILL after 2 s."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def split_launch_args(
    argv: list[str],
) -> tuple[int | None, str | None, list[str], list[str]] | None:
    """(np, hostfile, rank args, extra mpirun args) when argv asks to launch; None when this is a rank."""
    np: int | None = None
    hostfile: str | None = None
    extra: list[str] = []
    rest: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        for flag in ("--np", "--hostfile", "--mpirun-args"):
            if arg == flag and i + 1 < len(argv):
                value, skip = argv[i + 1], True
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            if flag == "--np":
                np = int(value)
            elif flag == "--hostfile":
                hostfile = value
            else:
                extra += shlex.split(value)
            break
        else:
            rest.append(arg)
    if np is None and hostfile is None:
        return None
    return np, hostfile, rest, extra
