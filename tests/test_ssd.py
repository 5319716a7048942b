"""The SSD tier with real files: damaged files are refused, the manifest counts only what every rank
wrote, and a restarted job finds its blocks again with answers identical to uncached ones."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from cluster.manifest import Manifest
from rank.ssd import LOCK_NAME, SsdBlockStore
from tests.jobs import Job, tiny_args

H1, H2, H3 = (bytes([i]) * 16 for i in (1, 2, 3))


def test_damaged_files_are_refused_and_deleted(tmp_path: Path) -> None:
    store = SsdBlockStore(tmp_path)
    k, v = mx.random.normal((2, 2, 4, 8)), mx.random.normal((2, 2, 4, 8))
    for h in (H1, H2, H3):
        store.save(h, k, v)
    store.close()
    assert sorted(ok for _, ok in store.take_results()) == [True, True, True]
    f1, f2 = store.path(H1.hex()), store.path(H2.hex())
    data = bytearray(f1.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the payload
    f1.write_bytes(bytes(data))
    f2.write_bytes(f2.read_bytes()[:-100])  # truncated
    store = SsdBlockStore(tmp_path)
    assert store.load(H1) is None and store.load(H2) is None
    assert store.counters.corrupt == 2 and not f1.exists() and not f2.exists()
    k3, v3 = store.load(H3)  # type: ignore[misc]
    assert mx.array_equal(k3, k).item() and mx.array_equal(v3, v).item()
    (tmp_path / "stranger.tmp123").write_bytes(b"x")  # not the tier's: left alone, with a warning
    (tmp_path / f"{H2.hex()}.tmp123").write_bytes(b"x")  # an interrupted write's (older writers' name)
    (tmp_path / f".{H2.hex()}.{'ab' * 8}.tmp").write_bytes(b"x")  # an interrupted write's
    assert store.keep_only({H3, H1}) == [H1]  # H1's file is gone: reported missing
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{H3.hex()}.kv", LOCK_NAME, "stranger.tmp123"]
    store.close()


def test_manifest_persists_only_on_every_ack(tmp_path: Path) -> None:
    now = [1000.0]
    m = Manifest(tmp_path / "m.sqlite", world_size=2, clock=lambda: now[0])
    for h in (H1, H2, H3):
        m.add_pending(h, (1, 2, 3), 100)
    assert not m.ack(H1, 0) and m.tokens(H1) is None  # one rank is not enough
    assert m.ack(H1, 1) and m.tokens(H1) == (1, 2, 3)
    m.ack(H2, 0)
    m.ack(H2, 1)
    m.close()
    m = Manifest(tmp_path / "m.sqlite", world_size=2, clock=lambda: now[0])  # a restart
    assert m.drop_unpersisted() == 1 and sorted(m.persisted_hashes()) == [H1, H2]
    now[0] += 10
    m.touch([H2])
    assert m.victims(max_bytes=150, ttl=None) == [H1]  # least recently used first
    assert m.victims(max_bytes=10_000, ttl=5.0) == [H1]  # unused for longer than the TTL


def test_a_failing_manifest_disables_the_tier(tmp_path: Path) -> None:
    """The manifest shares the tier's disk: when it cannot be written the tier turns off (as on a failed
    block write) instead of raising into the step loop."""
    from cluster.kvindex import BlockIndex
    from cluster.ssdtier import SsdTier

    index = BlockIndex(block_tokens=4, capacity_blocks=8, block_bytes=100)
    m = Manifest(tmp_path / "m.sqlite", world_size=1)
    tier = SsdTier(m, index, max_bytes=10_000)
    block = index.insert(H1, (1, 2, 3, 4), [])
    assert block is not None
    m.db.close()  # every later statement fails, as on a full disk
    evicted: list[int] = []
    assert tier.fetch((1, 2, 3, 4, 5, 6, 7, 8, 9), [H2, H3], 0, evicted) is False  # a read that fails
    assert index.lookup(H2, (1, 2, 3, 4)) is None and not tier.loading(H2)  # ... leaves RAM untouched
    tier.enabled = True
    tier.saved_in_ram(block)
    assert not tier.enabled and "disk full or I/O error" in tier.disabled_reason
    assert tier.fetch((1, 2, 3, 4, 5), [H1], 0, []) is False
    tier.load_results(set(), [])
    assert tier.clear() == 0


class _FakeStore:
    """What the SSD start-up sync needs of a rank's block store: the hashes it lacks."""

    def __init__(self, lacks: set[bytes]) -> None:
        self.lacks = lacks

    def keep_only(self, wanted: set[bytes]) -> list[bytes]:
        return sorted(wanted & self.lacks)


