"""Live quantized KV (`--kv-live-from N`): a sequence's running cache is quantized once it holds N positions.

As mlx-lm's `generate` does with `kv_bits` and `quantized_kv_start` (`maybe_quantize_kv_cache`): before a
pass, a sequence whose cache holds N positions or more has every layer's cache quantized (mlx-lm's
`KVCache.to_quantized`), and from then on its new positions are quantized on write and its attention is
mlx-lm's quantized one. The format is the prefix blocks' (`--kv-bits`, `--kv-group-size`: groups along the
head dimension, so the numbers are the same under any tensor-parallel layout). Where MLX runs on a CPU the
seam dequantizes a quantized cache's keys and values and attends them as plain ones
(`rank.packing.dequantizing`: MLX's quantized matmuls are far slower there than BLAS): the same values,
summed in another order (the logprobs match mlx-lm's quantized run within 1e-5, tests/test_livequant.py).

Whether a position is computed against quantized keys depends only on the sequence: position p attends
to quantized keys and values exactly when p >= N. Rank 0 keeps it so: a prompt chunk that would cross N
ends at N (the next one starts quantized), and a speculative row below N verifies no draft past N.

The decode batch holds both kinds of rows: `LiveBatch` is one layer's batch as two ragged caches
(rank.ragged), the rows below N in the model's dtype and the rows past it quantized, each padded only to
its own longest row; it splits each pass's rows between them and attends each group on its own (the
packed-step seam, rank.packing, hands it the attention). Row order is the executor's (the plan's); each
group keeps its rows in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from rank.packing import Attend
from rank.ragged import QuantizedRaggedKVCache, RaggedKVCache


@dataclass(frozen=True, slots=True)
class LiveQuant:
    """Quantize a sequence's cache once it holds `start` positions, to `bits` in groups of `group_size`."""

    start: int
    bits: int = 8
    group_size: int = 64

    def due(self, positions: int) -> bool:
        return positions >= self.start

    def quantize(self, caches: list[Any]) -> list[Any]:
        """A sequence's layer caches (mlx-lm's `KVCache`) quantized; ones already quantized stay."""
        return [
            c if hasattr(c, "bits") else c.to_quantized(group_size=self.group_size, bits=self.bits)
            for c in caches
        ]


def quantized(caches: Sequence[Any]) -> bool:
    return bool(caches) and hasattr(caches[0], "bits")


