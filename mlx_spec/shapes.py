"""Random-weight Gemma 4 models of the published shapes (E2B, E4B, 12B unified, 26B-A4B, 31B), their MTP
drafters and the block drafters published for them (DFlash, DSpark).

For measuring costs on a machine without downloading anything: a (k+1)-token verify pass and a drafter
step cost the same with random weights as with trained ones (acceptance does not: random drafters accept
nothing). Shapes from ref/gemma4-mtp.md A.1 and B.1 and /work/notes/block_drafters.md (12B: mlx-vlm's
gemma4_unified defaults, which its conversions of google/gemma-4-12B-it rely on); `tiny` is a small
stand-in for tests. `layers` keeps fewer decoder layers (in the shape's pattern) where a machine cannot
hold the whole model: ratios then weigh the embedding and head more than the full model does.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .models import gemma4_assistant, gemma4_text

S, F = "sliding_attention", "full_attention"


def _types(n: int, period: int) -> list:
    return [F if (i + 1) % period == 0 else S for i in range(n)]


BASE_SHAPES = {
    "e2b": dict(hidden_size=1536, num_hidden_layers=35, layer_types=_types(35, 5), intermediate_size=6144,
                num_attention_heads=8, num_key_value_heads=1, num_kv_shared_layers=20, use_double_wide_mlp=True,
                hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144, sliding_window=512),
    "e4b": dict(hidden_size=2560, num_hidden_layers=42, layer_types=_types(42, 6), intermediate_size=10240,
                num_attention_heads=8, num_key_value_heads=2, num_kv_shared_layers=18,
                hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144, sliding_window=512),
    "26b": dict(hidden_size=2816, num_hidden_layers=30, layer_types=_types(30, 6), intermediate_size=2112,
                num_attention_heads=16, num_key_value_heads=8, attention_k_eq_v=True,
                num_global_key_value_heads=2, enable_moe_block=True, num_experts=128, top_k_experts=8,
                moe_intermediate_size=704, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                sliding_window=1024),
    "12b": dict(model_type="gemma4_unified_text", hidden_size=3840, num_hidden_layers=48, layer_types=_types(48, 6),
                intermediate_size=15360, num_attention_heads=16, num_key_value_heads=8, attention_k_eq_v=True,
                num_global_key_value_heads=1, sliding_window=1024),  # no per-layer-input keys: unified
    "31b": dict(hidden_size=5376, num_hidden_layers=60, layer_types=_types(60, 6), intermediate_size=21504,
                num_attention_heads=32, num_key_value_heads=16, attention_k_eq_v=True,
                num_global_key_value_heads=4, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                sliding_window=1024),
    "tiny": dict(hidden_size=64, num_hidden_layers=6, layer_types=_types(6, 3), intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=1, num_kv_shared_layers=2, use_double_wide_mlp=True,
                 hidden_size_per_layer_input=8, vocab_size_per_layer_input=512, sliding_window=16,
                 vocab_size=512, head_dim=16, global_head_dim=32),
}
DRAFTER_SHAPES = {  # hidden, intermediate, heads, centroid head
    "e2b": (256, 2048, 4, True), "e4b": (256, 2048, 4, True), "12b": (1024, 8192, 16, False),
    "26b": (1024, 8192, 16, False), "31b": (1024, 8192, 32, False), "tiny": (32, 64, 4, True),
}
# Block drafters (config fields as published). 31B: z-lab/gemma-4-31B-it-DFlash (its model card); 12B:
# deepseek-ai/dspark_gemma4_12b_block7 (5 layers, ids as DeepSpec's 12B recipe, Markov rank 256 from its
# parameter count); E2B has no published block drafter: a DFlash of z-lab's proportions, for comparison.
BLOCK_DRAFTER_SHAPES = {
    ("31b", "dflash"): dict(layers=5, heads=64, kv=8, head_dim=128, intermediate=10752, block_size=16,
                            ids=[1, 12, 23, 35, 46, 57], window=2048),
    ("12b", "dspark"): dict(layers=5, block_size=7, ids=[5, 17, 29, 41, 46], markov_rank=256),
    ("e2b", "dflash"): dict(layers=5, heads=12, kv=4, head_dim=128, intermediate=6144, block_size=16,
                            ids=[1, 8, 15, 22, 29], window=None),
    ("tiny", "dflash"): dict(layers=2, heads=4, kv=2, head_dim=16, intermediate=64, block_size=8, ids=[0, 2],
                             window=8),
    ("tiny", "dspark"): dict(layers=2, block_size=5, ids=[0, 2], markov_rank=8),
}
COMMON = dict(model_type="gemma4_text", vocab_size=262144, head_dim=256, global_head_dim=512,
              final_logit_softcapping=30.0, rms_norm_eps=1e-6, max_position_embeddings=131072)


def base_config(shape: str, layers: int = 0) -> dict:
    """The shape's text config; `layers` > 0 keeps that many decoder layers (the pattern's last ones: the
    last is full attention, and any KV sharing shrinks in proportion)."""
    if shape not in BASE_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(BASE_SHAPES)}")
    config = {**COMMON, **BASE_SHAPES[shape]}
    n = config["num_hidden_layers"]
    if 0 < layers < n:
        config["layer_types"] = config["layer_types"][n - layers:]
        config["num_hidden_layers"] = layers
        if config.get("num_kv_shared_layers"):
            config["num_kv_shared_layers"] = config["num_kv_shared_layers"] * layers // n
    return config


def drafter_config(shape: str) -> dict:
    base = base_config(shape)
    hidden, inter, heads, centroids = DRAFTER_SHAPES[shape]
    text = {k: base[k] for k in ("vocab_size", "head_dim", "global_head_dim", "num_key_value_heads",
                                  "sliding_window", "rms_norm_eps", "max_position_embeddings")}
    text.update(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_hidden_layers=4,
                layer_types=[S, S, S, F], attention_k_eq_v=base.get("attention_k_eq_v", False),
                num_global_key_value_heads=base.get("num_global_key_value_heads"), final_logit_softcapping=None)
    n_centroids = 2048 if shape != "tiny" else 8
    return {"model_type": gemma4_assistant.model_type_for(base.get("model_type")),
            "backbone_hidden_size": base["hidden_size"],
            "use_ordered_embeddings": centroids, "num_centroids": n_centroids,
            "centroid_intermediate_top_k": 32 if shape != "tiny" else 2, "text_config": text}


def _noise(shape, dtype, key: int) -> mx.array:
    return mx.random.normal(shape, dtype=dtype, key=mx.random.key(key)) * 0.02  # drawn in dtype: no fp32 copy


def _randomize(model: nn.Module, dtype, seed: int, skip=frozenset()) -> None:
    """Small random weights in `dtype`, norms near 1; keeps integer tables (token_ordering) and `skip`."""
    params = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        if not mx.issubdtype(p.dtype, mx.floating) or name in skip:
            params.append((name, p))
            continue
        center = 1.0 if "norm" in name or "scalar" in name else 0.0
        params.append((name, center + _noise(p.shape, dtype, seed * 100_003 + i)))
        mx.eval(params[-1][1])  # one tensor at a time keeps peak memory at the model's size
    model.update(tree_unflatten(params))


def _random_quantized(model: nn.Module, dtype, seed: int, bits: int, group_size: int) -> None:
    """Quantize the layers that take it one at a time, each from fresh random weights: the unquantized model
    never exists whole (E2B in bf16 is 10 GB, in 4 bits under 3), so peak memory stays near the result's."""
    done = set()
    for i, (path, module) in enumerate(list(model.named_modules())):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            continue
        module.weight = _noise(module.weight.shape, dtype, seed * 7_919 + i)
        quantized = module.to_quantized(group_size=group_size, bits=bits)
        mx.eval(quantized.parameters())
        model.update_modules(tree_unflatten([(path, quantized)]))
        done.update(f"{path}.{name}" for name, _ in tree_flatten(quantized.parameters()))
    _randomize(model, dtype, seed, skip=done)


