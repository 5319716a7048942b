"""The block prefix cache index (rank 0): which KV blocks exist, who uses them, what to evict.

A block is `block_tokens` consecutive prompt tokens. Its key is a chain hash: BLAKE2b-128 over the parent
block's hash and the block's token ids, rooted in the model fingerprint and the tensor-parallel layout,
so equal keys mean equal prefixes of equal models sharded alike. 128 bits make an accidental collision
about as likely as a hardware fault (~2^-64 after 2^32 blocks), and a hit is still confirmed by
comparing the stored token ids, so a collision can cost a miss, never wrong output.

The tensors live on every rank (each its own heads' slice); this index only decides. Capacity is in
blocks (the RAM budget divided by a block's bytes on one rank); running out is a return value. Blocks
in use by a running sequence are referenced and never evicted; the others are evicted least recently
used first. A block stored by this step's plan is `pending` until the step has run: nobody may load it
before it exists.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockHash = bytes


def root_hash(fingerprint: str, layout: str) -> BlockHash:
    return hashlib.blake2b(f"{fingerprint}|{layout}".encode(), digest_size=16).digest()


def chain_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def block_hashes(root: BlockHash, tokens: Sequence[int], block_tokens: int) -> list[BlockHash]:
    """Hashes of every full block of `tokens`, in order."""
    out, parent = [], root
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = chain_hash(parent, tokens[start : start + block_tokens])
        out.append(parent)
    return out


@dataclass(slots=True)
class Block:
    block_id: int
    hash: BlockHash
    tokens: tuple[int, ...]
    refs: int = 0
    pending: bool = True


@dataclass(slots=True)
class TierStats:
    name: str
    capacity_blocks: int
    block_bytes: int
    blocks: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    stored: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "tier": self.name,
            "blocks": self.blocks,
            "capacity_blocks": self.capacity_blocks,
            "bytes_used": self.blocks * self.block_bytes,
            "capacity_bytes": self.capacity_blocks * self.block_bytes,
            "block_bytes": self.block_bytes,
            "query_tokens": self.query_tokens,
            "hit_tokens": self.hit_tokens,
            "miss_tokens": self.query_tokens - self.hit_tokens,
            "hit_rate": round(self.hit_rate, 4),
            "evictions": self.evictions,
            "stored": self.stored,
        }


@dataclass(slots=True)
class BlockIndex:
    block_tokens: int
    capacity_blocks: int
    block_bytes: int
    _by_hash: dict[BlockHash, Block] = field(default_factory=dict)
    _lru: OrderedDict[int, Block] = field(default_factory=OrderedDict)  # unreferenced, oldest first
    _next_id: int = 1
    stats: TierStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = TierStats("ram", self.capacity_blocks, self.block_bytes)

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, h: BlockHash, tokens: Sequence[int]) -> Block | None:
        block = self._by_hash.get(h)
        if block is None or block.pending or block.tokens != tuple(tokens):
            return None
        return block

    def match(self, tokens: Sequence[int], hashes: Sequence[BlockHash]) -> list[Block]:
        """Longest run of ready cached blocks at the start of `tokens`, leaving at least one token to
        compute (its logits start the answer). Counts the query in the statistics."""
        usable = (len(tokens) - 1) // self.block_tokens
        found: list[Block] = []
        for i, h in enumerate(hashes[:usable]):
            block = self.lookup(h, tokens[i * self.block_tokens : (i + 1) * self.block_tokens])
            if block is None:
                break
            found.append(block)
        self.stats.query_tokens += len(tokens)
        self.stats.hit_tokens += len(found) * self.block_tokens
        return found

    def ref(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            if b.refs == 0:
                self._lru.pop(b.block_id, None)
            b.refs += 1

    def unref(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            b.refs -= 1
            if b.refs == 0 and b.hash in self._by_hash:
                self._lru[b.block_id] = b

    def insert(self, h: BlockHash, tokens: Sequence[int], evicted: list[int]) -> Block | None:
        """A new pending block, referenced once; None when full of referenced blocks. Ids of blocks
        evicted to make room are appended to `evicted` (the ranks must drop them)."""
        if h in self._by_hash:
            return None
        if len(self._by_hash) >= self.capacity_blocks:
            if not self._lru:
                return None
            _, old = self._lru.popitem(last=False)
            del self._by_hash[old.hash]
            evicted.append(old.block_id)
            self.stats.evictions += 1
        block = Block(self._next_id, h, tuple(tokens), refs=1)
        self._next_id += 1
        self._by_hash[h] = block
        self.stats.stored += 1
        self.stats.blocks = len(self._by_hash)
        return block

    def remove(self, block: Block) -> None:
        """Forget a block that turned out unusable (a failed SSD read), whatever its references."""
        if self._by_hash.get(block.hash) is block:
            del self._by_hash[block.hash]
        self._lru.pop(block.block_id, None)
        block.refs = 0
        self.stats.blocks = len(self._by_hash)

    def ready(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            b.pending = False

    def clear(self) -> list[int]:
        """Drop every unreferenced block; their ids, for the ranks."""
        ids = list(self._lru)
        for b in self._lru.values():
            del self._by_hash[b.hash]
        self._lru.clear()
        self.stats.evictions += len(ids)
        self.stats.blocks = len(self._by_hash)
        return ids
