"""The SSD tier against a stalled disk, a hostile or shared folder, a fine-tuned model and a clear of
millions of blocks (issue #19)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from cluster.errors import ConfigError
from cluster.kvindex import BlockIndex
from cluster.manifest import Manifest
from cluster.ssdtier import SsdTier, plan_entries
from rank.models import fingerprint
from rank.ssd import LOCK_NAME, SsdBlockStore
from tests.jobs import Job, tiny_args

H1, H2, H3 = (bytes([i]) * 16 for i in (1, 2, 3))
SHAPE = (2, 2, 8, 8)  # one block's keys (or values): 256 float32 = 1 KiB
BLOCK = 2 * 1024


def kv() -> tuple[mx.array, mx.array]:
    return mx.random.normal(SHAPE), mx.random.normal(SHAPE)


def saved(tmp_path: Path, *hashes: bytes) -> tuple[mx.array, mx.array]:
    """Write `hashes` with one store, closed afterwards; the arrays they hold."""
    store = SsdBlockStore(tmp_path)
    k, v = kv()
    for h in hashes:
        store.save(h, k, v)
    store.close()
    assert all(ok for _, ok in store.take_results())
    return k, v


# -- the writer queue ------------------------------------------------------------------------------
class StalledDisk:
    """A write function that hangs until released, as on a dead or stalled disk."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, fd: int, data: bytes) -> None:
        self.entered.set()
        assert self.release.wait(timeout=60)
        os.write(fd, data)


def test_a_stalled_disk_drops_saves_and_never_blocks_the_engine(tmp_path: Path) -> None:
    disk = StalledDisk()
    store = SsdBlockStore(tmp_path, queue_bytes=3 * BLOCK, write_all=disk)
    k, v = kv()
    start = time.monotonic()
    accepted = [store.save(i.to_bytes(16, "big"), k, v) for i in range(200)]
    assert time.monotonic() - start < 10  # never waited for the disk (it writes nothing yet)
    assert accepted == [True] * 3 + [False] * 197  # three blocks fill the bound; the rest are dropped
    assert store.queued_bytes == 3 * BLOCK and store.counters.dropped == 197
    assert disk.entered.wait(10)
    outcomes = store.take_outcomes()
    assert outcomes.written == [] and outcomes.dropped == [i.to_bytes(16, "big") for i in range(3, 200)]
    disk.release.set()
    store.close()
    assert store.take_outcomes().written == [(i.to_bytes(16, "big"), True) for i in range(3)]
    assert store.queued_bytes == 0 and store.load((2).to_bytes(16, "big")) is not None


def test_a_dropped_save_is_forgotten_without_disabling_the_tier(tmp_path: Path) -> None:
    """Rank 0 learns of the drop: the block is never listed, the ranks that wrote their slice delete it,
    and the tier keeps working (a full queue is not a broken disk)."""
    index = BlockIndex(block_tokens=4, capacity_blocks=8, block_bytes=100)
    m = Manifest(tmp_path / "m.sqlite", world_size=2)
    tier = SsdTier(m, index, max_bytes=10_000)
    blocks = [index.insert(h, (i, 2, 3, 4), []) for i, h in enumerate((H1, H2))]
    for b in blocks:
        assert b is not None
        tier.saved_in_ram(b)
    assert len(tier.take()[1]) == 2
    tier.write_results(0, [(H1, True), (H2, True)])
    tier.write_results(1, [(H1, True)], dropped=[H2])
    assert tier.enabled and tier.dropped_saves == 1
    assert m.persisted_hashes() == [H1] and not m.known(H2)
    assert tier.take()[2] == (H2,)  # rank 0 wrote its slice: every rank deletes it
    tier.write_results(1, [], dropped=[H1])  # a drop can never unlist a persisted block
    assert m.persisted_hashes() == [H1]


# -- the folder ------------------------------------------------------------------------------------
def test_unknown_files_and_folders_are_left_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved(tmp_path, H1, H2)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / f"{H1.hex()}.kv").write_bytes(b"x")
    (tmp_path / f"{H3.hex()}.kv.orig").write_bytes(b"x")
    os.mkfifo(tmp_path / f"{H3.hex()}.kv")  # a FIFO under a block's name: opening it must not hang
    store = SsdBlockStore(tmp_path)
    with caplog.at_level(logging.WARNING, "orchard.ssd"):
        assert sorted(store.keep_only({H1, H3})) == [H3]  # H2 is not listed: deleted
    assert "skipping 4 unknown entries" in caplog.text and "backup/" in caplog.text
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"{H1.hex()}.kv", f"{H3.hex()}.kv", f"{H3.hex()}.kv.orig", "backup", "notes.txt",
                            LOCK_NAME])  # fmt: skip
    assert (tmp_path / "backup" / f"{H1.hex()}.kv").exists()
    assert store.load(H3) is None and store.load(H1) is not None
    store.close()


