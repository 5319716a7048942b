"""Tiny random-weight models of every mlx-lm family Orchard serves, built from mlx-lm's own classes.

`FAMILIES` maps a name to a small config (hidden 64-128, 2-4 layers, head counts even where the family
allows, so TP=2 divides them); `build(family, out)` writes a folder `mlx_lm.utils.load_model` and
`rank.models.load_model` read: config.json, model.safetensors from the family's `Model` after
`mx.random.seed(seed)` with its matrices scaled (random init at mlx's scale gives near-uniform logits, so a
tied model just repeats the last token and a comparison tests nothing), and the byte-level tokenizer of
`rank.models.make_tiny_model`. Same family and seed, same bytes.

Sliding windows are small (8 or 16 positions) so prompts of a few dozen tokens wrap the rotating caches.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

VOCAB = 259  # rank.models.write_byte_tokenizer: 3 specials + 256 bytes
WEIGHT_SCALE = 3.0
# families whose own scalings (gemma's sqrt(hidden) embedding, granite's multipliers) want another
SCALES = {"gemma2": 1.0, "gemma3": 1.0, "granite": 6.0}

_DENSE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}


def _dense(model_type: str, **extra: Any) -> dict[str, Any]:
    return {"model_type": model_type, **_DENSE, **extra}


FAMILIES: dict[str, dict[str, Any]] = {
    "llama": _dense("llama", tie_word_embeddings=True),
    # Mistral 7B's config declares a 4096 window that mlx-lm's llama never applies: packing stays on
    "mistral": _dense("mistral", tie_word_embeddings=False, head_dim=16, sliding_window=4096),
    "llama_sliding": _dense(
        "llama",
        num_hidden_layers=4,
        tie_word_embeddings=False,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    # a declared window nobody applies (qwen2 ignores it): must not turn packing off
    "qwen2": _dense("qwen2", tie_word_embeddings=True, sliding_window=32, use_sliding_window=False),
    "qwen3": _dense("qwen3", head_dim=16, tie_word_embeddings=True),
    "qwen3_moe": _dense(
        "qwen3_moe",
        head_dim=16,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
    "glm4_moe": _dense(
        "glm4_moe",
        head_dim=16,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        n_routed_experts=4,
        routed_scaling_factor=1.0,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        rope_scaling=None,
        use_qk_norm=True,
        tie_word_embeddings=False,
        attention_bias=False,
        partial_rotary_factor=0.5,
    ),
    "gemma2": _dense(
        "gemma2",
        head_dim=16,
        rms_norm_eps=1e-6,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=5.0,  # low enough that the cap visibly changes logprobs
        query_pre_attn_scalar=16.0,
    ),
    "gemma3": _dense(
        "gemma3_text",
        num_hidden_layers=4,
        head_dim=16,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=16,
        sliding_window=8,
        sliding_window_pattern=2,
        rope_local_base_freq=10000.0,
        rope_theta=1000000.0,
    ),
    "phi3": _dense("phi3", tie_word_embeddings=False),
    "olmo2": _dense("olmo2", tie_word_embeddings=False),
    "granite": _dense(
        "granite",
        tie_word_embeddings=True,
        logits_scaling=0.5,
        attention_multiplier=0.25,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_bias=False,
        mlp_bias=False,
    ),
    "starcoder2": {
        **{k: v for k, v in _dense("starcoder2").items() if k != "rms_norm_eps"},
        "norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    },
    "smollm3": _dense("smollm3", tie_word_embeddings=True, no_rope_layer_interval=2),
    "glm4": _dense("glm4", head_dim=16, attention_bias=True, partial_rotary_factor=0.5),
    "mixtral": _dense("mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "minimax": _dense(
        "minimax",
        head_dim=16,
        num_experts_per_tok=2,
        num_local_experts=4,
        shared_intermediate_size=0,
        rotary_dim=8,
        tie_word_embeddings=False,
        use_qk_norm=True,
    ),
    "gpt_oss": _dense(
        "gpt_oss",
        head_dim=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_scaling=None,
    ),
    "deepseek_v3": _dense(
        "deepseek_v3",
        moe_intermediate_size=32,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        routed_scaling_factor=1.0,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        v_head_dim=8,  # values narrower than keys, as in DeepSeek's MLA (there 128 against 192)
        qk_nope_head_dim=16,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        moe_layer_freq=1,
    ),
    # full attention only, as Ministral 3 ships: its attention scaling reads the cache's offset itself
    "ministral3": _dense(
        "ministral3",
        head_dim=16,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 16,  # so the scaling changes within a test's prompts
            "llama_4_scaling_beta": 0.1,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    "qwen3_5": {
        "model_type": "qwen3_5",
        "tie_word_embeddings": False,
        "text_config": {
            **_DENSE,
            "model_type": "qwen3_5_text",
            "num_hidden_layers": 4,
            "head_dim": 16,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "full_attention_interval": 2,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "type": "default",
                "mrope_section": [2, 1, 1],
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        },
    },
}

# mlx-lm model_type of each family (what `config.json` says), for the README's table
MODEL_TYPES = {name: cfg["model_type"] for name, cfg in FAMILIES.items()}


def config_of(family: str) -> dict[str, Any]:
    """A fresh copy of `family`'s config with the tokenizer's end-of-sequence id."""
    config = copy.deepcopy(FAMILIES[family])
    config["eos_token_id"] = [2]  # <|im_end|> in the byte-level vocabulary
    return config


def build(family: str, out: Path, seed: int = 0) -> Path:
    """Write a loadable model folder for `family` to `out` (created); returns `out`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from rank.models import write_byte_tokenizer

    vocab = write_byte_tokenizer(out)
    assert len(vocab) == VOCAB
    config = config_of(family)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    scale = SCALES.get(family, WEIGHT_SCALE)
    flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    weights = {k: (v * scale if v.ndim >= 2 and "norm" not in k else v) for k, v in flat}
    if family == "gemma3":
        weights.pop("lm_head.weight", None)  # tied as Gemma 3 ships (its sanitize ties it)
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
