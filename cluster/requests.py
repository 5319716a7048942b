"""What crosses from the HTTP side to the engine and back: requests in, events out.

The engine thread never touches asyncio and the API never touches MLX: the API submits a
`GenerationRequest` with a thread-safe `sink` callable; the engine calls the sink with `RequestEvent`s.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    CANCELLED = "cancelled"  # client went away or an operator cancelled it
    ERROR = "error"  # the engine failed; `RequestEvent.error` says why


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Decoding settings of one request. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token plus top-k alternatives
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated text
    repetition_penalty: float = 1.0  # vLLM/HF: divides positive (multiplies negative) logits of seen tokens

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class RequestEvent:
    """A piece of output: new text and tokens, and on the last event the finish reason and usage."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_type: str = "server_error"  # with `error`: "timeout", "server_error" or "unavailable"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


EventSink = Callable[[RequestEvent], None]
_ids = itertools.count(1)


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    sink: EventSink
    client: str = ""
    arrival: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_ids))


class Admission(str, enum.Enum):
    """Outcome of `submit`: an expected condition, so a return value (STYLE rule 4)."""

    ACCEPTED = "accepted"
    QUEUE_FULL = "queue_full"
    DRAINING = "draining"
    UNAVAILABLE = "unavailable"
