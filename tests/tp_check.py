"""Greedy decoding of several models under one `mpirun`: `mpirun -np 2 python tests/tp_check.py DIR...`.

Each rank loads every model through `rank.models.load_model` (sharded as `python -m rank` shards it), then
decodes greedily two ways, and rank 0 prints one JSON line per model (or the error that refused it):
- `forward`: mlx-lm's own forward pass of the sharded model (`model(inputs, cache)` with the model's
  `make_prompt_cache`), one sequence;
- `served`: Orchard's `Executor` as a job runs it (vocabulary-parallel head, packed steps and batched
  decode where the model allows, a prefix-cache hit where it keeps prefix blocks): three sequences of
  different lengths, arriving at different steps, driven by hand-written step plans that every rank
  executes alike; rank 0 picks each greedy token and shares it (an all-sum) as the bus would.
Each carries the greedy tokens and the whole log-distribution of every step (a tiny model that repeats
one token still shows every logit). One 2-rank job checks every family (an HTTP job per family would cost
a job start-up each); tests/test_families_tp.py compares the lines with mlx-lm's own decoding at TP=1.

Models after `--dequantize` load with --dequantize.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A prompt long enough to wrap the tiny models' sliding windows (8 and 16 positions).
PROMPT = [1, 84, 107, 104, 35, 116, 120, 108, 102, 110, 35, 101, 117, 114, 122, 113, 35, 105, 114, 123, 2, 1]
TOKENS = 8
BLOCK = 8  # prefix-cache block tokens of the served run
CHUNK = 8  # prompt tokens a sequence prefills a step
# The served run: "long" and "short" arrive at step 0; "hit" (long's first two blocks, then its own
# tokens) arrives once long's blocks are stored, and starts from them where the model keeps blocks.
SERVED = {
    "long": PROMPT,
    "short": [1, 72, 101, 108, 108, 111, 44, 35, 120, 111, 114, 108, 100],
    "hit": PROMPT[: 2 * BLOCK] + [50, 60, 70, 80, 90],
}

Logprobs = list[list[float]]


def _row(logits: Any) -> tuple[int, list[float]]:
    """Greedy token and the log-distribution of one row of float32 logits."""
    import mlx.core as mx
    import numpy as np

    lp = np.array(logits - mx.logsumexp(logits))
    return int(np.argmax(lp)), [round(float(v), 6) for v in lp]


def greedy(model: Any, prompt: list[int], tokens: int) -> tuple[list[int], Logprobs]:
    """mlx-lm's own forward, token by token: the tokens and each step's logprobs over the vocabulary."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    inputs = mx.array([prompt], dtype=mx.int32)
    out: list[int] = []
    logprobs: Logprobs = []
    for _ in range(tokens):
        token, lp = _row(model(inputs, cache=cache)[0, -1].astype(mx.float32))
        out.append(token)
        logprobs.append(lp)
        inputs = mx.array([[token]], dtype=mx.int32)
    return out, logprobs


@dataclass(slots=True)
class _Sequence:
    seq_id: int
    prompt: list[int]
    at: int = 0  # prompt positions in its cache
    tokens: list[int] = field(default_factory=list)
    logprobs: Logprobs = field(default_factory=list)


