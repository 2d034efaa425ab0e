"""Tiny random Gemma 4 models built in memory (no files), for the four variants and both drafter heads.

Weights are re-drawn with a large std so greedy decoding has clear margins (a near-tie would make an
exactness test flaky without saying anything about exactness).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_spec.models import gemma4_assistant, gemma4_text

WINDOW = 16
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16,
              global_head_dim=32, sliding_window=WINDOW, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
              hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, max_position_embeddings=1024)
S, F = "sliding_attention", "full_attention"

VARIANTS = {
    # per-layer inputs + KV sharing + double-wide MLP on shared layers
    "e2b": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=1,
                num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=256),
    # 128-expert MoE in miniature, k_eq_v full layers with their own kv head count
    "moe": dict(num_hidden_layers=4, layer_types=[S, S, S, F], num_key_value_heads=2, attention_k_eq_v=True,
                num_global_key_value_heads=1, enable_moe_block=True, num_experts=4, top_k_experts=2,
                moe_intermediate_size=32),
    # dense k_eq_v (31B-like)
    "dense_keqv": dict(num_hidden_layers=4, layer_types=[S, F, S, F], num_key_value_heads=4,
                       attention_k_eq_v=True, num_global_key_value_heads=2),
    # E4B-like: PLE + KV sharing, 2 kv heads
    "e4b": dict(num_hidden_layers=5, layer_types=[S, S, F, S, F], num_key_value_heads=2,
                num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=256),
}


def _redraw(model: nn.Module, seed: int, std: float = 0.15) -> None:
    mx.random.seed(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("token_ordering"):
            params.append((name, p))
        elif "norm" in name or name.endswith("layer_scalar") or name.endswith(".scale"):
            params.append((name, 1.0 + 0.1 * mx.random.normal(p.shape)))
        else:
            params.append((name, std * mx.random.normal(p.shape)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def text_config(variant: str, window: int = WINDOW) -> dict:
    return {"model_type": "gemma4_text", **COMMON, **VARIANTS[variant], "sliding_window": window}


def make_base(variant: str, seed: int = 0, window: int = WINDOW) -> gemma4_text.Model:
    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(text_config(variant, window)))
    _redraw(model, seed)
    return model


def drafter_config(base: gemma4_text.Model, head: str = "centroid") -> dict:
    b = base.args
    types = [S, F] if S in b.layer_types else [F]
    text = {**COMMON, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": len(types),
            "layer_types": types, "num_key_value_heads": b.num_key_value_heads, "head_dim": b.head_dim,
            "global_head_dim": b.global_head_dim, "attention_k_eq_v": b.attention_k_eq_v,
            "num_global_key_value_heads": b.num_global_key_value_heads, "sliding_window": b.sliding_window,
            "final_logit_softcapping": None, "vocab_size": b.vocab_size}
    return {"model_type": "gemma4_assistant", "backbone_hidden_size": b.hidden_size,
            "use_ordered_embeddings": head == "centroid", "num_centroids": 8, "centroid_intermediate_top_k": 2,
            "text_config": text}


def make_drafter(base: gemma4_text.Model, head: str = "centroid", seed: int = 1) -> gemma4_assistant.Model:
    d = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(drafter_config(base, head)))
    _redraw(d, seed)
    if head == "centroid":
        d.masked_embedding.token_ordering = mx.random.permutation(base.args.vocab_size).astype(mx.int32)
    return d