def test_reads_are_size_capped_and_never_follow_symlinks(tmp_path: Path) -> None:
    folder, elsewhere = tmp_path / "tier", tmp_path / "elsewhere"
    k, v = saved(elsewhere, H1)
    folder.mkdir()
    (folder / f"{H1.hex()}.kv").symlink_to(elsewhere / f"{H1.hex()}.kv")
    huge = folder / f"{H2.hex()}.kv"
    with open(huge, "wb") as f:
        f.truncate(BLOCK + 64 * 1024)  # sparse: larger than a block file can be
    store = SsdBlockStore(folder, block_bytes=BLOCK)
    assert store.load(H1) is None  # refused, not followed
    assert (elsewhere / f"{H1.hex()}.kv").exists()  # ... and what it points to is untouched
    assert store.load(H2) is None and not huge.exists()  # oversize: refused and deleted
    assert store.counters.corrupt == 2 and store.counters.read_bytes == 0
    assert sorted(store.keep_only({H1})) == [H1]  # a symlink is not a block file: reported missing
    store.close()
    other = SsdBlockStore(elsewhere, block_bytes=BLOCK)
    k1, v1 = other.load(H1)  # type: ignore[misc]
    assert mx.array_equal(k1, k).item() and mx.array_equal(v1, v).item()
    other.close()


def test_temporary_files_are_created_exclusively(tmp_path: Path) -> None:
    """A file planted at a temporary name the writer could predict is never written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    folder = tmp_path / "tier"
    folder.mkdir()
    planted = [f"{H1.hex()}.tmp{os.getpid()}", f"{H1.hex()}.kv.tmp", f".{H1.hex()}.tmp"]
    for name in planted:
        (folder / name).symlink_to(victim)
    k, _ = saved(folder, H1)
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*planted, f"{H1.hex()}.kv", LOCK_NAME])
    store = SsdBlockStore(folder)
    k1, _ = store.load(H1)  # type: ignore[misc]
    assert mx.array_equal(k1, k).item()
    store.close()


def test_the_header_is_checked_before_it_is_used(tmp_path: Path) -> None:
    """An edited header (here a shape with the same bytes, laid out otherwise) fails the checksum: a
    header is never trusted on its own."""
    saved(tmp_path, H1)
    path = tmp_path / f"{H1.hex()}.kv"
    data = path.read_bytes()
    assert data.count(b"[2, 2, 8, 8]") == 2  # keys' and values' shapes
    path.write_bytes(data.replace(b"[2, 2, 8, 8]", b"[2, 8, 2, 8]", 1))
    store = SsdBlockStore(tmp_path)
    assert store.load(H1) is None and store.counters.corrupt == 1 and not path.exists()
    store.close()


def test_two_stores_cannot_share_a_folder(tmp_path: Path) -> None:
    first = SsdBlockStore(tmp_path)
    with pytest.raises(ConfigError) as caught:
        SsdBlockStore(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and f"pid {os.getpid()}" in message and "--kv-ssd-dir" in message
    first.close()
    SsdBlockStore(tmp_path).close()  # free again once the first job is gone


@pytest.mark.cluster
def test_a_second_job_on_the_same_folder_stops_at_start_up(
    job_factory, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "kv"
    args = tiny_args(tiny_model, "--kv-ssd-dir", str(folder))
    first = job_factory.start(2, args, "lock-a", launcher=True)
    second = Job(2, args, tmp_path / "lock-b.log", launcher=True)
    try:
        assert second.wait(120) == 2
    finally:
        second.stop()
    assert "is in use by another Orchard job" in second.log() and str(folder) in second.log()
    assert httpx.get(first.url + "/health", timeout=10).status_code == 200  # the first one goes on
    assert first.stop() == 0


# -- the model fingerprint -------------------------------------------------------------------------
class CountingHash:
    def __init__(self) -> None:
        from rank.filedigest import sha256_file

        self.reads: list[Path] = []
        self._hash = sha256_file

    def __call__(self, path: Path) -> str:
        self.reads.append(path)
        return self._hash(path)


def tiny_weights(folder: Path) -> Path:
    """A model folder whose one weight file is 3 MiB (more than the 1 MiB the old fingerprint read)."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    path = folder / "model.safetensors"
    mx.save_safetensors(str(path), {"w": mx.arange(3 * 2**18, dtype=mx.float32)})
    return path


