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
"""

from __future__ import annotations

from collections.abc import Sequence
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
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write `keys`/`values` (B, kv_heads, W, d) at each row's length; return every row's keys up to
        the longest row's new end (what lies past a row's own end is masked by `make_mask`)."""
        width = keys.shape[2]
        end = max(self.lengths) + width
        self._reserve(end, keys, values)
        assert self.keys is not None and self.values is not None
        pos = self.offset[:, None, None, None] + mx.arange(width, dtype=mx.int32)[None, None, :, None]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(pos, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(pos, values.shape), values, axis=2)
        return self.keys[:, :, :end], self.values[:, :, :end]

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
        """Rows from one-sequence `KVCache`s (sequences that finished prefilling), right-padded."""
        lengths = [int(c.offset) for c in caches]
        if any(c.keys is None for c in caches):
            raise ValueError("a sequence without positions cannot join the decode batch")
        cap = _capacity(max(lengths))
        parts_k, parts_v = [], []
        for c, n in zip(caches, lengths, strict=True):
            pad = [(0, 0), (0, 0), (0, cap - n), (0, 0)]
            parts_k.append(mx.pad(c.keys[:, :, :n], pad))
            parts_v.append(mx.pad(c.values[:, :, :n], pad))
        return cls(lengths, mx.concatenate(parts_k, axis=0), mx.concatenate(parts_v, axis=0))

    def extend(self, other: RaggedKVCache) -> None:
        """Append `other`'s rows (both padded to the larger capacity). Rows always hold positions (a
        sequence joins the batch after its prompt), so both sides have buffers."""
        assert self.keys is not None and self.values is not None
        assert other.keys is not None and other.values is not None
        cap = max(self.keys.shape[2], other.keys.shape[2])
        ks = [_pad_to(self.keys, cap), _pad_to(other.keys, cap)]
        vs = [_pad_to(self.values, cap), _pad_to(other.values, cap)]
        self.keys, self.values = mx.concatenate(ks, axis=0), mx.concatenate(vs, axis=0)
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
        self.keys = self.keys[rows][:, :, : min(cap, self.keys.shape[2])]
        self.values = self.values[rows][:, :, : min(cap, self.values.shape[2])]

    def extract(self, row: int) -> Any:
        """Row `row` as a one-sequence `KVCache` (mlx-lm's)."""
        from mlx_lm.models.cache import KVCache

        cache = KVCache()
        n = self.lengths[row]
        if self.keys is not None and self.values is not None:
            cache.keys = mx.contiguous(self.keys[row : row + 1, :, :n])
            cache.values = mx.contiguous(self.values[row : row + 1, :, :n])
            cache.offset = n
        return cache

    # -- internals -----------------------------------------------------------------------------------
    def _reserve(self, end: int, keys: mx.array, values: mx.array) -> None:
        """Room for `end` positions in every row (keys/values give the shapes and dtype)."""
        b = len(self.lengths)
        if self.keys is None or self.values is None:
            cap = _capacity(end)
            self.keys = mx.zeros((b, keys.shape[1], cap, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((b, values.shape[1], cap, values.shape[3]), values.dtype)
        elif end > self.keys.shape[2]:
            cap = _capacity(end)
            self.keys, self.values = _pad_to(self.keys, cap), _pad_to(self.values, cap)


def _pad_to(x: mx.array, cap: int) -> mx.array:
    return x if x.shape[2] >= cap else mx.pad(x, [(0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)])
