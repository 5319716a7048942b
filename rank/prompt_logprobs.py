"""Prompt logprobs on rank 0: each prompt token's logprob given the tokens before it, and the k most
likely alternatives at its position (completions' `echo` with `logprobs`; evaluation harnesses score
answers with it).

The executor asks the model's head for every position of a chunk of such a request (`PrefillChunk.
prompt_logprobs >= 0`), on every rank alike, so a vocabulary-parallel head gathers the same rows. Position
p predicts token p + 1: the last position of a chunk that does not end the prompt predicts the first token
of the next chunk, so its row waits here for that chunk. The last position of the prompt predicts the first
generated token: that row is the sampler's, not ours.
"""

from __future__ import annotations

import mlx.core as mx

from cluster.messages import PrefillChunk
from cluster.requests import TokenLogprob
from rank.sampler import LOGIT_LIMIT


def rows_wanted(chunk: PrefillChunk) -> int:
    """Positions of `chunk` whose logits it needs beyond the sampler's row (0 without prompt logprobs)."""
    if chunk.prompt_logprobs < 0:
        return 0
    return len(chunk.tokens) - (1 if chunk.last else 0)


class PromptLogprobs:
    def __init__(self) -> None:
        self._pending: dict[int, mx.array] = {}  # sequence -> logprobs of its last computed position

    def forget(self, seq_id: int) -> None:
        self._pending.pop(seq_id, None)

    def chunk(self, chunk: PrefillChunk, logits: mx.array | None) -> list[TokenLogprob]:
        """Entries for the prompt tokens this chunk's logits (`rows_wanted` rows, or None for none) and
        the previous chunk's last row predict, in prompt order."""
        rows = [self._pending.pop(chunk.seq_id)] if chunk.seq_id in self._pending else []
        targets = list(chunk.tokens if rows else chunk.tokens[1:])
        if logits is not None:
            # finite as the sampler's (rank/sampler.py): a NaN or infinite logit must not reach the JSON
            logits = mx.clip(mx.nan_to_num(logits, nan=-LOGIT_LIMIT), -LOGIT_LIMIT, LOGIT_LIMIT)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if not chunk.last:
                self._pending[chunk.seq_id] = logprobs[-1:]
                logprobs = logprobs[:-1]
            rows.append(logprobs)
        if not rows or not targets:
            return []
        lp = mx.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]
        targets = targets[: lp.shape[0]]
        chosen = mx.take_along_axis(lp, mx.array(targets, dtype=mx.int32)[:, None], axis=-1)[:, 0]
        k = min(chunk.prompt_logprobs, lp.shape[-1])
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(targets)
        if k > 0:
            top_ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
            top_vals = mx.take_along_axis(lp, top_ids, axis=-1)
            mx.eval(chosen, top_ids, top_vals)
            ids_rows: list[list[int]] = top_ids.tolist()  # type: ignore[assignment]
            val_rows: list[list[float]] = top_vals.tolist()  # type: ignore[assignment]
            tops = [
                tuple(sorted(zip(ids, vals, strict=True), key=lambda iv: -iv[1]))
                for ids, vals in zip(ids_rows, val_rows, strict=True)
            ]
        values: list[float] = chosen.tolist()  # type: ignore[assignment]
        return [TokenLogprob(t, v, top) for t, v, top in zip(targets, values, tops, strict=True)]
