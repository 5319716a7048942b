"""What the routes need from the rest of rank 0, bundled: the engine door, the tokenizer, the settings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.errors import APIError
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
