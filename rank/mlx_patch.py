"""The one place that changes mlx-lm's code at run time: the seam packed steps and the CPU kernels use.

mlx-lm's model files (0.32: `models/llama.py` and its kin) call the `scaled_dot_product_attention` and
`swiglu` they import from `models/base.py` and `models/activations.py` as globals of the module that
defines the attention layer (the model's own, or another: smollm3's layers are llama's), and each
attention layer calls `self.rope(x, offset=cache.offset)` before `cache.update_and_fetch`, then passes
the cache on to the attention function. Those globals and each layer's `rope` attribute are what is
replaced here, nothing else, and only for the mlx-lm minor version this was written against: a newer or
older one may call them differently, and a seam that half fits computes wrong numbers without an error.
So on any other version, or when an attribute is missing, nothing is replaced: mlx-lm's own code runs (no
packed steps, no CPU kernels) and one log line says so. Whether a model's layers really fit the seam is
checked per model by rank.model_caps. `fix_upstream` works around mlx-lm bugs that batching triggers.

Every rank makes the same decision from the same model and version, so a step's passes (and collectives)
agree across ranks as long as the ranks run the same mlx-lm.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rank.packing import Attend, SegmentRoPE, attention_seam, attentions

log = logging.getLogger(__name__)

# The mlx-lm minor version this seam was written for (read from its 0.32.2 sources).
WRITTEN_FOR = (0, 32)
ATTENTION, SWIGLU = "scaled_dot_product_attention", "swiglu"
_ORIGINALS = "_orchard_mlx_kernels"  # the model module's own functions, kept to put them back


@dataclass(frozen=True, slots=True)
class Patched:
    """What `install` replaced: the packed-step seam, the CPU attention and SwiGLU; `note` says what it
    left alone and why (also logged), None when everything asked for was done."""

    packing: bool
    attention: bool
    swiglu: bool
    note: str | None = None


def version_problem(version: str) -> str | None:
    """Why the seam must not be installed on mlx-lm `version`, or None when it was written for it."""
    written = f"{WRITTEN_FOR[0]}.{WRITTEN_FOR[1]}"
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        return f"mlx-lm {version!r} is not a version this patch can compare with the {written} it was written for"
    minor = (int(found[1]), int(found[2]))
    if minor > WRITTEN_FOR:
        return f"mlx-lm {version} is newer than the {written} this patch was written for"
    if minor < WRITTEN_FOR:
        return f"mlx-lm {version} is older than the {written} this patch was written for"
    return None


def install(
    model: Any,
    attention: Callable[[Attend], Attend] | None = None,
    swiglu: Callable[..., Any] | None = None,
    version: str | None = None,
) -> Patched:
    """Put mlx-lm's own functions back into `model`'s modules, then install the packed-step seam and, when
    given, `attention(mlx_lm_attention)` and `swiglu` in front of mlx-lm's. `version` defaults to the
    installed mlx-lm's (tests pass another). Idempotent: installing without kernels undoes them.

    The modules are those that define the model's attention layers (smollm3's are llama's, qwen3_5's are
    qwen3_next's): the globals those layers' code reads."""
    restore(model)
    if version is None:
        import mlx_lm

        version = str(getattr(mlx_lm, "__version__", "unknown"))
    name = type(model).__module__
    layers = attentions(model)
    modules = _attention_modules(model)
    problem = version_problem(version)
    if problem is None and (not modules or not all(hasattr(m, ATTENTION) for m in modules)):
        missing = [m.__name__ for m in modules if not hasattr(m, ATTENTION)] or [name]
        problem = f"{', '.join(missing)} has no {ATTENTION}"
    if problem is not None:
        log.warning("%s: packed steps and CPU kernels off, mlx-lm's own code runs", problem)
        return Patched(False, False, False, problem)
    for layer in layers:
        layer.rope = SegmentRoPE(layer.rope)
    swapped = False
    for module in modules:
        originals: dict[str, Any] = module.__dict__.setdefault(_ORIGINALS, {})
        mlx_attention: Attend = originals.get(ATTENTION, getattr(module, ATTENTION))
        seam = attention_seam(attention(mlx_attention) if attention else mlx_attention)
        _replace(module, originals, ATTENTION, seam)
        if swiglu is not None and hasattr(module, SWIGLU):
            _replace(module, originals, SWIGLU, swiglu)
            swapped = True
    note = None
    if not layers:
        note = f"{name} has no attention layer with a rope: packed steps off"
        log.warning("%s", note)
    elif swiglu is not None and not swapped:
        log.debug("%s has no %s: CPU attention only", name, SWIGLU)
    return Patched(bool(layers), attention is not None, swapped, note)


def _attention_modules(model: Any) -> list[Any]:
    """The modules whose code runs `model`'s attention layers, each once (the model's own module when
    no layer has a rope: its attention function may still take the CPU kernels)."""
    names = dict.fromkeys(type(a).__module__ for a in attentions(model)) or {type(model).__module__: None}
    return [sys.modules[n] for n in names if n in sys.modules]


def restore(model: Any) -> None:
    """mlx-lm's own functions back in `model`'s modules, and its own RoPE in each attention layer."""
    for layer in attentions(model):
        if isinstance(layer.rope, SegmentRoPE):
            layer.rope = layer.rope.inner
    for module in {*_attention_modules(model), sys.modules.get(type(model).__module__)}:
        if module is None:
            continue
        for name, original in module.__dict__.get(_ORIGINALS, {}).items():
            setattr(module, name, original)


def _replace(module: Any, originals: dict[str, Any], name: str, value: Any) -> None:
    originals.setdefault(name, getattr(module, name))
    setattr(module, name, value)


# Upstream bugs worked around, whatever the mlx-lm version (each fix only acts where mlx-lm would fail).
_FIXED = "_orchard_upstream_fixes"
GEMMA2 = "mlx_lm.models.gemma2"


def fix_upstream(model: Any) -> tuple[str, ...]:
    """Work around mlx-lm bugs that batching triggers in `model`; returns what was fixed (logged once).

    gemma2 (0.32): its attention groups the query heads as (B, kv_heads, repeats, L, D) and adds the mask
    to scores of that shape, but a batch cache's mask is (B, 1, L, S): with more than one sequence and
    more than one query head per KV head the shapes do not broadcast, and a batched decode fails. The mask
    gets the repeats axis, (B, 1, 1, L, S), which is the same mask for every head of a group."""
    module = sys.modules.get(type(model).__module__)
    if module is None or module.__name__ != GEMMA2:
        return ()
    fixed: dict[str, Any] = module.__dict__.setdefault(_FIXED, {})
    grouped = model.layers[0].self_attn.repeats > 1
    if not grouped:  # one query head per KV head: 4-D scores, mlx-lm's mask fits
        if "create_attention_mask" in fixed:
            vars(module)["create_attention_mask"] = fixed.pop("create_attention_mask")
        return ()
    if "create_attention_mask" not in fixed:
        original = vars(module)["create_attention_mask"]
        fixed["create_attention_mask"] = original

        def create_attention_mask(h: Any, cache: Any = None, **kwargs: Any) -> Any:
            import mlx.core as mx

            mask = original(h, cache, **kwargs)
            if isinstance(mask, mx.array) and mask.ndim == 4:
                mask = mx.expand_dims(mask, 2)
            return mask

        vars(module)["create_attention_mask"] = create_attention_mask
        log.info("gemma2: batched decode masks get the query-group axis (works around an mlx-lm bug)")
    return ("gemma2 batched mask",)


def undo_fixes(model: Any) -> None:
    """mlx-lm's own code back (tests show the bug with it)."""
    module = sys.modules.get(type(model).__module__)
    if module is not None:
        for name, original in module.__dict__.pop(_FIXED, {}).items():
            setattr(module, name, original)
