"""Quantized prefix-cache blocks (rank.kvquant): the stored format, the SSD tier's files of it, the RAM
tier's capacity per byte, and greedy output served from quantized blocks.

Real parts: mx.quantize, the SSD store on a real folder, the executor and scheduler with the tiny
random-weight model (rank.models.make_tiny_model) in the leader loop on one rank."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cluster.bus import ControlBus
from cluster.engine_client import EngineClient
from cluster.kvindex import BlockIndex, root_hash
from cluster.prefix import PrefixCache
from cluster.requests import Admission, GenerationRequest, RequestEvent, SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from rank.engine import Leader
from rank.executor import Executor
from rank.kvquant import KvFormat
from rank.model_caps import BlockGeometry
from rank.models import load_model
from rank.ssd import SsdBlockStore
from rank.tokenizer import ChatTokenizer
from rank.transport import LocalTransport
from tests.test_engine_local import reference_greedy

H1 = b"\x01" * 16


def _pair(shape: tuple[int, ...], dtype: mx.Dtype = mx.bfloat16, seed: int = 0) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    return tuple(mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for _ in range(2))  # type: ignore[return-value]


def test_names_and_fit() -> None:
    assert KvFormat(16).name == "kv16" and KvFormat(8, 64).name == "q8g64" and KvFormat(4, 32).name == "q4g32"
    assert KvFormat(8, 64).fit(32) == KvFormat(8, 32)  # head dim 32 takes groups of 32
    assert KvFormat(8, 64).fit(128) == KvFormat(8, 64)
    assert KvFormat(8, 64).fit(40) == KvFormat(16, 64)  # no group size divides it: kept as computed
    with pytest.raises(ValueError, match="bits"):
        KvFormat(3)
    with pytest.raises(ValueError, match="group"):
        KvFormat(8, 48)


@pytest.mark.parametrize("bits", [8, 4])
def test_blocks_quantize_alike_under_any_head_split_and_concatenation(bits: int) -> None:
    """Groups run along the head dimension: a rank's slice of the heads, or one block of several,
    encodes to exactly the numbers of the whole."""
    kv = KvFormat(bits, 64)
    k, v = _pair((3, 4, 16, 64))
    whole = kv.encode(k, v)
    halves = [kv.encode(k[:, h : h + 2], v[:, h : h + 2]) for h in (0, 2)]
    for i in range(kv.parts):
        assert mx.array_equal(mx.concatenate([halves[0][i], halves[1][i]], axis=1), whole[i]).item()
    blocks = [kv.encode(k[:, :, t : t + 8], v[:, :, t : t + 8]) for t in (0, 8)]
    for a, b in zip(kv.decode(blocks), kv.decode([whole]), strict=True):
        assert mx.array_equal(a, b).item()
    error = mx.abs(kv.decode([whole])[0].astype(mx.float32) - k.astype(mx.float32)).max().item()
    assert error < (0.05 if bits == 8 else 0.6)


@pytest.mark.parametrize("dtype,ratio", [(mx.bfloat16, 1.8), (mx.float32, 3.5)])
def test_ram_tier_holds_more_blocks_for_the_same_bytes(dtype: mx.Dtype, ratio: float) -> None:
    """The capacity of the RAM tier is its budget over a block's stored bytes (rank/leader_setup.py): 8-bit
    blocks of SmolLM2's shape (30 layers, 3 KV heads, head dim 64) against the model's dtype."""
    geometry = BlockGeometry(30, 3, 64, 64, dtype)
    budget = 2**30
    plain = budget // geometry.stored_bytes(KvFormat(16), 32)
    quant = budget // geometry.stored_bytes(KvFormat(8, 64), 32)
    assert quant >= ratio * plain
    stored = KvFormat(8, 64).encode(*_pair((30, 3, 32, 64), dtype))
    assert sum(a.nbytes for a in stored) == geometry.stored_bytes(KvFormat(8, 64), 32)


@pytest.mark.parametrize("bits", [8, 4])
def test_ssd_round_trip_of_a_quantized_block_is_bit_exact(tmp_path: Path, bits: int) -> None:
    kv = KvFormat(bits, 64)
    stored = kv.encode(*_pair((2, 2, 8, 64)))
    store = SsdBlockStore(tmp_path, kv_format=kv.name)
    assert store.save(H1, *stored)
    store.close()  # waits for the writer
    store = SsdBlockStore(tmp_path, kv_format=kv.name)
    loaded = store.load(H1)
    assert loaded is not None and len(loaded) == kv.parts
    for a, b in zip(loaded, stored, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()
    assert [(str(a.dtype).split(".")[-1], tuple(a.shape)) for a in loaded] == kv.shapes(
        2, 2, 8, 64, mx.bfloat16
    )
    store.close()


def test_a_block_of_another_format_is_refused(tmp_path: Path) -> None:
    """A file written as q8g64 is never read as q4g64 or kv16 (refused and deleted: in a folder of
    another format it can only have been put there)."""
    stored = KvFormat(8, 64).encode(*_pair((2, 2, 8, 64)))
    store = SsdBlockStore(tmp_path, kv_format="q8g64")
    store.save(H1, *stored)
    store.close()
    other = SsdBlockStore(tmp_path, kv_format="q4g64")
    assert other.load(H1) is None and other.counters.corrupt == 1
    assert not (tmp_path / f"{H1.hex()}.kv").exists()
    other.close()


def test_the_format_joins_the_root_hash_and_the_ssd_folder(tiny_model: Path, tmp_path: Path) -> None:
    from rank.startup import _ssd_store

    roots = {root_hash("model", f"tp1|{KvFormat(b).name}") for b in (4, 8, 16)}
    assert len(roots) == 3
    folders = set()
    for bits in (8, 4, 16):
        args = argparse.Namespace(
            kv_ssd_dir=str(tmp_path / "kv"),
            kv_ram_gb=1.0,
            cache_dir=tmp_path / "cache",
            kv_ssd_queue_mb=1.0,
            kv_bits=bits,
            kv_group_size=64,
        )
        folder, store = _ssd_store(args, tiny_model, 0, 1)
        assert store is not None and folder is not None and folder.name.endswith(KvFormat(bits, 64).name)
        folders.add(folder)
        store.close()
    assert len(folders) == 3


class _Engine:
    """The leader loop on one rank with a prefix cache of blocks stored in `kv`'s format."""

    def __init__(self, model_dir: Path, kv: KvFormat, block: int = 8, chunk: int = 16) -> None:
        self.model, _ = load_model(model_dir, None)
        self.tokenizer = ChatTokenizer(model_dir)
        self.client = EngineClient(max_waiting=100)
        self.executor = Executor(self.model, True, block_tokens=block, kv_format=kv)
        index = BlockIndex(block, 256, self.executor.block_bytes)
        self.prefix = PrefixCache(index, root_hash("tiny", f"tp1|{self.executor.kv.name}"))
        sched = Scheduler(
            SchedulerConfig(4, chunk, 2048, idle_prefill_chunk=0),
            self.tokenizer.decode,
            [],
            prefix_cache=self.prefix,
        )
        self.leader = Leader(self.executor, sched, ControlBus(LocalTransport()), self.client)
        self.thread = threading.Thread(target=self.leader.run, daemon=True)
        self.thread.start()
        while self.client.state.value != "ready":
            time.sleep(0.01)

    def run(self, rid: str, prompt: list[int], n: int) -> list[int]:
        events: list[RequestEvent] = []
        req = GenerationRequest(
            rid, tuple(prompt), SamplingParams(temperature=0.0, max_tokens=n), sink=events.append
        )
        assert self.client.submit(req) is Admission.ACCEPTED
        deadline = time.monotonic() + 60
        while not (events and events[-1].finished):
            assert time.monotonic() < deadline, "request did not finish"
            time.sleep(0.01)
        return [t for e in events for t in e.token_ids]

    def stop(self) -> None:
        self.leader.request_stop()
        self.thread.join(timeout=10)


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_from_quantized_blocks_equals_unquantized(tiny_model: Path, bits: int) -> None:
    """The prompts of tests/test_engine_local.py's prefix tests: the run that hits quantized blocks gives
    the tokens of the run that computed everything, and of plain generation."""
    eng = _Engine(tiny_model, KvFormat(bits, 64))
    try:
        assert eng.executor.kv == KvFormat(bits, 32)  # the tiny model's head dimension is 32
        texts = [
            "A shared system prompt, long enough to span several cache blocks. " * 2,
            "Document: " + "the orchard has apple trees and pear trees. " * 4,
        ]
        for t, text in enumerate(texts):
            doc = eng.tokenizer.encode(text)
            miss = eng.run(f"miss{t}", doc, 12)
            computed = eng.executor.prefill_tokens
            hit = eng.run(f"hit{t}", doc, 12)
            assert eng.executor.prefill_tokens - computed <= 16  # the blocks were loaded, not recomputed
            assert hit == miss == reference_greedy(eng.model, doc, 12)
            for i in range(3):
                longer = doc + eng.tokenizer.encode(f" Question {i}?")
                assert eng.run(f"q{t}{i}", longer, 8) == reference_greedy(eng.model, longer, 8)
        assert eng.prefix.index.stats.hit_tokens > 0
        assert all(len(parts) == 6 for parts in eng.executor.blocks.values())
    finally:
        eng.stop()
