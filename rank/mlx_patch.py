"""The one place that changes mlx-lm's code at run time: the seam packed steps and the CPU kernels use.

mlx-lm's model files (0.32: `models/llama.py` and its kin) call the `scaled_dot_product_attention` and
`swiglu` they import from `models/base.py` and `models/activations.py` as globals of the model's module,
and each attention layer calls `self.rope(x, offset=cache.offset)` before `cache.update_and_fetch`, then
passes the cache on to the attention function. Those globals and each layer's `rope` attribute are what
is replaced here, nothing else, and only for the mlx-lm minor version this was written against: a newer or
older one may call them differently, and a seam that half fits computes wrong numbers without an error.
So on any other version, or when an attribute is missing, nothing is replaced: mlx-lm's own code runs (no
packed steps, no CPU kernels) and one log line says so.

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
    """Put mlx-lm's own functions back into `model`'s module, then install the packed-step seam and, when
    given, `attention(mlx_lm_attention)` and `swiglu` in front of mlx-lm's. `version` defaults to the
    installed mlx-lm's (tests pass another). Idempotent: installing without kernels undoes them."""
    module = sys.modules.get(type(model).__module__)
    restore(model)
    if version is None:
        import mlx_lm

        version = str(getattr(mlx_lm, "__version__", "unknown"))
    name = type(model).__module__
    problem = version_problem(version)
    if problem is None and (module is None or not hasattr(module, ATTENTION)):
        problem = f"{name} has no {ATTENTION}"
    if problem is not None:
        log.warning("%s: packed steps and CPU kernels off, mlx-lm's own code runs", problem)
        return Patched(False, False, False, problem)
    assert module is not None
    originals: dict[str, Any] = module.__dict__.setdefault(_ORIGINALS, {})
    mlx_attention: Attend = originals.get(ATTENTION, getattr(module, ATTENTION))
    layers = attentions(model)
    for layer in layers:
        layer.rope = SegmentRoPE(layer.rope)
    _replace(
        module, originals, ATTENTION, attention_seam(attention(mlx_attention) if attention else mlx_attention)
    )
    swapped = swiglu is not None and hasattr(module, SWIGLU)
    if swapped:
        _replace(module, originals, SWIGLU, swiglu)
    note = None
    if not layers:
        note = f"{name} has no attention layer with a rope: packed steps off"
        log.warning("%s", note)
    elif swiglu is not None and not swapped:
        log.debug("%s has no %s: CPU attention only", name, SWIGLU)
    return Patched(bool(layers), attention is not None, swapped, note)


def restore(model: Any) -> None:
    """mlx-lm's own functions back in `model`'s module, and its own RoPE in each attention layer."""
    module = sys.modules.get(type(model).__module__)
    for layer in attentions(model):
        if isinstance(layer.rope, SegmentRoPE):
            layer.rope = layer.rope.inner
    if module is None:
        return
    for name, original in module.__dict__.get(_ORIGINALS, {}).items():
        setattr(module, name, original)


def _replace(module: Any, originals: dict[str, Any], name: str, value: Any) -> None:
    originals.setdefault(name, getattr(module, name))
    setattr(module, name, value)
