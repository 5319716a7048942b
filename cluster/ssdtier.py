"""Rank 0's coordination of the SSD tier: what to write, what to read back, what to prune.

Write-through: every block the RAM tier stores is also written by every rank (its own slice), off the
step loop. A block counts as on disk only when every rank acknowledged its write (`Manifest`). On a RAM
miss whose prefix continues on disk, fresh RAM blocks are allocated and every rank reads its slice into
them in one plan; only if all ranks succeeded do the blocks become usable (a rank's damaged or missing
file drops the block everywhere). A write error on any rank (disk full, I/O error) disables the tier
with a warning; serving goes on from RAM. A save a rank dropped (its disk too far behind) only forgets
that block: it was never listed, and the ranks that wrote their slice delete it.

Every plan carries at most `max_per_plan` loads and deletes (clearing a tier of millions of blocks must
not make one plan over the bus limit); the rest go in the plans after it. Saves are not deferred (a
block may leave RAM before a later plan): they are bounded by the step's prefill budget instead.
"""

from __future__ import annotations

import functools
import itertools
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cluster.kvindex import Block, BlockHash, BlockIndex, TierStats
from cluster.manifest import Manifest

log = logging.getLogger("orchard.kv")

_R = TypeVar("_R")
MAX_PER_PLAN = 4096
ENTRY_WIRE_BYTES = 32  # one load, save or delete in an encoded plan, at most: [block id, 16-byte hash]


