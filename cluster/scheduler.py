"""Continuous batching as a step function over plain data.

`schedule()` turns the queue into the next `StepPlan`; `update()` takes the tokens rank 0 sampled for that
plan and turns them into request events. New requests join between steps, finished ones leave at the
next plan's `release`; nobody waits for the batch to drain. Modelled on vLLM v1's scheduler
(`schedule()` / `update_from_output()`), minus paging.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cluster.messages import Admit, PrefillChunk, StepPlan
from cluster.prefix import PrefixCache, PrefixState
from cluster.requests import FinishReason, GenerationRequest, RequestEvent, TokenLogprob
from cluster.textstream import Decode, IncrementalDetokenizer, StopMatcher


class SeqState(str, enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # sequences being prefilled or decoded at once
    prefill_chunk: int = 256  # prompt tokens per step, shared by all prefilling sequences
    context_length: int = 2048
    # ... and while no sequence decodes, when no stream's inter-token latency depends on short steps:
    # fewer, larger steps prefill faster (a 1,555-token prompt on a 2-core CPU: 3.7 s in 256-token
    # chunks, 3.3 s in one). 0: always prefill_chunk.
    idle_prefill_chunk: int = 1024


@dataclass(slots=True, frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(slots=True)
class Sequence:
    request: GenerationRequest
    detok: IncrementalDetokenizer
    stop: StopMatcher
    state: SeqState = SeqState.WAITING
    computed: int = 0  # prompt positions whose KV is on every rank
    output: list[int] = field(default_factory=list)
    admitted: bool = False  # the ranks know this sequence (it must be released)
    prefix: PrefixState | None = None  # with a prefix cache: block hashes and referenced blocks

    @property
    def seq_id(self) -> int:
        return self.request.seq_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)


Emit = tuple[GenerationRequest, RequestEvent]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        decode: Decode,
        eos_token_ids: Iterable[int],
        clock: Callable[[], float],
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.config = config
        self.prefix_cache = prefix_cache
        self._decode = decode
        self._eos = frozenset(eos_token_ids)
        self._clock = clock
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []  # PREFILL and RUNNING, in admission order
        self._by_request: dict[str, Sequence] = {}
        self._release: list[int] = []
        self._step = 0

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        pending_evictions = self.prefix_cache is not None and self.prefix_cache.has_evictions
        return bool(self._waiting or self._active or self._release or pending_evictions)

    def sequences(self) -> list[Sequence]:
        return list(self._waiting) + list(self._active)

    # -- inputs ----------------------------------------------------------------------------------
    def add(self, request: GenerationRequest) -> None:
        seq = Sequence(
            request=request,
            detok=IncrementalDetokenizer(self._decode),
            stop=StopMatcher(request.sampling.stop),
        )
        if self.prefix_cache is not None:
            seq.prefix = self.prefix_cache.state_for(request.prompt_tokens)
        self._waiting.append(seq)
        self._by_request[request.request_id] = seq

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> list[Emit]:
        """Finish a request wherever it is; returns its final event (none if it is unknown or done)."""
        seq = self._by_request.get(request_id)
        if seq is None or seq.state is SeqState.FINISHED:
            return []
        if seq.state is SeqState.WAITING:
            self._waiting.remove(seq)
        return [self._finish(seq, reason, "")]

    def fail_all(self, message: str) -> list[Emit]:
        out = []
        for seq in self.sequences():
            ev = self._finish(seq, FinishReason.ERROR, "")
            ev[1].error = message
            out.append(ev)
        return out

    # -- the step function -----------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The next plan: fill free slots, start and prefill sequences within the token budget (loading
        cached prefixes, storing new full blocks), decode every running sequence."""
        cfg, cache = self.config, self.prefix_cache
        while self._waiting and len(self._active) < cfg.max_batch:
            seq = self._waiting.popleft()
            seq.state = SeqState.PREFILL
            self._active.append(seq)
        producing: set[bytes] = set()
        if cache is not None:
            producing = cache.producing(
                s.prefix for s in self._active if s.admitted and s.state is SeqState.PREFILL and s.prefix
            )
        budget = cfg.prefill_chunk
        if cfg.idle_prefill_chunk > budget and not any(s.state is SeqState.RUNNING for s in self._active):
            budget = cfg.idle_prefill_chunk
        admits, prefill, stores = [], [], []
        decode_ids, decode_tokens = [], []
        for seq in self._active:
            if seq.state is SeqState.RUNNING:
                decode_ids.append(seq.seq_id)
                decode_tokens.append(seq.output[-1])
                continue
            if budget <= 0:
                continue
            tokens = seq.request.prompt_tokens
            if not seq.admitted:
                cached: tuple[int, ...] = ()
                if cache is not None and seq.prefix is not None:
                    if cache.should_wait(tokens, seq.prefix, producing):
                        continue  # another sequence is computing this prefix right now
                    cached = cache.start(tokens, seq.prefix)
                    seq.computed = len(cached) * cache.block_tokens
                    producing.update(seq.prefix.hashes[seq.prefix.covered :])
                seq.admitted = True
                admits.append(Admit(seq.seq_id, tokens, cached))
            end = min(seq.prompt_len, seq.computed + budget)
            prefill.append(PrefillChunk(seq.seq_id, seq.computed, end))
            budget -= end - seq.computed
            if cache is not None and seq.prefix is not None:
                stores += cache.store(seq.seq_id, tokens, seq.prefix, end)
        release, self._release = tuple(self._release), []
        self._step += 1
        ssd_load: tuple[tuple[int, bytes], ...] = ()
        ssd_save: tuple[tuple[int, bytes], ...] = ()
        ssd_delete: tuple[bytes, ...] = ()
        if cache is not None and cache.ssd is not None:
            ssd_load, ssd_save, ssd_delete = cache.ssd.take()
        return StepPlan(
            step=self._step,
            release=release,
            admit=tuple(admits),
            prefill=tuple(prefill),
            decode_ids=tuple(decode_ids),
            decode_tokens=tuple(decode_tokens),
            store=tuple(stores),
            evict=cache.take_evictions() if cache is not None else (),
            ssd_load=ssd_load,
            ssd_save=ssd_save,
            ssd_delete=ssd_delete,
        )

    def clear_prefix_cache(self, tier: str = "ram") -> int:
        """Drop every cached block of a tier that no running sequence uses; the next plan tells the ranks."""
        return self.prefix_cache.clear(tier) if self.prefix_cache is not None else 0

    def update(self, plan: StepPlan, sampled: dict[int, SampledToken]) -> list[Emit]:
        """Apply the outputs of `plan`; returns the events to deliver."""
        if self.prefix_cache is not None:
            self.prefix_cache.commit()
        by_id = {s.seq_id: s for s in self._active}
        for chunk in plan.prefill:
            seq = by_id.get(chunk.seq_id)
            if seq is not None and seq.state is SeqState.PREFILL:
                seq.computed = chunk.end
        events: list[Emit] = []
        for seq_id, tok in sampled.items():
            seq = by_id.get(seq_id)
            if seq is None or seq.state is SeqState.FINISHED:
                continue  # cancelled while the step ran
            if seq.state is SeqState.PREFILL:
                seq.state = SeqState.RUNNING
            events.append(self._append(seq, tok))
        return events

    # -- internals -------------------------------------------------------------------------------
    def _append(self, seq: Sequence, tok: SampledToken) -> Emit:
        seq.output.append(tok.token_id)
        params = seq.request.sampling
        lp = (tok.logprob,) if tok.logprob is not None else ()
        if tok.token_id in self._eos:
            return self._finish(seq, FinishReason.STOP, seq.detok.flush(), (tok.token_id,), lp)
        text = seq.stop.feed(seq.detok.push(tok.token_id))
        if seq.stop.stopped:
            return self._finish(seq, FinishReason.STOP, text, (tok.token_id,), lp)
        total = seq.prompt_len + len(seq.output)
        if len(seq.output) >= params.max_tokens or total >= self.config.context_length:
            text += seq.stop.feed(seq.detok.flush())
            if not seq.stop.stopped:
                text += seq.stop.flush()
            reason = FinishReason.STOP if seq.stop.stopped else FinishReason.LENGTH
            return self._finish(seq, reason, text, (tok.token_id,), lp)
        event = RequestEvent(
            seq.request.request_id,
            text=text,
            token_ids=(tok.token_id,),
            logprobs=lp,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output),
        )
        return seq.request, event

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        text: str,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> Emit:
        if seq.state in (SeqState.PREFILL, SeqState.RUNNING):
            self._active.remove(seq)
        if seq.admitted:
            self._release.append(seq.seq_id)
        if seq.prefix is not None and self.prefix_cache is not None:
            self.prefix_cache.release(seq.prefix)
        seq.state = SeqState.FINISHED
        self._by_request.pop(seq.request.request_id, None)
        event = RequestEvent(
            seq.request.request_id,
            text=text,
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output),
        )
        return seq.request, event
