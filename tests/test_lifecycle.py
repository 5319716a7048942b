"""Requests that end early and jobs that end gracefully, with real mpirun jobs."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.jobs import Job, stream_in_subprocess, tiny_args

pytestmark = pytest.mark.cluster
NO_EOS = {"2": -100}


def stats(job: Job) -> dict:
    return httpx.get(job.url + "/health", timeout=10).json()["engine_stats"]


def greedy_text(job: Job, prompt: str = "in step?") -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "logit_bias": NO_EOS}
    r = httpx.post(job.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def wait_idle(job: Job, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(job)
        if s["running"] == 0 and s["waiting"] == 0 and s["sequences_on_ranks"] == 0:
            return s
        assert time.monotonic() < deadline, f"engine did not return to idle: {s}"
        time.sleep(0.1)


async def stream_and_leave(url: str, i: int) -> int:
    """Open a stream and drop the connection: odd clients while queued, even ones after 3 tokens."""
    body = {"model": "tiny", "prompt": f"client {i} " * (1 + i % 7), "max_tokens": 300, "stream": True}
    body["logit_bias"] = NO_EOS
    seen = 0
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    seen += bool(json.loads(line[6:])["choices"][0]["text"])
                if i % 2 or seen >= 3:
                    break
    return seen


def test_fifty_disconnecting_streams_free_everything(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    job = job_factory.start(2, tiny_args(tiny_model), "disconnect")
    before = greedy_text(job)
    start = wait_idle(job)

    async def all_clients() -> list[int]:
        return await asyncio.gather(*(stream_and_leave(job.url, i) for i in range(50)))

    asyncio.run(all_clients())
    after = wait_idle(job)
    assert after["free_slots"] == start["free_slots"] == after["max_batch"]
    assert greedy_text(job) == before  # both ranks still in step: same tokens as before the storm
    assert after["generated_tokens"] < 50 * 300  # cancelled, not run to completion


def drain_scenario(job: Job, stop: Callable[[], None], plain: bool = False) -> None:
    """One event loop for the stream and the probes: a second client thread blocked on a long response
    can stall this machine's other client requests for seconds (seen with CPython threads here), which
    would test the client, not the server. `plain`: a plain greedy stream (ignore_eos, no logit bias),
    whose steps a TP=2 job chains (rank/engine.py)."""
    body: dict = {"model": "tiny", "prompt": "drain", "max_tokens": 1900, "stream": True, "logit_bias": NO_EOS}
    if plain:  # (its first chunks may carry no text: a byte-level token the detokenizer holds back)
        del body["logit_bias"]
        body["ignore_eos"], body["temperature"], body["prompt"] = True, 0, "hello there"

    async def scenario() -> list[str]:
        client = await stream_in_subprocess(job.url, body)
        assert client.stdout is not None
        try:
            lines: list[str] = []
            while True:  # until the first token
                line = (await asyncio.wait_for(client.stdout.readline(), 60)).decode().strip()
                lines.append(line)
                if line.startswith("data: {") and (plain or json.loads(line[6:])["choices"][0]["text"]):
                    break
            stop()
            deadline = time.monotonic() + 10
            async with httpx.AsyncClient(base_url=job.url, timeout=10) as probe:
                while True:  # new work is refused while the in-flight stream finishes
                    r = await probe.post(
                        "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}
                    )
                    if r.status_code == 503:
                        assert r.json()["error"]["code"] == "draining"
                        break
                    assert time.monotonic() < deadline, "no 503 while draining"
                    await asyncio.sleep(0.05)
            rest, _ = await asyncio.wait_for(client.communicate(), 60)
            return lines + [ln for ln in rest.decode().splitlines() if ln]
        finally:  # a failed check must not leave the client to be collected after this loop is closed
            if client.returncode is None:
                client.kill()
                await client.wait()

    lines = asyncio.run(scenario())
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 1 or (plain and len(chunks) > 100)
    assert job.wait(60) == 0, job.log()
    assert "draining" in job.log()


def test_sigterm_to_the_launcher_drains_then_every_rank_exits_zero(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    job = job_factory.start(2, tiny_args(tiny_model), "drain-launcher", launcher=True)
    drain_scenario(job, lambda: job.signal(signal.SIGTERM))


def test_sigusr1_to_the_launcher_drains_too(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGUSR1 is the ranks' drain signal (mpirun forwards it): sent to the launcher it must drain the job,
    not kill the launcher alone and leave mpirun and the ranks running without it."""
    job = job_factory.start(2, tiny_args(tiny_model), "drain-launcher-usr1", launcher=True)
    drain_scenario(job, lambda: job.signal(signal.SIGUSR1))


def test_sigterm_drains_a_job_whose_steps_are_chained(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """A plain greedy stream at TP=2 without speculation: its steps are chained (a plan is out before
    the step before runs); a drain stops chaining, finishes the stream and exits cleanly."""
    job = job_factory.start(2, tiny_args(tiny_model, "--spec", "off", "--log-level", "debug"), "drain-chained")
    rank0 = job.rank_pid(0)

    def stop() -> None:
        time.sleep(0.3)  # the stream decodes, chained, meanwhile
        __import__("os").kill(rank0, signal.SIGTERM)

    # Chained steps are counted from the step log, not a /health read during the drain: such a read took
    # seconds in CI while the stream ran, long enough for the stream to end before the drain was probed.
    drain_scenario(job, stop, plain=True)
    assert job.log().count(" (chained): ") > 10


def test_sigterm_to_rank0_drains_then_every_rank_exits_zero(job_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    job = job_factory.start(2, tiny_args(tiny_model), "drain-rank0")
    rank0 = job.rank_pid(0)
    drain_scenario(job, lambda: __import__("os").kill(rank0, signal.SIGTERM))
