"""The job across several hosts for real: each rank in its own network namespace with its own address
and hostname, the control bus and MLX's collectives crossing veth links and a bridge. Skipped with the
reason where namespaces cannot be made (not root, no iproute2)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.jobs import Job, tiny_args
from tests.netns import NamespaceHosts, available

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(available() is not None, reason=str(available()))]
PROMPTS = ["Once upon a time", "def fibonacci(n):", "The capital of France is"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NamespaceHosts]:
    with NamespaceHosts(3, tmp_path_factory.mktemp("netns")) as h:
        yield h


def greedy_ids(job: Job, prompt: str) -> list[int]:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "logit_bias": {"2": -100},
    }
    r = httpx.post(job.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def start_across(  # type: ignore[no-untyped-def]
    job_factory,
    tiny_model: Path,
    hosts: NamespaceHosts,
    np: int,
    name: str,
    *extra: str,
    env: dict | None = None,
) -> Job:
    args = tiny_args(tiny_model, "--admin-token", "t", "--step-timeout", "5")
    mpirun = [*extra, *hosts.mpirun_args(np)]
    return job_factory.start(np, args, name, env=env, mpirun_extra=mpirun, host=hosts.address(0))


@pytest.mark.parametrize("np", [2], ids=["2-hosts"])
def test_greedy_across_hosts_equals_one_rank(
    job_factory, tiny_model: Path, hosts: NamespaceHosts, np: int
) -> None:  # type: ignore[no-untyped-def]
    single = job_factory.start(1, tiny_args(tiny_model), "single-host")
    expected = [greedy_ids(single, p) for p in PROMPTS]
    single.stop()
    before = [hosts.rx_bytes(i) for i in range(np)]
    job = start_across(job_factory, tiny_model, hosts, np, f"netns-{np}")
    assert [greedy_ids(job, p) for p in PROMPTS] == expected
    state = httpx.get(job.url + "/admin/state", headers={"Authorization": "Bearer t"}, timeout=10).json()
    assert sorted(r["host"] for r in state["ranks"]) == [f"orhost{i + 1}" for i in range(np)]
    grown = [hosts.rx_bytes(i) - b for i, b in enumerate(before)]
    assert all(g > 100_000 for g in grown), grown  # the collectives really crossed every link
    kv_dirs = sorted(p.name for p in Path(job.log_path.parent).glob(f"kv-{job.log_path.stem}/*/rank*"))
    assert kv_dirs == [f"rank{i}" for i in range(np)]  # every host its own SSD-tier folder
    job.stop()


def test_host_killed_mid_request(job_factory, tiny_model: Path, hosts: NamespaceHosts) -> None:  # type: ignore[no-untyped-def]
    """Every process of one "Mac" dies, Open MPI's daemon included: mpirun tears the job down (with
    ULFM too: losing a daemon is losing a node). Clients see an error, nobody hangs, the job ends within
    seconds and the log names the lost host."""
    job = start_across(job_factory, tiny_model, hosts, 2, "netns-kill", "--with-ft", "ulfm")
    body = {
        "model": "tiny",
        "prompt": "far away",
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": {"2": -100},
    }
    lines: list[str] = []
    t0 = None
    with httpx.stream("POST", job.url + "/v1/completions", json=body, timeout=httpx.Timeout(30)) as r:
        try:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if t0 is None and len(lines) > 3:
                    t0 = time.monotonic()
                    hosts.kill_host(1)  # every process of the second "Mac"
        except httpx.HTTPError:
            lines.append("transport error")
    assert t0 is not None
    assert lines[-1] == "transport error" or "error" in lines[-1] or "error" in lines[-2]
    job.wait(15)
    assert time.monotonic() - t0 < 15
    log = job.log()
    assert "orhost2" in log, log[-3000:]  # mpirun names the host it lost
    # and a restart on the same hosts recovers
    again = start_across(job_factory, tiny_model, hosts, 2, "netns-kill-restart", "--with-ft", "ulfm")
    r = httpx.post(again.url + "/v1/completions", json={"model": "tiny", "prompt": "back", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    again.stop()


def test_embedded_model_across_three_hosts_equals_one_rank(job_factory, hosts: NamespaceHosts) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2's 9 heads and 3 KV heads split over three "Macs"; the first host is rank 0."""
    name = "SmolLM2-135M-Instruct"
    question = {
        "model": name,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    single = job_factory.start(1, [], "smollm-one-host")
    expected = httpx.post(single.url + "/v1/chat/completions", json=question, timeout=120).json()
    single.stop()
    before = [hosts.rx_bytes(i) for i in range(3)]
    args = ["--admin-token", "t", "--step-timeout", "30"]
    job = job_factory.start(3, args, "netns-3", mpirun_extra=hosts.mpirun_args(3), host=hosts.address(0))
    got = httpx.post(job.url + "/v1/chat/completions", json=question, timeout=120).json()
    assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert "Paris" in got["choices"][0]["message"]["content"]
    assert all(hosts.rx_bytes(i) - b > 100_000 for i, b in enumerate(before))
    job.stop()


def test_launcher_names_the_ranks_of_a_lost_host(job_factory, tiny_model: Path, hosts: NamespaceHosts) -> None:  # type: ignore[no-untyped-def]
    """Through `python -m rank --np 2 --mpirun-args ...`: mpirun kills rank 0 at once when it loses a
    daemon, so rank 0 cannot say which ranks ran there; the launcher, which outlives mpirun, can (rank 0
    left it a table of ranks, hosts and pids at start-up)."""
    extra = hosts.mpirun_args(2)
    i = extra.index("-np")
    extra = extra[:i] + extra[i + 2 :]
    args = tiny_args(tiny_model, "--admin-token", "t", "--step-timeout", "5")
    job = job_factory.start(2, args, "netns-kill-launcher", launcher=True, mpirun_extra=extra, host=hosts.address(0))
    victim = job.rank_pid(1)
    t0 = time.monotonic()
    hosts.kill_host(1)
    assert job.wait(15) != 0
    assert time.monotonic() - t0 < 15
    log = job.log()
    assert f"orchard: lost host orhost2, where rank 1 (pid {victim}) ran" in log, log[-3000:]
