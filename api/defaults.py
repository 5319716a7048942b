"""Sampling defaults for the fields a request leaves out, from the model's `generation_config.json`.

OpenAI's defaults (temperature 1, top_p 1) suit OpenAI's models; a small model sampled at temperature 1
rambles, and its makers say what to use instead in `generation_config.json` (SmolLM2's card: temperature
0.2, top_p 0.9). vLLM reads that file for the same reason (`--generation-config auto`); we read the
same keys, and `--generation-config vllm` turns it off as vLLM's flag does. A value the server cannot
honour (a temperature of 5, a top_p of 0) is dropped with a warning: a bad file must not make every
request that omits the field a 400.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("orchard.api")

FILE_NAME = "generation_config.json"


@dataclass(slots=True, frozen=True)
class SamplingDefaults:
    """What a request gets for each field it omits; None: OpenAI's default (the engine's neutral one)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # generation_config's max_new_tokens
    source: str = ""  # the file they came from ("" : none)

    def describe(self) -> str:
        """One line for the start-up log."""
        set_ = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        shown = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in set_.items() if v is not None
        )
        if not shown:
            return "sampling defaults: OpenAI's (temperature 1, top_p 1)"
        return f"sampling defaults for omitted fields: {shown} (from {self.source})"

    def as_dict(self) -> dict[str, float | int]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "source" and getattr(self, f.name) is not None
        }


# generation_config.json key -> (our field, type, lowest, highest, lowest inclusive)
_KEYS: dict[str, tuple[str, type, float, float, bool]] = {
    "temperature": ("temperature", float, 0.0, 2.0, True),
    "top_p": ("top_p", float, 0.0, 1.0, False),
    "top_k": ("top_k", int, -1, 2**31 - 1, True),
    "min_p": ("min_p", float, 0.0, 1.0, True),
    "repetition_penalty": ("repetition_penalty", float, 0.01, 10.0, True),
    "max_new_tokens": ("max_tokens", int, 1, 2**31 - 1, True),
}


def _valid(value: Any, kind: type, low: float, high: float, low_inclusive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind is int and not float(value).is_integer():
        return False
    if not math.isfinite(value) or value > high:
        return False
    return value >= low if low_inclusive else value > low


def defaults_from(config: dict[str, Any], source: str) -> SamplingDefaults:
    """The defaults a parsed generation config gives; invalid values are skipped with a warning."""
    found: dict[str, Any] = {}
    for key, (name, kind, low, high, inclusive) in _KEYS.items():
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if not _valid(value, kind, low, high, inclusive):
            log.warning("%s: ignoring %s=%r (outside what a request may ask for)", source, key, value)
            continue
        found[name] = kind(value)
    if found.get("top_k") in (0, -1):
        del found["top_k"]  # off, as the engine's default
    return SamplingDefaults(**found, source=source if found else "")


def load_defaults(model_dir: Path, mode: str = "auto") -> SamplingDefaults:
    """`mode` is vLLM's --generation-config: "auto" reads the model's folder, "vllm" uses none, anything
    else is a folder holding a generation_config.json."""
    if mode == "vllm":
        return SamplingDefaults()
    folder = model_dir if mode == "auto" else Path(mode).expanduser()
    path = folder / FILE_NAME
    if not path.is_file():
        if mode != "auto":
            log.warning("--generation-config %s: no %s there; using OpenAI's defaults", mode, FILE_NAME)
        return SamplingDefaults()
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): using OpenAI's sampling defaults", path, exc)
        return SamplingDefaults()
    if not isinstance(config, dict):
        log.warning("%s is not a JSON object: using OpenAI's sampling defaults", path)
        return SamplingDefaults()
    return defaults_from(config, str(path))
