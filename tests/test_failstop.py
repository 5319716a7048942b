"""Fail-stop with real processes: a rank that hangs or dies must never leave clients hanging or the job
half alive. Uses real mpirun jobs of the tiny model and real signals."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.jobs import Job, tiny_args

pytestmark = pytest.mark.cluster
BODY = {"model": "tiny", "prompt": "fault", "max_tokens": 1500, "stream": True, "logit_bias": {"2": -100}}


def start(job_factory, tiny_model: Path, name: str, *extra: str, launcher: bool = False) -> Job:  # type: ignore[no-untyped-def]
    args = tiny_args(tiny_model, "--step-timeout", "3", *extra)
    return job_factory.start(2, args, name, launcher=launcher)


class Stream:
    """A streaming request in a thread that records how it ended."""

    def __init__(self, job: Job) -> None:
        self.lines: list[str] = []
        self.status: int | None = None
        self.error: Exception | None = None
        self.started = threading.Event()
        self.ended = threading.Event()
        self.got_text = False
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        assert self.started.wait(60) and self.got_text, f"the stream never produced a token: {self.describe()}"

    def _run(self, job: Job) -> None:
        try:
            with httpx.stream(
                "POST", job.url + "/v1/completions", json=BODY, timeout=httpx.Timeout(60, read=30)
            ) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        if '"text":"' in line and '"text":""' not in line:
                            self.got_text = True
                            self.started.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.started.set()
            self.ended.set()

    def describe(self) -> str:
        """For assertion messages: how the stream went (its status, error and last lines)."""
        return f"status {self.status}, error {self.error!r}, {len(self.lines)} lines, last: {self.lines[-3:]}"

    def failed(self) -> bool:
        got_error_event = any(ln.startswith("data: {") and "error" in json.loads(ln[6:]) for ln in self.lines)
        return got_error_event or self.error is not None


@pytest.mark.parametrize("launcher", [False, True], ids=["mpirun", "launcher"])
def test_hung_follower_mid_request(job_factory, tiny_model: Path, launcher: bool) -> None:  # type: ignore[no-untyped-def]
    job = start(job_factory, tiny_model, "sigstop-busy", launcher=launcher)
    stream = Stream(job)
    follower = job.rank_pid(1)
    os.kill(follower, signal.SIGSTOP)
    try:
        assert stream.ended.wait(15), "client left hanging"
        assert stream.failed(), f"{stream.describe()}\n{job.log()[-3000:]}"
        try:
            ready = httpx.get(job.url + "/health/ready", timeout=2)
            assert ready.status_code == 503
            r = httpx.post(
                job.url + "/v1/completions", json={**BODY, "stream": False, "max_tokens": 1}, timeout=5
            )
            assert r.status_code == 503
        except httpx.TransportError:
            pass  # already gone: the job may stop before we ask
        assert job.wait(15) != 0
        # Named either way: it missed a bus message (stopped between steps), or the liveness side channel
        # (outside MPI) saw it silent while every rank waited inside the same collective.
        name = f"rank 1 (host {os.uname().nodename}, pid {follower})"
        assert f"{name} did not receive" in job.log() or f"{name} is not responding" in job.log()
    finally:
        os.kill(follower, signal.SIGCONT) if Path(f"/proc/{follower}").exists() else None


def test_hung_rank_among_three_is_named_before_the_step_timeout(job_factory, tiny3_model: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP of rank 2 of 3 mid-stream. Ranks 0 and 1 wait inside the same collective, so MPI cannot
    tell who hangs; the liveness pings can. With a long step timeout, the pulse timeout (2 s) decides:
    the job stops long before 60 s, and the log names rank 2, not rank 1, as the hung one."""
    args = tiny_args(tiny3_model, "--step-timeout", "60", "--pulse-timeout", "2")
    job = job_factory.start(3, args, "sigstop-three")
    stream = Stream(job)
    victim, bystander = job.rank_pid(2), job.rank_pid(1)
    t0 = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    try:
        assert stream.ended.wait(20), "client left hanging"
        assert stream.failed()
        assert job.wait(20) != 0
        assert time.monotonic() - t0 < 20
        log = job.log()
        node = os.uname().nodename
        assert f"step watchdog: rank 2 (host {node}, pid {victim}) hung" in log, log[-3000:]
        assert f"rank 1 (host {node}, pid {bystander}) is alive" in log
    finally:
        os.kill(victim, signal.SIGCONT) if Path(f"/proc/{victim}").exists() else None


