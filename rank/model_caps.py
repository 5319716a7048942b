"""What the executor's batching tricks can do for a model, decided from the model and its own caches.

The model is the authority on itself: its `make_cache()` says what each layer keeps (a full `KVCache`, a
`RotatingKVCache` window, MLA's latent in a `KVCache` of another shape, a linear-attention `ArraysCache`
state). Each trick either serves a cache type exactly or steps aside for the whole model, said once:

- batched decode: every layer's cache has mlx-lm's `merge` into a batch cache with `filter`/`extend`
  (mlx-lm's `BatchGenerator` needs the same); otherwise each decode row runs in a pass of its own.
- prefix blocks (RAM tier, and the SSD tier behind it): every layer keeps every position in a plain
  `KVCache` of one shape. A window forgets positions a block must hold; a recurrent state is not made of
  positions at all.
- packed steps (rank.packing): the seam is installed (rank.mlx_patch), every layer is attention with a
  `SegmentRoPE`, no sinks, every cache a plain `KVCache`, and a dry run of a packed pass (built lazily:
  shapes only, nothing evaluated, so no collective runs and every rank decides the same) goes through the
  seam once a layer. A model that reads its cache's offset itself (ministral3's attention scaling), does
  its own attention (gemma2), or works on the cached keys before attending (deepseek's MLA) fails the dry
  run and runs one pass per sequence.

A prefix block on this rank holds keys and values of `block_tokens` positions of every layer. Their last
dimensions may differ (MLA keeps a latent and a RoPE key); a block is stored as two arrays of equal shape,
the two halves of keys and values concatenated along that dimension (`BlockGeometry.pack`), which are
exactly keys and values when the dimensions are equal. The SSD tier writes such pairs as they are.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from rank import packing
from rank.kvquant import KvFormat

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """One rank's keys and values of one position in every layer: (layers, heads, key_dim | value_dim)."""

    layers: int
    heads: int
    key_dim: int
    value_dim: int
    dtype: mx.Dtype

    def bytes(self, tokens: int) -> int:
        """Bytes of `tokens` positions of every layer as the model computes them (a live cache's)."""
        return self.layers * self.heads * tokens * (self.key_dim + self.value_dim) * self.dtype.size

    @property
    def dim(self) -> int:
        """Values in a row of each array of a packed pair (`pack`)."""
        return (self.key_dim + self.value_dim) // 2

    def stored_bytes(self, kv: KvFormat, tokens: int) -> int:
        """Bytes of a block of `tokens` positions as stored in `kv`'s format (rank.kvquant)."""
        return kv.block_bytes(self.layers, self.heads, tokens, self.dim, self.dtype.size)

    def stored_shapes(self, kv: KvFormat, tokens: int) -> list[tuple[str, tuple]]:
        return kv.shapes(self.layers, self.heads, tokens, self.dim, self.dtype)

    def pack(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """(layers, heads, T, key_dim) and (..., value_dim) as two arrays of one shape (see the module)."""
        if self.key_dim == self.value_dim:
            return keys, values
        both = mx.concatenate([keys, values], axis=-1)
        half = (self.key_dim + self.value_dim) // 2
        return both[..., :half], both[..., half:]

    def unpack(self, first: mx.array, second: mx.array) -> tuple[mx.array, mx.array]:
        if self.key_dim == self.value_dim:
            return first, second
        both = mx.concatenate([first, second], axis=-1)
        return both[..., : self.key_dim], both[..., self.key_dim :]


@dataclass(frozen=True, slots=True)
class ModelCaps:
    """What the executor may do with this model; `notes` say what stepped aside and why."""

    batch_decode: bool
    prefix_blocks: bool
    packable: bool
    geometry: BlockGeometry | None
    cache_kinds: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.notes)

    def log(self, name: str, level: int = logging.INFO) -> None:
        """One line for the job's log: the model's caches, and each trick that steps aside."""
        kinds = ", ".join(sorted(set(self.cache_kinds)))
        if self.notes:
            log.log(level, "%s (caches: %s): %s", name, kinds, self.reason)
        else:
            log.log(level, "%s (caches: %s): batched decode, prefix cache and packed steps on", name, kinds)


