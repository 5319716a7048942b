"""Start real Orchard jobs for tests: `python -m rank` alone or under the venv's real `mpirun`."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_args(model: Path, *extra: str) -> list[str]:
    """`python -m rank` flags for the tiny test model, served as "tiny"."""
    return ["--model", str(model), "--served-model-name", "tiny", *extra]


def mpirun_prefix(np: int) -> list[str]:
    cmd = [str(BIN / "mpirun"), "--bind-to", "none", "--oversubscribe", "-np", str(np)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


class Job:
    """A running job; `stop()` sends SIGTERM (drain) and waits, then kills what is left."""

    def __init__(
        self,
        np: int,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        launcher: bool = False,
        mpirun_extra: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """`launcher`: start through `python -m rank --np N` instead of calling mpirun here.
        `mpirun_extra`: mpirun flags (hostfile, ssh stand-in) for jobs across test hosts; `host`: where
        rank 0 serves HTTP."""
        self.np = np
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        if host != "127.0.0.1":
            args = [*args, "--host", host]
        if "--kv-ssd-dir" not in args:  # each job its own SSD tier, so jobs running side by side stay apart
            args = [*args, "--kv-ssd-dir", str(log_path.parent / f"kv-{log_path.stem}")]
        rank_cmd = [sys.executable, "-m", "rank", "--port", str(self.port), *args]
        if launcher:
            cmd = rank_cmd + ["--np", str(np)]
            if mpirun_extra:
                cmd += ["--mpirun-args=" + shlex.join(mpirun_extra)]  # "=": the value may be one "--flag"
        elif mpirun_extra is not None:
            root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
            cmd = [str(BIN / "mpirun"), *root, "--bind-to", "none", *mpirun_extra, *rank_cmd]
        else:
            cmd = mpirun_prefix(np) + rank_cmd if np > 1 else rank_cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 120.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"job exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"job not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def pids(self) -> list[int]:
        """Pids of the rank processes (children of mpirun, or the process itself)."""
        if self.np == 1:
            return [self.proc.pid]
        want = ["-m", "rank", "--port", str(self.port)]
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "python" in argv[0] and argv[1:5] == want and int(entry.name) != self.proc.pid:
                pids.append(int(entry.name))
        return sorted(pids)

    def rank_pid(self, rank: int) -> int:
        for pid in self.pids():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
                return pid
        raise LookupError(f"no rank {rank} in {self.pids()}")


STREAM_SCRIPT = """
import json, sys, httpx
url, body = sys.argv[1], json.loads(sys.argv[2])
headers = {"Authorization": "Bearer " + sys.argv[3]} if len(sys.argv) > 3 else {}
try:
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                print(line, flush=True)
except httpx.HTTPError as exc:
    print("transport error: " + type(exc).__name__, flush=True)
"""


async def stream_in_subprocess(url: str, body: dict, key: str | None = None):  # type: ignore[no-untyped-def]
    """A streaming client in its own process, printing each SSE line. Tests that probe the server while a
    stream runs keep the stream out of their own process: a stream read in the test's process can hold
    off the test's other requests for seconds (seen here with threads and with one event loop alike)."""
    import asyncio
    import json

    args = [sys.executable, "-c", STREAM_SCRIPT, url, json.dumps(body)] + ([key] if key else [])
    return await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