class LiveBatch:
    """One layer's decode batch: `plain` holds the rows in the model's dtype, `quant` the quantized ones
    (either may be None when it has no rows); `flags[i]` says which holds row i."""

    attends_itself = True  # rank.packing's seam hands this cache the attention

    def __init__(self, plain: RaggedKVCache | None, quant: QuantizedRaggedKVCache | None, flags: list[bool]):
        self.plain, self.quant, self.flags = plain, quant, flags
        self._index()

    # -- what the model, rank.packing and the executor read --------------------------------------
    @property
    def lengths(self) -> list[int]:
        plain = iter(self.plain.lengths if self.plain is not None else ())
        quant = iter(self.quant.lengths if self.quant is not None else ())
        return [next(quant) if q else next(plain) for q in self.flags]

    def make_mask(self, *args: Any, **kwargs: Any) -> None:
        return None  # each group's mask is made in `attend`

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[list[Any], list[Any]]:
        """Each group writes its rows' new positions; returns [plain's, quant's] (the groups with rows)."""
        fetched = [
            g.update_and_fetch(_take(keys, idx), _take(values, idx))
            for (g, _), idx in zip(self._rows, self._gathers, strict=True)
        ]
        return [k for k, _ in fetched], [v for _, v in fetched]

    def attend(self, queries: mx.array, keys: list[Any], values: list[Any], scale: float, attend: Attend) -> mx.array:
        """Each group's queries against its own keys under its own mask (mlx-lm's attention takes the
        quantized path for the quantized group's cache); rows back in the batch's order."""
        width = queries.shape[2]
        parts = [
            attend(_take(queries, idx), k, v, g, scale, g.make_mask(width, return_array=True))
            for (g, _), idx, k, v in zip(self._rows, self._gathers, keys, values, strict=True)
        ]
        if len(parts) == 1:
            return parts[0]
        return mx.concatenate(parts, axis=0)[self._inverse]

    # -- what the executor calls -------------------------------------------------------------------
    def advance(self, counts: Sequence[int]) -> None:
        for g, rows in self._rows:
            g.advance([counts[i] for i in rows] if rows is not None else counts)

    def set_length(self, row: int, length: int) -> None:
        g, local = self._local(row)
        g.set_length(local, length)

    def filter(self, batch_indices: mx.array | Sequence[int]) -> None:
        """Keep (and order) rows `batch_indices` (of the batch's order)."""
        idx = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        local = self._locals()
        plain = [local[i] for i in idx if not self.flags[i]]
        quant = [local[i] for i in idx if self.flags[i]]
        self.flags = [self.flags[i] for i in idx]
        self.plain = _filtered(self.plain, plain)
        self.quant = _filtered(self.quant, quant)
        self._index()

    def extend(self, other: LiveBatch) -> None:
        """Append `other`'s rows after this batch's."""
        self.plain = _joined(self.plain, other.plain)
        self.quant = _joined(self.quant, other.quant)
        self.flags = self.flags + other.flags
        self._index()

    @classmethod
    def merge(cls, caches: Sequence[Any]) -> LiveBatch:
        """Rows from one-sequence caches, mlx-lm's `KVCache` or `QuantizedKVCache`, in order."""
        flags = [hasattr(c, "bits") for c in caches]
        plain = [c for c, q in zip(caches, flags, strict=True) if not q]
        quant = [c for c, q in zip(caches, flags, strict=True) if q]
        return cls(
            RaggedKVCache.merge(plain) if plain else None,
            QuantizedRaggedKVCache.merge(quant) if quant else None,  # type: ignore[arg-type]
            flags,
        )

    def quantize_rows(self, live: LiveQuant) -> int:
        """Rows of the plain group that hold `live.start` positions or more move to the quantized group
        (each quantized as mlx-lm's `to_quantized` does); how many moved."""
        if self.plain is None:
            return 0
        lengths = self.lengths
        due = [i for i, q in enumerate(self.flags) if not q and live.due(lengths[i])]
        if not due:
            return 0
        local = self._locals()
        moved = [live.quantize([self.plain.extract(local[i])])[0] for i in due]
        newcomers = QuantizedRaggedKVCache.merge(moved)
        stay = [local[i] for i, q in enumerate(self.flags) if not q and i not in set(due)]
        self.plain = _filtered(self.plain, stay)
        # the quantized group's rows back in batch order: its old rows, then the newcomers, interleaved
        old_quant = [i for i, q in enumerate(self.flags) if q]
        for i in due:
            self.flags[i] = True
        joined = _joined(self.quant, newcomers)
        assert joined is not None
        arrival = old_quant + due  # batch row of each of `joined`'s rows, in its order
        at = {row: j for j, row in enumerate(arrival)}
        order = [at[i] for i, q in enumerate(self.flags) if q]
        if order != list(range(len(order))):
            joined.filter(order)
        self.quant = joined  # type: ignore[assignment]
        self._index()
        return len(due)

    @property
    def offset(self) -> mx.array:
        return mx.array(self.lengths, dtype=mx.int32)

    @property
    def state(self) -> tuple[Any, ...]:
        return tuple(g.state for g, _ in self._rows)

    def is_trimmable(self) -> bool:
        return True

    # -- internals -----------------------------------------------------------------------------------
    def _index(self) -> None:
        """Each group's batch rows (None: the group holds every row, no gather needed)."""
        plain = [i for i, q in enumerate(self.flags) if not q]
        quant = [i for i, q in enumerate(self.flags) if q]
        self._rows: list[tuple[Any, list[int] | None]] = []
        self._gathers: list[mx.array | None] = []
        for g, rows in ((self.plain, plain), (self.quant, quant)):
            if rows:
                assert g is not None and len(g.lengths) == len(rows)
                whole = len(rows) == len(self.flags)
                self._rows.append((g, None if whole else rows))
                self._gathers.append(None if whole else mx.array(rows, dtype=mx.int32))
        order = plain + quant
        self._inverse = mx.array(sorted(range(len(order)), key=order.__getitem__), dtype=mx.int32)

    def _locals(self) -> list[int]:
        """Each batch row's index within its group."""
        seen = [0, 0]
        out = []
        for q in self.flags:
            out.append(seen[q])
            seen[q] += 1
        return out

    def _local(self, row: int) -> tuple[Any, int]:
        g = self.quant if self.flags[row] else self.plain
        assert g is not None
        return g, self._locals()[row]


def _take(x: mx.array, idx: mx.array | None) -> mx.array:
    return x if idx is None else x[idx]


def _filtered(group: Any, rows: list[int]) -> Any:
    if group is None or not rows:
        return None
    if rows != list(range(len(group.lengths))):
        group.filter(rows)
    return group


def _joined(mine: Any, theirs: Any) -> Any:
    if mine is None:
        return theirs
    if theirs is not None:
        mine.extend(theirs)
    return mine
