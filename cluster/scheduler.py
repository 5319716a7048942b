"""Continuous batching as a step function over plain data.

`schedule()` turns the queue into the next `ScheduledStep` (the `StepPlan` every rank executes, and the
requests whose rows of logits rank 0 samples); `update()` takes the tokens sampled for those rows and
returns the request events, finished ones included. New requests join between steps, finished ones leave
at the next plan's `release`; nobody waits for the batch to drain. Modelled on vLLM v1's scheduler
(`schedule()` / `update_from_output()`, one `requests` map), minus paging.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from cluster.adapters import AdapterRegistry, adapter_root
from cluster.memory import KvMemory
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
from cluster.speculation import SpecController
from cluster.textstream import Decode


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # sequences being prefilled or decoded at once
    prefill_chunk: int = 256  # prompt tokens per step, shared by all prefilling sequences
    context_length: int = 2048
    # ... up to this many while no sequence decodes (no stream's inter-token latency depends on short
    # steps), and while more sequences wait for their first token than decode, prefill_chunk for each
    # waiting one per decoding one: fewer, larger steps prefill faster (every step costs a fixed ~0.1-0.2 s
    # on a 2-core CPU: 8 chats arriving at once, 987 prompt tokens in 4 steps of 256 took 2.7 s, in one
    # 2.1 s; the decoding stream also stalls less in all). 0: always prefill_chunk.
    idle_prefill_chunk: int = 2048
    # --kv-live-from (rank.livequant): a sequence's cache is quantized once it holds this many positions;
    # a prompt chunk never crosses it and a row below it drafts nothing past it, so position p attends to
    # quantized keys exactly when p >= live_from, however the prompt was chunked. None: off.
    live_from: int | None = None


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
    # speculation: each row's drafted tokens (() for most), aligned with `rows`; row i then has
    # 1 + len(drafts[i]) rows of logits, one a position. Empty: no row drafted.
    drafts: tuple[tuple[int, ...], ...] = ()

    @property
    def widths(self) -> list[int]:
        """Rows of logits per request row."""
        return [1 + len(d) for d in self.drafts] if self.drafts else [1] * len(self.rows)


Emit = tuple[Request, RequestEvent]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        decode: Decode,
        eos_token_ids: Iterable[int],
        prefix_cache: PrefixCache | None = None,
        adapters: AdapterRegistry | None = None,
        decode_special: Decode | None = None,
        memory: KvMemory | None = None,
        spec: SpecController | None = None,
    ) -> None:
        self.config = config
        self.spec = spec  # speculative decoding (cluster/speculation.py); None: off
        self._rollback: list[tuple[int, int]] = []  # (sequence, positions kept) for the next plan
        self.memory = memory  # KV budget per rank (cluster.memory): requests wait for room before starting
        self._refused: list[Emit] = []  # requests that can never fit the budget: delivered by `update`
        self.prefix_cache = prefix_cache
        # LoRA adapters: their loads and unloads ride in plans; requests release their slot when they end
        self.adapters = adapters
        self._decode = decode
        # the detokenizer of requests with skip_special_tokens=False (keeps tool-call markers and the like)
        self._decode_special = decode_special or decode
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
        # Set by the engine when its ranks gather picks from vocabulary slices: each sampling row's
        # (temperature, PRNG key) for an argmax plan (`StepPlan.draws`, rank/sampler.py `Sampler.draws`).
        # None: a row that samples makes its step gather the slices.
        self.draws: Callable[[Sequence[Request]], tuple[tuple[float, int, int], ...]] | None = None

    # -- queries ---------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The model's end-of-sequence ids (the sampler bans them before `min_tokens`)."""
        return self._eos

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        pending_evictions = self.prefix_cache is not None and self.prefix_cache.has_evictions
        adapter_ops = self.adapters is not None and self.adapters.has_ops()
        return bool(
            self._waiting
            or self._active
            or self._release
            or self._rollback
            or pending_evictions
            or adapter_ops
        )

    def queue(self) -> list[Request]:
        """Unfinished requests: the waiting in arrival order, then the running in admission order."""
        return list(self._waiting) + self._active

    # -- inputs ----------------------------------------------------------------------------------
    def add(self, submission: GenerationRequest) -> Request:
        decode = self._decode if submission.sampling.skip_special_tokens else self._decode_special
        req = Request.from_submission(submission, next(self._seq_ids), decode)
        if req.fork_of and req.sampling.seed is not None:
            req.sampling = replace(
                req.sampling, seed=fork_seed(req.sampling.seed, req.request_id, req.fork_of)
            )
        if req.sampling.prompt_logprobs is not None:
            req.prompt_logprobs = []
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

    def end(self, request_id: str, reason: FinishReason) -> list[Emit]:
        """Finish a running request as if its output ended here (a complete or dead-ended grammar): the
        text the detokenizer and stop matcher still hold is delivered, unlike `cancel`."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        text = req.stop.feed(req.detok.flush())
        if not req.stop.stopped:
            text += req.stop.flush()
        return [self._finish(req, reason, text)]

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
            if self.memory is not None and (why := self.memory.never_fits(self._waiting[0])):
                emit = self._finish(self._waiting[0], FinishReason.ERROR, "")  # the API 400s these first
                emit[1].error, emit[1].error_type = why, "invalid_request_error"
                self._refused.append(emit)
                continue
            if self.memory is not None and not self.memory.admits(self._active, self._waiting[0]):
                break  # the head waits until running sequences free enough KV (nobody overtakes it)
            req = self._waiting.popleft()
            req.status = RequestStatus.PREFILL
            self._active.append(req)
        if self.memory is not None:
            self.memory.observe(self._active, len(self._waiting))
        producing: set[bytes] = set()
        if cache is not None:
            producing = cache.producing(
                r.prefix
                for r in self._active
                if r.admitted and r.status is RequestStatus.PREFILL and r.prefix
            )
        budget = cfg.prefill_chunk
        if cfg.idle_prefill_chunk > budget:
            running = sum(1 for r in self._active if r.status is RequestStatus.RUNNING)
            starting = len(self._active) - running
            wide = cfg.idle_prefill_chunk if not running else cfg.prefill_chunk * (starting // running)
            budget = max(budget, min(cfg.idle_prefill_chunk, wide))
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
                if cache is not None and self._fork_waits(req):
                    continue  # its first sibling is computing the same prompt: start from its blocks
                if cache is not None and req.prefix is not None and not _computes_prompt(req):
                    if cache.should_wait(tokens, req.prefix, producing):
                        continue  # another sequence is computing this prefix right now
                    cached = cache.start(tokens, req.prefix)
                    req.computed = len(cached) * cache.block_tokens
                    producing.update(req.prefix.hashes[req.prefix.covered :])
                req.admitted = True
                admits.append(Admit(req.seq_id, cached, req.adapter))
            end = min(req.prompt_len, req.computed + budget)
            if _computes_prompt(req):  # rank 0 holds a chunk's logits, chunk x vocabulary: keep it short
                end = min(end, req.computed + cfg.prefill_chunk)
            if cfg.live_from is not None and req.computed < cfg.live_from < end:
                end = cfg.live_from  # the ranks quantize the sequence's cache before its next chunk
            k = req.sampling.prompt_logprobs if _computes_prompt(req) else None
            prefill.append(
                PrefillChunk(
                    req.seq_id,
                    req.computed,
                    tokens[req.computed : end],
                    end == req.prompt_len,
                    -1 if k is None else k,
                )
            )
            prefilled.append((req, end))
            if end == req.prompt_len:
                completed.append(req)
            budget -= end - req.computed
            if cache is not None and req.prefix is not None:
                stores += cache.store(req.seq_id, tokens, req.prefix, end)
        release, self._release = tuple(self._release), []
        gone = set(release)
        rollback = tuple((sid, n) for sid, n in self._rollback if sid not in gone)
        self._rollback = []
        drafts: tuple[tuple[int, ...], ...] = ()
        if self.spec is not None and decoding:
            drafts = self.spec.drafts(
                decoding, [self._draft_room(r) for r in decoding], sum(len(c.tokens) for c in prefill)
            )
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
            decode_drafts=drafts,
            rollback=rollback,
            argmax=self._picks_only(completed + decoding, any(drafts))
            and all(c.prompt_logprobs < 0 for c in prefill),
            topk=_top_k_of(completed + decoding, prefill),
        )
        if plan.argmax and self.draws is not None and not all(map(_argmax_only, completed + decoding)):
            plan = replace(plan, draws=self.draws(completed + decoding))
        row_drafts = ((),) * len(completed) + drafts if drafts else ()
        return ScheduledStep(plan, tuple(completed + decoding), tuple(prefilled), row_drafts)

    def chain(self, step: ScheduledStep) -> ScheduledStep | None:
        """The step after `step`, planned before `step` runs (rank/engine.py sends it while `step` computes,
        so no rank waits for the plan): the same rows, each fed the token every rank picks for it in
        `step` (`StepPlan.chained`). Only when nothing else could change the next plan: `step` decodes
        every running sequence and nothing more, an argmax plan (rows plain greedy or sampling at a
        temperature alone: their next keys are drawn now, a request's keys never depend on its tokens)
        without drafts, nobody waits or leaves, and no row ends at `step` for its length. None otherwise.
        A row that ends at `step` on an EOS or a stop string is computed once more in vain; `update`
        skips it."""
        plan = step.plan
        if not plan.argmax or not plan.decode_ids or plan.prefill or any(plan.decode_drafts):
            return None  # (a step without drafts chains: the chained one has none either)
        if self._waiting or self._release or self._rollback or self._refused:
            return None
        rows = step.rows
        if len(rows) != len(self._active) or any(r.status is not RequestStatus.RUNNING for r in rows):
            return None
        context = self.config.context_length
        for r in rows:
            n = len(r.output) + 2  # its output after `step` and after the chained step
            if n > r.sampling.max_tokens or r.prompt_len + n > context:
                return None
        self._step += 1
        chained = StepPlan(
            step=self._step,
            decode_ids=plan.decode_ids,
            decode_tokens=(0,) * len(plan.decode_ids),
            argmax=True,
            chained=True,
            draws=self.draws(rows) if plan.draws and self.draws is not None else (),
        )
        return ScheduledStep(chained, rows, (), ())

    def _picks_only(self, rows: list[Request], drafts: bool) -> bool:
        """`StepPlan.argmax`: every row is plain greedy, or (when the ranks gather picks, `draws`, and no row
        has drafts: a sampled run draws keys as it goes) samples at its temperature alone."""
        sampling = self.draws is not None and not drafts
        return all(_argmax_only(r) or (sampling and _sampling_only(r)) for r in rows)

    def _draft_room(self, req: Request) -> int:
        """Drafts a row may verify: what it emits (accepted drafts and one more) stays within max_tokens
        and the context."""
        done = len(req.output)
        room = min(req.sampling.max_tokens - done, self.config.context_length - req.prompt_len - done) - 1
        held = req.prompt_len + done - 1  # positions the ranks hold; the step feeds 1 + drafts from there
        if self.config.live_from is not None and held < self.config.live_from:
            room = min(room, self.config.live_from - held - 1)  # every fed position below live_from
        return max(0, room)

    def clear_prefix_cache(self, tier: str = "ram") -> int:
        """Drop every cached block of a tier that no running sequence uses; the next plan tells the ranks."""
        return self.prefix_cache.clear(tier) if self.prefix_cache is not None else 0

    def update(
        self, step: ScheduledStep, sampled: Sequence[SampledToken | Sequence[SampledToken]]
    ) -> list[Emit]:
        """Apply the outputs of `step` (`sampled[i]` is the token of `step.rows[i]`, or, for a row that
        verified drafts, the run it produced: its accepted drafts and the next token; nothing when the step
        produced no logits); returns the events to deliver, each request's final one included."""
        if self.prefix_cache is not None:
            self.prefix_cache.commit()
        if self.adapters is not None:
            self.adapters.ran(step.plan.adapter_load, step.plan.adapter_unload)
        for req, end in step.prefilled:
            if req.status is RequestStatus.PREFILL:
                req.computed = end
        refused, self._refused = self._refused, []
        if not sampled:
            return refused
        if len(sampled) != len(step.rows):
            raise ValueError(f"{len(sampled)} tokens sampled for {len(step.rows)} rows")
        events: list[Emit] = refused
        drafts = step.drafts or ((),) * len(step.rows)
        for req, tok, drafted in zip(step.rows, sampled, drafts, strict=True):
            if req.status is RequestStatus.FINISHED:
                continue  # cancelled while the step ran
            if req.status is RequestStatus.PREFILL:
                req.status = RequestStatus.RUNNING
                if self.spec is not None:
                    self.spec.start(req)
            run = (tok,) if isinstance(tok, SampledToken) else tuple(tok)
            fed = req.prompt_len + len(req.output) - 1 + 1 + len(drafted)  # positions the ranks now hold
            events.append(self._append(req, run))
            if drafted and self.spec is not None:
                self.spec.accepted(req, len(drafted), len(run) - 1)
                kept = req.prompt_len + len(req.output) - 1  # every output token but the last is fed
                if not req.finished and kept < fed:
                    self._rollback.append((req.seq_id, kept))
        return events

    def record_prompt_logprobs(self, seq_id: int, entries: Sequence[TokenLogprob]) -> None:
        """Rank 0's executor computed prompt logprobs of a sequence (the next prompt tokens, in order);
        they wait on its `Request` for its first event."""
        for req in self._active:
            if req.seq_id == seq_id and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(entries)
                return

    # -- internals -------------------------------------------------------------------------------
    def _fork_waits(self, req: Request) -> bool:
        """n > 1: a sibling waits while its first computes the prompt, then starts from its blocks (and
        copies its prompt logprobs). Once the first has left (finished, cancelled) nobody waits for it."""
        if not req.fork_of:
            return False
        first = self.requests.get(req.fork_of)
        if first is None or first.status not in (RequestStatus.WAITING, RequestStatus.PREFILL):
            return False
        assert self.prefix_cache is not None
        return (req.prompt_len - 1) // self.prefix_cache.block_tokens > 0 or req.prompt_logprobs is not None

    def _append(self, req: Request, run: Sequence[SampledToken]) -> Emit:
        emit = self._next(req, run)
        if len(req.output) == 1 and req.prompt_logprobs is not None:
            emit[1].prompt_logprobs = (None, *req.prompt_logprobs)
            self._share_prompt_logprobs(req)
        return emit

    def _share_prompt_logprobs(self, first: Request) -> None:
        """Siblings still waiting take the first's prompt logprobs: they need not compute the prompt."""
        if (
            first.fork_of
            or first.prompt_logprobs is None
            or len(first.prompt_logprobs) != first.prompt_len - 1
        ):
            return
        for sib in self.queue():
            if sib.fork_of == first.request_id and not sib.admitted and sib.prompt_logprobs == []:
                sib.prompt_logprobs = list(first.prompt_logprobs)

    def _next(self, req: Request, run: Sequence[SampledToken]) -> Emit:
        """The tokens of one step (more than one when drafts were accepted), in order, until one ends the
        request: the rest of the run is dropped, as if it had never been drafted."""
        text, ids, lps = "", list[int](), list[TokenLogprob]()
        emit: Emit | None = None
        for tok in run:
            emit = self._one(req, tok)
            event = emit[1]
            text += event.text
            ids += event.token_ids
            lps += event.logprobs
            event.text, event.token_ids, event.logprobs = text, tuple(ids), tuple(lps)
            if event.finished:
                return emit
        assert emit is not None, "a step's run has at least one token"
        return emit

    def _one(self, req: Request, tok: SampledToken) -> Emit:
        req.output.append(tok.token_id)
        params = req.sampling
        lp = (tok.logprob,) if tok.logprob is not None else ()
        n = len(req.output)
        # min_tokens: the sampler bans EOS and stop ids before it; should one come anyway, it is text. A
        # constrained request's grammar decides where it ends: min_tokens does not apply (as documented)
        min_tokens = 0 if req.constraint is not None else params.min_tokens
        stop_id = tok.token_id in params.stop_token_ids or (
            tok.token_id in self._eos and not params.ignore_eos
        )
        if stop_id and n - 1 >= min_tokens:
            text = req.stop.feed(req.detok.flush())
            if not req.stop.stopped:
                text += req.stop.flush()
            return self._finish(req, FinishReason.STOP, text, (tok.token_id,), lp)
        text = req.stop.feed(req.detok.push(tok.token_id), check=n >= min_tokens)
        if req.stop.stopped:
            return self._finish(req, FinishReason.STOP, text, (tok.token_id,), lp)
        total = req.prompt_len + n
        if n >= params.max_tokens or total >= self.config.context_length:
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
            completion_tokens=n,
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
        if self.spec is not None:
            self.spec.forget(req)
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


def _computes_prompt(req: Request) -> bool:
    """A request with prompt logprobs computes every prompt position (no prefix-cache hit) unless it has
    them already (copied from its first sibling)."""
    lps = req.prompt_logprobs
    return lps is not None and len(lps) < req.prompt_len - 1


def fork_seed(seed: int, request_id: str, fork_of: str) -> int:
    """The seed of sibling i of an n > 1 request ("<rid>-i"): derived from the request's seed and i, so
    the siblings differ from each other and every run of the same request gives the same n outputs."""
    index = request_id[len(fork_of) + 1 :] if request_id.startswith(fork_of + "-") else request_id
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: within every PRNG's seed range


TOPK_GATHER_MAX = 256  # top_k up to which a rank sends its k best entries per row, not its vocabulary slice


def _top_k_of(rows: list[Request], prefill: list[PrefillChunk]) -> int:
    """`StepPlan.topk`: the largest top_k of the step's rows when every row samples with a top_k (at most
    TOPK_GATHER_MAX) or is plain greedy, and no row reads more of the distribution than its k best
    (logprobs, penalties, bias, a grammar, banned EOS, prompt logprobs); 0 otherwise, and for an
    all-greedy step (an `argmax` plan)."""
    if not rows or any(c.prompt_logprobs >= 0 for c in prefill):
        return 0
    k = 0
    for req in rows:
        p = req.sampling
        if _argmax_only(req):
            continue
        if not (p.logits_alone and _unbound(req) and 0 < p.top_k <= TOPK_GATHER_MAX):
            return 0
        k = max(k, p.top_k)
    return k


def _sampling_only(req: Request) -> bool:
    """Its next token is a sample of softmax(logits / temperature) (`SamplingParams.plain_sampling`), no
    grammar, min_tokens out."""
    return req.sampling.plain_sampling and _unbound(req)


def _argmax_only(req: Request) -> bool:
    """Its next tokens are the argmax of the logits as they come (rank/sampler.py): plain greedy, no grammar,
    and min_tokens out (until then EOS and the stop ids are banned)."""
    return req.sampling.plain_greedy and _unbound(req)


def _unbound(req: Request) -> bool:
    """No grammar masks its next token and min_tokens are out (until then EOS and the stop ids are banned)."""
    return req.constraint is None and len(req.output) >= req.sampling.min_tokens
