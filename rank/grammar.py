"""Constrained decoding on rank 0: an llguidance matcher per constrained request, and the step's token
masks, computed on a worker thread while the ranks run the step's forward pass.

The mask of a step depends only on the tokens sampled before it, so it can be filled while the forward
pass runs (llguidance releases the GIL; MLX's eval does too): `MaskFill.start` when the plan is sent,
`join` before sampling. A batch without a constrained row starts nothing, so it costs nothing.
Compiled grammars are kept by text (a client sends the same schema every time): a request's matcher is
a copy of the compiled one, made on the worker with the masks.

Masks are llguidance's bitmasks (one bit a token, int32 words, rows of `ceil(vocab / 32)` words for the
tokenizer's vocabulary); `penalty` unpacks them with plain MLX ops (CPU and Metal alike) into a
[B, V] additive mask for the logits' width: columns past the tokenizer's vocabulary (a padded head) are
never allowed; rows without a constraint allow everything.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from cluster.constraints import ll_tokenizer
from cluster.requests import Request

log = logging.getLogger("orchard.grammar")

_TEMPLATES_MAX = 64  # compiled grammars kept (a matcher is ~the grammar's size; copies are cheap)
# bit j of a word is token 32 * word + j (from data, not an op: MLX ops belong to the thread that made them)
_SHIFTS = mx.array(np.arange(32, dtype=np.int32))
_ERROR_CHARS = 300
# What a forbidden token's logit becomes: finite (0 * inf would be NaN in the add), far below any logit
# (the sampler clamps them to +-1e4), still finite divided by the smallest temperature (1e-5).
MASKED = -1e30  # of llguidance's message in a request's error (its full state is for the log)


@dataclass(slots=True)
class StepMasks:
    """The step's masks: `bits[j]` belongs to row `rows[j]` of the logits; `dead` maps a row whose
    matcher allows no token (or failed) to the reason. `fill_s`: the worker's time, `wait_s`: how long
    sampling waited for it (the part the forward pass did not hide)."""

    rows: list[int]
    bits: np.ndarray
    vocab: int  # the tokenizer's vocabulary: bits at or past it are padding
    dead: dict[int, str] = field(default_factory=dict)
    fill_s: float = 0.0
    wait_s: float = 0.0

    def penalty(self, batch: int, width: int) -> mx.array:
        """[batch, width] float32 to add to the logits: 0 where a token is allowed, `MASKED` where not;
        rows without a constraint get 0 (or -0.0) everywhere, so they keep their exact logits. Shifts
        broadcast over the words and an add, not `mx.where`: on the CPU a gather of each column's word
        costs 40 times more, and `where` over [8, 49152] 5-8 ms against 0.1 ms for an add."""
        words = self.bits.shape[1]
        full = np.full((batch, words), -1, dtype=np.int32)  # every bit set: everything allowed
        full[self.rows] = self.bits
        n = min(self.vocab, width)
        bit = (mx.right_shift(mx.array(full)[:, :, None], _SHIFTS) & 1).reshape(batch, words * 32)[:, :n]
        pen = (bit.astype(mx.float32) - 1.0) * -MASKED
        if n < width:  # a padded head: its extra columns are no token, for the constrained rows
            constrained = np.zeros((batch, 1), dtype=np.float32)
            constrained[self.rows] = MASKED
            pen = mx.concatenate([pen, mx.broadcast_to(mx.array(constrained), (batch, width - n))], axis=1)
        return pen


@dataclass(slots=True)
class MaskStats:
    """Per-step mask cost, for the benchmark and the debug log: steps with a constrained row, the
    worker's total and worst fill time, and the time sampling waited for it."""

    steps: int = 0
    rows: int = 0
    fill_s: float = 0.0
    fill_max_s: float = 0.0
    wait_s: float = 0.0

    def add(self, masks: StepMasks) -> None:
        self.steps += 1
        self.rows += len(masks.rows)
        self.fill_s += masks.fill_s
        self.fill_max_s = max(self.fill_max_s, masks.fill_s)
        self.wait_s += masks.wait_s


class MaskJob:
    """One step's fill, running on the worker; `join` hands the masks over and installs new matchers."""

    def __init__(self, future: Future[StepMasks], new: list[tuple[Request, list[Any]]], stats: MaskStats):
        self._future = future
        self._new = new
        self._stats = stats

    def join(self) -> StepMasks:
        t0 = time.perf_counter()
        masks = self._future.result()
        masks.wait_s = time.perf_counter() - t0
        for req, box in self._new:
            if box and req.matcher is None:
                req.matcher = box[0]
        self._stats.add(masks)
        return masks