def block_drafter_config(shape: str, family: str, layers: int = 0) -> dict:
    """A DFlash (z-lab layout) or DSpark (DeepSpec layout) config for the shape's base."""
    if (shape, family) not in BLOCK_DRAFTER_SHAPES:
        known = ", ".join(f"{s}/{f}" for s, f in BLOCK_DRAFTER_SHAPES)
        raise ValueError(f"no {family} drafter shape for {shape!r}; known: {known}")
    base, d = base_config(shape, layers), BLOCK_DRAFTER_SHAPES[shape, family]
    n = base["num_hidden_layers"]
    ids = sorted({min(i * n // BASE_SHAPES[shape]["num_hidden_layers"], n - 2) for i in d["ids"]})  # a cut base
    if family == "dflash":
        types = [F] * d["layers"] if not d["window"] else [S] * (d["layers"] - 1) + [F]
        return {"model_type": "gemma4", "architectures": ["DFlashDraftModel"], "hidden_size": base["hidden_size"],
                "intermediate_size": d["intermediate"], "num_hidden_layers": d["layers"],
                "num_attention_heads": d["heads"], "num_key_value_heads": d["kv"], "head_dim": d["head_dim"],
                "vocab_size": base["vocab_size"], "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
                "rope_theta": 1e6, "block_size": d["block_size"], "num_target_layers": n, "layer_types": types,
                "sliding_window": d["window"], "final_logit_softcapping": 30.0,
                "dflash_config": {"target_layer_ids": ids, "mask_token_id": 4}}
    return {**base, "architectures": ["Gemma4DSparkModel"], "num_hidden_layers": d["layers"],
            "layer_types": [F] * d["layers"], "tie_word_embeddings": False, "num_target_layers": n,
            "block_size": d["block_size"], "mask_token_id": 4, "target_layer_ids": ids,
            "markov_rank": d["markov_rank"], "markov_head_type": "vanilla", "enable_confidence_head": False}


def random_block_drafter(shape: str, family: str, dtype=mx.bfloat16, layers: int = 0, seed: int = 2,
                         q_bits: int = 0, group_size: int = 64):
    """A DFlash or DSpark drafter of the shape's published proportions, with random weights in dtype,
    quantized to q_bits (0 = not; DSpark's authors recommend 8 for theirs)."""
    from .models import get_model_classes

    config = block_drafter_config(shape, family, layers)
    model_class, args_class = get_model_classes(config)
    drafter = model_class(args_class.from_dict(config))
    if q_bits:
        _random_quantized(drafter, dtype, seed, q_bits, group_size)
    else:
        _randomize(drafter, dtype, seed)
    mx.eval(drafter.parameters())
    return drafter


def random_base(shape: str, dtype=mx.bfloat16, q_bits: int = 4, group_size: int = 64, seed: int = 0, layers: int = 0):
    """The base alone, with random weights, quantized to q_bits (0 = unquantized)."""
    base = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(base_config(shape, layers)))
    if q_bits:
        _random_quantized(base, dtype, seed, q_bits, group_size)
    else:
        _randomize(base, dtype, seed)
    mx.eval(base.parameters())
    return base


def random_pair(shape: str, dtype=mx.bfloat16, q_bits: int = 4, group_size: int = 64, seed: int = 0, layers: int = 0):
    """(base, drafter) with random weights; the base quantized to q_bits (0 = unquantized), drafter in dtype."""
    base = random_base(shape, dtype, q_bits, group_size, seed, layers)
    drafter = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(drafter_config(shape)))
    _randomize(drafter, dtype, seed + 1)
    if drafter.args.use_ordered_embeddings:
        vocab = drafter.text_args.vocab_size
        drafter.masked_embedding.token_ordering = mx.random.permutation(vocab, key=mx.random.key(seed)).astype(mx.int32)
    mx.eval(base.parameters(), drafter.parameters())
    return base, drafter
