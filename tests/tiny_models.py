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


# --- block drafters (DFlash, DSpark), in their published config layouts ------------------------------

def dflash_config(base: gemma4_text.Model, layer_types=(F, F), block_size: int = 8, target_layer_ids=(0, 2),
                  window=None, causal: bool = False) -> dict:
    """A z-lab-layout DFlash config (Qwen3 fields + dflash_config) that fits `base`."""
    b = base.args
    cfg = {"model_type": "gemma4", "architectures": ["DFlashDraftModel"], "hidden_size": b.hidden_size,
           "intermediate_size": 96, "num_hidden_layers": len(layer_types), "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": b.vocab_size, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 1024, "block_size": block_size, "num_target_layers": b.num_hidden_layers,
           "layer_types": list(layer_types), "sliding_window": window, "final_logit_softcapping": 30.0,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
           "dflash_config": {"target_layer_ids": list(target_layer_ids), "mask_token_id": 4}}
    if causal:
        cfg["dflash_config"]["causal"] = True
    return cfg


def dspark_config(base: gemma4_text.Model, block_size: int = 5, markov_rank: int = 8, target_layer_ids=(0, 2),
                  k_eq_v: bool = True, layers: int = 2) -> dict:
    """A DeepSpec-layout DSpark config: the base's text config with the DSpark fields, flat."""
    b = base.args
    return {"architectures": ["Gemma4DSparkModel"], "model_type": "gemma4_text", "hidden_size": b.hidden_size,
            "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": 4, "head_dim": 16,
            "global_head_dim": 32, "num_key_value_heads": 2, "num_global_key_value_heads": 1 if k_eq_v else None,
            "attention_k_eq_v": k_eq_v, "vocab_size": b.vocab_size, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 1024, "layer_types": [F] * layers, "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0, "tie_word_embeddings": False, "num_target_layers": b.num_hidden_layers,
            "block_size": block_size, "mask_token_id": 4, "target_layer_ids": list(target_layer_ids),
            "num_anchors": 512, "markov_rank": markov_rank, "markov_head_type": "vanilla",
            "enable_confidence_head": bool(markov_rank), "confidence_head_with_markov": True,
            "rope_parameters": {F: {"partial_rotary_factor": 0.25, "rope_theta": 1e6, "rope_type": "proportional"},
                                S: {"rope_theta": 1e4, "rope_type": "default"}}}


def make_block_drafter(config: dict, seed: int = 2):
    """A block drafter with random weights (large std, so drafts are decided by clear margins)."""
    from mlx_spec.models import get_model_classes

    model_class, args_class = get_model_classes(config)
    d = model_class(args_class.from_dict(config))
    _redraw(d, seed)
    return d


def engine(model, prompt, **settings):
    """An Engine for `prompt`: settings that are Request fields (max_tokens, sampling, seed, kv, ...) go into
    its Request, the rest (proposer, policy, eos_ids, cache, ...) to the Engine."""
    from dataclasses import fields

    from mlx_spec.engine import Engine
    from mlx_spec.request import Request

    names = {f.name for f in fields(Request)}
    request = Request(prompt, **{k: v for k, v in settings.items() if k in names})
    return Engine(model, request, **{k: v for k, v in settings.items() if k not in names})
