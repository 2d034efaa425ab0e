"""Tiny random EAGLE-3 drafters in the vllm-project/speculators layout (MLX + numpy only, no mlx_spec, so the
mlx-vlm golden script can build the same files):

    config = eagle3_config(base_text, aux=(1, 2, 3), draft_vocab=128)   # base_text: the base's text config
    weights = eagle3_weights(config, embed=base_embedding, seed=7)       # speculators' tensor names
    path = make_eagle3_checkpoint(tmp_path, base_dir, aux=(1, 2, 3))    # config.json + model.safetensors

As speculators trains them, the drafter's width is the base's and its `embed_tokens` is the base's own unscaled
table (mlx-vlm even swaps in the base's when the shapes match); the rest ~ N(0, 0.15), norm scales
~ 1 + N(0, 0.1). The reduced vocabulary is a sorted random subset: `d2t` int64 (target - draft id) and
`t2d` bool over the base's vocabulary, as speculators saves them.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

STD = 0.15


def eagle3_config(base_text: dict, *, layers: int = 1, kind: str = "llama", aux=(1, 2, 3),
                  draft_vocab: Optional[int] = None, norm_before_residual: bool = True, norm_before_fc: bool = False,
                  fc_norm: bool = False, norm_output: bool = False, speculative_tokens: int = 3,
                  intermediate: int = 96, heads: int = 4, kv_heads: int = 2, head_dim: int = 16) -> dict:
    """A Speculators EAGLE-3 config.json for a base whose text config is `base_text`."""
    H, V = base_text["hidden_size"], base_text["vocab_size"]
    layer = {"model_type": kind, "hidden_size": H, "intermediate_size": intermediate, "num_hidden_layers": layers,
             "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": V,
             "rms_norm_eps": 1e-6, "max_position_embeddings": 1024, "hidden_act": "silu", "attention_bias": False,
             "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False}
    if kind == "llama":
        layer["mlp_bias"] = False
    else:
        layer.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * layers)
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "speculators_version": "0.3.0", "dtype": "float32", "transformer_layer_config": layer,
            "draft_vocab_size": draft_vocab or V, "norm_before_residual": norm_before_residual,
            "norm_before_fc": norm_before_fc, "fc_norm": fc_norm, "norm_output": norm_output,
            "embed_requires_grad": False, "target_hidden_size": None,
            "eagle_aux_hidden_state_layer_ids": list(aux) if aux is not None else None,
            "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                   "proposal_methods": [{"proposal_type": "greedy",
                                                         "speculative_tokens": speculative_tokens,
                                                         "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                                   "verifier": {"name_or_path": "tiny-gemma4", "architectures": []}}}


def eagle3_weights(config: dict, embed: mx.array, seed: int = 7, targets=None) -> dict:
    """Random weights for `config` with speculators' names; `embed` (V, H) is the base's token table;
    `targets`: the draft vocabulary's token ids (default: a sorted random subset)."""
    rng = np.random.default_rng(seed)
    layer = config["transformer_layer_config"]
    H, V, Vd = layer["hidden_size"], layer["vocab_size"], config["draft_vocab_size"]
    hd, nh, nkv, inter = layer["head_dim"], layer["num_attention_heads"], layer["num_key_value_heads"], \
        layer["intermediate_size"]
    n_aux = len(config["eagle_aux_hidden_state_layer_ids"] or (0, 0, 0))
    w = {}

    def matrix(name, *shape):
        w[name] = mx.array(STD * rng.standard_normal(shape, dtype=np.float32))

    def scale(name, n):
        w[name] = mx.array(1.0 + 0.1 * rng.standard_normal((n,), dtype=np.float32))

    w["embed_tokens.weight"] = mx.array(embed).astype(mx.float32)
    matrix("fc.weight", H, n_aux * H)
    if config.get("norm_before_fc"):
        scale("input_norm.weight", n_aux * H)
    if config.get("fc_norm"):
        for i in range(n_aux):
            scale(f"fc_norm.{i}.weight", H)
    for i in range(layer["num_hidden_layers"]):
        p, width = f"layers.{i}.", 2 * H if i == 0 else H
        matrix(p + "self_attn.q_proj.weight", nh * hd, width)
        matrix(p + "self_attn.k_proj.weight", nkv * hd, width)
        matrix(p + "self_attn.v_proj.weight", nkv * hd, width)
        matrix(p + "self_attn.o_proj.weight", H, nh * hd)
        if layer["model_type"] == "qwen3":
            scale(p + "self_attn.q_norm.weight", hd)
            scale(p + "self_attn.k_norm.weight", hd)
        matrix(p + "mlp.gate_proj.weight", inter, H)
        matrix(p + "mlp.up_proj.weight", inter, H)
        matrix(p + "mlp.down_proj.weight", H, inter)
        scale(p + "input_layernorm.weight", H)
        scale(p + "post_attention_layernorm.weight", H)
        if i == 0:
            scale(p + "hidden_norm.weight", H)
    scale("norm.weight", H)
    matrix("lm_head.weight", Vd, H)
    if Vd < V:
        targets = np.sort(rng.choice(V, size=Vd, replace=False) if targets is None else np.array(targets))
        t2d = np.zeros(V, bool)
        t2d[targets] = True
        w["d2t"] = mx.array((targets - np.arange(Vd)).astype(np.int64))
        w["t2d"] = mx.array(t2d)
    return w


def _text_of(base_dir: Path) -> dict:
    config = json.loads((Path(base_dir) / "config.json").read_text())
    return config.get("text_config", config)


def base_embedding(base_dir: Path) -> mx.array:
    """The base checkpoint's token table (HF names, text or multimodal layout)."""
    weights = mx.load(str(Path(base_dir) / "model.safetensors"))
    return next(v for k, v in weights.items() if k.endswith("embed_tokens.weight") and "per_layer" not in k)


def make_eagle3_checkpoint(tmp_path: Path, base_dir: Path, name: str = "eagle3", seed: int = 7, **config) -> Path:
    """A Speculators-layout EAGLE-3 drafter for the HF base in `base_dir` (keywords: `eagle3_config`'s)."""
    cfg = eagle3_config(_text_of(base_dir), **config)
    out = Path(tmp_path) / name
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    mx.save_safetensors(str(out / "model.safetensors"), eagle3_weights(cfg, base_embedding(base_dir), seed),
                        metadata={"format": "pt"})
    return out


GOLDEN_AUX = (1, 2, 3)  # mlx-vlm 0.7.10's fc takes exactly three aux layers, and its id 0 is another layer
GOLDEN_DRAFTERS = {"eagle3": dict(draft_vocab=128, norm_before_residual=True, seed=7),
                   "eagle3_wide": dict(layers=2, norm_before_residual=False, norm_before_fc=True, seed=8)}


def build_eagle3_checkpoints(out: Path) -> dict:
    """The checkpoints of the EAGLE-3 goldens (tests/fixtures/make_eagle3_goldens.py), by name: the block
    goldens' `unified` base and the drafters of GOLDEN_DRAFTERS."""
    from checkpoints import make_unified_checkpoint

    base = make_unified_checkpoint(out, window=16)
    paths = {"unified": base}
    for name, options in GOLDEN_DRAFTERS.items():
        paths[name] = make_eagle3_checkpoint(out, base, name=name, aux=GOLDEN_AUX, **options)
    return paths