def probe(model: Any, inner: Any) -> ModelCaps:
    """`model`'s capabilities; `inner` is its inner model (rank.model_head.find_inner)."""
    caches = make_prompt_cache(model)
    kinds = tuple(type(c).__name__ for c in caches)
    notes: list[str] = []
    # The shapes a position takes in each cache: one token through the inner model, lazily.
    inner(mx.zeros((1, 1), dtype=mx.int32), cache=caches)

    batch_decode = _batchable(caches)
    if not batch_decode:
        notes.append("batched decode off (a cache type without merge/filter/extend): one pass a decode row")

    geometry = _geometry(caches)
    plain = all(type(c) is KVCache for c in caches)
    prefix_blocks = plain and geometry is not None and batch_decode
    if not prefix_blocks:
        notes.append(f"prefix cache off ({_why_not_blocks(caches, geometry)})")

    packable, why = _packable(model, inner, plain and batch_decode)
    if not packable:
        notes.append(f"packed steps off ({why}): one pass a sequence")
    return ModelCaps(batch_decode, prefix_blocks, packable, geometry, kinds, tuple(notes))


def _batchable(caches: list[Any]) -> bool:
    try:
        merged = [type(c).merge([c]) for c in caches]
    except (AttributeError, NotImplementedError, ValueError):
        return False
    return all(hasattr(m, "filter") and hasattr(m, "extend") for m in merged)


def _kv_shape(cache: Any) -> tuple[int, int, int, mx.Dtype] | None:
    keys, values = getattr(cache, "keys", None), getattr(cache, "values", None)
    if not isinstance(keys, mx.array) or not isinstance(values, mx.array):
        return None
    return int(keys.shape[1]), int(keys.shape[3]), int(values.shape[3]), keys.dtype


def _geometry(caches: list[Any]) -> BlockGeometry | None:
    """The layers' common (heads, key_dim, value_dim, dtype), when every layer has one."""
    shapes = {_kv_shape(c) for c in caches}
    if len(shapes) != 1 or None in shapes:
        return None
    heads, key_dim, value_dim, dtype = shapes.pop()  # type: ignore[misc]
    if (key_dim + value_dim) % 2:
        return None
    return BlockGeometry(len(caches), heads, key_dim, value_dim, dtype)


def _why_not_blocks(caches: list[Any], geometry: BlockGeometry | None) -> str:
    others = sorted({type(c).__name__ for c in caches if type(c) is not KVCache})
    if "RotatingKVCache" in others:
        return "sliding-window layers keep only their last positions"
    if others:
        return f"{', '.join(others)} is not a cache of positions"
    if geometry is None:
        return "layers keep keys of different shapes"
    return "decode rows cannot be batched"


def _packable(model: Any, inner: Any, plain: bool) -> tuple[bool, str]:
    layers = packing.attentions(model)
    modules = {sys.modules.get(type(a).__module__) for a in layers}
    if not all(hasattr(m, "scaled_dot_product_attention") for m in modules):
        return False, "its attention does not call mlx-lm's scaled_dot_product_attention"
    if not packing.seam_installed(model):
        return False, "the packing seam is not installed (rank.mlx_patch)"
    if len(layers) != len(model.layers):
        return False, "not every layer is attention"
    if any(hasattr(a, "sinks") for a in layers):
        return False, "attention sinks"
    if not plain:
        return False, "a cache other than a plain KVCache"
    return _dry_run(model, inner)


def _dry_run(model: Any, inner: Any) -> tuple[bool, str]:
    """Build (never evaluate) a packed pass of two prompt chunks and two decode rows; it must go
    through the seam once a layer and give one hidden state a position."""
    decoding = []
    for n in (1, 2):
        cache = make_prompt_cache(model)
        inner(mx.zeros((1, n), dtype=mx.int32), cache=cache)
        decoding.append(cache)
    batch = [type(layer[0]).merge(list(layer)) for layer in zip(*decoding, strict=True)]
    chunks = [make_prompt_cache(model), make_prompt_cache(model)]
    layout = packing.RowLayout.of([2, 3], 2)
    caches = packing.pass_caches(chunks, layout, batch)
    try:
        out = inner(mx.zeros((1, 7), dtype=mx.int32), cache=caches)
    except Exception as exc:  # any failure of a foreign model's code on a packed row: it does not pack
        return False, f"its layers cannot run a packed row: {type(exc).__name__}: {exc}"
    if tuple(out.shape[:2]) != (1, 7):
        return False, f"a packed row gave hidden states of shape {tuple(out.shape)}"
    if any(c.attended != 1 for c in caches):
        return False, "its attention does not go through the packing seam"
    return True, ""
