"""A request's life on rank 0: what the API submits, the one record the scheduler keeps, the events out.

The engine thread never touches asyncio and the API never touches MLX: the API submits a
`GenerationRequest` with a thread-safe `sink` callable; the scheduler turns it into its `Request`, the one
place that request's state lives until it finishes; the engine calls the sink with `RequestEvent`s.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.textstream import Decode, IncrementalDetokenizer, StopMatcher

if TYPE_CHECKING:
    from cluster.constraints import Constraint
    from cluster.prefix import PrefixState
    from cluster.speculation import SpecState


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    CANCELLED = "cancelled"  # client went away or an operator cancelled it
    ERROR = "error"  # the engine failed; `RequestEvent.error` says why
    # the constraint's matcher allowed no token or failed (`RequestEvent.error` says why); the text so far
    # is delivered, but it does not match the constraint
    GRAMMAR_ERROR = "grammar_error"


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
    # vLLM's extensions (docs/extensions.md)
    ignore_eos: bool = False  # EOS does not finish the request (max_tokens and the context still do)
    min_tokens: int = 0  # neither EOS, stop ids nor stop strings finish it before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # finish STOP on these ids, like EOS (the id is not in the text)
    include_stop_str_in_output: bool = False  # the matched stop string stays in the output
    skip_special_tokens: bool = True  # False: the detokenizer keeps special tokens (tool-call markers)
    prompt_logprobs: int | None = None  # echo+logprobs: each prompt token's logprob plus top-k alternatives

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def plain_greedy(self) -> bool:
        """The pick is the argmax of the model's logits as they come: nothing read from the rest of the
        distribution (under TP, rank 0 then needs each rank's best entry, not its slice of the vocabulary)."""
        return self.greedy and self.logits_alone

    @property
    def logits_alone(self) -> bool:
        """Nothing but the model's logits decides the pick: no logit bias, no penalties, no logprobs to
        report (each would need the whole distribution on rank 0)."""
        return not self.logit_bias and self.logprobs is None and not self.penalised

    @property
    def plain_sampling(self) -> bool:
        """The pick is a sample of softmax(logits / temperature) as they come: no top-k, top-p or min-p cut,
        nothing else read from the distribution (under TP, each rank adds the Gumbel noise of the row's key
        to its slice and rank 0 needs its best entry: `StepPlan.draws`)."""
        cut = 0 < self.top_k or self.top_p < 1.0 or self.min_p > 0.0
        return not self.greedy and not cut and self.logits_alone


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
    # With `SamplingParams.prompt_logprobs`, on the first event only: one entry per prompt token, None for
    # position 0 (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


EventSink = Callable[[RequestEvent], None]


@dataclass(slots=True)
class GenerationRequest:
    """What the API hands the engine door (`EngineClient.submit`), which stamps `arrival`."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    sink: EventSink
    client: str = ""
    arrival: float = 0.0
    adapter_name: str = ""  # the LoRA adapter asked for by name (`model`); "": the base model
    adapter: int = 0  # its slot, set by the engine door when it accepts the request (and counts its use)
    # n > 1: the id of a sibling with the same prompt whose prompt KV this one shares ("": none). The route
    # submits "<rid>", "<rid>-1", ...; the scheduler prefills the first and starts the others from its blocks.
    fork_of: str = ""
    constraint: Constraint | None = None  # what the output must match (cluster/constraints.py)
    speculative: bool = True  # False: this request never verifies drafts (the body's "speculative")


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"  # queued for a batch slot
    PREFILL = "prefill"  # its prompt is being computed
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """Everything rank 0 knows about one request, owned by the scheduler from `add` to its final event.

    Other parts receive it or look it up in `Scheduler.requests`; nobody keeps a map of their own. What
    later features attach (a grammar matcher, drafted tokens, an adapter slot) goes here as fields too.
    """

    request_id: str
    seq_id: int  # the ranks' name for its KV cache (bus messages carry this, not the request id)
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    sink: EventSink
    client: str
    detok: IncrementalDetokenizer
    stop: StopMatcher
    arrival: float
    status: RequestStatus = RequestStatus.WAITING
    computed: int = 0  # prompt positions whose KV is on every rank
    output: list[int] = field(default_factory=list)
    admitted: bool = False  # the ranks know its sequence (it must be released)
    prefix: PrefixState | None = None  # with a prefix cache: block hashes and referenced blocks
    first_token_at: float | None = None
    last_token_at: float | None = None
    # The sampler's per-request state (rank/sampler.py): its PRNG key (an MLX array; cluster/ never
    # imports MLX) and, with penalties, how often each token was generated.
    rng_key: object | None = None
    token_counts: Counter[int] | None = None
    adapter: int = 0  # the LoRA slot its tokens run with (cluster/adapters.py); 0: the base model
    fork_of: str = ""  # n > 1: the sibling whose prompt KV it starts from (GenerationRequest.fork_of)
    constraint: Constraint | None = None
    # rank 0's llguidance matcher for `constraint` (rank/grammar.py), made when it is first sampled
    matcher: object | None = None
    # With sampling.prompt_logprobs: the entries for prompt tokens 1.. as the executor computes them
    # (rank 0), delivered on the first event with None for token 0.
    prompt_logprobs: list[TokenLogprob] | None = None
    speculative: bool = True  # it may verify drafts (GenerationRequest.speculative)
    spec: SpecState | None = None  # its speculation while it decodes (cluster/speculation.py)

    @classmethod
    def from_submission(cls, sub: GenerationRequest, seq_id: int, decode: Decode) -> Request:
        return cls(
            request_id=sub.request_id,
            seq_id=seq_id,
            prompt_tokens=sub.prompt_tokens,
            sampling=sub.sampling,
            sink=sub.sink,
            client=sub.client,
            detok=IncrementalDetokenizer(decode),
            stop=StopMatcher(sub.sampling.stop, include=sub.sampling.include_stop_str_in_output),
            arrival=sub.arrival,
            adapter=sub.adapter,
            constraint=sub.constraint,
            fork_of=sub.fork_of,
            speculative=sub.speculative,
        )

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_tokens)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


class Admission(str, enum.Enum):
    """Outcome of `submit`: an expected condition, so a return value (STYLE rule 4)."""

    ACCEPTED = "accepted"
    QUEUE_FULL = "queue_full"
    PAUSED = "paused"  # an operator paused admission (/admin/drain); the job keeps serving
    SHUTTING_DOWN = "shutting_down"  # the job is stopping (SIGTERM): in-flight requests finish
    UNAVAILABLE = "unavailable"
    UNKNOWN_MODEL = "unknown_model"  # no adapter serves that name now (never loaded, or being unloaded)
