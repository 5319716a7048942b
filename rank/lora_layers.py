"""Unfused LoRA adapters in slots, chosen per token: one packed pass may mix adapters and the base model.

After the model is sharded, every linear of its layers that an adapter may modify is wrapped in a
`SlotLinear`: the layer itself plus, per slot (slot 0 is the base model), that adapter's A and B, split
the way the layer is split:
- whole (TP=1, or a layer every rank computes whole): A and B whole;
- column-parallel (`AllToShardedLinear`, output split): A whole, B split by output, so the LoRA term is
  this rank's slice of the output;
- row-parallel (`ShardedToAllLinear`, input split): A split by input, B whole; the LoRA term of this
  rank's input slice is added to the layer's partial product before its all_sum, so the sum is the
  unsharded one and no collective is added (the wrapper runs the layer's own forward in two halves).
The term is mlx-lm's `LoRALinear`'s, `scale * ((x @ A) @ B)` (no dropout), added to the layer's output.

Which slot each token uses is set by the executor before each pass (`LoraSlots.tokens`). A pass whose
tokens are all base runs the layers alone (nothing added); a pass of one adapter adds
`scale * (x @ A) @ B` as mlx-lm's `LoRALinear` does; a mixed pass multiplies every token by the A of all the pass's adapters side by side (a few dozen
columns), keeps each token's own columns times its scale (a mask made once per pass; zero for the base),
and multiplies by their B stacked: two small dense matmuls a layer whatever the mix, where a per-token
`gather_mm` or one matmul per adapter costs an operation per row or per adapter on every layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
)
from mlx.utils import tree_unflatten

from cluster.errors import AdapterError, EngineError
from rank.lora import FUSED_NAMES, AdapterInfo, TargetShape, inspect_adapter, load_matrices

_LAYER_PATH = re.compile(r"(^|\.)layers\.\d+\.")
_COLUMN = (AllToShardedLinear, QuantizedAllToShardedLinear)
_ROW = (ShardedToAllLinear, QuantizedShardedToAllLinear)
_WHOLE = (nn.Linear, nn.QuantizedLinear)


class TokenSlots:
    """Which adapter each token of the current pass uses; read by every `SlotLinear` while the pass's
    graph is built (so it may change as soon as the model call returns)."""

    __slots__ = ("mask", "present", "single")

    def __init__(self) -> None:
        self.present: tuple[int, ...] = ()  # adapter slots (not 0) the pass uses, ascending
        self.single: int | None = None  # the one slot every token uses (not 0), if so
        # mixed passes: (T, sum of the present adapters' ranks), token t's scale in the columns of its
        # adapter, zero elsewhere (all zero for a base token)
        self.mask: mx.array | None = None

    def clear(self) -> None:
        self.present, self.single, self.mask = (), None, None


class _SlotWeights:
    """One wrapped layer's per-slot A, B and scale, kept out of the model's parameter tree, and the
    present adapters' A side by side and B stacked (zeros for an adapter without this layer), made once
    for each set of adapters a mixed pass uses."""

    __slots__ = ("a", "b", "joined", "scale")

    def __init__(self, slots: int) -> None:
        self.a: list[mx.array | None] = [None] * slots
        self.b: list[mx.array | None] = [None] * slots
        self.scale: list[float] = [0.0] * slots
        self.joined: dict[tuple[int, ...], tuple[mx.array, mx.array]] = {}

    def join(self, present: tuple[int, ...], ranks: list[int], dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        got = self.joined.get(present)
        if got is None:
            shapes = next(
                (a.shape[0], b.shape[1])
                for a, b in zip(self.a, self.b, strict=True)
                if a is not None and b is not None
            )
            a_parts, b_parts = [], []
            for s in present:
                a, b = self.a[s], self.b[s]
                if a is None or b is None:
                    a_parts.append(mx.zeros((shapes[0], ranks[s]), dtype=dtype))
                    b_parts.append(mx.zeros((ranks[s], shapes[1]), dtype=dtype))
                else:
                    a_parts.append(a.astype(dtype))
                    b_parts.append(b.astype(dtype))
            got = (mx.concatenate(a_parts, axis=1), mx.concatenate(b_parts, axis=0))
            mx.eval(got)
            if len(self.joined) >= 4:  # the sets a run of steps uses: a few at a time
                self.joined.pop(next(iter(self.joined)))
            self.joined[present] = got
        return got


class SlotLinear(nn.Module):
    """A linear layer with per-slot LoRA terms, split as the layer is (see the module docstring)."""

    def __init__(self, base: nn.Module, kind: str, slots: TokenSlots, owner: LoraSlots) -> None:
        super().__init__()
        self.base = base
        self.kind = kind  # "whole", "column", "row" or "fused" (rank.lora.TargetShape)
        self.slots = slots
        self.owner = owner
        self.weights = _SlotWeights(owner.count)

    def __call__(self, x: mx.array) -> mx.array:
        ctx, w = self.slots, self.weights
        if not ctx.present or all(w.a[s] is None for s in ctx.present):
            return self.base(x)
        if self.kind != "row":
            return self._add_lora(self.base(x), x)
        base = self.base
        if "scales" in base:  # quantized: the layer's own matmul, without its all_sum
            y = mx.quantized_matmul(
                x,
                base["weight"],
                scales=base["scales"],
                biases=base.get("biases"),
                transpose=True,
                group_size=base.group_size,
                bits=base.bits,
                mode=getattr(base, "mode", "affine"),
            )
        else:
            y = x @ base["weight"].T
        y = mx.distributed.all_sum(self._add_lora(y, x), group=base.group)
        return y + base["bias"] if "bias" in base else y

    def _add_lora(self, y: mx.array, x: mx.array) -> mx.array:
        """`y` plus the LoRA term of every token of `x` (zero for tokens whose slot does not modify this
        layer). Where the dtypes agree the term is added by the second matmul itself (`addmm`: one BLAS
        call instead of a matmul, a scaling and an addition over the whole output); otherwise it is
        mlx-lm's `LoRALinear` arithmetic, `y + (scale * ((x @ A) @ B)).astype(x.dtype)`."""
        ctx, w = self.slots, self.weights
        flat = x.reshape(-1, x.shape[-1])
        if ctx.single is not None:
            a, b, scale = w.a[ctx.single], w.b[ctx.single], w.scale[ctx.single]
            assert a is not None and b is not None
            h = flat @ a
        else:
            assert ctx.mask is not None
            a, b = w.join(ctx.present, self.owner.ranks, ctx.mask.dtype)
            h, scale = (flat @ a) * ctx.mask, 1.0  # each token's own adapter's columns, times its scale
        if h.dtype == b.dtype == y.dtype:
            return mx.addmm(y.reshape(h.shape[0], -1), h, b, alpha=scale).reshape(y.shape)
        return y + (scale * (h @ b)).astype(x.dtype).reshape(y.shape)


