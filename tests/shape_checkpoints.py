"""Random-weight checkpoints of every published Gemma 4 shape (mlx_spec/shapes.py), cut small, with an MTP
drafter each: the head geometry (query heads, K/V heads per layer type, k_eq_v, experts and top-k, KV
sharing, per-layer inputs, whether a layer is sliding or full) is the shape's; the widths are tiny, so a rank can hold one.

    base_dir, drafter_dir = write_shape(tmp_path, "26b", q_bits=4)

Widths are chosen so 2 ranks can split them, quantized too (group 32): intermediate 256, per-layer-input
width 64; except the MoE's dense MLP, an odd number of quantization groups wide as the 26B-A4B's. The 12B is written in Google's `gemma4_unified` layout (text under `language_model.`).
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from checkpoints import VOCAB, write_tokenizer
from mlx_spec import shapes
from mlx_spec.models import gemma4, gemma4_assistant, gemma4_text
from tiny_models import _redraw

LAYERS = [shapes.S, shapes.S, shapes.F] * 2  # both types before any KV-shared layer; a pipeline stage each
SMALL = dict(hidden_size=64, head_dim=16, global_head_dim=32, intermediate_size=256, moe_intermediate_size=32,
             vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, sliding_window=16, max_position_embeddings=1024)
GROUP = 32


def base_config(shape: str) -> dict:
    config = {**shapes.base_config(shape), **SMALL, "num_hidden_layers": len(LAYERS), "layer_types": LAYERS}
    if config.get("num_kv_shared_layers"):
        config["num_kv_shared_layers"] = len(LAYERS) // 2  # E2B shares 20 of 35, E4B 18 of 42
    if config.get("hidden_size_per_layer_input"):
        config["hidden_size_per_layer_input"] = 64
    if config.get("enable_moe_block"):  # 26B: 2112 = 33 groups of 64, which 2 ranks cannot share; 96 = 3 of 32
        config["intermediate_size"] = 96
    return config


def drafter_config(base: dict, shape: str) -> dict:
    _, _, heads, centroid = shapes.DRAFTER_SHAPES[shape]
    text = {**{k: base[k] for k in ("vocab_size", "head_dim", "global_head_dim", "num_key_value_heads",
                                     "sliding_window", "rms_norm_eps", "max_position_embeddings")},
            "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": heads, "num_hidden_layers": 2,
            "layer_types": [shapes.S, shapes.F], "attention_k_eq_v": base.get("attention_k_eq_v", False),
            "num_global_key_value_heads": base.get("num_global_key_value_heads"), "final_logit_softcapping": None}
    return {"model_type": gemma4_assistant.model_type_for(base.get("model_type")),
            "backbone_hidden_size": base["hidden_size"], "use_ordered_embeddings": centroid, "num_centroids": 8,
            "centroid_intermediate_top_k": 2, "text_config": text}


def _quantize(model: nn.Module, bits: int) -> None:
    nn.quantize(model, group_size=GROUP, bits=bits,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % GROUP == 0)


def _save(model: nn.Module, config: dict, out: Path, bits: int = 0) -> Path:
    out.mkdir(parents=True)
    if bits:
        config = {**config, "quantization": {"group_size": GROUP, "bits": bits}}
    (out / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    write_tokenizer(out, chat_template=False)
    return out


def write_shape(tmp_path: Path, shape: str, q_bits: int = 0, seed: int = 0):
    """(base directory, drafter directory) for the shape, cut small; base quantized to q_bits if given."""
    text = base_config(shape)
    if text["model_type"] == gemma4_text.UNIFIED_TEXT:
        config = {"model_type": "gemma4_unified", "text_config": text, "vocab_size": VOCAB}
        base = gemma4.Model(gemma4.ModelArgs.from_dict(config))
    else:
        config, base = text, gemma4_text.Model(gemma4_text.ModelArgs.from_dict(text))
    _redraw(base, seed)
    if q_bits:
        _quantize(base, q_bits)
    name = shape + (f"-{q_bits}bit" if q_bits else "")
    base_dir = _save(base, config, Path(tmp_path) / name, q_bits)
    d_config = drafter_config(text, shape)
    drafter = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(d_config))
    _redraw(drafter, seed + 1)
    if drafter.args.use_ordered_embeddings:
        drafter.masked_embedding.token_ordering = mx.random.permutation(VOCAB, key=mx.random.key(seed)).astype(mx.int32)
    return base_dir, _save(drafter, d_config, Path(tmp_path) / (name + "-drafter"))
