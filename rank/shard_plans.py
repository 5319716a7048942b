"""Tensor parallelism for the mlx-lm families that have no `shard()` of their own (gemma2, gemma3, phi3,
olmo2, granite, starcoder2, smollm3, glm4, mixtral), mirroring what mlx-lm's llama `shard()` does: the
projections into attention heads and into the FFN are split by output rows (`all-to-sharded`), the
projections out of them by input columns (`sharded-to-all`, one all-reduce each), and each attention
module is told it now holds `heads / N` heads. MLX's helpers shard plain and quantized linears alike.

Three shapes need more than that:
- fused projections (phi3's `qkv_proj`, phi3's and glm4's `gate_up_proj`) are split segment by segment,
  so each rank gets its own slice of q, of k and of v (of gate and of up), in the order its forward
  splits them;
- olmo2 normalises q and k over the width of all heads at once: a sharded RMSNorm sums the squares
  across ranks, so every rank divides by the same norm as an unsharded model;
- mixtral's experts are split like an FFN inside each expert (`shard_inplace` on the switch layers; the
  router stays whole) and the block's output is summed across ranks once, after the experts are mixed.

Everything is checked before anything is changed: a model whose heads or widths do not divide is refused
whole with a message that names the rank counts that work, never left half sharded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from cluster.errors import ShardingError


@dataclass(slots=True, frozen=True)
class AttentionPlan:
    """Where an attention module keeps its projections and head counts."""

    heads: str = "n_heads"
    kv_heads: str = "n_kv_heads"
    fused_qkv: str | None = None  # one projection holding q, k and v rows (phi3)
    head_norms: tuple[str, ...] = ()  # RMSNorms over all heads' width at once (olmo2's q_norm, k_norm)


@dataclass(slots=True, frozen=True)
class FeedForwardPlan:
    """Where a layer keeps its FFN: `column` projections go in, `row` comes out."""

    attr: str = "mlp"
    column: tuple[str, ...] = ("gate_proj", "up_proj")
    row: str = "down_proj"
    fused_halves: bool = False  # the one column projection holds gate and up halves (phi3, glm4)
    experts: bool = False  # a mixture of experts: `switch_mlp` sharded in place, the block's sum reduced


@dataclass(slots=True, frozen=True)
class ShardPlan:
    attention: AttentionPlan = AttentionPlan()
    feed_forward: FeedForwardPlan = FeedForwardPlan()


_FUSED_GATE_UP = FeedForwardPlan(column=("gate_up_proj",), fused_halves=True)

PLANS: dict[str, ShardPlan] = {
    "gemma2": ShardPlan(),
    "gemma3_text": ShardPlan(),
    "gemma3": ShardPlan(),  # the multimodal wrapper mlx-lm loads text-only: gemma3_text's layers
    "granite": ShardPlan(),
    "smollm3": ShardPlan(),
    "olmo2": ShardPlan(AttentionPlan(head_norms=("q_norm", "k_norm"))),
    "phi3": ShardPlan(AttentionPlan(fused_qkv="qkv_proj"), _FUSED_GATE_UP),
    "glm4": ShardPlan(feed_forward=_FUSED_GATE_UP),
    "starcoder2": ShardPlan(feed_forward=FeedForwardPlan(column=("c_fc",), row="c_proj")),
    "mixtral": ShardPlan(
        AttentionPlan(heads="num_heads", kv_heads="num_key_value_heads"),
        FeedForwardPlan(attr="block_sparse_moe", experts=True),
    ),
}


def plan_for(model_type: str) -> ShardPlan | None:
    return PLANS.get(model_type)


class ShardedRMSNorm(nn.Module):
    """An RMSNorm over a width split across ranks: the sum of squares is all-reduced, so the norm is the
    unsharded one (mlx-lm's minimax has the same for the same reason)."""

    def __init__(self, weight: mx.array, eps: float, group: Any) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.group = group

    @classmethod
    def from_rms_norm(cls, norm: nn.RMSNorm, group: Any) -> ShardedRMSNorm:
        n, r = group.size(), group.rank()
        return cls(mx.contiguous(mx.split(norm.weight, n, axis=-1)[r]), norm.eps, group)

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.astype(mx.float32)
        norm2 = mx.distributed.all_sum(xf.square().sum(-1, keepdims=True), group=self.group)
        width = x.shape[-1] * self.group.size()
        return (xf * mx.rsqrt(norm2 / width + self.eps) * self.weight).astype(x.dtype)


class ExpertsAllSum(nn.Module):
    """A mixture-of-experts block whose experts hold a slice of every expert's FFN: each rank's mix is a
    partial sum, reduced once here (on the mixed output, not on each of the k experts' outputs)."""

    def __init__(self, block: nn.Module, group: Any) -> None:
        super().__init__()
        self.block = block
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.block(x), group=self.group)


# -- checks -------------------------------------------------------------------------------------------


def _in_features(linear: Any) -> int:
    """Input width of a plain or quantized (switch) linear: packed quantized rows hold 32/bits each."""
    width = int(linear.weight.shape[-1])
    bits = getattr(linear, "bits", None)
    return width * 32 // bits if bits else width


def _out_features(linear: Any) -> int:
    return int(linear.weight.shape[-2])