class GrammarRuntime:
    """Rank 0's grammar state: llguidance's tokenizer (built once from the served one), compiled
    grammars by text, and the worker thread the masks are filled on."""

    def __init__(self, tokenizer: Any, threads: int | None = None) -> None:
        self.tokenizer = ll_tokenizer(tokenizer)
        self.vocab = int(self.tokenizer.vocab_size)
        self.words = (self.vocab + 31) // 32
        self._executor = llguidance.LLExecutor(num_threads=threads)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchard-grammar")
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self.stats = MaskStats()

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def prepare(self, grammar: str) -> None:
        """Compile `grammar` on the worker now, as its request arrives: its prompt's prefill hides the
        compile (up to 100s of ms for a large schema), which the first mask would otherwise wait for."""
        if grammar not in self._templates:
            self._worker.submit(self._template, grammar)

    def start(self, rows: Sequence[Request]) -> MaskJob | None:
        """Begin filling the masks of `rows` (a step's rows, in logits order); None without constraints."""
        wanted = [
            (i, req, req.constraint.grammar) for i, req in enumerate(rows) if req.constraint is not None
        ]
        if not wanted:
            return None
        new: list[tuple[Request, list[Any]]] = [(req, []) for _, req, _ in wanted if req.matcher is None]
        boxes = {id(req): box for req, box in new}
        jobs = [(i, req.matcher, boxes.get(id(req)), grammar) for i, req, grammar in wanted]
        return MaskJob(self._worker.submit(self._fill, jobs), new, self.stats)

    def _fill(self, jobs: list[tuple[int, Any, list[Any] | None, str]]) -> StepMasks:
        t0 = time.perf_counter()
        try:
            return self._fill_masks(jobs, t0)
        except Exception as exc:  # misuse of llguidance's API: these requests end, the engine goes on
            log.exception("grammar mask fill failed")
            why = f"the grammar engine failed: {type(exc).__name__}: {exc}"
            rows = [row for row, *_ in jobs]
            bits = np.zeros((len(jobs), self.words), dtype=np.int32)
            return StepMasks(rows, bits, self.vocab, dict.fromkeys(rows, why), time.perf_counter() - t0)

    def _fill_masks(self, jobs: list[tuple[int, Any, list[Any] | None, str]], t0: float) -> StepMasks:
        matchers = []
        for _, matcher, box, grammar in jobs:
            if matcher is None:
                matcher = self._matcher(grammar)
                assert box is not None
                box.append(matcher)
            matchers.append(matcher)
        bits = np.zeros((len(jobs), self.words), dtype=np.int32)
        live = [(m, j) for j, m in enumerate(matchers) if not m.is_error()]
        if live:
            fill_next_token_bitmask_par(self._executor, live, bits)
        dead: dict[int, str] = {}
        any_bit = np.any(bits != 0, axis=1).tolist()
        for j, ((row, *_), m) in enumerate(zip(jobs, matchers, strict=True)):
            if m.is_error():
                dead[row] = _short(m.get_error())
            elif not any_bit[j]:
                dead[row] = "the constraint allows no next token"
        return StepMasks([row for row, *_ in jobs], bits, self.vocab, dead, time.perf_counter() - t0)

    def _matcher(self, grammar: str) -> Any:
        return self._template(grammar).deep_copy()

    def _template(self, grammar: str) -> Any:
        """The compiled grammar (a fresh matcher, never advanced); on the worker thread only."""
        template = self._templates.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            self._templates[grammar] = template
            while len(self._templates) > _TEMPLATES_MAX:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(grammar)
        return template

    def consume(self, rows: Sequence[Request], tokens: Sequence[int], masks: StepMasks) -> None:
        """Advance the matchers of the masked rows by their sampled tokens (a refused token leaves the
        matcher in its error state: the next step's fill finds it and the request ends)."""
        for row in masks.rows:
            if row in masks.dead:
                continue
            matcher: Any = rows[row].matcher
            if matcher is not None and not matcher.consume_token(tokens[row]):
                log.debug("%s: token %d refused: %s", rows[row].request_id, tokens[row], matcher.get_error())


def _short(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "the grammar engine failed"
    return first[:_ERROR_CHARS]
