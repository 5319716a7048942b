"""The model's own output path, applied to the rows that need logits.

The executor runs the inner model (embeddings, layers, final norm) over a pass's positions and needs
logits for a few of them only: the last position of a prompt, one per decode row. Projecting them through
our own copy of the head would skip whatever the model's `__call__` does after its inner model (gemma2's
final softcap, granite's logit scaling, qwen3_5's gather of a sharded head) and would have to guess
whether the head is tied. Instead `ModelHead` calls the model's own `__call__` on a shallow copy of the
model whose inner model is a `_Given` stand-in that returns the rows it is given: every transform the
model applies is applied, by the model's code, and nothing else changes (the copies share every weight).

Under tensor parallelism the vocabulary can be split across ranks (`ModelHead.vocab_slice`): the same
copy, with the projection it uses (the embedding when tied, `lm_head` otherwise, whichever the model's
`__call__` touches) replaced by this rank's rows of it. Elementwise transforms commute with slicing the
vocabulary, so each rank's slice is exactly that part of the model's logits; a head that mixes logits
across the vocabulary (a softmax, a gather) would not, and such a model's head is not sliced: it runs
whole on every rank (`splits_vocabulary` is false when the model's projection is already sharded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_MAX_DEPTH = 3  # top model -> language_model -> model: the deepest nesting in mlx-lm 0.32


class _Given(nn.Module):
    """Stands in for the inner model in a copy of the model: returns `rows`; any other attribute (the
    embedding a tied head projects through, ...) is the inner model's, or `overrides`'."""

    def __init__(self, inner: nn.Module, overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_rows", None)
        object.__setattr__(self, "touched", set())
        for name, value in (overrides or {}).items():
            self[name] = value

    def __getattr__(self, name: str) -> Any:
        touched: set[str] = object.__getattribute__(self, "touched")
        touched.add(name)
        if name in self:
            return self[name]
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        rows = object.__getattribute__(self, "_rows")
        assert rows is not None, "the head's stand-in was called without rows"
        return rows


@dataclass(frozen=True, slots=True)
class InnerPath:
    """Where the inner model sits: `owner` holds it as attribute `name`; `path` leads from the top model
    to `owner` (empty when the top model owns it, ("language_model",) for qwen3_5)."""

    path: tuple[str, ...]
    name: str
    inner: nn.Module
    owner: nn.Module


def find_inner(model: nn.Module) -> InnerPath:
    """The module that holds the model's layers as its own attribute and is called by its owner's
    `__call__` (by mlx-lm convention, an attribute `model` of the top model or of its `language_model`)."""
    first = model.layers[0]  # `model.layers` may be a new list (a pipeline stage's slice of them)

    def search(module: nn.Module, path: tuple[str, ...]) -> InnerPath | None:
        if len(path) >= _MAX_DEPTH:
            return None
        for name, child in module.items():
            if not isinstance(child, nn.Module):
                continue
            own = child.get("layers")
            if isinstance(own, list) and any(layer is first for layer in own):
                return InnerPath(path, name, child, module)
            found = search(child, (*path, name))
            if found is not None:
                return found
        return None

    found = search(model, ())
    if found is None:
        raise ValueError(f"{type(model).__name__}: no inner model holding its layers")
    return found


def _copy_with(model: nn.Module, where: InnerPath, given: _Given, owner_changes: dict[str, Any]) -> nn.Module:
    """A shallow copy of `model` down to the inner model's owner, the inner model replaced by `given`."""
    top = copy.copy(model)
    parent = top
    for name in where.path:
        child = copy.copy(parent[name])
        parent[name] = child
        parent = child
    parent[where.name] = given
    for name, value in owner_changes.items():
        parent[name] = value
    return top


def _rows_of(module: nn.Module, lo: int, hi: int) -> nn.Module:
    """`module` (an Embedding or Linear, plain or quantized) holding only output rows [lo, hi)."""
    part = copy.copy(module)  # the same module type, holding only our rows
    for name in ("weight", "scales", "biases", "bias"):
        if name in module:
            part[name] = mx.contiguous(module[name][lo:hi])
    return part


def _is_sharded(module: nn.Module) -> bool:
    """Whether a projection was already split across ranks by the model's own `shard` (mlx's
    distributed linear layers)."""
    return type(module).__module__.startswith("mlx.nn.layers.distributed")


class ModelHead:
    """`head(rows)` is `model(...)`'s logits for hidden states `rows` (N, D) of the inner model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.where = find_inner(model)
        self.inner = self.where.inner
        self._given = _Given(self.inner)
        self._top = _copy_with(model, self.where, self._given, {})
        # Which projection does the model's own head use? The one its `__call__` touches (lazily: shapes
        # only, nothing evaluated, no collective runs).
        self._run(self._given, self._top, self.inner(mx.zeros((1, 1), dtype=mx.int32))[0])
        self.tied = "embed_tokens" in self._given.touched
        owner = self.where.owner
        if self.tied:
            self.projection: nn.Module = self.inner["embed_tokens"]
        elif "lm_head" in owner:
            self.projection = owner["lm_head"]
        else:
            raise ValueError(f"{type(model).__name__}: its head uses neither embed_tokens nor lm_head")
        self.splits_vocabulary = not _is_sharded(self.projection)

    @property
    def vocab_rows(self) -> int:
        return int(self.projection["weight"].shape[0])

    @staticmethod
    def _run(given: _Given, top: nn.Module, rows: mx.array) -> mx.array:
        object.__setattr__(given, "_rows", rows[None])
        try:
            out = top(mx.zeros((1, rows.shape[0]), dtype=mx.int32))
        finally:
            object.__setattr__(given, "_rows", None)
        return out[0]

    def __call__(self, rows: mx.array) -> mx.array:
        return self._run(self._given, self._top, rows)

    def vocab_slice(self, lo: int, hi: int) -> VocabSlice:
        """The model's head producing only vocabulary entries [lo, hi) (see the module's docstring)."""
        part = _rows_of(self.projection, lo, hi)
        mx.eval(part.parameters())
        if self.tied:
            given = _Given(self.inner, {"embed_tokens": part})
            top = _copy_with(self.model, self.where, given, {})
        else:
            given = _Given(self.inner)
            top = _copy_with(self.model, self.where, given, {"lm_head": part})
        return VocabSlice(given, top, hi - lo)


@dataclass(frozen=True, slots=True)
class VocabSlice:
    """One rank's part of a vocabulary-parallel head: `width` logits a row."""

    given: _Given
    top: nn.Module
    width: int

    def __call__(self, rows: mx.array) -> mx.array:
        return ModelHead._run(self.given, self.top, rows)
