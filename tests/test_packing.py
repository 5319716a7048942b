"""Packed steps piece by piece: where segments lie in a row, RoPE from each segment's own offset, a packed
cache's split of keys into each sequence's cache, and which cache a pass gets. The whole step (packed
against one pass per sequence, logits and KV) is tested in tests/test_cpu_kernels.py."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from rank.packing import PackedCache, RowLayout, SegmentRoPE, Segments, attention_seam, pass_caches


def test_row_layout_puts_chunks_end_to_end_then_the_decode_rows() -> None:
    assert RowLayout.of([3, 5], 2) == RowLayout(((0, 3), (3, 8)), (8, 10))
    assert RowLayout.of([], 4) == RowLayout((), (0, 4))  # the decode batch alone
    assert RowLayout.of([7], 0) == RowLayout(((0, 7),), (7, 7))  # one chunk alone


def test_segment_rope_rotates_each_segment_from_its_own_offset() -> None:
    rope = nn.RoPE(16, base=10000.0)
    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, 9, 16)).astype(np.float32))
    layout = RowLayout.of([4, 2], 3)
    got = SegmentRoPE(rope)(x, offset=Segments(layout, [10, 0], mx.array([5, 7, 30])))
    want = [rope(x[:, :, 0:4], offset=10), rope(x[:, :, 4:6], offset=0)]
    want += [rope(x[:, :, 6 + i : 7 + i], offset=off) for i, off in enumerate((5, 7, 30))]
    np.testing.assert_allclose(np.array(got), np.array(mx.concatenate(want, axis=2)), atol=1e-6)
    np.testing.assert_array_equal(np.array(SegmentRoPE(rope)(x, offset=3)), np.array(rope(x, offset=3)))


def _kv(n: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((1, 2, n, 4)).astype(np.float32))


def test_packed_cache_gives_each_sequence_its_own_keys() -> None:
    first, second = KVCache(), KVCache()
    first.update_and_fetch(_kv(5, 1), _kv(5, 2))  # 5 positions already cached
    batch = BatchKVCache([1, 0])
    batch.update_and_fetch(
        _kv(2, 3).transpose(2, 1, 0, 3)[:, :, :1], _kv(2, 4).transpose(2, 1, 0, 3)[:, :, :1]
    )
    packed = PackedCache([first, second], RowLayout.of([3, 2], 2), batch)
    assert packed.offset.offsets == [5, 0] and packed.make_mask(7) is None
    keys, values = _kv(7, 5), _kv(7, 6)
    k, v = packed.update_and_fetch(keys, values)
    assert [a.shape[2] for a in k] == [8, 2, 2] and first.offset == 8 and second.offset == 2
    np.testing.assert_array_equal(np.array(k[0][:, :, 5:]), np.array(keys[:, :, 0:3]))
    np.testing.assert_array_equal(np.array(v[1]), np.array(values[:, :, 3:5]))
    np.testing.assert_array_equal(np.array(k[2][:, :, -1]), np.array(keys[0, :, 5:7].transpose(1, 0, 2)))


def test_a_lone_chunk_or_batch_keeps_its_own_caches() -> None:
    chunk, other = [KVCache(), KVCache()], [KVCache(), KVCache()]
    batch = [BatchKVCache([0]), BatchKVCache([0])]
    assert pass_caches([chunk], RowLayout.of([4], 0), batch) is chunk
    assert pass_caches([], RowLayout.of([], 1), batch) is batch
    packed = pass_caches([chunk, other], RowLayout.of([4, 1], 1), batch)
    assert [type(c) for c in packed] == [PackedCache, PackedCache]
    assert packed[1].caches == [chunk[1], other[1]] and packed[1].batch is batch[1]
    assert all(c.batch is None for c in pass_caches([chunk, other], RowLayout.of([4, 1], 0), batch))


def test_the_seam_sends_packed_caches_to_their_segments_and_the_rest_on() -> None:
    calls: list[tuple] = []

    def attend(q, k, v, cache, scale, mask, sinks=None):
        calls.append((q.shape, cache, mask, sinks))
        return q

    seam = attention_seam(attend)
    q = mx.zeros((1, 2, 3, 4))
    sinks = mx.zeros((2,))
    assert seam(q, q, q, cache="c", scale=0.5, mask="causal", sinks=sinks) is q
    assert calls == [((1, 2, 3, 4), "c", "causal", sinks)]
    calls.clear()
    packed = PackedCache([KVCache(), KVCache()], RowLayout.of([1, 2], 0))
    out = seam(q, [q[:, :, :1], q[:, :, 1:]], [q[:, :, :1], q[:, :, 1:]], cache=packed, scale=0.5, mask=None)
    assert out.shape == q.shape
    # each segment's own cache goes along (a quantized one takes mlx-lm's quantized path, rank.livequant)
    first, second = packed.caches
    assert calls == [((1, 2, 1, 4), first, "causal", None), ((1, 2, 2, 4), second, "causal", None)]
