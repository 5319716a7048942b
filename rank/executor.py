"""Runs a `StepPlan` on this rank's shard. Every rank runs the same code in the same order; only rank 0
asks for logits (followers skip the vocabulary projection, which needs no collective).

The model is the authority on itself: the inner model gives hidden states, and the rows that need logits
go through the model's own head and post-processing (rank.model_head); caches are the model's own
(`make_prompt_cache`: its `make_cache()` when it has one). A sequence being prefilled owns its list of
layer caches; once it decodes it is a row of the shared batch caches (each cache type's own `merge`, as
mlx-lm's `BatchGenerator` does), whose rows are kept in the plan's `decode_ids` order with `filter`.
What the model's caches allow (batched decode, prefix blocks, packed steps) is decided once, from the
model (rank.model_caps); a trick that cannot serve the model exactly steps aside.
Prefix-cache blocks (RAM tier) are copies of `block_tokens` positions of a sequence's cache, a pair of
arrays of shape (layers, kv_heads_on_this_rank, block_tokens, d) (`BlockGeometry.pack`); a sequence that
hits them starts with them concatenated into its cache and prefills only the rest.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from cluster.errors import EngineError
from cluster.messages import PrefillChunk, StepPlan
from cluster.requests import TokenLogprob
from rank import mlx_patch, model_caps
from rank.kvquant import KvFormat
from rank.livequant import LiveBatch, LiveQuant, quantized
from rank.lora_layers import LoraSlots
from rank.model_head import ModelHead, VocabSlice
from rank.packing import RowLayout, pass_caches
from rank.prompt_logprobs import PromptLogprobs, rows_wanted
from rank.ragged import RaggedKVCache
from rank.sampler import finite_logits, from_top_k, gumbel_scores, top_k_entries

log = logging.getLogger(__name__)


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
    # rank 0: (sequence id, entries) of the prompt logprobs this step computed (rank/prompt_logprobs.py)
    prompt_logprobs: list[tuple[int, list[TokenLogprob]]] = field(default_factory=list)
    # rank 0, an `argmax` plan under a vocabulary-parallel head: each row's argmax, in place of `logits`
    picks: list[int] | None = None


@dataclass(slots=True)
class _Rows:
    """A step's output rows as its passes produce them: sequence ids and their last hidden states; and
    the chunks that want prompt logprobs, with their other positions' hidden states (None: none)."""

    ids: list[int]
    hidden: list[mx.array]
    prompt: list[tuple[PrefillChunk, mx.array | None]] = field(default_factory=list)


