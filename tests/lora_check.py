"""LoRA adapters served by Orchard's `Executor`, alone or under `mpirun -np 2 python tests/lora_check.py
MODEL ADAPTER1 ADAPTER2 [MODEL ADAPTER1 ADAPTER2 ...]`.

For each group of three, every rank loads the model through `rank.models.load_model` twice:
- `fused`: ADAPTER1 fused at load (`--adapter-path`), the REQUESTS' prompts served on the base slot;
- `unfused`: the base model with ADAPTER1 in slot 1 and ADAPTER2 in slot 2 (`--lora`), the REQUESTS
  served each alone, then all together in packed steps that mix both adapters and the base, twice: with
  short prompt chunks (passes mostly of decode rows) and long ones (passes mostly of prompt chunks).
Plans are written by hand and executed alike on every rank; rank 0 picks each greedy token and shares it
(an all-sum) as the bus would, and prints one JSON line per group. tests/test_lora.py runs the same
functions in-process at TP=1 and compares. `build_adapter` makes the synthetic adapters (mlx-lm's own
`linear_to_lora_layers`, random non-zero B, saved in mlx-lm's format).
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

TOKENS = 6


def _prompt(seed: int, n: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(seed).integers(3, 259, n)]


# name -> (prompt, adapter slot, arrival step of the mixed run)
REQUESTS: dict[str, tuple[list[int], int, int]] = {
    "one": (_prompt(1, 45), 1, 0),
    "two": (_prompt(2, 38), 2, 0),
    "base": (_prompt(3, 41), 0, 0),
    "one-late": (_prompt(4, 12), 1, 3),
    "two-late": (_prompt(5, 9), 2, 4),
}
CHUNKS = {"short": 5, "long": 40}  # prompt tokens a sequence prefills a step in the mixed runs


def build_adapter(
    model_dir: Path,
    out: Path,
    seed: int,
    rank: int = 4,
    scale: float = 2.0,
    num_layers: int = 4,
    keys: list[str] | None = None,
    zero_b: bool = False,
    b_std: float = 0.3,
) -> Path:
    """An adapter for the model in `model_dir`, as mlx-lm's trainer would save one: LoRA layers from
    `linear_to_lora_layers`, B random (or zero), adapter_config.json + adapters.safetensors."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    mx.random.seed(seed)
    params: dict[str, Any] = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params)
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
    for k, v in weights.items():
        if k.endswith(".lora_b"):
            weights[k] = mx.zeros(v.shape) if zero_b else b_std * mx.random.normal(v.shape)
    out.mkdir(parents=True, exist_ok=True)
    mx.eval(weights)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


@dataclass(slots=True)
class _Sequence:
    seq_id: int
    prompt: list[int]
    slot: int
    at: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)


def _row(logits: Any) -> tuple[int, list[float]]:
    import mlx.core as mx
    import numpy as np

    lp = np.array(logits - mx.logsumexp(logits))
    return int(np.argmax(lp)), [round(float(v), 6) for v in lp]


