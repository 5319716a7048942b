"""How prefix-cache blocks are stored on this rank: as the model computed them (`kv16`), or quantized with
`mx.quantize` (`q8g64`: 8 bits, groups of 64), in RAM and on the SSD tier alike.

A block is a pair of arrays of shape (layers, heads, tokens, dim) (rank.model_caps.BlockGeometry.pack).
Quantization groups run along the last axis, the head dimension: each (layer, head, position) row is
quantized on its own, so a block quantizes to the same numbers whatever slice of the heads a rank holds
(any tensor-parallel layout), and a block's positions quantize the same whether they are stored alone or
next to others (concatenating stored blocks along the token axis and dequantizing once gives exactly the
blocks dequantized one by one).

8 bits with groups of 64 cost 64 + 4 bytes per 64 bf16 values (a scale and a bias in the model's dtype):
1.88x the blocks of bf16 per byte, 3.56x of fp32. The format's name joins the prefix cache's root hash and
the SSD folder's name, so a block of one format is never read as another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

BITS = (4, 8, 16)
GROUP_SIZES = (32, 64, 128)  # what mx.quantize takes


@dataclass(frozen=True, slots=True)
class KvFormat:
    """`bits` 16: blocks kept in the model's dtype, as computed; 8 or 4: `mx.quantize` in groups of
    `group_size` along the head dimension."""

    bits: int = 8
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"kv bits must be one of {BITS}, not {self.bits}")
        if self.bits != 16 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"kv group size must be one of {GROUP_SIZES}, not {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def name(self) -> str:
        """What names this format in root hashes, SSD folders and block file headers."""
        return "kv16" if not self.quantized else f"q{self.bits}g{self.group_size}"

    @property
    def parts(self) -> int:
        """Arrays a stored block has: keys and values, or each as (packed, scales, biases)."""
        return 6 if self.quantized else 2

    def fit(self, dim: int) -> KvFormat:
        """The format for blocks whose rows have `dim` values: the group size shrinks to one that divides
        `dim` (a head dimension of 80 takes groups of 32 where 64 was asked); when none does, blocks are
        kept unquantized. Every rank decides the same, from the model."""
        if not self.quantized or dim % self.group_size == 0:
            return self
        for g in sorted(GROUP_SIZES, reverse=True):
            if g < self.group_size and dim % g == 0:
                return KvFormat(self.bits, g)
        return KvFormat(16, self.group_size)

    def block_bytes(self, layers: int, heads: int, tokens: int, dim: int, dtype_size: int) -> int:
        """Bytes of one stored block (both arrays of the pair, each of `dim` values a row)."""
        values = layers * heads * tokens * dim
        if not self.quantized:
            return 2 * values * dtype_size
        return 2 * (values * self.bits // 8 + 2 * (values // self.group_size) * dtype_size)

    def shapes(
        self, layers: int, heads: int, tokens: int, dim: int, dtype: mx.Dtype
    ) -> list[tuple[str, tuple]]:
        """(dtype name, shape) of each stored part, in order: what a block read from disk must be."""
        rows = (layers, heads, tokens)
        dt = str(dtype).split(".")[-1]
        if not self.quantized:
            return [(dt, (*rows, dim))] * 2
        one = [("uint32", (*rows, dim * self.bits // 32)), (dt, (*rows, dim // self.group_size))]
        one.append(one[1])
        return one + one

    def encode(self, first: mx.array, second: mx.array) -> tuple[mx.array, ...]:
        """A block's pair as stored (not evaluated: the caller evaluates a step's blocks at once)."""
        if not self.quantized:
            return first, second
        out: list[mx.array] = []
        for x in (first, second):
            packed, scales, biases = mx.quantize(x, group_size=self.group_size, bits=self.bits)
            out += (packed, scales, biases)
        return tuple(out)

    def join(self, blocks: list[tuple[mx.array, ...]]) -> list[mx.array]:
        """Consecutive stored blocks' parts, each concatenated along the token axis (still as stored)."""
        return [
            mx.concatenate([b[i] for b in blocks], axis=2) if len(blocks) > 1 else blocks[0][i]
            for i in range(self.parts)
        ]

    def decode(self, blocks: list[tuple[mx.array, ...]]) -> tuple[mx.array, mx.array]:
        """Consecutive stored blocks as one pair of arrays in the model's dtype (concatenated along the
        token axis, dequantized once)."""
        joined = self.join(blocks)
        if not self.quantized:
            return joined[0], joined[1]
        g, b = self.group_size, self.bits
        first = mx.dequantize(joined[0], joined[1], joined[2], group_size=g, bits=b)
        second = mx.dequantize(joined[3], joined[4], joined[5], group_size=g, bits=b)
        return first, second

    def round_trip(self, first: mx.array, second: mx.array) -> tuple[mx.array, mx.array]:
        """What a block's pair reads back as (the live K/V a hit would load)."""
        return self.decode([self.encode(first, second)])


def parse_format(bits: int, group_size: int) -> KvFormat:
    """`--kv-bits` / `--kv-group-size`; ValueError says what is allowed."""
    return KvFormat(int(bits), int(group_size))


def device_memory() -> int:
    """The memory this host's ranks share: Metal's recommended working set on a Mac GPU, else the
    machine's physical memory (psutil)."""
    info: dict = {}
    try:
        info = dict(mx.device_info())
    except (AttributeError, RuntimeError):
        pass
    metal = info.get("max_recommended_working_set_size")
    if isinstance(metal, int) and metal > 0:
        return metal
    import psutil

    return int(psutil.virtual_memory().total)


def weights_bytes(model: Any) -> int:
    """Bytes of this rank's shard of the weights."""
    from mlx.utils import tree_flatten

    leaves: Any = tree_flatten(model.parameters())
    return sum(int(leaf.nbytes) for _, leaf in leaves)


def kv_memory(args: Any, executor: Any, ram_tier_bytes: int, context_length: int) -> Any:
    """Rank 0's `cluster.memory.KvMemory` for `--kv-budget` (GiB per rank; default: `default_budget`), or
    None when the model's caches have no single shape to account for (then nothing is enforced)."""
    import logging

    from cluster.memory import GIB, KvCost, KvMemory, default_budget
    from rank.env import local_ranks

    log = logging.getLogger("orchard")
    geometry = executor.caps.geometry
    if geometry is None:
        log.info("KV memory admission off: this model's layers keep caches of different shapes")
        return None
    live = getattr(executor, "live", None)  # --kv-live-from (rank.livequant): quantized past a length
    if live is not None:
        cost = KvCost(geometry.bytes(1), live_from=live.start, quant_token_bytes=geometry.stored_bytes(executor.kv, 1))
    else:
        cost = KvCost(geometry.bytes(1))
    if getattr(args, "kv_budget", None):
        budget, how = int(args.kv_budget * GIB), "--kv-budget"
    else:
        budget, how = default_budget(
            device_memory(), weights_bytes(executor.model), ram_tier_bytes, local_ranks()
        )
    memory = KvMemory(cost, budget, context_length)
    log.info(
        "KV budget %.2f GiB per rank (%s): %d positions of %d bytes; a lone request fits up to %d",
        budget / GIB,
        how,
        budget // cost.token_bytes,
        cost.token_bytes,
        min(context_length, memory.room(0)),
    )
    return memory
