"""Starting and stopping the servers the benchmarks measure, with the environment `python -m rank` gives
its ranks, and never leaving a process behind.

A job of N > 1 ranks runs under the venv's mpirun with the launcher's flags (`rank.launch.mpirun_command`);
one rank runs alone. Each job gets a session of its own: Open MPI puts every rank in its own process group
but keeps it in mpirun's session, so stopping a job ends with a sweep of that session, and nothing it
started survives, even when mpirun died first. Not a script: imported by the benchmark scripts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rank.env import _REEXEC_MARK, find_libmpi, find_openblas, local_ranks, under_mpi, with_openblas
from rank.launch import mpirun_command

Progress = Callable[[str], None]


# ENVIRONMENT.md: unset for benchmarks only (rank.env.with_openblas then picks the kernels the CPU
# deserves, for every system measured alike).
BENCH_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def rank_environment(
    ranks_on_host: int, blas: str = "auto", base: dict[str, str] | None = None
) -> dict[str, str]:
    """The variables rank.env.prepare_process sets for a rank sharing its host with `ranks_on_host - 1`
    others, for processes that are not `python -m rank` (mlx_lm.server, raw_engine.py)."""
    env = dict(os.environ if base is None else base)
    lib = find_libmpi()
    if lib:
        env.setdefault("MLX_MPI_LIBNAME", lib)
    if ranks_on_host > 1:
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    for name in BENCH_UNSET:
        env.pop(name, None)
    if sys.platform != "linux" or blas == "none" or env.get(_REEXEC_MARK):
        return env
    openblas = find_openblas()
    if openblas is None:
        if blas == "openblas":
            raise SystemExit(
                "--blas openblas: no loadable OpenBLAS found (apt-get install libopenblas0-pthread)"
            )
        return env
    return with_openblas(env, openblas, ranks_on_host)


def reexec_with_rank_environment(script: str, argv: list[str], blas: str) -> None:
    """Run first in a benchmark script (also under mpirun): restart this process once with the rank
    environment, since LD_PRELOAD only acts at exec. Same pid, so mpirun does not notice."""
    if os.environ.get(_REEXEC_MARK) or "-h" in argv or "--help" in argv:
        return
    env = rank_environment(local_ranks() if under_mpi() else 1, blas)
    if env.get(_REEXEC_MARK):
        os.execve(sys.executable, [sys.executable, script, *argv], env)
    os.environ.update(env)  # no OpenBLAS: the MPI variables still matter


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mpirun_prefix(np: int) -> list[str]:
    """`mpirun ... -np N` exactly as the launcher builds it, without the `python -m rank` tail."""
    cmd = mpirun_command(np, None, [])
    tail = [sys.executable, "-m", "rank"]
    assert cmd[-3:] == tail, cmd
    return cmd[:-3]


def session_pids(sid: int) -> list[int]:
    """Processes whose session is `sid` (field 6 of /proc/PID/stat)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z" and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


@dataclass(slots=True)
class Job:
    """One server job: mpirun (a session leader) and its ranks. Output goes to a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    ready_path: str
    drain_signal: signal.Signals = signal.SIGTERM
    stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float, progress: Progress, every: float = 10.0) -> float:
        """Seconds until `ready_path` answered 200; SystemExit with the log's tail when not in time."""
        start = time.monotonic()
        next_note = start + every
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - start > timeout:
                raise SystemExit(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")
            if now >= next_note:
                last = self.log_tail(1).strip()[:120]
                progress(
                    f"  {self.name}: waiting for {self.ready_path} ({now - start:.0f} s){' | ' + last if last else ''}"
                )
                next_note = now + every
            time.sleep(0.5)

    def stop(self, grace: float = 30.0) -> None:
        """Drain signal, then SIGTERM to mpirun, then SIGKILL to whatever is left in the session."""
        if self.stopped:
            return
        self.stopped = True
        for sig, wait in ((self.drain_signal, grace), (signal.SIGTERM, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                self.proc.send_signal(sig)
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 10.0
        while (left := session_pids(self.proc.pid)) and time.monotonic() < deadline:
            for pid in left:  # ranks mpirun left behind (it does not wait for them after SIGTERM)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.wait(10)


def start_job(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    port: int,
    ready_path: str,
    logs: Path,
    drain_signal: signal.Signals = signal.SIGTERM,
) -> Job:
    log_path = logs / (f"{name}-{port}.log" if port else f"{name}.log")
    with open(log_path, "wb") as log:
        log.write((" ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Job(name, proc, log_path, port, ready_path, drain_signal)


def job_command(np: int, cmd: list[str], env: dict[str, str]) -> list[str]:
    """`cmd` under the launcher's mpirun for np > 1, with LD_PRELOAD moved from `env` to the ranks only
    (-x), not mpirun. One rank runs alone: `python -m rank` under a one-process mpirun fails (MLX's strict
    MPI init refuses a world of one)."""
    if np == 1:
        return cmd
    preload = env.pop("LD_PRELOAD", None)
    return [*mpirun_prefix(np), *(["-x", f"LD_PRELOAD={preload}"] if preload else []), *cmd]


def start_orchard(
    np: int, model: str | None, port: int, logs: Path, kv_ssd_dir: str, extra: list[str]
) -> Job:
    """`python -m rank`; the ranks set their own environment (that is part of what is measured). An
    explicit admin token keeps the job from overwriting ~/.cache/orchard/admin-token."""
    args = ["--port", str(port), "--kv-ssd-dir", kv_ssd_dir, "--admin-token", os.urandom(12).hex()]
    if model:
        args += ["--model", model]
    env = {k: v for k, v in os.environ.items() if k not in BENCH_UNSET}
    cmd = job_command(np, [sys.executable, "-m", "rank", *args, *extra], env)
    # mpirun forwards SIGUSR1 and rank 0 drains on it; SIGTERM to mpirun would kill the ranks at once.
    return start_job(f"orchard-np{np}", cmd, env, port, "/health/ready", logs, signal.SIGUSR1)


def start_mlx_lm(np: int, model_dir: Path, port: int, logs: Path, extra: list[str]) -> Job:
    """mlx_lm.server with the variables our ranks give themselves."""
    env = rank_environment(np)
    server = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--host", "127.0.0.1"]
    cmd = job_command(np, [*server, "--port", str(port), *extra], env)
    return start_job(f"mlx_lm.server-np{np}", cmd, env, port, "/health", logs)


def log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="orchard-bench-logs-"))


class StopOnSignal:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `finally` blocks stop every job (Ctrl-C already is)."""

    def __enter__(self) -> StopOnSignal:
        self.previous = {s: signal.signal(s, self._raise) for s in (signal.SIGTERM, signal.SIGHUP)}
        return self

    @staticmethod
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def run_to_end(
    name: str, cmd: list[str], timeout: float, logs: Path, env: dict[str, str] | None = None
) -> Job:
    """A batch job (no server): wait for it within `timeout`, then sweep its session whatever happened."""
    job = start_job(name, cmd, dict(os.environ) if env is None else env, 0, "", logs)
    try:
        job.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: still running after {timeout:.0f} s, stopping it", file=sys.stderr)
    finally:
        job.stop(grace=5.0)
    return job


def stop_all(jobs: list[Job], grace: float = 10.0) -> None:
    """Stop every job, deaf to Ctrl-C and SIGTERM meanwhile so a second one cannot cut the cleanup short."""
    deaf = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in deaf}
    try:
        for job in jobs:
            job.stop(grace)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