def _head_counts(attn: Any, plan: AttentionPlan) -> tuple[int, int]:
    return int(getattr(attn, plan.heads)), int(getattr(attn, plan.kv_heads))


def _counts_that_work(values: list[int]) -> str:
    return " or ".join(str(n) for n in range(1, max(values) + 1) if all(v % n == 0 for v in values))


def _check_row(name: str, linear: Any, n: int) -> None:
    """A projection split by input columns: each rank's columns must be whole quantization groups."""
    width = _in_features(linear)
    if width % n:
        raise ShardingError(f"{name}'s input width {width} is not divisible by {n} ranks")
    group_size = getattr(linear, "group_size", None)
    if group_size and (width // n) % group_size:
        raise ShardingError(
            f"{name} is quantized in groups of {group_size}: its input width {width} split {n} ways "
            f"({width // n} a rank) does not keep whole groups: run fewer ranks, or pass --dequantize"
        )


def _check_column(name: str, linear: Any, n: int, segments: list[int]) -> None:
    for size in segments:
        if size % n:
            raise ShardingError(f"{name}'s output width {size} is not divisible by {n} ranks")


def _qkv_sizes(attn: Any, plan: AttentionPlan) -> list[int]:
    heads, kv = _head_counts(attn, plan)
    linear = getattr(attn, plan.fused_qkv or "")
    head_dim = _out_features(linear) // (heads + 2 * kv)
    return [heads * head_dim, kv * head_dim, kv * head_dim]


def check_plan(model: Any, plan: ShardPlan, n: int) -> None:
    """Raise ShardingError, before anything changes, when `n` ranks cannot split this model."""
    for i, layer in enumerate(model.layers):
        attn, a = layer.self_attn, plan.attention
        heads, kv = _head_counts(attn, a)
        if heads % n or kv % n:
            raise ShardingError(
                f"this model has {heads} attention heads and {kv} KV heads: run "
                f"{_counts_that_work([heads, kv])} ranks (this job has {n})"
            )
        where = f"layer {i}"
        if a.fused_qkv:
            _check_column(f"{where} {a.fused_qkv}", getattr(attn, a.fused_qkv), n, _qkv_sizes(attn, a))
        _check_row(f"{where} o_proj", attn.o_proj, n)
        for norm in a.head_norms:
            if int(getattr(attn, norm).weight.shape[-1]) % n:
                raise ShardingError(f"{where} {norm}'s width is not divisible by {n} ranks")
        for name, linear, segments in _ffn_linears(layer, plan.feed_forward):
            full = _out_features(linear)
            if name.endswith(plan.feed_forward.row):
                _check_row(f"{where} {name}", linear, n)
            else:
                _check_column(f"{where} {name}", linear, n, [full // segments] * segments)


def _ffn_linears(layer: Any, ffn: FeedForwardPlan) -> Iterator[tuple[str, Any, int]]:
    """(name, projection, segments) of a layer's FFN, experts' switch layers included."""
    block = getattr(layer, ffn.attr)
    holder = block.switch_mlp if ffn.experts else block
    prefix = "switch_mlp." if ffn.experts else ""
    for name in ffn.column:
        yield prefix + name, getattr(holder, name), 2 if ffn.fused_halves else 1
    yield prefix + ffn.row, getattr(holder, ffn.row), 1


# -- sharding -----------------------------------------------------------------------------------------


def shard_with_plan(model: Any, plan: ShardPlan, group: Any) -> None:
    """Shard `model` across `group` in place (check_plan first: this assumes everything divides)."""
    n = group.size()
    check_plan(model, plan, n)
    for layer in model.layers:
        _shard_attention(layer.self_attn, plan.attention, group)
        _shard_feed_forward(layer, plan.feed_forward, group)


def _shard_attention(attn: Any, a: AttentionPlan, group: Any) -> None:
    n = group.size()
    if a.fused_qkv:
        q, k, _ = _qkv_sizes(attn, a)
        fused = getattr(attn, a.fused_qkv)
        setattr(attn, a.fused_qkv, shard_linear(fused, "all-to-sharded", segments=[q, q + k], group=group))
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    for norm in a.head_norms:
        setattr(attn, norm, ShardedRMSNorm.from_rms_norm(getattr(attn, norm), group))
    setattr(attn, a.heads, getattr(attn, a.heads) // n)
    setattr(attn, a.kv_heads, getattr(attn, a.kv_heads) // n)


def _shard_feed_forward(layer: Any, ffn: FeedForwardPlan, group: Any) -> None:
    block = getattr(layer, ffn.attr)
    segments = 2 if ffn.fused_halves else 1
    if ffn.experts:  # the router stays whole; every expert keeps a slice of its FFN
        for name in ffn.column:
            shard_inplace(getattr(block.switch_mlp, name), "all-to-sharded", segments=segments, group=group)
        shard_inplace(getattr(block.switch_mlp, ffn.row), "sharded-to-all", group=group)
        setattr(layer, ffn.attr, ExpertsAllSum(block, group))
        return
    for name in ffn.column:
        setattr(
            block, name, shard_linear(getattr(block, name), "all-to-sharded", segments=segments, group=group)
        )
    setattr(block, ffn.row, shard_linear(getattr(block, ffn.row), "sharded-to-all", group=group))
