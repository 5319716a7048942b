"""Runs a `StepPlan` on this rank's shard. Every rank runs the same code in the same order; only rank 0
asks for logits (followers skip the vocabulary projection, which needs no collective).

KV layout: a sequence being prefilled owns a per-layer `KVCache`; once it decodes it is a row of the
shared `BatchKVCache` (left-padded, mlx-lm's), whose rows are kept in the plan's `decode_ids` order.
Prefix-cache blocks (RAM tier) are copies of `block_tokens` positions of a sequence's cache, one keys and
one values array of shape (layers, kv_heads_on_this_rank, block_tokens, head_dim) each; a sequence that
hits them starts with them concatenated into its cache and prefills only the rest.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from cluster.errors import EngineError
from cluster.messages import PrefillChunk, StepPlan
from rank.packing import RowLayout, packs, pass_caches


def _load_malloc_trim() -> Any:
    """glibc's malloc_trim, or None: freed buffers otherwise stay in malloc's arenas, and RSS only grows."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _trim_heap() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(slots=True)
class StepOutput:
    """Rows of `logits` belong to `row_ids` (sequence ids), in order. Empty on followers."""

    row_ids: list[int]
    logits: mx.array | None
    ssd_failed: tuple[int, ...] = ()  # blocks of this plan's `ssd_load` this rank could not read


@dataclass(slots=True)
class _Rows:
    """A step's output rows as its passes produce them: sequence ids and their last hidden states."""

    ids: list[int]
    hidden: list[mx.array]


