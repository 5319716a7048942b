"""The decode batch's KV cache when rows may feed several tokens a step and keep fewer (speculation).

mlx-lm's `BatchKVCache` left-pads its rows so that they all end at one shared index: every row writes its
new positions there, and a row can only be rolled back together with all the others. A speculative step
feeds each row its pending token plus its drafts, and each row keeps as many as it accepted, so rows end
at different lengths after every step. Trimming them all to the shortest would leave the others' accepted
positions to be fed again (forever, next to a row that never drafts), and shifting rows to realign them
copies the whole cache every step.

Here rows are right-padded instead: row b's positions are [0, length_b), each row writes its new positions
at its own length (one scatter a layer), and a query at position p of row b sees keys 0..p. Rolling a row
back is setting its length: what lies beyond is never seen (the mask hides it) and the row's next tokens
overwrite it. Positions a row wrote for padding (a step's rows are as wide as its widest) are past its
length in the same way.

It speaks the cache interface mlx-lm's models and `rank.packing` use (`update_and_fetch`, `make_mask`,
`offset`, `merge`, `extend`, `filter`); the executor moves lengths on with `advance` after each pass and
rolls rows back with `set_length`. Only plain `KVCache` layers become ragged (rank.model_caps decides).
`QuantizedRaggedKVCache` is the same batch with keys and values stored as `mx.quantize` gives them, for
the rows `--kv-live-from` quantized (rank.livequant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

STEP = 256  # positions the buffer grows by, as mlx-lm's caches


def _capacity(n: int) -> int:
    return max(STEP, -(-n // STEP) * STEP)


class RaggedKVCache:
    """One layer's keys and values of the decode batch, (B, kv_heads, capacity, d), rows right-padded."""

    def __init__(
        self, lengths: Sequence[int], keys: mx.array | None = None, values: mx.array | None = None
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.keys, self.values = keys, values
        self.offset = mx.array(self.lengths, dtype=mx.int32)  # where each row's next position is (RoPE)

    # -- what the model and rank.packing call ----------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Write `keys`/`values` (B, kv_heads, W, d) at each row's length; return every row's keys up to
        the longest row's new end (what lies past a row's own end is masked by `make_mask`)."""
        width = keys.shape[2]
        end = max(self.lengths) + width
        keys, values = self._encode(keys), self._encode(values)
        self._reserve(end, keys, values)
        assert self.keys is not None and self.values is not None
        pos = self.offset[:, None, None, None] + mx.arange(width, dtype=mx.int32)[None, None, :, None]

        def put(buffer: mx.array, new: mx.array) -> mx.array:
            return mx.put_along_axis(buffer, mx.broadcast_to(pos, new.shape), new, axis=2)

        self.keys, self.values = _zip_each(put, self.keys, keys), _zip_each(put, self.values, values)
        return _each(lambda x: x[:, :, :end], self.keys), _each(lambda x: x[:, :, :end], self.values)

    def make_mask(self, n: int, return_array: bool = False, **_: Any) -> mx.array:
        """(B, 1, n, T) booleans: query j of row b (at position length_b + j) sees keys 0..length_b + j."""
        end = max(self.lengths) + n
        last = self.offset[:, None, None, None] + mx.arange(n, dtype=mx.int32)[None, None, :, None]
        return mx.arange(end, dtype=mx.int32)[None, None, None, :] <= last

    @property
    def state(self) -> tuple[Any, ...]:
        return self.keys, self.values, self.offset

    def is_trimmable(self) -> bool:
        return True

    # -- what the executor calls -------------------------------------------------------------------
    def advance(self, counts: Sequence[int]) -> None:
        """After a pass: row b keeps the first counts[b] positions it wrote (the rest were padding)."""
        self.lengths = [n + c for n, c in zip(self.lengths, counts, strict=True)]
        self.offset = mx.array(self.lengths, dtype=mx.int32)

    def set_length(self, row: int, length: int) -> None:
        """Roll row `row` back to `length` positions (drafts it did not accept)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"row {row}: length {length} is not within 0..{self.lengths[row]}")
        self.lengths[row] = length
        self.offset = mx.array(self.lengths, dtype=mx.int32)

    @classmethod
    def merge(cls, caches: Sequence[Any]) -> RaggedKVCache:
        """Rows from one-sequence caches (sequences that finished prefilling: mlx-lm's `KVCache`, or its
        `QuantizedKVCache` for `QuantizedRaggedKVCache`), right-padded."""
        lengths = [int(c.offset) for c in caches]
        if any(c.keys is None for c in caches):
            raise ValueError("a sequence without positions cannot join the decode batch")
        cap = _capacity(max(lengths))

        def joined(arrays: list[Any]) -> Any:
            def pad(x: mx.array, n: int) -> mx.array:
                return mx.pad(x[:, :, :n], [(0, 0), (0, 0), (0, cap - n), (0, 0)])

            rows = [_each(lambda x, n=n: pad(x, n), a) for a, n in zip(arrays, lengths, strict=True)]
            if isinstance(rows[0], tuple):
                return tuple(mx.concatenate([r[i] for r in rows], axis=0) for i in range(len(rows[0])))
            return mx.concatenate(rows, axis=0)

        return cls._like(caches[0], lengths, joined([c.keys for c in caches]), joined([c.values for c in caches]))

    @classmethod
    def _like(cls, model: Any, lengths: list[int], keys: Any, values: Any) -> RaggedKVCache:
        return cls(lengths, keys, values)

    def extend(self, other: RaggedKVCache) -> None:
        """Append `other`'s rows (both padded to the larger capacity). Rows always hold positions (a
        sequence joins the batch after its prompt), so both sides have buffers."""
        assert self.keys is not None and self.values is not None
        assert other.keys is not None and other.values is not None
        cap = max(_cap(self.keys), _cap(other.keys))

        def join(mine: mx.array, theirs: mx.array) -> mx.array:
            return mx.concatenate([_pad_to(mine, cap), _pad_to(theirs, cap)], axis=0)

        self.keys, self.values = _zip_each(join, self.keys, other.keys), _zip_each(join, self.values, other.values)
        self.lengths += other.lengths
        self.offset = mx.array(self.lengths, dtype=mx.int32)

    def filter(self, batch_indices: mx.array | Sequence[int]) -> None:
        """Keep (and order) rows `batch_indices`; the buffer shrinks to what the longest row left needs, so
        a long sequence that leaves does not keep every other row padded to its length."""
        idx = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        self.lengths = [self.lengths[i] for i in idx]  # type: ignore[index]
        self.offset = mx.array(self.lengths, dtype=mx.int32)
        if self.keys is None or self.values is None:
            return
        rows = mx.array(idx, dtype=mx.int32)
        cap = _capacity(max(self.lengths, default=0))
        keep = min(cap, _cap(self.keys))
        self.keys = _each(lambda x: x[rows][:, :, :keep], self.keys)
        self.values = _each(lambda x: x[rows][:, :, :keep], self.values)

    def extract(self, row: int) -> Any:
        """Row `row` as a one-sequence `KVCache` (mlx-lm's)."""
        cache = self._single()
        n = self.lengths[row]
        if self.keys is not None and self.values is not None:
            cache.keys = _each(lambda x: mx.contiguous(x[row : row + 1, :, :n]), self.keys)
            cache.values = _each(lambda x: mx.contiguous(x[row : row + 1, :, :n]), self.values)
            cache.offset = n
        return cache

    def _single(self) -> Any:
        from mlx_lm.models.cache import KVCache

        return KVCache()

    def _encode(self, x: mx.array) -> Any:
        """New positions as the buffer stores them."""
        return x

    # -- internals -----------------------------------------------------------------------------------
    def _reserve(self, end: int, keys: Any, values: Any) -> None:
        """Room for `end` positions in every row (keys/values, as `_encode` gives them: the shapes and
        dtypes)."""
        b = len(self.lengths)
        if self.keys is None or self.values is None:
            cap = _capacity(end)

            def zeros(x: mx.array) -> mx.array:
                return mx.zeros((b, x.shape[1], cap, x.shape[3]), x.dtype)

            self.keys, self.values = _each(zeros, keys), _each(zeros, values)
        elif end > _cap(self.keys):
            cap = _capacity(end)
            self.keys = _each(lambda x: _pad_to(x, cap), self.keys)
            self.values = _each(lambda x: _pad_to(x, cap), self.values)