def serve(
    executor: Any, requests: dict[str, tuple[list[int], int, int]], chunk: int, group: Any = None
) -> dict[str, dict[str, Any]]:
    """Greedy decoding of `requests` (name -> prompt, slot, arrival step) by hand-written plans: prompt
    chunks packed with decode rows where the model packs; every sequence released at the end."""
    import mlx.core as mx
    import numpy as np

    from cluster.messages import Admit, PrefillChunk, StepPlan

    leader = group is None or group.rank() == 0
    names = list(requests)
    waiting = {n: requests[n][2] for n in names}
    live: dict[int, _Sequence] = {}
    done: dict[str, _Sequence] = {}
    release: list[int] = []
    for step in range(500):
        admit = []
        for name, at in list(waiting.items()):
            if at <= step:
                prompt, slot, _ = requests[name]
                seq = live[names.index(name)] = _Sequence(names.index(name), prompt, slot)
                admit.append(Admit(seq.seq_id, (), slot))
                del waiting[name]
        prefill, decode = [], []
        for seq in live.values():
            if seq.at < len(seq.prompt):
                end = min(seq.at + chunk, len(seq.prompt))
                prefill.append(
                    PrefillChunk(seq.seq_id, seq.at, tuple(seq.prompt[seq.at : end]), end == len(seq.prompt))
                )
                seq.at = end
            elif seq.tokens:
                decode.append(seq)
        plan = StepPlan(
            step,
            release=tuple(release),
            admit=tuple(admit),
            prefill=tuple(prefill),
            decode_ids=tuple(s.seq_id for s in decode),
            decode_tokens=tuple(s.tokens[-1] for s in decode),
        )
        out = executor.execute(plan)
        release = []
        choices = [0] * len(out.row_ids)
        rows: list[list[float]] = []
        if leader and out.row_ids:
            assert out.logits is not None
            for i in range(len(out.row_ids)):
                choices[i], lp = _row(out.logits[i])
                rows.append(lp)
        if out.row_ids and group is not None:  # rank 0's choice, on every rank
            summed = mx.distributed.all_sum(mx.array(choices, dtype=mx.int32), group=group)
            choices = [int(v) for v in np.array(summed)]
        for i, seq_id in enumerate(out.row_ids):
            seq = live[seq_id]
            seq.tokens.append(choices[i])
            if leader:
                seq.logprobs.append(rows[i])
            if len(seq.tokens) == TOKENS:
                done[names[seq_id]] = live.pop(seq_id)
                release.append(seq_id)
        if not live and not waiting:
            executor.execute(StepPlan(step + 1, release=tuple(release)))
            assert executor.num_sequences == 0 and not executor.seq_adapter
            return {n: {"tokens": s.tokens, "logprobs": s.logprobs} for n, s in done.items()}
    raise RuntimeError("the run did not finish")


def _executor(model: Any, group: Any, max_loras: int = 0) -> Any:
    from rank import cpu_kernels
    from rank.executor import Executor

    cpu_kernels.install(model)  # as rank.startup does: the packing seam (and the CPU kernels on a CPU)
    leader = group is None or group.rank() == 0
    return Executor(model, want_logits=leader, block_tokens=8, group=group, max_loras=max_loras)


def alone(executor: Any, group: Any) -> dict[str, dict[str, Any]]:
    """Each request served by itself."""
    out = {}
    for name, (prompt, slot, _) in REQUESTS.items():
        out[name] = serve(executor, {name: (prompt, slot, 0)}, 16, group)[name]
    return out


def run_group(model_dir: Path, first: Path, second: Path, group: Any) -> dict[str, Any]:
    """The fused and unfused runs of one model (see the module docstring)."""
    from rank.models import load_model

    model, _ = load_model(model_dir, group, adapter_path=first)
    fused = serve(_executor(model, group), {n: (p, 0, a) for n, (p, _, a) in REQUESTS.items()}, 16, group)
    model, _ = load_model(model_dir, group)
    executor = _executor(model, group, max_loras=2)
    executor.load_adapter(1, first)
    executor.load_adapter(2, second)
    line: dict[str, Any] = {"model": model_dir.name, "fused": fused, "alone": alone(executor, group)}
    for name, chunk in CHUNKS.items():
        line[f"mixed-{name}"] = serve(executor, REQUESTS, chunk, group)
    line["packed"] = executor.packed_passes > 0
    return line


def main(argv: list[str]) -> int:
    from rank.env import find_libmpi

    lib = find_libmpi()
    if lib:
        os.environ.setdefault("MLX_MPI_LIBNAME", lib)
    import mlx.core as mx

    group = mx.distributed.init(backend="mpi", strict=True)
    for i in range(0, len(argv), 3):
        model_dir, first, second = (Path(a) for a in argv[i : i + 3])
        line = run_group(model_dir, first, second, group)
        if group.rank() == 0:
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