class Executor:
    def __init__(
        self, model: Any, want_logits: bool, block_tokens: int = 32, ssd: Any = None, group: Any = None
    ) -> None:
        self.model = model
        self.ssd = ssd  # rank.ssd.SsdBlockStore or None
        self.block_tokens = block_tokens
        self.blocks: dict[int, tuple[mx.array, mx.array]] = {}
        self.prefill_tokens = 0  # prompt positions computed (not loaded from cache), for tests and stats
        self.want_logits = want_logits
        self._steps = 0
        self.num_layers = len(model.layers)
        self.prefilling: dict[int, list[KVCache]] = {}
        self.batch: list[BatchKVCache] | None = None
        self.batch_ids: list[int] = []
        args = model.args
        self._tied = bool(getattr(args, "tie_word_embeddings", True)) or not hasattr(model, "lm_head")
        self.group = group if group is not None and group.size() > 1 else None
        self._packs = packs(model)  # a step in one pass (rank.packing; rank.mlx_patch installs its seam)
        self._head = self._head_rows() if self.group is not None else None

    @property
    def num_sequences(self) -> int:
        return len(self.prefilling) + len(self.batch_ids)

    def _holds(self, seq_id: int) -> bool:
        return seq_id in self.prefilling or seq_id in self.batch_ids

    def execute(self, plan: StepPlan) -> StepOutput:
        self._release(plan.release)
        for block_id in plan.evict:
            self.blocks.pop(block_id, None)
        failed = self._ssd_load(plan.ssd_load)
        for admit in plan.admit:
            if self._holds(admit.seq_id):
                raise EngineError(f"sequence {admit.seq_id} admitted twice")
            self.prefilling[admit.seq_id] = self._cache_from_blocks(admit.cached)
        for chunk in plan.prefill:
            cache = self.prefilling[chunk.seq_id]
            if cache[0].offset != chunk.start:
                raise EngineError(
                    f"sequence {chunk.seq_id}: prefill at {chunk.start}, cache at {cache[0].offset}"
                )
            self.prefill_tokens += chunk.end - chunk.start
        # A step is its prompt chunks, then its decode rows. Packed (rank.packing), they all run in one
        # pass, the batch arranged first (a sequence is never prefilled and decoded in one step);
        # otherwise each chunk runs in a pass of its own, and the batch in one after the step's stores.
        packed = self._packs and len(plan.prefill) + bool(plan.decode_ids) > 1
        rows = _Rows([], [])
        if packed:
            if plan.decode_ids:
                self._arrange_batch(plan.decode_ids)
            self._forward(plan.prefill, plan.decode_ids, plan.decode_tokens, rows)
        else:
            for chunk in plan.prefill:
                self._forward((chunk,), (), (), rows)
        for store in plan.store:
            self._store(store.seq_id, store.first, store.block_ids)
        self._steps += 1
        if plan.prefill or plan.release or self._steps % 256 == 0:
            # Prefill chunks and finished sequences leave buffers of one-off shapes in MLX's cache, which
            # would otherwise grow without bound (as mlx-lm's own generate loop does, clear it here).
            mx.clear_cache()
            _trim_heap()
        if self.ssd is not None:
            for block_id, h in plan.ssd_save:
                if block_id in self.blocks:
                    self.ssd.save(h, *self.blocks[block_id])
            self.ssd.delete(list(plan.ssd_delete))
        if plan.decode_ids and not packed:
            self._arrange_batch(plan.decode_ids)
            self._forward((), plan.decode_ids, plan.decode_tokens, rows)
        if not rows.hidden:
            return StepOutput([], None, failed)
        row_ids, hidden = rows.ids, rows.hidden
        last = mx.concatenate(hidden, axis=0) if len(hidden) > 1 else hidden[0]
        if self.group is not None:
            return self._vocab_parallel(row_ids, last, failed)
        if not self.want_logits:
            mx.eval(last)
            return StepOutput(row_ids, None, failed)
        logits = self._lm_head(last).astype(mx.float32)
        # Evaluate here, where MLX releases the GIL: `.tolist()`/`.item()` in the sampler would run the
        # whole step (collectives included, waiting for the other ranks) while holding it, starving
        # uvicorn's thread for the length of the step.
        mx.eval(logits)
        return StepOutput(row_ids, logits, failed)

    def _forward(
        self,
        chunks: tuple[PrefillChunk, ...],
        decode_ids: tuple[int, ...],
        decode_tokens: tuple[int, ...],
        rows: _Rows,
    ) -> None:
        """One forward pass over `chunks` end to end, then one token for each decode row (the batch is
        arranged in `decode_ids` order); adds the step's output rows: the last position of each chunk
        that ends its prompt, then every decode row. A pass of prompt chunks is evaluated here: that
        bounds the graph, and on followers runs the pass's collectives."""
        layout = RowLayout.of([c.end - c.start for c in chunks], len(decode_ids))
        tokens = [t for c in chunks for t in c.tokens]
        tokens += decode_tokens
        inputs = mx.array(tokens, dtype=mx.int32)
        # a lone decode batch is B rows of one token; anything else, one row
        inputs = inputs[None] if chunks else inputs[:, None]
        cache = pass_caches([self.prefilling[c.seq_id] for c in chunks], layout, self.batch)
        h = self.model.model(inputs, cache=cache)
        positions = h.reshape(-1, h.shape[-1])  # (1, N, D) or (B, 1, D): one hidden state a position
        for c, (_, end) in zip(chunks, layout.spans, strict=True):
            if c.last:
                rows.ids.append(c.seq_id)
                rows.hidden.append(positions[end - 1 : end])
        if decode_ids:
            lo, hi = layout.batch_span
            rows.ids.extend(decode_ids)
            rows.hidden.append(positions[lo:hi])
        if chunks:
            mx.eval(h)

    def _ssd_load(self, loads: tuple[tuple[int, bytes], ...]) -> tuple[int, ...]:
        failed = []
        for block_id, h in loads:
            arrays = self.ssd.load(h) if self.ssd is not None else None
            if arrays is None:
                failed.append(block_id)
            else:
                self.blocks[block_id] = arrays
        return tuple(failed)

    @functools.cached_property
    def block_bytes(self) -> int:
        """Bytes of one block on this rank (keys and values)."""
        attn, args = self.model.layers[0].self_attn, self.model.args
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        dtype = self.model.model.embed_tokens(mx.array([[0]])).dtype
        return 2 * self.num_layers * attn.n_kv_heads * self.block_tokens * head_dim * dtype.size

    def _cache_from_blocks(self, block_ids: tuple[int, ...]) -> list[KVCache]:
        caches = [KVCache() for _ in range(self.num_layers)]
        if not block_ids:
            return caches
        try:
            keys = [self.blocks[b][0] for b in block_ids]
            values = [self.blocks[b][1] for b in block_ids]
        except KeyError as exc:
            raise EngineError(f"cached block {exc} is not on this rank (ranks out of step)") from None
        k_all = mx.concatenate(keys, axis=2) if len(keys) > 1 else keys[0]
        v_all = mx.concatenate(values, axis=2) if len(values) > 1 else values[0]
        for layer, cache in enumerate(caches):
            cache.keys, cache.values = k_all[layer][None], v_all[layer][None]
            cache.offset = k_all.shape[2]
        return caches

    def _store(self, seq_id: int, first: int, block_ids: tuple[int, ...]) -> None:
        cache = self.prefilling.get(seq_id)
        if cache is None:
            raise EngineError(f"store from sequence {seq_id}, which is not prefilling")
        b = self.block_tokens
        new = []
        for i, block_id in enumerate(block_ids):
            lo, hi = (first + i) * b, (first + i + 1) * b
            if hi > cache[0].offset:
                raise EngineError(f"block {first + i} of sequence {seq_id} is not computed yet")
            k = mx.stack([c.keys[0, :, lo:hi, :] for c in cache])
            v = mx.stack([c.values[0, :, lo:hi, :] for c in cache])
            self.blocks[block_id] = (k, v)
            new += [k, v]
        mx.eval(new)

    def _head_rows(self) -> tuple[Any, list[int]]:
        """Vocabulary-parallel output projection: this rank's rows of it, and every rank's row count.
        Without it rank 0 alone reads the whole projection each step while the others wait (on the
        embedded model that is a fifth of the weights)."""
        import copy

        source = self.model.model.embed_tokens if self._tied else self.model.lm_head
        vocab = int(source["weight"].shape[0])
        assert self.group is not None
        n, r = self.group.size(), self.group.rank()
        bounds = [vocab * i // n for i in range(n + 1)]
        head = copy.copy(source)  # the same module type (plain or quantized), holding only our rows
        for name in ("weight", "scales", "biases", "bias"):
            if name in source:
                head[name] = mx.contiguous(source[name][bounds[r] : bounds[r + 1]])
        mx.eval(head.parameters())
        return head, [bounds[i + 1] - bounds[i] for i in range(n)]

    def _vocab_parallel(self, row_ids: list[int], last: mx.array, failed: tuple[int, ...]) -> StepOutput:
        """Every rank projects onto its rows of the vocabulary; rank 0 gathers the pieces (point to point:
        the followers never need the whole distribution)."""
        assert self._head is not None
        head, counts = self._head
        local = self._lm_head(last, head)  # in the model's dtype: half the bytes of fp32
        if not self.want_logits:
            mx.eval(mx.distributed.send(local, 0, group=self.group))
            return StepOutput(row_ids, None, failed)
        # The step's all-reduces first: a receive has no inputs, and must not be scheduled before them.
        mx.eval(local)
        rows = local.shape[0]
        parts = [local] + [
            mx.distributed.recv((rows, counts[i]), local.dtype, i, group=self.group)
            for i in range(1, len(counts))
        ]
        logits = mx.concatenate(parts, axis=1).astype(mx.float32)
        mx.eval(logits)  # where MLX releases the GIL (see below)
        return StepOutput(row_ids, logits, failed)

    def _lm_head(self, h: mx.array, head: Any = None) -> mx.array:
        """The output projection: the model's own, or `head` (this rank's rows of it)."""
        if head is None:
            head = self.model.model.embed_tokens if self._tied else self.model.lm_head
        return head.as_linear(h) if self._tied else head(h)

    def _release(self, seq_ids: tuple[int, ...]) -> None:
        if not seq_ids:
            return
        gone = set(seq_ids)
        for sid in seq_ids:
            self.prefilling.pop(sid, None)
        if self.batch is not None and gone.intersection(self.batch_ids):
            keep = [i for i, sid in enumerate(self.batch_ids) if sid not in gone]
            self.batch_ids = [self.batch_ids[i] for i in keep]
            if not keep:
                self.batch = None
            else:
                idx = mx.array(keep, dtype=mx.int32)
                for c in self.batch:
                    c.filter(idx)

    def _arrange_batch(self, decode_ids: tuple[int, ...]) -> None:
        """Join newly prefilled sequences, then put the rows in the plan's order."""
        joining = [sid for sid in decode_ids if sid in self.prefilling]
        for sid in decode_ids:
            if not self._holds(sid):
                raise EngineError(f"decode of unknown sequence {sid}")
        if joining:
            self._join(joining, [self.prefilling.pop(sid) for sid in joining])
        if list(decode_ids) != self.batch_ids:
            pos = {sid: i for i, sid in enumerate(self.batch_ids)}
            if set(pos) != set(decode_ids):
                raise EngineError("decode batch differs from the plan (ranks out of step)")
            order = mx.array([pos[sid] for sid in decode_ids], dtype=mx.int32)
            assert self.batch is not None
            for c in self.batch:
                c.keys, c.values = c.keys[order], c.values[order]  # type: ignore[index]
                c.offset, c.left_padding = c.offset[order], c.left_padding[order]  # type: ignore[index]
            self.batch_ids = list(decode_ids)

    def _join(self, seq_ids: list[int], caches: list[list[KVCache]]) -> None:
        """Sequences that finished prefilling become rows of the batch. All of a step's at once: every
        extend copies the whole batch, so one at a time cost a copy of every row per newcomer."""
        merged = [BatchKVCache.merge(list(layer)) for layer in zip(*caches, strict=True)]
        if self.batch is None:
            self.batch = merged
        else:
            for mine, theirs in zip(self.batch, merged, strict=True):
                mine.extend(theirs)
        self.batch_ids.extend(seq_ids)