def test_long_steps_are_not_hangs(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """A step may take longer than the pulse timeout as long as every rank answers its pings."""
    # MLX's own CPU kernels (--cpu-kernels off) keep the step long: with ours it can end under 0.5 s.
    args = tiny_args(tiny_model, "--pulse-timeout", "0.5", "--prefill-chunk", "4096", "--cpu-kernels", "off")
    job = job_factory.start(2, args, "long-steps")
    prompt = "orchard " * 240  # one prefill chunk of ~1,900 tokens: seconds on this CPU, over 0.5 s anywhere
    r = httpx.post(
        job.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4}, timeout=120
    )
    assert r.status_code == 200, r.text
    # the test means something only if the prefill step really outlasted the pulse timeout
    deadline, lines = time.monotonic() + 10, []
    while not lines and time.monotonic() < deadline:  # the request's log line follows its response
        lines = [ln for ln in job.log().splitlines() if r.json()["id"] in ln and "ttft=" in ln]
        time.sleep(0.2)
    assert lines, job.log()[-2000:]
    line = lines[0]
    ttft_ms = int(line.split("ttft=")[1].split("ms")[0])
    assert ttft_ms > 500, line
    assert httpx.get(job.url + "/health/ready", timeout=5).status_code == 200
    job.stop()


@pytest.mark.parametrize("launcher", [False, True], ids=["mpirun", "launcher"])
def test_hung_follower_while_idle_is_named(job_factory, tiny_model: Path, launcher: bool) -> None:  # type: ignore[no-untyped-def]
    job = start(job_factory, tiny_model, "sigstop-idle", "--heartbeat-interval", "0.5", launcher=launcher)
    follower = job.rank_pid(1)
    os.kill(follower, signal.SIGSTOP)
    try:
        assert job.wait(20) != 0
        assert f"rank 1 (host {os.uname().nodename}, pid {follower}) did not receive" in job.log()
    finally:
        os.kill(follower, signal.SIGCONT) if Path(f"/proc/{follower}").exists() else None


def test_killed_follower_mid_request(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Raw mpirun (no ULFM): Open MPI ends every rank at once; clients see an error, nobody hangs."""
    job = start(job_factory, tiny_model, "kill-follower")
    stream = Stream(job)
    t0 = time.monotonic()
    os.kill(job.rank_pid(1), signal.SIGKILL)
    assert stream.ended.wait(10), "client left hanging"
    assert stream.failed()
    assert job.wait(10) != 0
    assert time.monotonic() - t0 < 10


def test_killed_follower_is_named_with_the_launcher(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Through `python -m rank --np 2` (ULFM on): rank 0 survives the death long enough to answer the
    client with an error event and to name the dead rank and its host in the log and in /health."""
    job = start(job_factory, tiny_model, "kill-follower-ulfm", launcher=True)
    stream = Stream(job)
    t0 = time.monotonic()
    victim = job.rank_pid(1)
    os.kill(victim, signal.SIGKILL)
    assert stream.ended.wait(10), "client left hanging"
    assert stream.failed()
    health = None
    try:
        health = httpx.get(job.url + "/health", timeout=2)
    except httpx.TransportError:
        pass
    if health is not None:
        assert health.status_code == 503 and f"pid {victim}" in health.json()["error"]
    assert job.wait(10) != 0
    assert time.monotonic() - t0 < 10
    assert f"rank 1 (host {os.uname().nodename}, pid {victim}) died" in job.log()


def test_killed_rank0_takes_followers_down(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    job = start(job_factory, tiny_model, "kill-rank0")
    follower = job.rank_pid(1)
    os.kill(job.rank_pid(0), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{follower}").exists() and time.monotonic() < deadline:
        status = Path(f"/proc/{follower}/status").read_text() if Path(f"/proc/{follower}").exists() else ""
        if "State:\tZ" in status:
            break
        time.sleep(0.1)
    assert time.monotonic() < deadline, "follower still running 10 s after rank 0 died"
    assert job.wait(10) != 0