def plan_entries(max_message_bytes: int) -> int:
    """Loads and deletes per plan so that the SSD lists of a plan (saves included, as many) take at most
    a quarter of the bus limit, and never more than `MAX_PER_PLAN`."""
    return max(1, min(MAX_PER_PLAN, max_message_bytes // 4 // (3 * ENTRY_WIRE_BYTES)))


def _manifest_errors_disable(default: Any) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """The manifest lives on the tier's disk: when it cannot be written (disk full, I/O error), the tier
    is disabled like after a failed block write, and serving goes on from RAM. Without this a full disk
    surfaced as an engine failure in the step loop."""

    def wrap(method: Callable[..., _R]) -> Callable[..., _R]:
        @functools.wraps(method)
        def guarded(self: SsdTier, *args: Any, **kwargs: Any) -> _R:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                if self.enabled:
                    self.disable(f"its manifest failed: {exc} (disk full or I/O error)")
                return default  # type: ignore[no-any-return]

        return guarded

    return wrap


class SsdTier:
    MAX_OPS_PER_PLAN = MAX_PER_PLAN  # loads and deletes per plan, each, unless the leader sets less

    def __init__(
        self,
        manifest: Manifest,
        index: BlockIndex,
        max_bytes: int,
        ttl: float | None = None,
        max_per_plan: int = MAX_PER_PLAN,
    ) -> None:
        self.manifest = manifest
        self.index = index
        self.block_bytes = index.block_bytes
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.enabled = True
        self.disabled_reason = ""
        self.stats = TierStats("ssd", max(1, max_bytes // self.block_bytes), self.block_bytes)
        self.stats.blocks = manifest.persisted_count()
        self.corrupt = 0
        self.dropped_saves = 0  # blocks not persisted because some rank's writer was too far behind
        self.max_per_plan = max(1, max_per_plan)
        self.io: Any = None  # rank 0's file counters (rank.ssd.SsdCounters): bytes and time of reads/writes
        self._save: list[tuple[int, BlockHash]] = []
        self._load: list[tuple[int, BlockHash]] = []
        self._delete: dict[BlockHash, None] = {}  # ordered; a block saved again leaves it
        self._loading: dict[int, Block] = {}  # read from disk, not ready yet (sent or still to send)
        self._in_flight: list[int] = []  # block ids of the loads the last plan carried

    # -- writing ---------------------------------------------------------------------------------
    @_manifest_errors_disable(None)
    def saved_in_ram(self, block: Block) -> None:
        """A new RAM block: write it to every rank's disk unless it is there already."""
        if not self.enabled or self.manifest.known(block.hash):
            return
        victims = self.manifest.victims(self.max_bytes, self.ttl, incoming=self.block_bytes)
        if victims:
            self.stats.evictions += self.manifest.delete(victims)
            self._delete.update(dict.fromkeys(victims))
        if self.manifest.usage()[1] + self.block_bytes > self.max_bytes:
            return  # the rest is still being written: this block is not kept on disk
        self.manifest.add_pending(block.hash, block.tokens, self.block_bytes)
        self._delete.pop(block.hash, None)  # a delete still to send would remove the new file
        self._save.append((block.block_id, block.hash))
        self.stats.stored += 1

    @_manifest_errors_disable(None)
    def write_results(
        self, rank: int, results: Sequence[tuple[BlockHash, bool]], dropped: Sequence[BlockHash] = ()
    ) -> None:
        """A rank's finished writes, and the saves it `dropped` (its writer queue was full)."""
        for h, ok in results:
            if ok:
                self.manifest.ack(h, rank)
            elif self.enabled:
                self.disable(f"rank {rank} could not write a block (disk full or I/O error)")
        if dropped:
            forgotten = self.manifest.forget_pending(dropped)
            self.dropped_saves += len(forgotten)
            self._delete.update(dict.fromkeys(forgotten))  # ranks that wrote their slice remove it
        self.stats.blocks = self.manifest.persisted_count()

    def disable(self, reason: str) -> None:
        self.enabled = False
        self.disabled_reason = reason
        log.warning("SSD tier disabled: %s; serving continues from RAM", reason)

    # -- reading ---------------------------------------------------------------------------------
    def loading(self, h: BlockHash) -> bool:
        return any(b.hash == h for b in self._loading.values())

    @_manifest_errors_disable(False)
    def fetch(
        self, tokens: Sequence[int], hashes: Sequence[BlockHash], first: int, evicted: list[int]
    ) -> bool:
        """Queue reads of the persisted blocks that continue a prefix at block `first`; True if any."""
        if not self.enabled:
            return False
        bt = self.index.block_tokens
        usable = (len(tokens) - 1) // bt
        on_disk: list[tuple[BlockHash, tuple[int, ...]]] = []
        for i in range(first, usable):  # every manifest read first: a failing one leaves RAM untouched
            chunk = tuple(tokens[i * bt : (i + 1) * bt])
            if self.manifest.tokens(hashes[i]) != chunk:
                break
            on_disk.append((hashes[i], chunk))
        found: list[Block] = []
        for h, chunk in on_disk:
            block = self.index.insert(h, chunk, evicted)
            if block is None:
                break  # RAM full of blocks in use
            found.append(block)
        self.stats.query_tokens += (usable - first) * bt
        for block in found:
            self._loading[block.block_id] = block
            self._load.append((block.block_id, block.hash))
        if found:
            self._touch([b.hash for b in found])
        return bool(found)

    @_manifest_errors_disable(None)
    def _touch(self, hashes: list[BlockHash]) -> None:
        self.manifest.touch(hashes)

    def load_results(self, failed: set[int], evicted: list[int]) -> None:
        """Every rank ran the last plan's reads: usable blocks become ready; a block any rank failed goes
        everywhere. Reads still to send stay loading."""
        in_flight, self._in_flight = self._in_flight, []
        for block_id in in_flight:
            block = self._loading.pop(block_id, None)
            if block is None:
                continue
            if block_id in failed:
                self.corrupt += 1
                self.index.remove(block)
                evicted.append(block_id)
                self._forget(block.hash)
                self._delete[block.hash] = None
                continue
            self.index.ready([block])
            self.index.unref([block])
            self.stats.hit_tokens += self.index.block_tokens
        self._count()

    @_manifest_errors_disable(None)
    def _forget(self, h: BlockHash) -> None:
        self.manifest.delete([h])

    @_manifest_errors_disable(None)
    def _count(self) -> None:
        self.stats.blocks = self.manifest.persisted_count()

    def forget_on_ranks(self, hashes: set[BlockHash]) -> None:
        """Blocks some rank lacks: every rank deletes its copy with the next plans."""
        self._delete.update(dict.fromkeys(hashes))

    # -- the plan --------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self._save or self._load or self._delete)

    def take(
        self,
    ) -> tuple[tuple[tuple[int, BlockHash], ...], tuple[tuple[int, BlockHash], ...], tuple[BlockHash, ...]]:
        """The next plan's (loads, saves, deletes): at most `max_per_plan` loads and deletes, the rest
        left for the plans after it."""
        n = self.max_per_plan
        load, self._load = tuple(self._load[:n]), self._load[n:]
        self._in_flight.extend(block_id for block_id, _ in load)
        save, self._save = tuple(self._save), []
        delete = tuple(itertools.islice(self._delete, n))
        for h in delete:
            del self._delete[h]
        return load, save, delete

    @_manifest_errors_disable(0)
    def clear(self) -> int:
        """Forget every block, pending writes too (a write that lands later is an orphan file, removed at
        the next start-up)."""
        hashes = self.manifest.all_hashes()
        self.stats.evictions += self.manifest.delete(hashes)
        self._delete.update(dict.fromkeys(hashes))
        self.stats.blocks = 0
        return len(hashes)

    def to_json(self) -> dict[str, object]:
        out = self.stats.to_json()
        out["enabled"] = self.enabled
        out["disabled_reason"] = self.disabled_reason
        out["corrupt_dropped"] = self.corrupt
        io = self.io
        if io is not None:
            out["rank0_io"] = {
                "write_bytes": io.write_bytes,
                "read_bytes": io.read_bytes,
                "writes": io.writes,
                "reads": io.reads,
                "write_ms_avg": round(io.write_seconds / io.writes * 1000, 2) if io.writes else 0.0,
                "read_ms_avg": round(io.read_seconds / io.reads * 1000, 2) if io.reads else 0.0,
                "corrupt_found": io.corrupt,
                "errors": io.errors,
            }
        return out
