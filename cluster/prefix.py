"""Prefix caching as the scheduler uses it: what a new sequence can load, when it should wait for a
sequence already computing the same prefix, and which of its prompt blocks to store.

Requests that arrive together with the same long document must not each prefill it: the first one
computes it, the others wait until its blocks are stored and then load them (vLLM avoids the duplicate
work the same way, by scheduling prefix hits after the blocks exist)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cluster.kvindex import Block, BlockHash, BlockIndex, block_hashes
from cluster.messages import StoreBlocks
from cluster.ssdtier import SsdTier


@dataclass(slots=True)
class PrefixState:
    """A sequence's view of the cache: its prompt's block hashes and the blocks it holds references to."""

    hashes: list[BlockHash]
    blocks: list[Block] = field(default_factory=list)  # prompt blocks 0..len-1, referenced

    @property
    def covered(self) -> int:
        return len(self.blocks)


class PrefixCache:
    # Evictions per plan: clearing a tier of a million blocks must not make one plan of a million ids (the
    # bus has a size limit). Block ids are never reused, so an eviction sent a few plans late is harmless.
    MAX_EVICTIONS_PER_PLAN = 8192

    def __init__(
        self,
        index: BlockIndex,
        root: BlockHash,
        ssd: SsdTier | None = None,
        max_evictions: int = MAX_EVICTIONS_PER_PLAN,
    ) -> None:
        self.index = index
        self.max_evictions = max_evictions
        self.ssd = ssd
        self.root = root
        self.block_tokens = index.block_tokens
        self._pending: list[Block] = []
        self._evict: list[int] = []

    def state_for(self, tokens: tuple[int, ...], root: BlockHash | None = None) -> PrefixState:
        """`root`: where the chain of block hashes starts; a request under a LoRA adapter starts from its
        adapter's root (`cluster.adapters.adapter_root`), so its blocks are never another's."""
        return PrefixState(block_hashes(self.root if root is None else root, tokens, self.block_tokens))

    def producing(self, states: Iterable[PrefixState]) -> set[BlockHash]:
        """Hashes that sequences already prefilling will store."""
        out: set[BlockHash] = set()
        for st in states:
            out.update(st.hashes[st.covered :])
        return out

    def should_wait(self, tokens: tuple[int, ...], st: PrefixState, producing: set[BlockHash]) -> bool:
        """True when the first block this sequence lacks in RAM is being computed by another sequence or
        read from disk; starts that read when the prefix continues on disk."""
        usable = (len(tokens) - 1) // self.block_tokens
        for i, h in enumerate(st.hashes[:usable]):
            if self.index.lookup(h, tokens[i * self.block_tokens : (i + 1) * self.block_tokens]) is None:
                if h in producing:
                    return True
                if self.ssd is None:
                    return False
                return self.ssd.loading(h) or self.ssd.fetch(tokens, st.hashes, i, self._evict)
        return False

    def start(self, tokens: tuple[int, ...], st: PrefixState) -> tuple[int, ...]:
        """Reference the longest cached prefix; the block ids every rank loads before prefilling."""
        found = self.index.match(tokens, st.hashes)
        self.index.ref(found)
        st.blocks = list(found)
        return tuple(b.block_id for b in found)

    def store(
        self, seq_id: int, tokens: tuple[int, ...], st: PrefixState, computed: int
    ) -> list[StoreBlocks]:
        """Blocks the sequence's KV now covers (after a chunk ending at `computed`) and the cache lacks,
        as runs of consecutive blocks (one that some other sequence stored meanwhile splits a run; this
        may be the sequence's last prefill step, so every run is stored now)."""
        runs: list[StoreBlocks] = []
        first = st.covered
        ids: list[int] = []
        for i in range(st.covered, computed // self.block_tokens):
            chunk = tokens[i * self.block_tokens : (i + 1) * self.block_tokens]
            existing = self.index.lookup(st.hashes[i], chunk)
            if existing is not None:
                if ids:
                    runs.append(StoreBlocks(seq_id, first, tuple(ids)))
                    ids = []
                self.index.ref([existing])
                st.blocks.append(existing)
                first = i + 1
                continue
            block = self.index.insert(st.hashes[i], chunk, self._evict)
            if block is None:
                break  # full of blocks in use: a return value, not an error; this prefix is not cached
            st.blocks.append(block)
            self._pending.append(block)
            ids.append(block.block_id)
            if self.ssd is not None:
                self.ssd.saved_in_ram(block)
        if ids:
            runs.append(StoreBlocks(seq_id, first, tuple(ids)))
        return runs

    def release(self, st: PrefixState) -> None:
        self.index.unref(st.blocks)
        st.blocks = []

    def clear(self, tier: str = "ram") -> int:
        if tier == "ssd":
            return self.ssd.clear() if self.ssd is not None else 0
        ids = self.index.clear()
        self._evict.extend(ids)
        return len(ids)

    def ssd_results(self, failed: set[int]) -> None:
        if self.ssd is not None:
            self.ssd.load_results(failed, self._evict)

    @property
    def has_evictions(self) -> bool:
        return bool(self._evict) or (self.ssd is not None and self.ssd.has_work())

    def take_evictions(self) -> tuple[int, ...]:
        """The next plan's evictions, at most `max_evictions`; the rest wait for the plans after it."""
        out = tuple(self._evict[: self.max_evictions])
        del self._evict[: self.max_evictions]
        return out

    def commit(self) -> None:
        """The plan that stored the pending blocks has run on every rank: they may be loaded now."""
        self.index.ready(self._pending)
        self._pending = []
