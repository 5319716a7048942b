"""The draft-model proposer of speculative decoding (issue 16), on rank 0 only.

A small model with the served model's vocabulary guesses the next k tokens of a row; the served model
verifies them in its next step (cluster/speculation.py). The draft model is unsharded and runs on rank 0
between steps, so followers never see it: drafts travel in the step plan like any other tokens.

Each request keeps its own draft KV cache and the tokens fed into it. A verification step accepts a prefix
of the drafts, so the context the next `propose` sees shares a prefix with what the cache holds: the cache
is trimmed back to the longest common prefix (mlx-lm's `trim`, exact for plain KV caches) and only the
difference is fed, usually nothing (the accepted drafts are in the cache already). Per step a row costs k
draft-model tokens. A new request's cache starts as a copy of the longest prefix another request's cache
holds (n > 1 choices, a shared system prompt); the rest of its prompt is fed at most `catch_up` tokens
per call, so a long new prompt never stalls a step (it gets no drafts until caught up). Caches are bounded
by `max_sequences`, least recently used dropped first; a dropped request just starts over.

`propose` drafts one row (its k greedy steps are one lazy MLX graph, one synchronisation); `propose_rows`
drafts a step's rows as one batch (their caches merged into mlx-lm's left-padded BatchKVCache for the k
steps and split back), which on a CPU costs about one row's time for all of them."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import ModelError
from cluster.requests import Request

log = logging.getLogger("orchard")

# The longest piece of context fed to the draft model in one forward pass: its activations stay bounded
# however long a prompt is (mlx-lm's own prefill step).
PREFILL_CHUNK = 512
# A new request starts from a copy of another's cache when they share at least this many tokens.
MIN_SHARED = 16


@dataclass(slots=True)
class DraftSequence:
    """One request's draft KV cache and exactly the tokens it holds (len(fed) == the cache's offset)."""

    cache: list[Any]
    fed: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DraftModelInfo:
    """What `load_draft` read from the folder, for its checks and the start-up log."""

    path: str
    layers: int
    vocab: int
    max_context: int


# Caches whose trim is exact at every length. A sliding window (RotatingKVCache) trims only until it first
# wraps, a chunked cache only within its chunk, and recurrent state (ArraysCache) not at all.
def _unrewindable(caches: list[Any]) -> set[str]:
    from mlx_lm.models.cache import CacheList, ConcatenateKVCache, KVCache, QuantizedKVCache

    kinds: set[str] = set()
    for c in caches:
        if type(c) is CacheList:
            kinds |= _unrewindable(list(c.caches))
        elif type(c) not in (KVCache, QuantizedKVCache, ConcatenateKVCache):
            kinds.add(type(c).__name__)
    return kinds


def _common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftProposer:
    """Proposer (cluster/speculation.py) backed by a draft model with a persistent cache per request.

    `propose` and `forget` run on the engine thread, the only thread that calls MLX."""

    def __init__(
        self,
        model: Any,
        max_context: int,
        max_sequences: int,
        prefill_chunk: int = PREFILL_CHUNK,
        catch_up: int = PREFILL_CHUNK,
    ) -> None:
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        probe = make_prompt_cache(model)
        kinds = sorted(_unrewindable(probe))
        if kinds or not can_trim_prompt_cache(probe):
            raise ModelError(
                f"the draft model's caches ({', '.join(kinds)}) cannot be rewound, and a draft cache must "
                "be trimmed back after every rejected draft: use a draft model with full attention only"
            )
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be at least 1, not {max_sequences}")
        self.model = model
        self.max_context = max_context
        self.max_sequences = max_sequences
        self.prefill_chunk = max(1, prefill_chunk)
        # Context tokens fed per call at most: a new long prompt is fed over several steps (no drafts for
        # it meanwhile), as the served model's own prefill is chunked, so no step stalls on the draft.
        self.catch_up = max(1, catch_up)
        self._seqs: OrderedDict[str, DraftSequence] = OrderedDict()
        self.prefilled_tokens = 0  # context tokens fed to catch a cache up (not drafts): the cost of misses
        self.evictions = 0
        self.shared_tokens = 0  # context tokens a new request's cache copied from another's

    @property
    def sequences(self) -> int:
        """How many requests hold a draft cache now (at most max_sequences)."""
        return len(self._seqs)

    def cached_tokens(self, request_id: str) -> int:
        """Tokens in `request_id`'s draft cache (0: none held)."""
        seq = self._seqs.get(request_id)
        return len(seq.fed) if seq is not None else 0

    def propose(self, req: Request, k: int) -> tuple[int, ...]:
        """Up to k greedy draft tokens following `req.prompt_tokens + req.output`."""
        context = req.prompt_tokens + tuple(req.output)
        k = min(k, self.max_context - len(context))
        if k <= 0 or not context:
            return ()
        seq, _ = self._catch_up(req.request_id, context, self.catch_up)
        return self._draft(seq, context[-1], k) if len(seq.fed) == len(context) - 1 else ()

    def propose_rows(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[tuple[int, ...]]:
        """`propose` for a step's rows at once. Each row's cache is caught up alone (after a verification
        that is nothing, or the one accepted draft it never fed), then the greedy steps of all rows run as
        one batch: their caches merged into a left-padded batch cache and split back after. On a CPU a
        batch of B rows costs little more than one row (the weights are read once per step)."""
        from mlx_lm.models.cache import KVCache

        out: list[tuple[int, ...]] = [()] * len(reqs)
        rows: list[tuple[int, DraftSequence, int, int]] = []  # (index, sequence, last token, k)
        budget = self.catch_up
        for i, (req, k) in enumerate(zip(reqs, ks, strict=True)):
            context = req.prompt_tokens + tuple(req.output)
            k = min(k, self.max_context - len(context))
            if k > 0 and context:
                seq, fed = self._catch_up(req.request_id, context, budget)
                budget -= fed
                if len(seq.fed) == len(context) - 1:
                    rows.append((i, seq, context[-1], k))
        width = max((k for *_, k in rows), default=0)
        together = [
            r
            for r in rows
            if len(r[1].fed) + 1 + width <= self.max_context and all(type(c) is KVCache for c in r[1].cache)
        ]
        if len(together) < 2:
            together = []
        alone = [r for r in rows if all(r[0] != t[0] for t in together)]
        for i, seq, last, k in alone:
            out[i] = self._draft(seq, last, k)
        if together:
            drafted = self._draft_batch([(seq, last) for _, seq, last, _ in together], width)
            for (i, _, _, k), drafts in zip(together, drafted, strict=True):
                out[i] = drafts[:k]
        return out

    def forget(self, req: Request) -> None:
        """The request ended: its draft cache is freed."""
        self._seqs.pop(req.request_id, None)

    def clear(self) -> None:
        self._seqs.clear()

    def _catch_up(self, request_id: str, context: tuple[int, ...], budget: int) -> tuple[DraftSequence, int]:
        """Bring its cache toward holding `context` but the last token (whose logits are where drafts
        start): trimmed back to the longest common prefix, then fed at most `budget` more tokens. Returns
        the sequence and how many tokens were fed; it is caught up when len(fed) == len(context) - 1."""
        seq = self._sequence(request_id, context)
        keep = min(_common_prefix(seq.fed, context), len(context) - 1)
        if len(seq.fed) > keep:
            self._trim(seq, len(seq.fed) - keep)
        todo = context[len(seq.fed) : -1][: max(0, budget)]
        self._prefill(seq, todo)
        return seq, len(todo)

    def _sequence(self, request_id: str, context: tuple[int, ...]) -> DraftSequence:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._seqs.move_to_end(request_id)
            return seq
        seq = self._copy_of_best_prefix(context)
        while len(self._seqs) >= self.max_sequences:
            self._seqs.popitem(last=False)
            self.evictions += 1
        self._seqs[request_id] = seq
        return seq

    def _copy_of_best_prefix(self, context: tuple[int, ...]) -> DraftSequence:
        """A new request's cache: a copy of the longest prefix of `context` another request's cache holds
        (n > 1 choices share their prompt; chats share a system prompt), else empty."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        best, n = None, 0
        for other in self._seqs.values():
            shared = min(_common_prefix(other.fed, context), len(context) - 1)
            if shared > n and all(type(c) is KVCache and c.keys is not None for c in other.cache):
                best, n = other, shared
        if best is None or n < MIN_SHARED:
            return DraftSequence(make_prompt_cache(self.model))
        caches = []
        for c in best.cache:
            copy = KVCache()
            copy.keys = mx.contiguous(c.keys[..., :n, :])
            copy.values = mx.contiguous(c.values[..., :n, :])
            copy.offset = n
            caches.append(copy)
        mx.eval([c.state for c in caches])
        self.shared_tokens += n
        return DraftSequence(caches, best.fed[:n])

    def _trim(self, seq: DraftSequence, n: int) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        if trim_prompt_cache(seq.cache, n) == n:
            del seq.fed[len(seq.fed) - n :]
        else:  # cannot happen with the caches __init__ accepts; if it does, start this request over
            from mlx_lm.models.cache import make_prompt_cache

            seq.cache, seq.fed = make_prompt_cache(self.model), []

    def _prefill(self, seq: DraftSequence, tokens: tuple[int, ...]) -> None:
        """Feed `tokens` in bounded chunks. Logits are never evaluated, so the head is never computed."""
        import mlx.core as mx

        for start in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[start : start + self.prefill_chunk]
            self.model(mx.array(chunk, dtype=mx.uint32)[None], cache=seq.cache)
            mx.eval([c.state for c in seq.cache])
            seq.fed.extend(chunk)
        self.prefilled_tokens += len(tokens)

    def _draft(self, seq: DraftSequence, last: int, k: int) -> tuple[int, ...]:
        """Feed `last`, then draft k tokens greedily, feeding each but the last: one evaluation."""
        import mlx.core as mx

        y = mx.array([[last]], dtype=mx.uint32)
        drafts = []
        for i in range(k):
            logits = self.model(y, cache=seq.cache)[:, -1, :]
            token = mx.argmax(logits, axis=-1).astype(mx.uint32)
            drafts.append(token)
            if i + 1 < k:
                y = token[None]
        out = mx.concatenate(drafts)
        mx.eval(out, [c.state for c in seq.cache])
        drafted: list[int] = out.tolist()  # type: ignore[assignment]
        tokens = tuple(drafted)
        seq.fed.append(last)
        seq.fed.extend(tokens[:-1])
        return tokens

    def _draft_batch(self, rows: list[tuple[DraftSequence, int]], k: int) -> list[tuple[int, ...]]:
        """`_draft` for several rows (plain KV caches) as one batch of k greedy steps."""
        import mlx.core as mx
        from mlx_lm.models.cache import BatchKVCache

        merged = [
            BatchKVCache.merge([seq.cache[layer] for seq, _ in rows])
            for layer in range(len(rows[0][0].cache))
        ]
        y = mx.array([[last] for _, last in rows], dtype=mx.uint32)
        steps = []
        for i in range(k):
            logits = self.model(y, cache=merged)[:, -1, :]
            token = mx.argmax(logits, axis=-1).astype(mx.uint32)
            steps.append(token)
            if i + 1 < k:
                y = token[:, None]
        out = mx.stack(steps, axis=1)
        mx.eval(out, [c.state for c in merged])
        drafted: list[list[int]] = out.tolist()  # type: ignore[assignment]
        for j, (seq, last) in enumerate(rows):
            seq.cache = [c.extract(j) for c in merged]
            seq.fed.append(last)
            seq.fed.extend(drafted[j][:-1])
        return [tuple(d) for d in drafted]


def config_text(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's part of a config (multimodal wrappers nest it under text_config)."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def config_vocab(config: dict[str, Any]) -> int | None:
    """A model's vocabulary size as its config.json says (multimodal wrappers: their text model's); the
    served model's is read the same way, so the check compares like with like."""
    vocab = config_text(config).get("vocab_size") or config.get("vocab_size")
    return vocab if isinstance(vocab, int) else None