def served(model: Any, group: Any, tokens: int, argmax: bool = False) -> dict[str, dict[str, Any]]:
    """The SERVED run through Orchard's Executor; on rank 0, each sequence's tokens and logprobs, and
    under "ways" which tricks served them (a prefix-cache hit, packed steps). `argmax`: every plan says
    its rows are plain greedy, so a vocabulary-parallel head sends rank 0 each slice's best entry alone
    (the tokens are then the ranks' picks, and there are no logprobs)."""
    import mlx.core as mx
    import numpy as np

    from cluster.messages import Admit, PrefillChunk, StepPlan, StoreBlocks
    from rank import cpu_kernels
    from rank.executor import Executor

    cpu_kernels.install(model)  # as rank.startup does: the packed-step seam (and the CPU kernels)
    leader = group is None or group.rank() == 0
    executor = Executor(model, want_logits=leader, block_tokens=BLOCK, group=group)
    keeps_blocks = executor.caps.prefix_blocks
    names = list(SERVED)
    waiting = {"long": 0, "short": 0}
    live: dict[str, _Sequence] = {}
    done: dict[str, _Sequence] = {}
    release: list[int] = []
    stored = False
    picked = False  # an argmax plan came back as the ranks' picks (not as logits)
    for step in range(200):
        admit, prefill, store, decode = [], [], [], []
        for name, arrives in list(waiting.items()):
            if arrives <= step:
                seq = live[name] = _Sequence(names.index(name), SERVED[name])
                cached = (0, 1) if name == "hit" and keeps_blocks else ()
                seq.at = len(cached) * BLOCK
                admit.append(Admit(seq.seq_id, cached))
                del waiting[name]
        for seq in live.values():
            if seq.at < len(seq.prompt):
                end = min(seq.at + CHUNK, len(seq.prompt))
                prefill.append(
                    PrefillChunk(seq.seq_id, seq.at, tuple(seq.prompt[seq.at : end]), end == len(seq.prompt))
                )
                seq.at = end
                if seq.seq_id == 0 and end >= 2 * BLOCK and not stored:  # long's first two blocks
                    if keeps_blocks:
                        store.append(StoreBlocks(0, 0, (0, 1)))
                    stored = True
                    waiting["hit"] = step + 1
            elif seq.tokens:
                decode.append(seq)
        plan = StepPlan(
            step,
            release=tuple(release),
            admit=tuple(admit),
            prefill=tuple(prefill),
            decode_ids=tuple(s.seq_id for s in decode),
            decode_tokens=tuple(s.tokens[-1] for s in decode),
            store=tuple(store),
            argmax=argmax,
        )
        out = executor.execute(plan)
        release = []
        by_id = {s.seq_id: s for s in live.values()}
        choices = [0] * len(out.row_ids)
        rows: Logprobs = []
        if leader and out.row_ids and out.picks is not None:
            choices, picked = list(out.picks), True
        elif leader and out.row_ids:
            assert out.logits is not None
            for i in range(len(out.row_ids)):
                choices[i], lp = _row(out.logits[i])
                rows.append(lp)
        if out.row_ids and group is not None:  # rank 0's choice, on every rank (followers have no logits)
            summed = mx.distributed.all_sum(mx.array(choices, dtype=mx.int32), group=group)
            choices = [int(v) for v in np.array(summed)]
        for i, seq_id in enumerate(out.row_ids):
            seq = by_id[seq_id]
            seq.tokens.append(int(choices[i]))
            if leader and rows:
                seq.logprobs.append(rows[i])
            if len(seq.tokens) == tokens:
                done[names[seq_id]] = live.pop(names[seq_id])
                release.append(seq_id)
        if not live and not waiting and len(done) == len(SERVED):
            executor.execute(StepPlan(step + 1, release=tuple(release)))
            caps = executor.caps
            ways = {
                "prefix_hit": keeps_blocks,
                "packable": caps.packable,
                "packed": executor.packed_passes > 0,
                "argmax_gather": picked,
            }
            return {
                "ways": ways,
                **{n: {"tokens": s.tokens, "logprobs": s.logprobs} for n, s in done.items()},
            }
    raise RuntimeError("the served run did not finish")


def main(argv: list[str]) -> int:
    from rank.env import find_libmpi

    lib = find_libmpi()
    if lib:
        os.environ.setdefault("MLX_MPI_LIBNAME", lib)
    import mlx.core as mx

    from cluster.errors import ModelError
    from rank.models import load_model

    runs: list[tuple[str, bool]] = []
    dequantize = False
    for arg in argv:
        if arg == "--dequantize":
            dequantize = True
        else:
            runs.append((arg, dequantize))
    group = mx.distributed.init(backend="mpi", strict=True)
    for d, dequantize in runs:
        line: dict[str, Any] = {"model": Path(d).name, "dequantized": dequantize}
        try:
            model, _ = load_model(Path(d), group, dequantize_weights=dequantize)
        except ModelError as exc:  # every rank refuses the same model before any collective
            line["error"] = f"{type(exc).__name__}: {exc}"
        else:
            tokens, logprobs = greedy(model, PROMPT, TOKENS)
            line["forward"] = {"tokens": tokens, "logprobs": logprobs}
            line["served"] = served(model, group, TOKENS)
            line["served_argmax"] = served(model, group, TOKENS, argmax=True)
        if group.rank() == 0:
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
