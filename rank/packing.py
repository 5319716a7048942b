"""Packed steps: several sequences' prompt chunks, then the decode batch's rows, in one forward pass.

One pass reads the weights once for every sequence in it: on a CPU a pass over a short chunk costs nearly
a whole read of the weights (embedded model at a 1,500-token context: 63 ms for 1 token, 137 ms for 20,
213 ms for 50), so a step whose chunks and decode rows run end to end in one row costs about one pass.
Each segment of the row keeps its own cache, positions (`SegmentRoPE`) and causal attention (`PackedCache`),
so its numbers are those of a pass of its own.

A step's passes, and so its collectives, must be the same on every rank: whether a model packs depends on
the model and on the seam `rank.mlx_patch` installs, never on the device (MLX's attention does the work
where the CPU kernels are off). `rank.model_caps` decides it: models with sliding windows, attention sinks,
other caches than a plain `KVCache`, or layers that do not fit the seam run one pass per sequence.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# mlx-lm's `scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None)`.
Attend = Callable[..., mx.array]

_SEAM = "orchard_packs"  # marks the attention function built by `attention_seam`


@dataclass(frozen=True, slots=True)
class RowLayout:
    """Where a pass's segments lie along its positions: [lo, hi) of each prompt chunk, end to end, then
    `batch_span`, `width` positions for each decode row (row after row: 1, or a speculative step's
    pending token plus drafts, rank.ragged). A pass of one chunk, or of the batch alone, has the same
    layout with nothing else in it, so the executor reads its rows the same way for every pass."""

    spans: tuple[tuple[int, int], ...]
    batch_span: tuple[int, int]
    width: int = 1

    @classmethod
    def of(cls, lengths: Sequence[int], rows: int, width: int = 1) -> RowLayout:
        bounds = list(itertools.accumulate(lengths, initial=0))
        return cls(tuple(itertools.pairwise(bounds)), (bounds[-1], bounds[-1] + rows * width), width)


class Segments:
    """The `offset` a `PackedCache` shows a layer's RoPE: segment i starts at `offsets[i]`; with
    `batch_offsets`, each decode row is at its own position."""

    __slots__ = ("batch_offsets", "batch_span", "offsets", "spans", "width")

    def __init__(self, layout: RowLayout, offsets: list[int], batch_offsets: mx.array | None = None) -> None:
        self.offsets, self.batch_offsets = offsets, batch_offsets
        self.spans, self.batch_span, self.width = layout.spans, layout.batch_span, layout.width


def _rows(x: mx.array, width: int = 1) -> mx.array:
    """(1, H, B*W, D) -> (B, H, W, D): decode tokens of a packed row as the rows of a batch."""
    if width == 1:
        return x.transpose(2, 1, 0, 3)
    _, h, n, d = x.shape
    return x.reshape(h, n // width, width, d).transpose(1, 0, 2, 3)


def _unrows(x: mx.array, width: int = 1) -> mx.array:
    """(B, H, W, D) -> (1, H, B*W, D): the inverse of `_rows`."""
    if width == 1:
        return x.transpose(2, 1, 0, 3)
    b, h, w, d = x.shape
    return x.transpose(1, 0, 2, 3).reshape(1, h, b * w, d)


class SegmentRoPE(nn.Module):
    """A layer's RoPE that also takes `Segments` for an offset: each segment rotated from its own."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        if not isinstance(offset, Segments):
            return self.inner(x, offset=offset)
        parts = [
            self.inner(x[:, :, lo:hi], offset=off)
            for (lo, hi), off in zip(offset.spans, offset.offsets, strict=True)
        ]
        if offset.batch_offsets is not None:
            lo, hi = offset.batch_span
            w = offset.width
            parts.append(_unrows(self.inner(_rows(x[:, :, lo:hi], w), offset=offset.batch_offsets), w))
        return mx.concatenate(parts, axis=2)


class PackedCache:
    """One layer's view of a packed pass: the caches of the sequences whose chunks are in the row (one
    `KVCache` each) and, optionally, the decode batch's `BatchKVCache` for the row's last positions."""

    attends_itself = True  # the seam hands it the attention (`attend`)

    def __init__(self, caches: list[Any], layout: RowLayout, batch: Any = None) -> None:
        self.caches, self.batch = caches, batch
        self.attended = 0  # calls of `attend`: one a layer, or the layer's attention bypassed the seam
        self.offset = Segments(
            layout, [c.offset for c in caches], batch.offset if batch is not None else None
        )
        # the decode rows' mask, made before their cache grows (as mlx-lm's models do)
        self.batch_mask = batch.make_mask(layout.width, return_array=True) if batch is not None else None

    def make_mask(self, *args: Any, **kwargs: Any) -> None:
        return None  # each segment's mask is applied in `attend`

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        fetched = [
            c.update_and_fetch(keys[:, :, lo:hi], values[:, :, lo:hi])
            for c, (lo, hi) in zip(self.caches, self.offset.spans, strict=True)
        ]
        if self.batch is not None:
            lo, hi = self.offset.batch_span
            w = self.offset.width
            fetched.append(
                self.batch.update_and_fetch(_rows(keys[:, :, lo:hi], w), _rows(values[:, :, lo:hi], w))
            )
        return [k for k, _ in fetched], [v for _, v in fetched]

    def attend(
        self, queries: mx.array, keys: list[mx.array], values: list[mx.array], scale: float, attend: Attend
    ) -> mx.array:
        """Each segment's causal attention over its own keys, the decode rows' under the batch's mask."""
        self.attended += 1
        spans = self.offset.spans
        # each segment's cache goes along: a quantized one (rank.livequant) takes mlx-lm's quantized path
        parts = [
            attend(queries[:, :, lo:hi], k, v, c, scale, "causal")
            for (lo, hi), c, k, v in zip(spans, self.caches, keys[: len(spans)], values[: len(spans)], strict=True)
        ]
        if self.batch is not None:
            lo, hi = self.offset.batch_span
            w = self.offset.width
            q = _rows(queries[:, :, lo:hi], w)
            if getattr(self.batch, "attends_itself", False):  # rank.livequant.LiveBatch: its groups
                out = self.batch.attend(q, keys[-1], values[-1], scale, attend)
            else:
                out = attend(q, keys[-1], values[-1], None, scale, self.batch_mask)
            parts.append(_unrows(out, w))
        return mx.concatenate(parts, axis=2)