class Executor:
    def __init__(
        self,
        model: Any,
        want_logits: bool,
        block_tokens: int = 32,
        ssd: Any = None,
        group: Any = None,
        max_loras: int = 0,
        config: dict[str, Any] | None = None,
        kv_format: KvFormat | None = None,
        speculative: bool = False,
        point_to_point: bool = True,
        live_from: int | None = None,
    ) -> None:
        self.model = model
        # unfused adapters (rank.lora_layers): slots 1..max_loras; none, and the layers stay as they are
        self.lora = LoraSlots(model, group, max_loras) if max_loras > 0 else None
        self.config = config or {}
        self.seq_adapter: dict[int, int] = {}  # sequence -> its adapter slot, for those not on the base
        self.head = ModelHead(model)  # the model's own output path, for the rows that need logits
        self.inner = self.head.inner
        mlx_patch.fix_upstream(model)
        self.caps = model_caps.probe(model, self.inner)
        name = type(model).__module__.rsplit(".", 1)[-1]
        self.caps.log(name, logging.INFO if want_logits else logging.DEBUG)
        # the SSD tier holds prefix blocks: without them, it steps aside on every rank alike
        self.ssd = ssd if self.caps.prefix_blocks else None  # rank.ssd.SsdBlockStore or None
        # how blocks are stored (rank.kvquant), fitted to the model's head dimension alike on every rank
        geometry = self.caps.geometry
        kv = kv_format or KvFormat(16)
        self.kv = kv.fit(geometry.dim) if geometry is not None else kv
        if self.ssd is not None:
            self.ssd.kv_format = self.kv.name
        self.block_tokens = block_tokens
        self.blocks: dict[int, tuple[mx.array, ...]] = {}  # a block's stored parts (rank.kvquant)
        self.prefill_tokens = 0  # prompt positions computed (not loaded from cache), for tests and stats
        self.packed_passes = 0  # passes that ran several sequences' rows at once
        self.want_logits = want_logits
        self._steps = 0
        self.num_layers = len(self.caps.cache_kinds)
        self.prefilling: dict[int, list[Any]] = {}  # sequences not in the batch (all, without batching)
        self.batch: list[Any] | None = None
        self.batch_ids: list[int] = []
        self.group = group if group is not None and group.size() > 1 else None
        # every rank can send to rank 0 in `group` (rank.collectives.TensorGroup); if not (a ring of more
        # than 3 ranks links neighbours only) the vocabulary gather is an all-gather
        self.point_to_point = point_to_point
        self._packs = self.caps.packable  # a step in one pass (rank.packing, its seam from rank.mlx_patch)
        self._slice = self._head_slice() if self.group is not None and self.head.splits_vocabulary else None
        # where this rank's rows of the vocabulary start (its slice's ids are offset by it)
        self._vocab_lo = sum(self._slice[1][: self.group.rank()]) if self._slice is not None and self.group else 0
        # Two ranks with a vocabulary-parallel head: an argmax step's picks reach both ranks in the one
        # exchange (each sends the other its best entries), so rank 0 may send the next plan before it
        # knows them (`StepPlan.chained`, rank/engine.py): the plan broadcast overlaps the step.
        self.chains = self._slice is not None and self.group is not None and self.group.size() == 2
        self._picks: dict[int, int] = {}  # each row's pick in the last argmax step, when every rank has them
        self.prompt_logprobs = PromptLogprobs()
        # Speculation (--spec): decode rows feed drafts and keep what rank 0 accepts, so the batch's rows
        # end at different lengths: right-padded ragged caches (rank.ragged), for models of plain KV caches.
        self.speculates = speculative and self.caps.prefix_blocks
        if speculative and not self.speculates:
            log.log(
                logging.WARNING if want_logits else logging.DEBUG,
                "speculative decoding off: it needs plain KV caches that can be rolled back (%s)",
                self.caps.reason,
            )
        # --kv-live-from: running caches quantized past a length (rank.livequant), in the blocks' format
        self.live = self._live_quant(live_from, logging.WARNING if want_logits else logging.DEBUG)
        self._ragged = self.speculates or self.live is not None  # the batch's rows end where they do

    def _live_quant(self, start: int | None, level: int) -> LiveQuant | None:
        if start is None:
            return None
        geometry = self.caps.geometry
        why = None
        if not self.kv.quantized:
            why = f"the blocks' format is {self.kv.name} (--kv-bits 8 or 4 sets the live format too)"
        elif not (self.caps.prefix_blocks and self._packs and self.caps.batch_decode) or geometry is None:
            why = f"it needs plain KV caches and the packed-step seam ({self.caps.reason})"
        elif geometry.key_dim != geometry.value_dim:
            why = "keys and values of different widths"
        if why is not None:
            log.log(level, "live quantized KV off: %s", why)
            return None
        return LiveQuant(start, self.kv.bits, self.kv.group_size)

    @property
    def splits_vocabulary(self) -> bool:
        """Whether the ranks gather rank 0's logits from vocabulary slices (argmax and top-k plans reduce
        what they send)."""
        return self._slice is not None

    @property
    def num_sequences(self) -> int:
        return len(self.prefilling) + len(self.batch_ids)

    def _holds(self, seq_id: int) -> bool:
        return seq_id in self.prefilling or seq_id in self.batch_ids

    @property
    def lora_targets(self) -> dict[str, Any]:
        """What an unfused adapter may modify on this model (rank.lora.inspect_adapter's `targets`); empty
        without adapter slots. Fixed once the executor exists, so any thread may read it."""
        return self.lora.targets if self.lora is not None else {}

    def load_adapter(self, slot: int, path: Path | str, digest: bytes | None = None) -> Any:
        """Load the adapter at `path` into `slot` on this rank (its own disk, as the model); returns its
        rank.lora.AdapterInfo. `digest`: rank 0's, checked against this rank's copy."""
        if self.lora is None:
            raise EngineError("this job holds no adapter slots (start it with --lora or --max-loras)")
        if slot in self.seq_adapter.values():
            raise EngineError(f"adapter slot {slot} is replaced while sequences use it")
        return self.lora.load(slot, Path(path), self.config, digest)

    def unload_adapter(self, slot: int) -> None:
        if self.lora is None:
            raise EngineError("this job holds no adapter slots (start it with --lora or --max-loras)")
        if slot in self.seq_adapter.values():
            raise EngineError(f"adapter slot {slot} is unloaded while sequences use it")
        self.lora.unload(slot)

    def execute(self, plan: StepPlan) -> StepOutput:
        decode_tokens = plan.decode_tokens
        if plan.chained:  # the input tokens are the step before's picks, which every rank computed
            try:
                decode_tokens = tuple(self._picks[sid] for sid in plan.decode_ids)
            except KeyError as exc:
                raise EngineError(f"chained step {plan.step}: no pick of sequence {exc} (ranks out of step)") from None
        self._picks = {}
        for slot in plan.adapter_unload:
            self.unload_adapter(slot)
        for load in plan.adapter_load:
            self.load_adapter(load.slot, load.path, load.digest)
        self._release(plan.release)
        self._rollback(plan.rollback)
        for block_id in plan.evict:
            self.blocks.pop(block_id, None)
        failed = self._ssd_load(plan.ssd_load)
        for admit in plan.admit:
            if self._holds(admit.seq_id):
                raise EngineError(f"sequence {admit.seq_id} admitted twice")
            slot = admit.adapter
            if slot and (self.lora is None or slot not in self.lora.loaded):
                raise EngineError(f"sequence {admit.seq_id} admitted on empty adapter slot {slot}")
            self.prefilling[admit.seq_id] = self._cache_from_blocks(admit.cached)
            if slot:
                self.seq_adapter[admit.seq_id] = slot
        for chunk in plan.prefill:
            at = _positions(self.prefilling[chunk.seq_id])
            if at is not None and at != chunk.start:
                raise EngineError(f"sequence {chunk.seq_id}: prefill at {chunk.start}, cache at {at}")
            if self.live is not None and at is not None and self.live.due(at):
                caches = self.prefilling[chunk.seq_id]
                if not quantized(caches):  # before the pass: its positions from here on see quantized K/V
                    self.prefilling[chunk.seq_id] = self.live.quantize(caches)
            self.prefill_tokens += chunk.end - chunk.start
        # A step is its prompt chunks, then its decode rows. Packed (rank.packing), they all run in one
        # pass, the batch arranged first (a sequence is never prefilled and decoded in one step);
        # otherwise each chunk runs in a pass of its own, and the batch in one after the step's stores.
        packed = self._packs and len(plan.prefill) + bool(plan.decode_ids) > 1
        rows = _Rows([], [])
        if packed:
            self.packed_passes += 1
            if plan.decode_ids:
                self._arrange_batch(plan.decode_ids)
            self._forward(plan.prefill, plan.decode_ids, decode_tokens, rows, plan.decode_drafts)
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
            if self.caps.batch_decode:
                self._arrange_batch(plan.decode_ids)
                self._forward((), plan.decode_ids, decode_tokens, rows, plan.decode_drafts)
            else:
                if any(plan.decode_drafts):
                    raise EngineError("drafts for a model that decodes one row at a time")
                self._decode_one_by_one(plan.decode_ids, decode_tokens, rows)
        if not rows.hidden and not rows.prompt:
            return StepOutput([], None, failed)
        row_ids = rows.ids
        hidden = rows.hidden + [h for _, h in rows.prompt if h is not None]  # prompt logprobs' rows last
        last = mx.concatenate(hidden, axis=0) if len(hidden) > 1 else hidden[0]
        if self._slice is not None:
            if plan.argmax and not rows.prompt:
                return self._vocab_argmax(row_ids, last, failed, plan.draws)
            if plan.topk > 0 and not rows.prompt:
                return self._vocab_topk(row_ids, last, failed, plan.topk)
            return self._prompt_rows(self._vocab_parallel(row_ids, last, failed), rows)
        if not self.want_logits and self.group is None:
            mx.eval(last)
            return StepOutput(row_ids, None, failed)
        # the model's own head (under TP, one the model shards itself: every rank runs its collectives)
        logits = self.head(last).astype(mx.float32)
        if not self.want_logits:
            mx.eval(logits)
            return StepOutput(row_ids, None, failed)
        # Evaluate here, where MLX releases the GIL: `.tolist()`/`.item()` in the sampler would run the
        # whole step (collectives included, waiting for the other ranks) while holding it, starving
        # uvicorn's thread for the length of the step.
        mx.eval(logits)
        return self._prompt_rows(StepOutput(row_ids, logits, failed), rows)

    def _prompt_rows(self, out: StepOutput, rows: _Rows) -> StepOutput:
        """Rank 0: the rows after the sampler's are prompt positions: their logprobs go in the output."""
        if not rows.prompt or out.logits is None:
            return out
        n = len(out.row_ids)
        at = n
        for chunk, h in rows.prompt:
            m = 0 if h is None else h.shape[0]
            entries = self.prompt_logprobs.chunk(chunk, out.logits[at : at + m] if m else None)
            if entries:
                out.prompt_logprobs.append((chunk.seq_id, entries))
            at += m
        out.logits = out.logits[:n] if n else None
        return out

    def _forward(
        self,
        chunks: tuple[PrefillChunk, ...],
        decode_ids: tuple[int, ...],
        decode_tokens: tuple[int, ...],
        rows: _Rows,
        drafts: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        """One forward pass over `chunks` end to end, then the decode rows (the batch is arranged in
        `decode_ids` order): each row its token, then its drafts, right-padded to the widest row; adds the
        step's output rows: the last position of each chunk that ends its prompt, then every decode row's
        positions but the padding. A pass of prompt chunks is evaluated here: that bounds the graph, and on
        followers runs the pass's collectives."""
        counts = [1 + len(d) for d in drafts] if drafts else [1] * len(decode_ids)
        width = max(counts, default=1)
        if width > 1 and not self.speculates:
            raise EngineError("drafts for a decode batch that cannot roll rows back (speculation is off)")
        layout = RowLayout.of([c.end - c.start for c in chunks], len(decode_ids), width)
        tokens = [t for c in chunks for t in c.tokens]
        for i, token in enumerate(decode_tokens):
            row = (token, *drafts[i]) if drafts else (token,)
            tokens += row + (0,) * (width - len(row))  # padding: written past the row's length, never seen
        inputs = mx.array(tokens, dtype=mx.int32)
        # a lone decode batch is B rows of `width` tokens; anything else, one row
        inputs = inputs[None] if chunks else inputs.reshape(len(decode_ids), width)
        cache = pass_caches([self.prefilling[c.seq_id] for c in chunks], layout, self.batch)
        with self._adapters(chunks, decode_ids, width):
            h = self.inner(inputs, cache=cache)
        if decode_ids and self._ragged:  # the batch is ragged: rows keep what they fed
            assert self.batch is not None
            for c in self.batch:
                c.advance(counts)
        positions = h.reshape(-1, h.shape[-1])  # (1, N, D) or (B, W, D): one hidden state a position
        for c, (start, end) in zip(chunks, layout.spans, strict=True):
            if c.last:
                rows.ids.append(c.seq_id)
                rows.hidden.append(positions[end - 1 : end])
            if c.prompt_logprobs >= 0:
                m = rows_wanted(c)
                rows.prompt.append((c, positions[start : start + m] if m else None))
        if decode_ids:
            lo, hi = layout.batch_span
            batch = positions[lo:hi]
            if width > 1:  # every row's own positions, without the padding
                keep = [i * width + j for i, n in enumerate(counts) for j in range(n)]
                batch = batch[mx.array(keep, dtype=mx.int32)]
                rows.ids.extend(sid for sid, n in zip(decode_ids, counts, strict=True) for _ in range(n))
            else:
                rows.ids.extend(decode_ids)
            rows.hidden.append(batch)
        if chunks:
            mx.eval(h)

    def _adapters(self, chunks: tuple[PrefillChunk, ...], decode_ids: tuple[int, ...], width: int = 1) -> Any:
        """The pass's token slots, in its token order: each chunk's tokens, then `width` per decode row."""
        if self.lora is None or not self.seq_adapter:
            return nullcontext()
        slot = self.seq_adapter.get
        slots = [slot(c.seq_id, 0) for c in chunks for _ in range(c.end - c.start)]
        slots += [slot(sid, 0) for sid in decode_ids for _ in range(width)]
        return self.lora.tokens(slots)

    def _rollback(self, lengths: tuple[tuple[int, int], ...]) -> None:
        """Sequences keep the positions rank 0 accepted in the step before (speculation's drafts)."""
        for sid, n in lengths:
            if sid in self.batch_ids and self._ragged:
                assert self.batch is not None
                row = self.batch_ids.index(sid)
                for c in self.batch:
                    c.set_length(row, n)
            elif sid in self.prefilling and (at := _positions(self.prefilling[sid])) is not None and n <= at:
                for c in self.prefilling[sid]:
                    c.trim(at - n)
            else:
                raise EngineError(f"rollback of sequence {sid} to {n} positions, which it cannot do")

    def _ssd_load(self, loads: tuple[tuple[int, bytes], ...]) -> tuple[int, ...]:
        failed = []
        geometry = self.caps.geometry
        want = geometry.stored_shapes(self.kv, self.block_tokens) if geometry is not None else None
        for block_id, h in loads:
            arrays = self.ssd.load(h) if self.ssd is not None else None
            if arrays is not None and [(str(a.dtype).split(".")[-1], tuple(a.shape)) for a in arrays] != want:
                arrays = None  # a file of the right format but another block shape: never loaded
            if arrays is None:
                failed.append(block_id)
            else:
                self.blocks[block_id] = arrays
        return tuple(failed)

    def _decode_one_by_one(self, decode_ids: tuple[int, ...], tokens: tuple[int, ...], rows: _Rows) -> None:
        """A decode step for a model whose caches cannot be batched: one pass a row, its own caches."""
        for sid, token in zip(decode_ids, tokens, strict=True):
            if sid not in self.prefilling:
                raise EngineError(f"decode of unknown sequence {sid}")
            with self._adapters((), (sid,)):
                h = self.inner(mx.array([[token]], dtype=mx.int32), cache=self.prefilling[sid])
            rows.ids.append(sid)
            rows.hidden.append(h[0, -1:])

    @property
    def block_bytes(self) -> int:
        """Bytes of one block on this rank (keys and values); 1 for a model without prefix blocks (so
        that sizes divided by it stay defined: such a model's tiers are off, see `caps`)."""
        geometry = self.caps.geometry
        return geometry.stored_bytes(self.kv, self.block_tokens) if geometry is not None else 1

    def _cache_from_blocks(self, block_ids: tuple[int, ...]) -> list[Any]:
        caches = make_prompt_cache(self.model)
        if not block_ids:
            return caches
        geometry = self.caps.geometry
        if not self.caps.prefix_blocks or geometry is None:
            raise EngineError("a prefix-cache hit for a model without prefix blocks (see its caps)")
        try:
            stored = [self.blocks[b] for b in block_ids]
        except KeyError as exc:
            raise EngineError(f"cached block {exc} is not on this rank (ranks out of step)") from None
        if self.live is not None and self.live.due(len(block_ids) * self.block_tokens):
            return self._quantized_from_blocks(stored)
        k_all, v_all = geometry.unpack(*self.kv.decode(stored))
        for layer, cache in enumerate(caches):
            cache.keys, cache.values = k_all[layer][None], v_all[layer][None]
            cache.offset = k_all.shape[2]
        return caches

    def _quantized_from_blocks(self, stored: list[tuple[mx.array, ...]]) -> list[Any]:
        """A sequence's caches, quantized (rank.livequant), straight from blocks of the same format: the
        numbers it held when the blocks were stored, bit for bit."""
        from mlx_lm.models.cache import QuantizedKVCache

        assert self.live is not None
        parts = self.kv.join(stored)
        caches = []
        for layer in range(self.num_layers):
            c = QuantizedKVCache(self.live.group_size, self.live.bits)
            c.keys = tuple(p[layer][None] for p in parts[:3])
            c.values = tuple(p[layer][None] for p in parts[3:])
            c.offset = int(parts[0].shape[2])
            caches.append(c)
        return caches

    def _store(self, seq_id: int, first: int, block_ids: tuple[int, ...]) -> None:
        cache = self.prefilling.get(seq_id)
        if cache is None:
            raise EngineError(f"store from sequence {seq_id}, which is not prefilling")
        geometry = self.caps.geometry
        if not self.caps.prefix_blocks or geometry is None:
            raise EngineError("a prefix-cache store for a model without prefix blocks (see its caps)")
        b = self.block_tokens
        new: list[mx.array] = []
        for i, block_id in enumerate(block_ids):
            lo, hi = (first + i) * b, (first + i + 1) * b
            if hi > cache[0].offset:
                raise EngineError(f"block {first + i} of sequence {seq_id} is not computed yet")
            if quantized(cache):  # already in the blocks' format (rank.livequant): the same numbers
                parts = tuple(
                    mx.stack([getattr(c, side)[i][0, :, lo:hi, :] for c in cache])
                    for side in ("keys", "values")
                    for i in range(3)
                )
            else:
                k = mx.stack([c.keys[0, :, lo:hi, :] for c in cache])
                v = mx.stack([c.values[0, :, lo:hi, :] for c in cache])
                parts = self.kv.encode(*geometry.pack(k, v))
            self.blocks[block_id] = parts
            new += parts
        mx.eval(new)

    def _head_slice(self) -> tuple[VocabSlice, list[int]]:
        """Vocabulary-parallel output: this rank's rows of the model's head (with every transform the
        model applies after it), and every rank's row count. Without it rank 0 alone reads the whole
        projection each step while the others wait (on the embedded model that is a fifth of the weights)."""
        vocab = self.head.vocab_rows
        assert self.group is not None
        n, r = self.group.size(), self.group.rank()
        bounds = [vocab * i // n for i in range(n + 1)]
        return self.head.vocab_slice(bounds[r], bounds[r + 1]), [bounds[i + 1] - bounds[i] for i in range(n)]

    def _vocab_parallel(self, row_ids: list[int], last: mx.array, failed: tuple[int, ...]) -> StepOutput:
        """Every rank projects onto its rows of the vocabulary; rank 0 gathers the pieces (point to point:
        the followers never need the whole distribution)."""
        assert self._slice is not None
        head, counts = self._slice
        parts = self._to_rank0(head(last), counts)  # in the model's dtype: half the bytes of fp32
        if parts is None:
            return StepOutput(row_ids, None, failed)
        logits = mx.concatenate(parts, axis=1).astype(mx.float32)
        mx.eval(logits)  # where MLX releases the GIL (see below)
        return StepOutput(row_ids, logits, failed)

    def _vocab_argmax(
        self, row_ids: list[int], last: mx.array, failed: tuple[int, ...], draws: tuple[tuple[float, int, int], ...]
    ) -> StepOutput:
        """`_vocab_parallel` for a step whose every row is plain greedy or samples at a temperature alone
        (`draws`: its key's Gumbel noise is added to the slice first, rank/sampler.py `gumbel_scores`):
        each rank sends rank 0 its slice's best score and its index per row (rows x 2 numbers instead of
        rows x vocabulary / ranks); rank 0 takes the best of them, the first rank's on a tie, which is the
        argmax of the whole row with the sampler's clamping: the same token as gathering the slices."""
        assert self._slice is not None
        head, counts = self._slice
        local = finite_logits(head(last).astype(mx.float32))
        if draws:
            if len(draws) != local.shape[0]:
                raise EngineError(f"{len(draws)} draws for {local.shape[0]} rows")
            local = gumbel_scores(local, draws, self._vocab_lo, sum(counts))
        best = mx.stack(
            [local.max(axis=-1), (mx.argmax(local, axis=-1) + self._vocab_lo).astype(mx.float32)], axis=-1
        )
        # chained steps: both ranks get both ranks' entries, and keep the picks for the next step
        parts = self._to_rank0(best, [2] * len(counts), everyone=self.chains)
        if parts is None:
            return StepOutput(row_ids, None, failed)
        every = mx.stack(parts)  # ranks x rows x (value, index)
        winner = mx.argmax(every[:, :, 0], axis=0)  # the first rank holding a row's maximum
        picks = mx.take_along_axis(every[:, :, 1], winner[None], axis=0)[0].astype(mx.int32)
        mx.eval(picks)  # where MLX releases the GIL
        chosen = picks.tolist()
        if self.chains:
            self._picks = dict(zip(row_ids, chosen, strict=True))
            if not self.want_logits:
                return StepOutput(row_ids, None, failed)
        return StepOutput(row_ids, None, failed, picks=chosen)

    def _vocab_topk(self, row_ids: list[int], last: mx.array, failed: tuple[int, ...], k: int) -> StepOutput:
        """`_vocab_parallel` for a step whose rows all sample with top_k <= k (or are plain greedy): each rank
        sends rank 0 its slice's k best entries per row (values and vocabulary indices, rank/sampler.py
        `top_k_entries`), rank 0 sets them in rows of -inf. The k best of a whole row are among the
        entries sent (ties go to the lower id on every rank alike), so every row samples as from the
        whole row: the same token for the same key."""
        assert self._slice is not None
        head, counts = self._slice
        local = finite_logits(head(last).astype(mx.float32))
        values, idx = top_k_entries(local, min(k, local.shape[-1]))
        sent = mx.concatenate([values, (idx + self._vocab_lo).astype(mx.float32)], axis=-1)  # exact: ids < 2**24
        parts = self._to_rank0(sent, [2 * min(k, c) for c in counts])
        if parts is None:
            return StepOutput(row_ids, None, failed)
        logits = from_top_k(parts, sum(counts))
        mx.eval(logits)  # where MLX releases the GIL
        return StepOutput(row_ids, logits, failed)

    def _to_rank0(self, local: mx.array, widths: list[int], everyone: bool = False) -> list[mx.array] | None:
        """Every rank's `local` (rows x widths[rank]) on rank 0, in rank order; None on the others.
        Point to point where every rank reaches rank 0; else one all-gather of the pieces padded to the
        widest (every rank receives them all: more bytes, the same number of link delays as a ring).
        `everyone`: the all-gather, and every rank gets the pieces."""
        assert self.group is not None
        rows = local.shape[0]
        if everyone or not self.point_to_point:
            wide = max(widths)
            padded = mx.pad(local, [(0, 0), (0, wide - local.shape[1])]) if local.shape[1] < wide else local
            every = mx.distributed.all_gather(padded, group=self.group)  # ranks * rows x wide
            mx.eval(every)  # where MLX releases the GIL
            if not self.want_logits and not everyone:
                return None
            return [every[i * rows : (i + 1) * rows, :w] for i, w in enumerate(widths)]
        if not self.want_logits:
            mx.eval(mx.distributed.send(local, 0, group=self.group))
            return None
        # The step's all-reduces first: a receive has no inputs, and must not be scheduled before them.
        mx.eval(local)
        return [local] + [
            mx.distributed.recv((rows, widths[i]), local.dtype, i, group=self.group)
            for i in range(1, len(widths))
        ]

    def _release(self, seq_ids: tuple[int, ...]) -> None:
        if not seq_ids:
            return
        gone = set(seq_ids)
        for sid in seq_ids:
            self.prefilling.pop(sid, None)
            self.seq_adapter.pop(sid, None)
            self.prompt_logprobs.forget(sid)
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
                c.filter(order)  # each cache type's own reordering
            self.batch_ids = list(decode_ids)
        if self.live is not None and self.batch is not None:
            for c in self.batch:  # rows that reached the length: quantized before this pass
                c.quantize_rows(self.live)

    def _join(self, seq_ids: list[int], caches: list[list[Any]]) -> None:
        """Sequences that finished prefilling become rows of the batch, each layer's caches merged by
        their own type (as mlx-lm's `_merge_caches`). All of a step's at once: every extend copies the
        whole batch, so one at a time cost a copy of every row per newcomer."""
        merge = LiveBatch.merge if self.live is not None else RaggedKVCache.merge if self.speculates else None
        merged = [(merge or layer[0].merge)(list(layer)) for layer in zip(*caches, strict=True)]
        if self.batch is None:
            self.batch = merged
        else:
            for mine, theirs in zip(self.batch, merged, strict=True):
                mine.extend(theirs)
        self.batch_ids.extend(seq_ids)


def _positions(caches: list[Any]) -> int | None:
    """How many positions a sequence's caches hold, from the first that counts them (a linear-attention
    state does not)."""
    for c in caches:
        offset = getattr(c, "offset", None)
        if isinstance(offset, int):
            return offset
    return None
