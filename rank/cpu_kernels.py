"""Faster stand-ins for the two MLX operations that dominate a llama forward pass on the CPU.

MLX's CPU backend evaluates `exp` (and every other transcendental) one value at a time, at about 20 ns a
value: 20x slower than numpy's vectorized `exp` (measured here: 446 ms against 24 ms for 21.7 M values).
Two places of a llama layer are made of exps:

- softmax in attention: a 1,555-token prompt of the embedded model spent 570 of a layer's 820 ms there.
  `attention` computes it in numpy instead: the scores block by block with a BLAS matmul, softmax in place,
  and only the keys a causal block can see (half the work of a full-square prefill); the blocks (or, in a
  decode step, groups of sequences) run on the rank's cores in parallel, which MLX leaves idle meanwhile.
  570 ms become about 40. The result goes back into the MLX graph as a new array, so evaluation breaks at
  every layer: that costs less than the exps it saves from a few thousand scores on, and smaller calls (a
  decode step over a short context) keep MLX's kernel.
- SiLU in the MLP (a sigmoid: one exp per FFN value): `swiglu` computes 2^(-x log2 e) with `mx.power`,
  which MLX evaluates 3x faster than `exp`, and stays in the graph (57 ms become 17 for 1,555 tokens).

Macs (Metal) never take these paths: they are installed only when MLX's default device is the CPU. They
are on by default there; `--cpu-kernels off` (ORCHARD_CPU_KERNELS=off) turns them off. Quantized KV caches
and attention sinks keep MLX's kernels. `rank.mlx_patch` puts them in mlx-lm's way (with the packed-step
seam of `rank.packing`, which every device gets).
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from rank import mlx_patch
from rank.packing import Attend

# Below this many scores (batch x heads x queries x keys) MLX's own kernel is used: its exps cost about
# what breaking the graph does (measured: equal at 4.6 Ki scores, numpy 2.3x faster at 22 Ki).
MIN_SCORES = 1 << 13
# ... and for decode steps (a few queries per row, the batch's rows each with a mask row), where leaving
# the graph at every layer costs more: 8 chats of ~170 positions (12 Ki scores) decoded in 90 ms a step
# with MLX's kernel, 98 with numpy; a shared 1,550-token document (112 Ki) in 235 against 148 ms: even
# at about 21 Ki (benchmarks/serve_bench.py distinct and shared-prefix, 8 streams, step log).
MIN_DECODE_SCORES = 24 << 10
DECODE_QUERIES = 17  # queries a row feeds in a decode step: its token and up to 16 drafts (--spec-tokens)
# Queries a block: a causal block skips the keys after its last query, so smaller blocks skip more, down
# to where the matmuls get too thin (1,555-token prompt: 39 ms at 256, 43 at 512, 45 at 64, 67 unblocked).
QUERY_BLOCK = 256
# Scores held at once, per KV head: bounds the temporary memory of a long context (16 Mi floats, 64 MiB).
BLOCK_SCORES = 1 << 24

_FLOOR = np.float32(-80.0)
# Up to this many query rows per KV head (group x block rows), scores are computed as K q^T.
_THIN_ROWS = 8


def wanted(setting: str | None = None) -> bool:
    """Whether to use these kernels: on with a CPU default device, unless turned off."""
    value = (setting or os.environ.get("ORCHARD_CPU_KERNELS") or "auto").lower()
    if value in ("off", "0", "no", "false", "none"):
        return False
    if value in ("on", "1", "yes", "true"):
        return True
    return mx.default_device() == mx.cpu


def install(model: Any, setting: str | None = None) -> bool:
    """Route `model`'s attention and SwiGLU through this module's kernels when wanted; returns whether it did.

    The packed-step seam is installed whatever the setting, MLX's attention doing the work when the
    kernels are off: a step's passes, and so its collectives, must be the same on every rank, even where
    one rank runs on Metal and another on a CPU. "off" puts MLX's attention and SiLU back."""
    kernels = wanted(setting)
    patched = mlx_patch.install(model, attention_for if kernels else None, swiglu if kernels else None)
    if patched.attention:
        numpy_blas_single_threaded()
    return patched.attention


def numpy_blas_single_threaded() -> bool:
    """Give numpy's own OpenBLAS (its wheel bundles one, apart from the one MLX uses) a single thread.

    Two OpenBLAS thread pools in one process fight: each pool's threads spin for a while after a call,
    so MLX's matmuls and numpy's slow each other down (a 1,555-token prefill took 15.5 s in 512-token
    chunks, against 7.9 s with this). One thread costs the attention matmuls little (43 -> 52 ms a layer)
    and frees the other cores for MLX's pool. Returns whether numpy's library was found."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for name in (
            "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                return True
    return False


@functools.partial(mx.compile, shapeless=True)  # as mlx-lm's own: every batch and chunk shape, one trace
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, with the sigmoid's exp as a power of 2 (see the module's docstring)."""
    g = gate.astype(mx.float32)  # the exponent rounded to bf16 would cost SiLU 3% of precision
    return (g / (1.0 + mx.power(2.0, g * -1.4426950408889634))).astype(x.dtype) * x


