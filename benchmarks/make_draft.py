"""Write a draft model for speculative decoding (`--draft-model DIR`) of the embedded SmolLM2-135M.

A layer-skip self-draft (rank/layer_skip.py): the served model's own weights cut to N of its decoder
layers (default the first 6 of 30; `--keep-last M` takes M of them from the end), with the same embedding,
final norm, tied head and tokenizer files and `num_hidden_layers: N`. No training and nothing downloaded;
it shares the vocabulary by construction. The folder loads with `mlx_lm.load`, `mlx_lm.server
--draft-model` and `python -m rank --draft-model`. It exists so the draft path runs and can be measured
here: SmolLM2-135M has no layers to spare, and its layer-skip drafts are almost never accepted (0-2% up
to 15 layers, 13-23% at 24, 33% at 29; /tmp/notes/draft.md). A trained smaller sibling drafts better.

    .venv/bin/python benchmarks/make_draft.py --out /tmp/smollm2-draft6            # 6 layers
    .venv/bin/python benchmarks/make_draft.py --layers 10 --out DIR --model DIR     # any mlx-lm folder
    .venv/bin/python benchmarks/make_draft.py --out DIR --measure                   # + acceptance figures

`--measure` runs the greedy speculative loop on one sequence (no server): the served model's greedy
continuation is the truth, the proposer drafts `--spec-tokens` tokens after each accepted run, and the
longest matching prefix plus the bonus token is accepted. It prints acceptance and the draft's time per
`propose` call, for an input-grounded prompt (repeat a text with one change) and a free chat prompt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs import reexec_with_rank_environment  # noqa: E402

from rank.draft import load_draft  # noqa: E402
from rank.layer_skip import write_layer_skip_draft  # noqa: E402
from rank.models import default_cache_dir, resolve_model  # noqa: E402

GROUNDED = (
    "Repeat this paragraph exactly, but write 'Paris' instead of 'Lyon':\n\n"
    "Lyon is a city in France. It lies where the Rhone and the Saone meet, and it is known for its food, "
    "its old town and its silk weavers. Many visitors come to Lyon for the festival of lights in December."
)
CHAT = "Write a short poem about the sea and a lighthouse keeper."


def measure(target_dir: Path, draft_dir: Path, k: int, tokens: int) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from cluster.requests import GenerationRequest, Request, SamplingParams
    from rank import cpu_kernels
    from rank.models import load_model
    from rank.tokenizer import ChatTokenizer

    model, config = load_model(target_dir, None)
    cpu_kernels.install(model, "auto")
    proposer = load_draft(draft_dir, int(config["vocab_size"]), max_sequences=4)
    cpu_kernels.install(proposer.model, "auto")
    tok = ChatTokenizer(target_dir)
    for name, text in (("grounded", GROUNDED), ("chat", CHAT)):
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        cache = make_prompt_cache(model)
        logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
        truth: list[int] = []
        for _ in range(tokens):  # the served model's greedy continuation
            token: int = mx.argmax(logits, axis=-1).item()  # type: ignore[assignment]
            truth.append(token)
            logits = model(mx.array([[truth[-1]]]), cache=cache)[:, -1]
        req = Request.from_submission(
            GenerationRequest(name, tuple(prompt), SamplingParams(temperature=0.0), sink=lambda e: None),
            0,
            tok.decode,
        )
        req.output.append(truth[0])
        steps = drafted = accepted = 0
        spent = 0.0
        while len(req.output) < tokens:
            start = time.perf_counter()
            drafts = proposer.propose(req, k)
            spent += time.perf_counter() - start
            n = len(req.output)
            hit = 0
            while hit < len(drafts) and n + hit < tokens and drafts[hit] == truth[n + hit]:
                hit += 1
            req.output.extend(truth[n : min(tokens, n + hit + 1)])  # the accepted run and the bonus token
            steps += 1
            drafted += len(drafts)
            accepted += hit
        proposer.forget(req)
        print(
            f"{name}: {tokens} tokens in {steps} verification steps ({tokens / steps:.2f} tokens/step); "
            f"accepted {accepted}/{drafted} drafts ({accepted / max(drafted, 1):.0%}); "
            f"draft {1000 * spent / steps:.1f} ms per propose (k={k}, incl. the prompt's prefill once)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the draft model folder to write")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers kept (default 6)")
    parser.add_argument(
        "--keep-last", type=int, default=0, help="of those, taken from the model's end (default 0)"
    )
    parser.add_argument("--model", default=None, help="the served model (default: the embedded SmolLM2)")
    parser.add_argument("--measure", action="store_true", help="then print acceptance on two prompts")
    parser.add_argument("--spec-tokens", type=int, default=4, help="drafts per step for --measure")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt for --measure")
    args = parser.parse_args()
    if args.measure:
        reexec_with_rank_environment(str(Path(__file__).resolve()), sys.argv[1:], "auto")  # OpenBLAS
    src = resolve_model(args.model, default_cache_dir(), print)
    write_layer_skip_draft(src, args.out, args.layers, args.keep_last)
    last = f" and the last {args.keep_last}" if args.keep_last else ""
    print(f"wrote {args.out}: the first {args.layers - args.keep_last}{last} layers of {src}")
    if args.measure:
        measure(src, args.out, args.spec_tokens, args.tokens)


if __name__ == "__main__":
    main()