def _full_shape(module: nn.Module, kind: str, n: int) -> TargetShape:
    out_w, in_w = (int(d) for d in module["weight"].shape)
    bits = getattr(module, "bits", None)
    if "scales" in module and bits:
        in_w = in_w * 32 // bits
    if kind in ("column", "fused"):
        out_w *= n
    elif kind == "row":
        in_w *= n
    return TargetShape(in_w, out_w, kind)


class LoraSlots:
    """The adapters a rank holds unfused: slots 1..count-1 (slot 0 is the base model), each wrapped layer's
    share of them, and the current pass's token slots."""

    def __init__(self, model: nn.Module, group: Any, max_loras: int) -> None:
        self.group = group if group is not None and group.size() > 1 else None
        self.size = self.group.size() if self.group is not None else 1
        self.rank = self.group.rank() if self.group is not None else 0
        self.count = max_loras + 1
        self.context = TokenSlots()
        self.layers: dict[str, SlotLinear] = {}
        self.targets: dict[str, TargetShape] = {}  # what an adapter may modify: fixed after start
        self.loaded: dict[int, AdapterInfo] = {}
        self.scales = [0.0] * self.count
        self.ranks = [0] * self.count
        self.dtype: mx.Dtype = mx.float32  # of the adapters' matrices, for a mixed pass's mask
        wraps = []
        for path, module in model.named_modules():
            if not _LAYER_PATH.search(path) or isinstance(module, SlotLinear):
                continue
            kind = "column" if isinstance(module, _COLUMN) else "row" if isinstance(module, _ROW) else None
            if kind is None and isinstance(module, _WHOLE):
                kind = "whole"
            if kind is None:
                continue
            if kind == "column" and path.rsplit(".", 1)[-1] in FUSED_NAMES:
                kind = "fused"
            self.targets[path] = _full_shape(module, kind, self.size)
            self.layers[path] = wrapper = SlotLinear(module, kind, self.context, self)
            wraps.append((path, wrapper))
        if not wraps:
            raise AdapterError("this model has no linear layers an adapter could modify")
        model.update_modules(tree_unflatten(wraps))

    def load(self, slot: int, path: Path, config: dict[str, Any], digest: bytes | None = None) -> AdapterInfo:
        """Put the adapter at `path` into `slot` (each rank its share); `digest`: what rank 0 inspected,
        so a rank whose copy differs says so instead of computing something else."""
        if not 0 < slot < self.count:
            raise EngineError(f"adapter slot {slot} is outside 1..{self.count - 1} (--max-loras)")
        info = inspect_adapter(path, config, self.size, self.targets)
        if digest and info.digest != digest:
            raise AdapterError(
                f"adapter {path} on rank {self.rank} differs from rank 0's copy (content hash)"
            )
        self.unload(slot)
        arrays = []
        for target, (a, b) in load_matrices(Path(path).expanduser()).items():
            layer = self.layers[target]
            if layer.kind == "column":
                b = mx.split(b, self.size, axis=1)[self.rank]
            elif layer.kind == "row":
                a = mx.split(a, self.size, axis=0)[self.rank]
            a, b = mx.contiguous(a), mx.contiguous(b)
            w = layer.weights
            w.a[slot], w.b[slot], w.scale[slot] = a, b, info.scale
            w.joined.clear()
            arrays += [a, b]
        mx.eval(arrays)
        self.loaded[slot] = info
        self.scales[slot], self.ranks[slot] = info.scale, info.rank
        self.dtype = mx.result_type(*arrays) if len(self.loaded) == 1 else mx.result_type(self.dtype, *arrays)
        return info

    def unload(self, slot: int) -> None:
        if self.loaded.pop(slot, None) is None:
            return
        self.scales[slot] = 0.0
        for layer in self.layers.values():
            w = layer.weights
            if w.a[slot] is not None:
                w.a[slot] = w.b[slot] = None
                w.scale[slot] = 0.0
            w.joined.clear()

    @contextmanager
    def tokens(self, token_slots: Sequence[int]) -> Iterator[None]:
        """Within: the model's layers give token i the LoRA term of slot `token_slots[i]`."""
        self._set(token_slots)
        try:
            yield
        finally:
            self.context.clear()

    def _set(self, token_slots: Sequence[int]) -> None:
        ctx = self.context
        ctx.clear()
        present = tuple(sorted({s for s in token_slots if s}))
        if not present:
            return
        missing = [s for s in present if s not in self.loaded]
        if missing:
            raise EngineError(f"tokens of adapter slot(s) {missing}, which hold no adapter")
        ctx.present = present
        if len(present) == 1 and 0 not in token_slots:
            ctx.single = present[0]
            return
        slots = np.asarray(token_slots)
        mask = np.zeros((len(token_slots), sum(self.ranks[s] for s in present)), dtype=np.float32)
        lo = 0
        for s in present:
            mask[slots == s, lo : lo + self.ranks[s]] = self.scales[s]
            lo += self.ranks[s]
        ctx.mask = mx.array(mask).astype(self.dtype)