def test_the_fingerprint_covers_every_byte_and_is_cached(tmp_path: Path) -> None:
    weights = tiny_weights(tmp_path / "model")
    cache, hashing = tmp_path / "cache", CountingHash()
    first = fingerprint(weights.parent, cache, hashing)
    assert len(hashing.reads) == 1
    assert fingerprint(weights.parent, cache, hashing) == first and len(hashing.reads) == 1  # a cache hit
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # a fine-tune of the same shape: same name, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    tuned = fingerprint(weights.parent, cache, hashing)
    assert tuned != first and len(hashing.reads) == 2
    assert fingerprint(weights.parent, cache, hashing) == tuned and len(hashing.reads) == 2


def test_a_rewrite_that_restores_the_mtime_is_still_seen(tmp_path: Path) -> None:
    """A copy that keeps the old mtime (`cp -p`, `rsync -a`) changes ctime and inode: hashed again."""
    weights = tiny_weights(tmp_path / "model")
    cache, hashing = tmp_path / "cache", CountingHash()
    first = fingerprint(weights.parent, cache, hashing)
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(bytes(data))
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, weights)
    assert fingerprint(weights.parent, cache, hashing) != first and len(hashing.reads) == 2


# -- plans -----------------------------------------------------------------------------------------
def test_a_clear_of_many_blocks_goes_out_over_several_plans(tmp_path: Path) -> None:
    index = BlockIndex(block_tokens=4, capacity_blocks=16, block_bytes=100)
    m = Manifest(tmp_path / "m.sqlite", world_size=1)
    hashes = [i.to_bytes(16, "big") for i in range(10_000)]
    m.db.executemany(
        "INSERT INTO blocks (hash, tokens, nbytes, created, last_used, acks, persisted) "
        "VALUES (?, x'90', 100, 0, 0, 1, 1)",
        [(h,) for h in hashes],
    )
    tier = SsdTier(m, index, max_bytes=10**9)  # the default cap: 4096
    assert tier.clear() == 10_000
    deletes = []
    while tier.has_work():
        load, save, delete = tier.take()
        assert len(delete) <= 4096 and not load and not save
        deletes.append(delete)
    assert [len(d) for d in deletes] == [4096, 4096, 1808]
    assert [h for d in deletes for h in d] == hashes
    assert plan_entries(16 * 2**20) == 4096 and plan_entries(64 * 1024) == 170  # from the bus limit


def test_loads_beyond_the_cap_wait_for_the_next_plans(tmp_path: Path) -> None:
    bt = 4
    index = BlockIndex(block_tokens=bt, capacity_blocks=64, block_bytes=100)
    m = Manifest(tmp_path / "m.sqlite", world_size=1)
    tier = SsdTier(m, index, max_bytes=10**6, max_per_plan=3)
    tokens = tuple(range(8 * bt + 1))
    hashes = [i.to_bytes(16, "big") for i in range(8)]
    for i, h in enumerate(hashes):
        m.add_pending(h, tokens[i * bt : (i + 1) * bt], 100)
        m.ack(h, 0)
    assert tier.fetch(tokens, hashes, 0, [])
    sent = []
    while tier.has_work():
        load, _, _ = tier.take()
        assert 0 < len(load) <= 3
        sent.append([h for _, h in load])
        tier.load_results(set(), [])  # the plan ran on every rank
        ready = [index.lookup(h, tokens[i * bt : (i + 1) * bt]) for i, h in enumerate(hashes)]
        done = sum(len(s) for s in sent)
        assert all(b is not None for b in ready[:done])  # sent and read: ready
        assert ready[done:] == [None] * (8 - done)  # not sent yet: not ready ...
        assert all(tier.loading(h) for h in hashes[done:])  # ... and still loading
    assert [len(s) for s in sent] == [3, 3, 2] and [h for s in sent for h in s] == hashes