def test_ssd_sync_goes_in_chunks_however_many_blocks_are_missing(tmp_path: Path) -> None:
    """The manifest's list and every follower's answer go in chunks under the bus limit, so a follower
    lacking hundreds of listed blocks (a wiped disk) does not keep the job from starting; the job starts
    with the blocks every rank has."""
    import threading

    from cluster.kvindex import BlockIndex
    from cluster.ssdtier import SsdTier
    from rank.ssdsync import sync_followers, sync_leader
    from tests.test_bus import Net

    listed = [i.to_bytes(16, "big") for i in range(600)]
    m = Manifest(tmp_path / "m.sqlite", world_size=3)
    for h in listed:
        m.add_pending(h, (1, 2, 3, 4), 100)
        for r in range(3):
            m.ack(h, r)
    tier = SsdTier(m, BlockIndex(block_tokens=4, capacity_blocks=8, block_bytes=100), max_bytes=10**6)
    net, limit = Net(3), 1024  # about 50 hashes per message
    lacks = {0: {listed[599]}, 1: set(listed[:450]), 2: set(listed[500:550])}
    followers = [
        threading.Thread(target=sync_followers, args=(net.bus(r, limit), _FakeStore(lacks[r])), daemon=True)
        for r in (1, 2)
    ]
    for t in followers:
        t.start()
    leader = net.bus(0, limit)
    sync_leader(leader, _FakeStore(lacks[0]), m, tier)  # type: ignore[arg-type]
    for t in followers:
        t.join(timeout=10)
        assert not t.is_alive()
    assert leader.bytes_sent > 600 * 16 > limit  # the list went out in several messages
    gone = set().union(*lacks.values())
    assert sorted(m.persisted_hashes()) == [h for h in listed if h not in gone]
    assert tier.stats.blocks == 99 and set(tier.take()[2]) == gone  # every rank deletes its copy too


pytestmark_cluster = pytest.mark.cluster
NO_EOS = {"2": -100}
PROMPT = "The orchard keeps its memories on disk so a restart does not forget them. " * 5


def start(job_factory, tiny_model: Path, kv: Path, name: str, *extra: str) -> Job:  # type: ignore[no-untyped-def]
    args = tiny_args(tiny_model, "--admin-token", "t", "--kv-ssd-dir", str(kv))
    return job_factory.start(2, [*args, *extra], name, launcher=True)


def ask(job: Job, prompt: str = PROMPT) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "logit_bias": NO_EOS}
    r = httpx.post(job.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def ssd(job: Job) -> dict:
    tiers = httpx.get(job.url + "/admin/cache", headers={"Authorization": "Bearer t"}, timeout=10).json()[
        "tiers"
    ]
    return next(t for t in tiers if t["tier"] == "ssd")


def wait_persisted(job: Job, n: int) -> dict:
    deadline = time.monotonic() + 20
    while (tier := ssd(job))["blocks"] < n:
        assert time.monotonic() < deadline, tier
        time.sleep(0.2)
    return tier


def rank_files(kv: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.glob("*.kv")) for d in kv.glob("*/rank*")}


