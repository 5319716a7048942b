"""What the routes need from the rest of rank 0, bundled: the engine door, the tokenizer, the settings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.defaults import SamplingDefaults
from api.errors import APIError
from cluster.adapters import AdapterInspector, AdapterState
from cluster.config import ServingConfig
from cluster.engine_client import EngineClient
from cluster.snapshot import JobFacts, JobSnapshot


class TextCodec(Protocol):
    """The tokenizer as the API sees it (implemented by `rank.tokenizer.ChatTokenizer`)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...


@dataclass
class Service:
    client: EngineClient
    tokenizer: TextCodec
    config: ServingConfig
    vocab_size: int
    started: float = field(default_factory=time.time)
    # Validates an adapter folder for POST /admin/adapters (rank/lora.py's inspect_adapter, bound to this
    # model and rank count); None: runtime loading is off. Run on a worker thread: it reads files.
    inspect_adapter: AdapterInspector | None = None
    # Sampling values for fields a request omits (the model's generation_config.json; api/defaults.py).
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    tool_parser: str | None = None  # --tool-parser: the tool-call format's name (None: from the template)

    def snapshot(self) -> JobSnapshot:
        """What /health, /metrics and /admin/* show: the engine's last published snapshot, never its live
        statistics. Overlaid live: the engine's lifecycle state with its failure, and the operator's
        admission pause, which `EngineClient` owns and HTTP or a watchdog change at once (a drain or a
        failure must show before the engine's next publish, which a hung engine never makes)."""
        c = self.client
        snap: JobSnapshot | None = c.snapshot
        if snap is None:  # the engine has not published yet
            cfg = self.config
            snap = JobSnapshot.starting(
                JobFacts(cfg.model_name, cfg.world_size, cfg.context_length, self.started)
            )
        return snap.with_lifecycle(c.state.value, c.admission_paused, c.failure)

    def model_card(self, adapter: str = "") -> dict[str, Any]:
        """OpenAI's model object; an adapter's names its base model as `parent`, as vLLM's does."""
        card: dict[str, Any] = {
            "id": adapter or self.config.model_name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "orchard",
        }
        if adapter:
            card["parent"] = self.config.model_name
        return card

    def model_cards(self) -> list[dict[str, Any]]:
        """The base model, then every adapter that serves requests now."""
        rows = self.client.adapters.rows() if self.client.adapters is not None else ()
        ready = [a.name for a in rows if a.state == AdapterState.READY.value]
        return [self.model_card()] + [self.model_card(name) for name in ready]

    def check_model(self, name: str | None, param: str | None = "model") -> str:
        """The adapter `name` selects ("" for the base model, also when `model` is omitted, as vLLM and
        llama.cpp allow), or a 404 naming what is served. The engine door checks again when it accepts
        the request (an unload may come in between)."""
        if name is None or name == self.config.model_name:
            return ""
        reg = self.client.adapters
        if reg is not None and reg.state_of(name) is AdapterState.READY:
            return name
        served = [self.config.model_name] + [
            a.name for a in (reg.rows() if reg is not None else ()) if a.state == AdapterState.READY.value
        ]
        listing = ", ".join(repr(n) for n in served[:8]) + (", ..." if len(served) > 8 else "")
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {listing}",
            param=param,
            code="model_not_found",
        )
