"""What the routes need from the rest of rank 0, bundled: the engine door, the tokenizer, the settings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.errors import APIError
from cluster.config import ServingConfig
from cluster.engine_client import EngineClient
from cluster.health import HealthTable
from cluster.stats import ServingStats


class KvTier(Protocol):
    """A KV cache tier as operators see it (`cluster.kvindex.TierStats`, `cluster.ssdtier.SsdTier`)."""

    def to_json(self) -> dict[str, object]: ...


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
    stats: ServingStats | None = None
    health: HealthTable | None = None
    kv_tiers: list[KvTier] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "orchard",
        }

    def check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                param=param,
                code="model_not_found",
            )