def pass_caches(chunk_caches: list[list[Any]], layout: RowLayout, batch: list[Any] | None) -> list[Any]:
    """Each layer's cache for a pass over `chunk_caches` (one list of layer caches per chunk, in the row's
    order) and then, when `layout` has decode rows, the `batch`: a lone chunk or the batch alone passes
    through with its own caches, anything more is packed."""
    rows = layout.batch_span[1] - layout.batch_span[0]
    if not rows and len(chunk_caches) == 1:
        return chunk_caches[0]
    if rows and not chunk_caches:
        assert batch is not None
        return batch
    return [
        PackedCache(list(layer), layout, batch[i] if rows and batch is not None else None)
        for i, layer in enumerate(zip(*chunk_caches, strict=True))
    ]


def attention_seam(attend: Attend) -> Attend:
    """mlx-lm's attention function as a packed pass needs it: a `PackedCache` attends segment by segment
    (a `rank.livequant.LiveBatch` group by group), anything else goes to `attend` (mlx-lm's own function,
    or the CPU kernels in front of it). Where MLX runs on a CPU, quantized caches are dequantized first
    (`dequantizing`)."""
    if mx.default_device() == mx.cpu:
        attend = dequantizing(attend)

    def scaled_dot_product_attention(
        queries: mx.array,
        keys: Any,
        values: Any,
        cache: Any,
        scale: float,
        mask: Any,
        sinks: mx.array | None = None,
    ) -> mx.array:
        if getattr(cache, "attends_itself", False):
            return cache.attend(queries, keys, values, scale, attend)
        return attend(queries, keys, values, cache, scale, mask, sinks)

    setattr(scaled_dot_product_attention, _SEAM, True)
    return scaled_dot_product_attention


DEQUANTIZE_FROM = 16  # queries per row from which a CPU dequantizes a quantized cache to attend it


def dequantizing(attend: Attend) -> Attend:
    """`attend` with a quantized cache's keys and values (rank.livequant) dequantized first, then attended
    as plain ones, for calls of DEQUANTIZE_FROM queries a row or more (prompt chunks). On a CPU, MLX's
    quantized matmuls are far slower than BLAS for many queries: a prompt chunk of 256 at 2,048 positions
    of the embedded model took 13.1 s against 1.8 s plain, and 1.2 s dequantized. For a decode step they
    are the better of the two: dequantizing the whole cache every step cost 5.5x a plain step at 8k
    positions (benchmarks/quantized_attention_cpu.py). The numbers are the same dequantized values mlx-lm's
    quantized attention multiplies by, summed in another order."""

    def scaled_dot_product_attention(
        queries: mx.array,
        keys: Any,
        values: Any,
        cache: Any,
        scale: float,
        mask: Any,
        sinks: mx.array | None = None,
    ) -> mx.array:
        bits = getattr(cache, "bits", None)
        if bits is not None and isinstance(keys, (tuple, list)) and queries.shape[2] >= DEQUANTIZE_FROM:
            g = cache.group_size
            keys = mx.dequantize(*keys, group_size=g, bits=bits)
            values = mx.dequantize(*values, group_size=g, bits=bits)
            cache = None
        return attend(queries, keys, values, cache, scale, mask, sinks)

    return scaled_dot_product_attention


def seam_installed(model: Any) -> bool:
    """Whether `rank.mlx_patch` installed the seam for `model`: `attention_seam` in the module of each of
    its attention layers, and a `SegmentRoPE` on each."""
    layers = attentions(model)

    def seam_of(a: Any) -> bool:
        return bool(
            getattr(
                getattr(sys.modules.get(type(a).__module__), "scaled_dot_product_attention", None),
                _SEAM,
                False,
            )
        )

    return bool(layers) and all(isinstance(a.rope, SegmentRoPE) and seam_of(a) for a in layers)


def attentions(model: Any) -> list[Any]:
    """The model's attention modules that take a position offset through a `rope`."""
    return [layer.self_attn for layer in model.layers if hasattr(getattr(layer, "self_attn", None), "rope")]