def attention_for(fallback: Attend) -> Attend:
    """mlx-lm's attention function `fallback` with the calls large enough to pay for leaving MLX's graph
    done by `attention`; quantized caches, sinks and small calls keep MLX's kernel."""

    def scaled_dot_product_attention(
        queries: mx.array,
        keys: Any,
        values: Any,
        cache: Any,
        scale: float,
        mask: Any,
        sinks: mx.array | None = None,
    ) -> mx.array:
        # (a packed row's segments come with no cache: the quick test first)
        if sinks is None and (cache is None or (isinstance(keys, mx.array) and not hasattr(cache, "bits"))):
            b, h, q_len, _ = queries.shape
            floor = MIN_DECODE_SCORES if q_len <= DECODE_QUERIES else MIN_SCORES
            if b * h * q_len * keys.shape[2] >= floor:
                return attention(queries, keys, values, scale, mask)
        return fallback(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    return scaled_dot_product_attention


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any) -> mx.array:
    """softmax(q k^T * scale + mask) v, as `mx.fast.scaled_dot_product_attention` computes it, with
    queries (B, H, L, D), keys and values (B, KV, T, D), H a multiple of KV, and `mask` None, "causal"
    (the queries are the last L of the T positions) or an array broadcastable to (B, H, L, T), boolean
    (True = attend) or additive. Values may be narrower than keys (MLA's prefill): the output has theirs."""
    dtype = queries.dtype
    if dtype != mx.float32:
        queries, keys, values = (a.astype(mx.float32) for a in (queries, keys, values))
    causal = isinstance(mask, str)
    if isinstance(mask, mx.array):
        if mask.dtype != mx.bool_ and mask.dtype != mx.float32:
            mask = mask.astype(mx.float32)  # an additive mask in the model's dtype (numpy has no bfloat16)
        mx.eval(queries, keys, values, mask)  # here MLX releases the GIL; numpy's conversion would not
        mask_np: np.ndarray | str | None = np.asarray(mask)
    else:
        mx.eval(queries, keys, values)
        mask_np = mask
    q, k, v = np.asarray(queries), np.asarray(keys), np.asarray(values)
    batch, heads, q_len, dim = q.shape
    kv_heads, t_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    group = heads // kv_heads
    # Every (sequence, KV head) pair at once: numpy's stacked matmul loops over them in C. A query head
    # h belongs to KV head h // group, so (B, H, ...) splits into (B, KV, group, ...).
    q5 = q.reshape(batch, kv_heads, group, q_len, dim)
    out = np.empty((batch, kv_heads, group, q_len, v_dim), dtype=np.float32)
    mask5 = None
    if isinstance(mask_np, np.ndarray):
        mask5 = np.broadcast_to(mask_np, (batch, heads, q_len, t_len)).reshape(
            batch, kv_heads, group, q_len, t_len
        )
    workers = _workers()
    rows = max(1, min(QUERY_BLOCK, BLOCK_SCORES // max(1, batch * heads * t_len)))
    if q_len >= 32 * workers:  # a chunk of one block still gives every worker a share
        rows = min(rows, -(-q_len // workers))
    blocks = [(r0, min(q_len, r0 + rows)) for r0 in range(0, q_len, rows)]
    # Independent pieces of work, one per query block, or per group of sequences when there is a single
    # block (a decode step): numpy leaves the GIL in its matmuls and ufuncs, so they run on every core
    # that MLX's matmuls (idle meanwhile) use.
    parts = min(batch, workers) if len(blocks) < workers else 1
    seqs = [(batch * i // parts, batch * (i + 1) // parts) for i in range(parts)]
    tasks = [(b0, b1, r0, r1) for r0, r1 in blocks for b0, b1 in seqs]

    def attend(task: tuple[int, int, int, int]) -> None:
        b0, b1, r0, r1 = task
        n, nb = r1 - r0, b1 - b0
        # A causal block sees the keys up to its last query's position, and no further.
        seen = t_len - q_len + r1 if causal else t_len
        qb = (q5[b0:b1, :, :, r0:r1] * np.float32(scale)).reshape(nb, kv_heads, group * n, dim)
        kb = k[b0:b1, :, :seen]
        if group * n <= _THIN_ROWS:  # K q^T reads the keys row by row: 1.7x faster for a decode step
            s = np.ascontiguousarray(np.matmul(kb, qb.swapaxes(-1, -2)).swapaxes(-1, -2))
        else:
            s = np.matmul(qb, kb.swapaxes(-1, -2))  # (nb, KV, group * n, seen)
        s5 = s.reshape(nb, kv_heads, group, n, seen)
        if causal and n > 1:
            # Query row i (position seen - n + i) sees keys up to its own: -inf above that diagonal,
            # which lies in the block's last n columns.
            s5[..., seen - n :] += _upper(n)
        elif mask5 is not None:
            block_mask = mask5[b0:b1, :, :, r0:r1, :seen]
            if block_mask.dtype == np.bool_:
                np.copyto(s5, -np.inf, where=~block_mask)
            else:
                s5 += block_mask
        peak = s.max(axis=-1, keepdims=True)
        peak[peak == -np.inf] = 0.0  # a row that sees no key: finite (all weights equal), as MLX's
        s -= peak
        # exp(-80) is still a normal float: below it, exp returns subnormals, which make both the exp
        # and the matmul with them several times slower on x86; their weight is nil anyway.
        np.maximum(s, _FLOOR, out=s)
        np.exp(s, out=s)
        total = s.sum(axis=-1, keepdims=True)
        o = np.matmul(s, v[b0:b1, :, :seen])
        o /= total
        out[b0:b1, :, :, r0:r1] = o.reshape(nb, kv_heads, group, n, v_dim)

    if len(tasks) > 1 and workers > 1:
        list(_pool(workers).map(attend, tasks))
    else:
        for task in tasks:
            attend(task)
    out = out.reshape(batch, heads, q_len, v_dim)
    result = mx.array(out)
    return result if dtype == mx.float32 else result.astype(dtype)


def _workers() -> int:
    """Threads for attention: this rank's share of the host's cores, as OpenBLAS gets (rank.env)."""
    try:
        return max(1, int(os.environ.get("OPENBLAS_NUM_THREADS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpu-attention")


@functools.lru_cache(maxsize=8)
def _upper(n: int) -> np.ndarray:
    return np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
