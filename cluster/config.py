"""Settings shared by the HTTP side and the engine. Every limit is configurable and enforced."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class ServingLimits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int = 0  # 0: the model's context length
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 512
    max_waiting: int = 256  # requests queued beyond the running batch; more get 429
    request_timeout: float = 600.0  # seconds from arrival to the last token; then 504 / error event
    max_stop_strings: int = 4


@dataclass(slots=True, frozen=True)
class ServingConfig:
    model_name: str
    context_length: int
    limits: ServingLimits = field(default_factory=ServingLimits)
    api_keys: tuple[str, ...] = ()
    admin_token: str | None = None
    world_size: int = 1

    @property
    def prompt_limit(self) -> int:
        lim = self.limits.max_prompt_tokens
        return min(lim, self.context_length) if lim > 0 else self.context_length