class QuantizedRaggedKVCache(RaggedKVCache):
    """`RaggedKVCache` storing keys and values as `mx.quantize` gives them, (packed, scales, biases), in
    groups along the head dimension, as mlx-lm's `QuantizedKVCache` does for one sequence: new positions
    are quantized on write, and `bits`/`group_size` make mlx-lm's attention function take its quantized
    path (`quantized_scaled_dot_product_attention`), whose boolean mask hides each row's padding."""

    def __init__(
        self,
        lengths: Sequence[int],
        keys: Any = None,
        values: Any = None,
        group_size: int = 64,
        bits: int = 8,
    ) -> None:
        super().__init__(lengths, keys, values)
        self.group_size, self.bits = group_size, bits

    @classmethod
    def _like(cls, model: Any, lengths: list[int], keys: Any, values: Any) -> RaggedKVCache:
        return cls(lengths, keys, values, model.group_size, model.bits)

    def _single(self) -> Any:
        from mlx_lm.models.cache import QuantizedKVCache

        return QuantizedKVCache(self.group_size, self.bits)

    def _encode(self, x: mx.array) -> Any:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))


def _each(f: Callable[[mx.array], mx.array], x: Any) -> Any:
    """`f` of an array, or of each part of a quantized one (packed, scales, biases)."""
    return tuple(f(p) for p in x) if isinstance(x, (tuple, list)) else f(x)


def _zip_each(f: Callable[[mx.array, mx.array], mx.array], x: Any, y: Any) -> Any:
    return tuple(f(a, b) for a, b in zip(x, y, strict=True)) if isinstance(x, (tuple, list)) else f(x, y)


def _cap(x: Any) -> int:
    return int((x[0] if isinstance(x, (tuple, list)) else x).shape[2])


def _pad_to(x: mx.array, cap: int) -> mx.array:
    return x if x.shape[2] >= cap else mx.pad(x, [(0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)])
