"""Continuous batching as a step function over plain data.

`schedule()` turns the queue into the next `ScheduledStep` (the `StepPlan` every rank executes, and the
requests whose rows of logits rank 0 samples); `update()` takes the tokens sampled for those rows and
returns the request events, finished ones included. New requests join between steps, finished ones leave
at the next plan's `release`; nobody waits for the batch to drain. Modelled on vLLM v1's scheduler
(`schedule()` / `update_from_output()`, one `requests` map), minus paging.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cluster.adapters import AdapterRegistry, adapter_root
from cluster.messages import Admit, PrefillChunk, StepPlan
from cluster.prefix import PrefixCache
from cluster.requests import (
    FinishReason,
    GenerationRequest,
    Request,
    RequestEvent,
    RequestStatus,
    TokenLogprob,
)
from cluster.textstream import Decode


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


@dataclass(slots=True, frozen=True)
class ScheduledStep:
    """A plan and what rank 0 needs to finish it: `rows[i]` is the request of row i of the step's logits
    (prompts completed in this step, in chunk order, then the decode rows), `prefilled` the requests whose
    chunks the plan computes, with the prompt position each reaches."""

    plan: StepPlan
    rows: tuple[Request, ...] = ()
    prefilled: tuple[tuple[Request, int], ...] = ()


Emit = tuple[Request, RequestEvent]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        decode: Decode,
        eos_token_ids: Iterable[int],
        prefix_cache: PrefixCache | None = None,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self.config = config
        self.prefix_cache = prefix_cache
        # LoRA adapters: their loads and unloads ride in plans; requests release their slot when they end
        self.adapters = adapters
        self._decode = decode
        self._eos = frozenset(eos_token_ids)
        # Every unfinished request, by id: the one map of requests on rank 0. Other threads may test
        # membership and copy its values (single dict operations, atomic under the GIL); only the engine
        # thread changes it.
        self.requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # PREFILL and RUNNING, in admission order
        self._release: list[int] = []
        self._seq_ids = itertools.count(1)
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
        adapter_ops = self.adapters is not None and self.adapters.has_ops()
        return bool(self._waiting or self._active or self._release or pending_evictions or adapter_ops)

    def queue(self) -> list[Request]:
        """Unfinished requests: the waiting in arrival order, then the running in admission order."""
        return list(self._waiting) + self._active

    # -- inputs ----------------------------------------------------------------------------------
    def add(self, submission: GenerationRequest) -> Request:
        req = Request.from_submission(submission, next(self._seq_ids), self._decode)
        if self.prefix_cache is not None:
            root = None
            if req.adapter and self.adapters is not None:
                root = adapter_root(self.prefix_cache.root, self.adapters.digest(req.adapter))
            req.prefix = self.prefix_cache.state_for(req.prompt_tokens, root)
        self._waiting.append(req)
        self.requests[req.request_id] = req
        return req

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> list[Emit]:
        """Finish a request wherever it is; returns its final event (none if it is unknown or done)."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        return [self._finish(req, reason, "")]

    def fail_all(self, message: str, error_type: str = "server_error") -> list[Emit]:
        out = []
        for req in self.queue():
            emit = self._finish(req, FinishReason.ERROR, "")
            emit[1].error, emit[1].error_type = message, error_type
            out.append(emit)
        return out

    def older_than(self, cutoff: float) -> list[Request]:
        return [r for r in self.requests.values() if r.arrival < cutoff]

    # -- the step function -----------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """The next step: fill free slots, start and prefill sequences within the token budget (loading
        cached prefixes, storing new full blocks), decode every running sequence."""
        cfg, cache = self.config, self.prefix_cache
        while self._waiting and len(self._active) < cfg.max_batch:
            req = self._waiting.popleft()
            req.status = RequestStatus.PREFILL
            self._active.append(req)
        producing: set[bytes] = set()
        if cache is not None:
            producing = cache.producing(
                r.prefix for r in self._active if r.admitted and r.status is RequestStatus.PREFILL and r.prefix
            )
        budget = cfg.prefill_chunk
        if cfg.idle_prefill_chunk > budget and not any(r.status is RequestStatus.RUNNING for r in self._active):
            budget = cfg.idle_prefill_chunk
        admits, prefill, stores = [], [], []
        completed: list[Request] = []
        prefilled: list[tuple[Request, int]] = []
        decoding: list[Request] = []
        for req in self._active:
            if req.status is RequestStatus.RUNNING:
                decoding.append(req)
                continue
            if budget <= 0:
                continue
            tokens = req.prompt_tokens
            if not req.admitted:
                cached: tuple[int, ...] = ()
                if cache is not None and req.prefix is not None:
                    if cache.should_wait(tokens, req.prefix, producing):
                        continue  # another sequence is computing this prefix right now
                    cached = cache.start(tokens, req.prefix)
                    req.computed = len(cached) * cache.block_tokens
                    producing.update(req.prefix.hashes[req.prefix.covered :])
                req.admitted = True
                admits.append(Admit(req.seq_id, cached, req.adapter))
            end = min(req.prompt_len, req.computed + budget)
            prefill.append(PrefillChunk(req.seq_id, req.computed, tokens[req.computed : end], end == req.prompt_len))
            prefilled.append((req, end))
            if end == req.prompt_len:
                completed.append(req)
            budget -= end - req.computed
            if cache is not None and req.prefix is not None:
                stores += cache.store(req.seq_id, tokens, req.prefix, end)
        release, self._release = tuple(self._release), []
        self._step += 1
        ssd_load: tuple[tuple[int, bytes], ...] = ()
        ssd_save: tuple[tuple[int, bytes], ...] = ()
        ssd_delete: tuple[bytes, ...] = ()
        if cache is not None and cache.ssd is not None:
            ssd_load, ssd_save, ssd_delete = cache.ssd.take()
        adapter_load, adapter_unload = self.adapters.take_ops() if self.adapters is not None else ((), ())
        plan = StepPlan(
            step=self._step,
            release=release,
            admit=tuple(admits),
            prefill=tuple(prefill),
            decode_ids=tuple(r.seq_id for r in decoding),
            decode_tokens=tuple(r.output[-1] for r in decoding),
            store=tuple(stores),
            evict=cache.take_evictions() if cache is not None else (),
            ssd_load=ssd_load,
            ssd_save=ssd_save,
            ssd_delete=ssd_delete,
            adapter_load=adapter_load,
            adapter_unload=adapter_unload,
        )
        return ScheduledStep(plan, tuple(completed + decoding), tuple(prefilled))

    def clear_prefix_cache(self, tier: str = "ram") -> int:
        """Drop every cached block of a tier that no running sequence uses; the next plan tells the ranks."""
        return self.prefix_cache.clear(tier) if self.prefix_cache is not None else 0

    def update(self, step: ScheduledStep, sampled: Sequence[SampledToken]) -> list[Emit]:
        """Apply the outputs of `step` (`sampled[i]` is the token of `step.rows[i]`, or nothing when the
        step produced no logits); returns the events to deliver, each request's final one included."""
        if self.prefix_cache is not None:
            self.prefix_cache.commit()
        if self.adapters is not None:
            self.adapters.ran(step.plan.adapter_load, step.plan.adapter_unload)
        for req, end in step.prefilled:
            if req.status is RequestStatus.PREFILL:
                req.computed = end
        if not sampled:
            return []
        if len(sampled) != len(step.rows):
            raise ValueError(f"{len(sampled)} tokens sampled for {len(step.rows)} rows")
        events: list[Emit] = []
        for req, tok in zip(step.rows, sampled, strict=True):
            if req.status is RequestStatus.FINISHED:
                continue  # cancelled while the step ran
            if req.status is RequestStatus.PREFILL:
                req.status = RequestStatus.RUNNING
            events.append(self._append(req, tok))
        return events

    # -- internals -------------------------------------------------------------------------------
    def _append(self, req: Request, tok: SampledToken) -> Emit:
        req.output.append(tok.token_id)
        params = req.sampling
        lp = (tok.logprob,) if tok.logprob is not None else ()
        if tok.token_id in self._eos:
            return self._finish(req, FinishReason.STOP, req.detok.flush(), (tok.token_id,), lp)
        text = req.stop.feed(req.detok.push(tok.token_id))
        if req.stop.stopped:
            return self._finish(req, FinishReason.STOP, text, (tok.token_id,), lp)
        total = req.prompt_len + len(req.output)
        if len(req.output) >= params.max_tokens or total >= self.config.context_length:
            text += req.stop.feed(req.detok.flush())
            if not req.stop.stopped:
                text += req.stop.flush()
            reason = FinishReason.STOP if req.stop.stopped else FinishReason.LENGTH
            return self._finish(req, reason, text, (tok.token_id,), lp)
        event = RequestEvent(
            req.request_id,
            text=text,
            token_ids=(tok.token_id,),
            logprobs=lp,
            prompt_tokens=req.prompt_len,
            completion_tokens=len(req.output),
        )
        return req, event

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        text: str,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> Emit:
        if req.status is RequestStatus.WAITING:
            self._waiting.remove(req)
        elif req.status in (RequestStatus.PREFILL, RequestStatus.RUNNING):
            self._active.remove(req)
        if req.admitted:
            self._release.append(req.seq_id)
        if req.prefix is not None and self.prefix_cache is not None:
            self.prefix_cache.release(req.prefix)
        if self.adapters is not None:
            self.adapters.release(req.adapter)  # its last request gone, a draining adapter unloads
        req.status = RequestStatus.FINISHED
        self.requests.pop(req.request_id, None)
        event = RequestEvent(
            req.request_id,
            text=text,
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            finish_reason=reason,
            prompt_tokens=req.prompt_len,
            completion_tokens=len(req.output),
        )
        return req, event