@pytest.mark.cluster
def test_restart_finds_blocks_and_refuses_damaged_ones(job_factory, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kv = tmp_path / "kv"
    blocks = (len(PROMPT) - 1) // 32  # byte-level tokenizer: one token per character
    job = start(job_factory, tiny_model, kv, "ssd-a")
    cold = ask(job)
    wait_persisted(job, blocks)
    assert job.stop() == 0
    files = rank_files(kv)
    assert sorted(files) == ["rank0", "rank1"] and all(len(f) == blocks for f in files.values())

    job = start(job_factory, tiny_model, kv, "ssd-b")
    assert ssd(job)["blocks"] == blocks  # found again after the restart
    assert ask(job) == cold
    assert ssd(job)["hit_tokens"] >= blocks * 32
    assert job.stop() == 0

    damaged = rank_files(kv)["rank1"][2]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x55
    damaged.write_bytes(bytes(data))
    truncated = rank_files(kv)["rank0"][5]
    truncated.write_bytes(truncated.read_bytes()[:200])
    job = start(job_factory, tiny_model, kv, "ssd-c")
    assert ask(job) == cold  # damaged blocks are dropped and recomputed, never used
    tier = wait_persisted(job, blocks)  # the recomputed blocks are written again
    assert tier["corrupt_dropped"] >= 1
    cleared = httpx.delete(job.url + "/admin/cache/ssd", headers={"Authorization": "Bearer t"}, timeout=10)
    assert cleared.json() == {"clearing": "ssd"}
    deadline = time.monotonic() + 10
    while ssd(job)["blocks"] or any(rank_files(kv).values()):
        assert time.monotonic() < deadline, (ssd(job), rank_files(kv))
        time.sleep(0.2)
    assert job.stop() == 0


@pytest.mark.cluster
def test_kill_during_writes_leaves_a_consistent_manifest(
    job_factory, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    kv = tmp_path / "kv"
    prompts = [f"Document {i}: " + "apples and pears and plums " * 12 for i in range(6)]
    ref = start(job_factory, tiny_model, tmp_path / "ref-kv", "ssd-ref", "--kv-ssd-dir", "none")
    expected = [ask(ref, p) for p in prompts]
    ref.stop()
    job = start(job_factory, tiny_model, kv, "ssd-kill")
    for p in prompts[:3]:
        ask(job, p)
    os.killpg(job.proc.pid, signal.SIGKILL)  # every process of the job, writes in flight or not
    job.proc.wait(10)
    for pid in job.pids():
        os.kill(pid, signal.SIGKILL)
    job = start(job_factory, tiny_model, kv, "ssd-restart")
    assert [ask(job, p) for p in prompts] == expected
    job.stop()
    manifest = Manifest(next(kv.glob("*/manifest.sqlite")), world_size=2)
    listed = set(manifest.persisted_hashes())
    for files in rank_files(kv).values():
        assert {bytes.fromhex(f.stem) for f in files} >= listed  # every listed block is on every rank


@pytest.mark.cluster
def test_tiny_bound_keeps_usage_under_it(job_factory, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    kv = tmp_path / "kv"
    # room for 4 blocks of the tiny model at TP=2 in the default 8-bit format (rank.kvquant: head dim 32,
    # groups of 32): 2 x (8,192 bytes of values + 2 x 256 fp32 scales and biases) = 20,480 bytes a block
    bound_gib = 4 * 20480 / 2**30
    job = start(job_factory, tiny_model, kv, "ssd-bound", "--kv-ssd-gb", str(bound_gib))
    for i in range(5):
        ask(job, f"Bound test {i}: " + "cherries " * 20)
    time.sleep(1.5)  # the last writes' acknowledgements
    tier = ssd(job)
    assert tier["bytes_used"] <= tier["capacity_bytes"] and tier["evictions"] > 0
    for files in rank_files(kv).values():
        assert len(files) <= 5  # the bound plus at most one write in flight
    job.stop()


@pytest.mark.cluster
def test_disk_full_disables_the_tier_and_serving_goes_on(
    job_factory, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    kv = tmp_path / "small-disk"
    kv.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(kv)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        job = start(job_factory, tiny_model, kv, "ssd-full")
        first = ask(job)  # 11 blocks of 64 KiB per rank: far more than 160 KiB
        deadline = time.monotonic() + 15
        while ssd(job)["enabled"]:
            assert time.monotonic() < deadline, "the tier was not disabled"
            time.sleep(0.2)
        assert "disk full or I/O error" in ssd(job)["disabled_reason"]
        assert ask(job) == first  # still served, from the RAM tier
        assert ask(job, "another prompt " * 10)
        assert job.stop() == 0
        assert "SSD tier disabled" in job.log()
    finally:
        subprocess.run(["umount", "-l", str(kv)], capture_output=True)
