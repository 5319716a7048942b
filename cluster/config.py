"""Settings shared by the HTTP side and the engine. Every limit is configurable and enforced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.memory import KvMemory


@dataclass(slots=True, frozen=True)
class ServingLimits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int = 0  # 0: the model's context length
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 512
    max_waiting: int = 256  # requests queued beyond the running batch; more get 429
    request_timeout: float = 600.0  # seconds from arrival to the last token; then 504 / error event
    max_stop_strings: int = 4
    max_messages: int = 4096  # chat messages in one request, checked before anything is rendered
    max_template_chars: int = 0  # a rendered chat prompt; 0: 4 x max_body_bytes (api/prompts.py)


@dataclass(slots=True, frozen=True)
class HttpFront:
    """The HTTP server's edge: who may connect, how many at once, and how long sending a request may take
    (a client trickling bytes must not hold a connection forever)."""

    max_connections: int = 512  # open connections; a new one over the cap gets 503 and is closed
    header_timeout: float = 10.0  # seconds to send a request's headers (from connect or the last response)
    request_read_timeout: float = 60.0  # seconds to send a request's body after its headers; then 408
    allowed_hosts: tuple[str, ...] = ()  # more Host names a key-less loopback server answers ("*": any)
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-For names the client (IPs, CIDRs, "*")
    metrics_token: str | None = None  # read-only token for /metrics (Prometheus), besides the admin token
    sse_keepalive: float = 10.0  # seconds a stream waits silent (queue, prefill) before a comment; 0: off


@dataclass(slots=True, frozen=True)
class ServingConfig:
    model_name: str
    context_length: int
    limits: ServingLimits = field(default_factory=ServingLimits)
    api_keys: tuple[str, ...] = ()
    admin_token: str | None = None
    world_size: int = 1
    front: HttpFront = field(default_factory=HttpFront)
    memory: KvMemory | None = None  # the KV budget per rank (cluster.memory); None: not enforced

    def kv_refusal(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request of this size can never run within the job's KV budget (the message of a 400:
        what it needs, what the job has), or None when it can."""
        return self.memory.refusal(prompt_tokens, max_tokens) if self.memory is not None else None

    def kv_room(self, prompt_tokens: int) -> int | None:
        """The most completion tokens a prompt of this size may have within the KV budget (a default
        max_tokens is capped to it; 0: none fit, see `kv_refusal`), or None when no budget is enforced."""
        return self.memory.room(prompt_tokens) if self.memory is not None else None

    @property
    def prompt_limit(self) -> int:
        lim = self.limits.max_prompt_tokens
        return min(lim, self.context_length) if lim > 0 else self.context_length