def draft_info(path: Path, model: Any, config: dict[str, Any]) -> DraftModelInfo:
    text = config_text(config)
    vocab = config_vocab(config)
    if vocab is None:
        raise ModelError(f"{path}/config.json does not say its vocabulary size (vocab_size)")
    max_context = text.get("max_position_embeddings") or config.get("max_position_embeddings") or 2048
    layers = len(getattr(model, "layers", ()))
    return DraftModelInfo(str(path), layers, vocab, int(max_context))


def load_draft(path: Path, target_vocab: int, max_sequences: int) -> DraftProposer:
    """Load the `--draft-model` folder unsharded on this rank and check it can draft for the served model."""
    from rank.models import load_model

    if not (path / "config.json").exists():
        raise ModelError(f"--draft-model {path}: not an mlx-lm model directory (no config.json)")
    model, config = load_model(path, None)
    info = draft_info(path, model, config)
    if info.vocab != target_vocab:
        raise ModelError(
            f"the draft model's vocabulary ({info.vocab}) differs from the served model's ({target_vocab}): "
            "a draft model must use the same tokenizer"
        )
    proposer = DraftProposer(model, info.max_context, max_sequences)
    log.info(
        "draft model %s: %d layers, vocabulary %d, context %d, caches for up to %d sequences",
        info.path,
        info.layers,
        info.vocab,
        info.max_context,
        max_sequences,
    )
    return proposer
