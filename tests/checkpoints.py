"""Tiny random Gemma 4 checkpoints in Hugging Face layout, built in-process (MLX + numpy, no torch).

    from checkpoints import make_checkpoint, make_drafter    # pytest puts tests/ on sys.path
    base = make_checkpoint(tmp_path, variant="e2b")          # -> tmp_path/"e2b-global-text-1"
    drafter = make_drafter(tmp_path, base, head="centroid")  # -> tmp_path/"drafter-centroid"

What a directory holds, as Google's checkpoints do:
- config.json: a `gemma4_text` config (`Gemma4ForCausalLM`) or, with layout="multimodal", Google's
  `gemma4` config (`Gemma4ForConditionalGeneration`: text_config + vision_config + audio_config, no
  top-level vocab_size). Head geometry of full-attention layers in either config form: "global"
  (`global_head_dim`, `num_global_key_value_heads`) or "per_layer" (`per_layer_config` only).
- safetensors with transformers' tensor names (ref A.3/B.2): one `model.safetensors`, or `shards` files
  plus `model.safetensors.index.json`; the multimodal layout nests text weights under
  `model.language_model.` and adds small fake `model.vision_tower.*`, `model.embed_vision.*`,
  `model.audio_tower.*`, `model.embed_audio.*` tensors. MoE experts are stored as HF stores them:
  `experts.gate_up_proj` (E, 2*I, H) and `experts.down_proj` (E, H, I).
- tokenizer.json (WordLevel, whitespace-split: "<pad>"=0 "<eos>"=1 "<bos>"=2 "<unk>"=3,
  "<start_of_turn>"=4 "<end_of_turn>"=5, "user"=6 "model"=7, then "w8".."w{VOCAB-1}"; BOS prepended),
  tokenizer_config.json, special_tokens_map.json, chat_template.jinja, generation_config.json.

Weights ~ N(0, 0.15), norm scales and layer_scalar ~ 1 + N(0, 0.1): logits have clear top-2 margins, so
greedy decoding is stable under fp32 reordering. Same arguments, same bytes (seeded numpy).

Variants (hidden 64, 4 heads, head_dim 16 / global_head_dim 32, vocab VOCAB; input dims are multiples of
64 where the real models' are, so quantization applies; the PLE width 16 is not, so those stay float):
- "e2b":  PLE, KV sharing (last 2 of 6 layers), double-wide MLP on shared layers, 1 kv head
- "e4b":  PLE, KV sharing (last 2 of 6 layers), single-width MLP, 2 kv heads
- "moe":  26B-like: 4 experts top-2 next to the dense MLP, router, k_eq_v full layers (1 global kv head)
- "dense_keqv": 31B-like: k_eq_v full layers, 4 sliding / 2 global kv heads
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

VOCAB = 256
HIDDEN = 64
HEAD_DIM = 16
GLOBAL_HEAD_DIM = 32
INTERMEDIATE = 128
PLE_WIDTH = 16
S, F = "sliding_attention", "full_attention"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
STD = 0.15

VARIANTS: Dict[str, dict] = {
    "e2b": dict(num_hidden_layers=6, layer_types=[S, S, F, S, S, F], num_key_value_heads=1,
                num_kv_shared_layers=2, hidden_size_per_layer_input=PLE_WIDTH, use_double_wide_mlp=True),
    "e4b": dict(num_hidden_layers=6, layer_types=[S, S, S, F, S, F], num_key_value_heads=2,
                num_kv_shared_layers=2, hidden_size_per_layer_input=PLE_WIDTH, use_double_wide_mlp=False),
    "moe": dict(num_hidden_layers=4, layer_types=[S, S, F, F], num_key_value_heads=2,
                num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True,
                num_experts=4, top_k_experts=2, moe_intermediate_size=64, intermediate_size=64),
    "dense_keqv": dict(num_hidden_layers=4, layer_types=[S, F, S, F], num_key_value_heads=4,
                       num_global_key_value_heads=2, attention_k_eq_v=True),
}
MULTIMODAL_TEXT_PREFIX = "model.language_model."
FAKE_TOWER_TENSORS = {  # dropped by every text-only loader
    "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": (16, 16),
    "model.vision_tower.patch_embedder.input_proj.weight": (16, 48),
    "model.embed_vision.embedding_projection.weight": (HIDDEN, 16),
    "model.audio_tower.layers.0.feed_forward1.ffw_layer_1.linear.weight": (32, 16),
    "model.embed_audio.embedding_projection.weight": (HIDDEN, 16),
}


# --- configs ---------------------------------------------------------------------------------------

def text_config(variant: str, window: int = 16, dtype: str = "float32") -> dict:
    """A complete HF `gemma4_text` config dict (global form) for a variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    cfg = dict(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", dtype=dtype,
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=4,
        num_key_value_heads=1, head_dim=HEAD_DIM, global_head_dim=GLOBAL_HEAD_DIM, sliding_window=window,
        max_position_embeddings=1024, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", attention_bias=False, attention_dropout=0.0,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, use_cache=True,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=0,
        use_double_wide_mlp=False, attention_k_eq_v=False, enable_moe_block=False, num_experts=None,
        top_k_experts=None, moe_intermediate_size=None, use_bidirectional_attention=None,
        rope_parameters={
            F: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            S: {"rope_theta": 10000.0, "rope_type": "default"},
        },
    )
    cfg.update(VARIANTS[variant])
    return cfg


def to_config_form(cfg: dict, form: str) -> dict:
    """Rewrite the full-layer head geometry as `global_head_dim`/... ("global") or `per_layer_config`."""
    cfg = dict(cfg)
    if form == "global":
        return cfg
    if form != "per_layer":
        raise ValueError(f"config_form must be 'global' or 'per_layer', got {form!r}")
    override = {"head_dim": cfg.pop("global_head_dim")}
    n_global = cfg.pop("num_global_key_value_heads", None)
    if cfg.get("attention_k_eq_v") and n_global is not None:
        override["num_key_value_heads"] = n_global
    cfg["per_layer_config"] = {str(i): dict(override) for i, t in enumerate(cfg["layer_types"]) if t == F}
    return cfg


def multimodal_config(text: dict) -> dict:
    """Google's `gemma4` wrapper config around a text config (towers described, never used)."""
    text = {k: v for k, v in text.items() if k not in ("architectures", "dtype")}
    return dict(
        architectures=["Gemma4ForConditionalGeneration"], model_type="gemma4", dtype="float32",
        text_config=text, tie_word_embeddings=True, image_token_id=VOCAB - 1, audio_token_id=VOCAB - 2,
        boi_token_id=VOCAB - 3, eoi_token_id=VOCAB - 4,
        vision_config={"model_type": "gemma4_vision", "hidden_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "patch_size": 4},
        audio_config={"model_type": "gemma4_audio", "hidden_size": 16, "num_hidden_layers": 1},
    )


# --- weights ---------------------------------------------------------------------------------------

class _Weights:
    def __init__(self, seed: int, dtype: str, quant_grid: Optional[int] = None):
        self.rng = np.random.default_rng(seed)
        self.dtype = getattr(mx, dtype)
        self.quant_grid = quant_grid
        self.tensors: Dict[str, mx.array] = {}

    def matrix(self, name: str, *shape: int) -> None:
        if self.quant_grid:
            w = self._on_grid(shape, self.quant_grid)
        else:
            w = STD * self.rng.standard_normal(shape, dtype=np.float32)
        self.tensors[name] = mx.array(w).astype(self.dtype)

    def _on_grid(self, shape, bits: int) -> np.ndarray:
        """w = scale * (level - 2**(bits-1)), levels in [0, 2**bits - 1], one scale per row, both extreme
        levels in every 32 inputs: MLX's affine quantization at `bits` (and 8 for a 4-bit grid: 255 = 17*15)
        with group size 32, 64 or 128 then recovers w up to float rounding."""
        top, mid = 2 ** bits - 1, 2 ** (bits - 1)
        levels = np.clip(np.round(mid + (top / 6) * self.rng.standard_normal(shape)), 0, top)
        levels[..., 0::32] = 0
        levels[..., 1::32] = top
        scale = STD * 6 / top * np.exp(0.1 * self.rng.standard_normal(shape[:-1] + (1,)))
        return (scale * (levels - mid)).astype(np.float32)

    def scale(self, name: str, *shape: int) -> None:
        self.tensors[name] = mx.array(1.0 + 0.1 * self.rng.standard_normal(shape, dtype=np.float32)).astype(self.dtype)


def _base_weights(cfg: dict, seed: int, dtype: str, shared_kv_tensors: bool,
                  quant_grid: Optional[int]) -> Dict[str, mx.array]:
    w = _Weights(seed, dtype, quant_grid)
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    P = cfg["hidden_size_per_layer_input"]
    n_heads = cfg["num_attention_heads"]
    first_shared = L - cfg["num_kv_shared_layers"]
    w.matrix("model.embed_tokens.weight", V, H)
    w.scale("model.norm.weight", H)
    if P:
        w.matrix("model.embed_tokens_per_layer.weight", cfg["vocab_size_per_layer_input"], L * P)
        w.matrix("model.per_layer_model_projection.weight", L * P, H)
        w.scale("model.per_layer_projection_norm.weight", P)
    for i, t in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        full = t == F
        hd = cfg["global_head_dim"] if full else cfg["head_dim"]
        k_eq_v = full and cfg["attention_k_eq_v"]
        n_global = cfg.get("num_global_key_value_heads")
        n_kv = n_global if k_eq_v and n_global else cfg["num_key_value_heads"]
        shared = i >= first_shared
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w.scale(p + norm + ".weight", H)
        w.scale(p + "layer_scalar", 1)
        w.matrix(p + "self_attn.q_proj.weight", n_heads * hd, H)
        w.scale(p + "self_attn.q_norm.weight", hd)
        w.matrix(p + "self_attn.o_proj.weight", H, n_heads * hd)
        if not shared or shared_kv_tensors:  # HF ignores these on shared layers; some checkpoints carry them
            w.matrix(p + "self_attn.k_proj.weight", n_kv * hd, H)
            w.scale(p + "self_attn.k_norm.weight", hd)
            if not k_eq_v:
                w.matrix(p + "self_attn.v_proj.weight", n_kv * hd, H)
        inter = cfg["intermediate_size"] * (2 if shared and cfg["use_double_wide_mlp"] else 1)
        w.matrix(p + "mlp.gate_proj.weight", inter, H)
        w.matrix(p + "mlp.up_proj.weight", inter, H)
        w.matrix(p + "mlp.down_proj.weight", H, inter)
        if P:
            w.matrix(p + "per_layer_input_gate.weight", P, H)
            w.matrix(p + "per_layer_projection.weight", H, P)
            w.scale(p + "post_per_layer_input_norm.weight", H)
        if cfg["enable_moe_block"]:
            E, I = cfg["num_experts"], cfg["moe_intermediate_size"]
            w.matrix(p + "router.proj.weight", E, H)
            w.scale(p + "router.scale", H)
            w.scale(p + "router.per_expert_scale", E)
            w.matrix(p + "experts.gate_up_proj", E, 2 * I, H)
            w.matrix(p + "experts.down_proj", E, H, I)
            for norm in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                         "pre_feedforward_layernorm_2"):
                w.scale(p + norm + ".weight", H)
    return w.tensors


# --- files -----------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(out: Path, tensors: Dict[str, mx.array], shards: int = 1) -> None:
    """`model.safetensors`, or `shards` files `model-0000i-of-0000N.safetensors` plus the index."""
    if shards <= 1:
        mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        mx.save_safetensors(str(out / fname), part, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(v.nbytes for v in tensors.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tokenizer(out: Path, chat_template: bool = True) -> None:
    """WordLevel tokenizer files and generation_config.json (eos 1), as `save_pretrained` lays them out."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({"user": 6, "model": 7})
    vocab.update({f"w{i}": i for i in range(8, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
                                               **specials})
    write_json(out / "special_tokens_map.json", specials)
    if chat_template:
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    write_json(out / "generation_config.json", {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})


def make_checkpoint(tmp_path: Path, variant: str = "e2b", config_form: str = "global", layout: str = "text",
                    shards: int = 1, window: int = 16, seed: int = 0, dtype: str = "float32",
                    shared_kv_tensors: bool = False, quant_grid: Optional[int] = None,
                    name: Optional[str] = None) -> Path:
    """Write a tiny random HF Gemma 4 base checkpoint and return its directory.

    variant: "e2b" | "e4b" | "moe" | "dense_keqv"; config_form: "global" | "per_layer";
    layout: "text" (gemma4_text, `model.*`) | "multimodal" (gemma4, `model.language_model.*` + towers);
    shards: number of safetensors files (>1 writes the index); window: sliding_window; dtype: stored
    float dtype ("float32" | "bfloat16" | "float16"), also written as config `dtype`;
    shared_kv_tensors: also store k/v projections on KV-shared layers (HF ignores them);
    quant_grid: put every matrix on a `quant_grid`-bit affine grid (std still ~0.15), so quantizing it to
    that many bits is lossless up to float rounding: quantized == float, tie-aware, tests the packing;
    name: directory name (default "{variant}-{config_form}-{layout}-{shards}").
    The same weights come out for the same (variant, seed, dtype, shared_kv_tensors), whatever the form,
    layout or sharding, so those can be compared for exact equality.
    """
    if layout not in ("text", "multimodal"):
        raise ValueError(f"layout must be 'text' or 'multimodal', got {layout!r}")
    text = text_config(variant, window=window, dtype=dtype)
    weights = _base_weights(text, seed, dtype, shared_kv_tensors, quant_grid)
    text = to_config_form(text, config_form)
    if layout == "multimodal":
        config = multimodal_config(text)
        config["dtype"] = dtype
        weights = {MULTIMODAL_TEXT_PREFIX + k.removeprefix("model."): v for k, v in weights.items()}
        rng = np.random.default_rng(seed + 1)
        for k, shape in FAKE_TOWER_TENSORS.items():
            weights[k] = mx.array(STD * rng.standard_normal(shape, dtype=np.float32))
    else:
        config = text
    out = Path(tmp_path) / (name or f"{variant}-{config_form}-{layout}-{shards}")
    out.mkdir(parents=True)
    write_json(out / "config.json", config)
    write_safetensors(out, weights, shards)
    write_tokenizer(out)
    return out


def make_drafter(tmp_path: Path, base_dir: Path, head: str = "centroid", seed: int = 1, dtype: str = "float32",
                 num_centroids: int = 16, top_k: int = 4, layers=(S, S, S, F), name: Optional[str] = None) -> Path:
    """Write a tiny random `gemma4_assistant` drafter (HF layout) that fits the base in `base_dir`.

    head: "centroid" (use_ordered_embeddings: `masked_embedding.centroids` + `token_ordering` int64, a
    random vocabulary permutation) | "dense" (tied head only). The attention geometry (head dims, kv heads,
    k_eq_v, window, rope) mirrors the base, since the drafter reads the base's K/V. Hidden 64, 4 heads.
    """
    if head not in ("centroid", "dense"):
        raise ValueError(f"head must be 'centroid' or 'dense', got {head!r}")
    base_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    bt = base_cfg.get("text_config", base_cfg)
    global_hd = bt.get("global_head_dim")
    n_global = bt.get("num_global_key_value_heads")
    for override in (bt.get("per_layer_config") or {}).values():
        global_hd = override.get("head_dim", global_hd)
        n_global = override.get("num_key_value_heads", n_global)
    text = dict(
        model_type="gemma4_text", vocab_size=bt["vocab_size"], hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=len(layers), layer_types=list(layers), num_attention_heads=4,
        num_key_value_heads=bt["num_key_value_heads"], head_dim=bt["head_dim"], global_head_dim=global_hd,
        attention_k_eq_v=bt.get("attention_k_eq_v", False), sliding_window=bt["sliding_window"],
        rope_parameters=bt.get("rope_parameters"), max_position_embeddings=bt.get("max_position_embeddings", 1024),
        num_kv_shared_layers=len(layers), hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        final_logit_softcapping=None, use_double_wide_mlp=False, enable_moe_block=False, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )
    if text["attention_k_eq_v"] and n_global is not None:
        text["num_global_key_value_heads"] = n_global
    config = dict(
        architectures=["Gemma4AssistantForCausalLM"], model_type="gemma4_assistant", dtype=dtype,
        backbone_hidden_size=bt["hidden_size"], use_ordered_embeddings=head == "centroid",
        num_centroids=num_centroids, centroid_intermediate_top_k=top_k, tie_word_embeddings=True,
        text_config=text,
    )
    w = _Weights(seed, dtype)
    V, H, Hb = text["vocab_size"], HIDDEN, bt["hidden_size"]
    w.matrix("model.embed_tokens.weight", V, H)
    w.scale("model.norm.weight", H)
    for i, t in enumerate(layers):
        p = f"model.layers.{i}."
        hd = global_hd if t == F else text["head_dim"]
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w.scale(p + norm + ".weight", H)
        w.scale(p + "layer_scalar", 1)
        w.matrix(p + "self_attn.q_proj.weight", 4 * hd, H)
        w.scale(p + "self_attn.q_norm.weight", hd)
        w.matrix(p + "self_attn.o_proj.weight", H, 4 * hd)
        w.matrix(p + "mlp.gate_proj.weight", INTERMEDIATE, H)
        w.matrix(p + "mlp.up_proj.weight", INTERMEDIATE, H)
        w.matrix(p + "mlp.down_proj.weight", H, INTERMEDIATE)
    w.matrix("pre_projection.weight", H, 2 * Hb)
    w.matrix("post_projection.weight", Hb, H)
    if head == "centroid":
        w.matrix("masked_embedding.centroids.weight", num_centroids, H)
        ordering = np.random.default_rng(seed + 1).permutation(V).astype(np.int64)
        w.tensors["masked_embedding.token_ordering"] = mx.array(ordering)  # int64 on disk, as HF saves it
    out = Path(tmp_path) / (name or f"drafter-{head}")
    out.mkdir(parents=True)
    write_json(out / "config.json", config)
    write_safetensors(out, w.tensors)
    write_tokenizer(out, chat_template=False)
    return out


def tokens(seed: int = 0, n: int = 12) -> list:
    """A prompt of n token ids: BOS then ordinary words."""
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(8, VOCAB, size=n - 1).tolist()


# --- Gemma 4 12B "unified" (gemma4_unified) and block drafters (DFlash, DSpark) ------------------------

UNIFIED_TEXT = dict(num_hidden_layers=4, layer_types=[S, F, S, F], num_key_value_heads=2, num_global_key_value_heads=1,
                    attention_k_eq_v=True)
UNIFIED_TOWERS = {  # the 12B's encoder-free embedders, dropped by every text-only loader
    "model.vision_embedder.patch_ln1.weight": (48,), "model.vision_embedder.patch_dense.weight": (HIDDEN, 48),
    "model.vision_embedder.patch_ln2.weight": (HIDDEN,), "model.vision_embedder.pos_embedding": (16, 2, HIDDEN),
    "model.embed_vision.embedding_projection.weight": (HIDDEN, HIDDEN),
    "model.embed_audio.embedding_projection.weight": (HIDDEN, 64),
}


def unified_text_config(window: int = 16) -> dict:
    """A `gemma4_unified_text` config as transformers 5.24 writes it: `per_layer_config` instead of the global
    head geometry, and no per-layer-input (PLE) keys at all (a loader that defaults them to 256 breaks)."""
    cfg = text_config("dense_keqv", window=window)
    cfg.update(UNIFIED_TEXT, model_type="gemma4_unified_text", use_bidirectional_attention="vision")
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
                "top_k_experts", "moe_intermediate_size", "architectures", "dtype"):
        cfg.pop(key, None)
    return to_config_form(cfg, "per_layer")


def make_unified_checkpoint(tmp_path: Path, seed: int = 0, window: int = 16, name: str = "unified") -> Path:
    """A tiny Gemma 4 12B-style base in Google's `gemma4_unified` layout: text weights under
    `model.language_model.`, k_eq_v full layers with one global kv head, plus the vision/audio embedders."""
    text = unified_text_config(window)
    flat = text_config("dense_keqv", window=window)
    flat.update(UNIFIED_TEXT, hidden_size_per_layer_input=0)
    weights = _base_weights(flat, seed, "float32", False, None)
    weights = {MULTIMODAL_TEXT_PREFIX + k.removeprefix("model."): v for k, v in weights.items()}
    rng = np.random.default_rng(seed + 1)
    for k, shape in UNIFIED_TOWERS.items():
        weights[k] = mx.array(STD * rng.standard_normal(shape, dtype=np.float32))
    config = dict(architectures=["Gemma4UnifiedForConditionalGeneration"], model_type="gemma4_unified",
                  dtype="float32", text_config=text, tie_word_embeddings=True, vocab_size=VOCAB,
                  image_token_id=VOCAB - 1, audio_token_id=VOCAB - 2, boi_token_id=VOCAB - 3, eoi_token_id=VOCAB - 4,
                  vision_config={"model_type": "gemma4_unified_vision", "hidden_size": HIDDEN, "patch_size": 4},
                  audio_config={"model_type": "gemma4_unified_audio", "audio_embed_dim": 64})
    out = Path(tmp_path) / name
    out.mkdir(parents=True)
    write_json(out / "config.json", config)
    write_safetensors(out, weights)
    write_tokenizer(out)
    return out


def _text_of(base_dir: Path) -> dict:
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    return cfg.get("text_config", cfg)


def make_dflash_checkpoint(tmp_path: Path, base_dir: Path, *, layers=(F, F), block_size: int = 6,
                           target_layer_ids=(0, 2), window: Optional[int] = None, seed: int = 3,
                           rope_form: str = "parameters", prefix: str = "", name: str = "dflash") -> Path:
    """A z-lab-layout DFlash drafter for the base in `base_dir`: Qwen3 config fields + `dflash_config`,
    weights without a prefix (or with `prefix`), no embedding or head. rope_form: "parameters"
    (transformers 5: `rope_parameters`) or "theta" (a flat `rope_theta`)."""
    bt = _text_of(base_dir)
    H, hd, heads, kv, inter = bt["hidden_size"], 16, 4, 2, 96
    config = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": H,
              "intermediate_size": inter, "num_hidden_layers": len(layers), "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "vocab_size": bt["vocab_size"], "rms_norm_eps": 1e-6,
              "max_position_embeddings": 1024, "block_size": block_size, "num_target_layers": bt["num_hidden_layers"],
              "layer_types": list(layers), "sliding_window": window, "final_logit_softcapping": 30.0,
              "tie_word_embeddings": False, "dtype": "float32",
              "dflash_config": {"target_layer_ids": list(target_layer_ids), "mask_token_id": 4}}
    if rope_form == "parameters":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    else:
        config["rope_theta"] = 1e6
    w = _Weights(seed, "float32")
    w.matrix("fc.weight", H, len(target_layer_ids) * H)
    w.scale("hidden_norm.weight", H)
    w.scale("norm.weight", H)
    for i in range(len(layers)):
        p = f"layers.{i}."
        w.matrix(p + "self_attn.q_proj.weight", heads * hd, H)
        w.matrix(p + "self_attn.k_proj.weight", kv * hd, H)
        w.matrix(p + "self_attn.v_proj.weight", kv * hd, H)
        w.matrix(p + "self_attn.o_proj.weight", H, heads * hd)
        w.scale(p + "self_attn.q_norm.weight", hd)
        w.scale(p + "self_attn.k_norm.weight", hd)
        w.matrix(p + "mlp.gate_proj.weight", inter, H)
        w.matrix(p + "mlp.up_proj.weight", inter, H)
        w.matrix(p + "mlp.down_proj.weight", H, inter)
        w.scale(p + "input_layernorm.weight", H)
        w.scale(p + "post_attention_layernorm.weight", H)
    out = Path(tmp_path) / name
    out.mkdir(parents=True)
    write_json(out / "config.json", config)
    write_safetensors(out, {prefix + k: v for k, v in w.tensors.items()})
    return out


def make_dspark_checkpoint(tmp_path: Path, base_dir: Path, *, layers: int = 2, block_size: int = 5,
                           target_layer_ids=(0, 2), markov_rank: int = 8, k_eq_v: bool = True,
                           confidence_head: bool = True, nested: bool = False, seed: int = 4,
                           name: str = "dspark") -> Path:
    """A DeepSpec-layout DSpark drafter (`Gemma4DSparkModel`) for the base in `base_dir`: a copy of the
    base's text config with the DSpark fields, flat (or under `dflash_config` with `nested`); own
    embedding and LM head; full-attention Gemma 4 blocks with the base's global head geometry."""
    bt = _text_of(base_dir)
    H, V, inter = bt["hidden_size"], bt["vocab_size"], 96
    ghd = bt.get("global_head_dim") or next(iter(bt["per_layer_config"].values()))["head_dim"]
    n_kv = 1 if k_eq_v else bt["num_key_value_heads"]
    config = {k: v for k, v in bt.items() if k != "per_layer_config"}
    config.update(architectures=["Gemma4DSparkModel"], num_hidden_layers=layers, layer_types=[F] * layers,
                  global_head_dim=ghd, attention_k_eq_v=k_eq_v, num_global_key_value_heads=1 if k_eq_v else None,
                  intermediate_size=inter, hidden_size_per_layer_input=0, enable_moe_block=False,
                  tie_word_embeddings=False, dtype="float32", target_model_type="gemma4_unified",
                  num_target_layers=bt["num_hidden_layers"], num_anchors=512)
    fields = dict(block_size=block_size, mask_token_id=4, target_layer_ids=list(target_layer_ids),
                  markov_rank=markov_rank, markov_head_type="vanilla", enable_confidence_head=confidence_head,
                  confidence_head_with_markov=True)
    if nested:
        config["dflash_config"] = fields
    else:
        config.update(fields)
    heads = bt["num_attention_heads"]
    w = _Weights(seed, "float32")
    w.matrix("embed_tokens.weight", V, H)
    w.matrix("lm_head.weight", V, H)
    w.matrix("fc.weight", H, len(target_layer_ids) * H)
    w.scale("hidden_norm.weight", H)
    w.scale("norm.weight", H)
    for i in range(layers):
        p = f"layers.{i}."
        w.matrix(p + "self_attn.q_proj.weight", heads * ghd, H)
        w.matrix(p + "self_attn.k_proj.weight", n_kv * ghd, H)
        if not k_eq_v:
            w.matrix(p + "self_attn.v_proj.weight", n_kv * ghd, H)
        w.matrix(p + "self_attn.o_proj.weight", H, heads * ghd)
        w.scale(p + "self_attn.q_norm.weight", ghd)
        w.scale(p + "self_attn.k_norm.weight", ghd)
        w.matrix(p + "mlp.gate_proj.weight", inter, H)
        w.matrix(p + "mlp.up_proj.weight", inter, H)
        w.matrix(p + "mlp.down_proj.weight", H, inter)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w.scale(p + norm + ".weight", H)
        w.scale(p + "layer_scalar", 1)
    if markov_rank:
        w.matrix("markov_head.markov_w1.weight", V, markov_rank)
        w.matrix("markov_head.markov_w2.weight", V, markov_rank)
    if confidence_head:
        w.matrix("confidence_head.proj.weight", 1, H + markov_rank)
        w.tensors["confidence_head.proj.bias"] = mx.zeros((1,))
    out = Path(tmp_path) / name
    out.mkdir(parents=True)
    write_json(out / "config.json", config)
    write_safetensors(out, w.tensors)
    return out


BLOCK_IDS = (0, 2)  # the layers of the unified base the block drafters below read


def build_block_checkpoints(out: Path) -> dict:
    """The checkpoints of the block-drafter goldens (tests/fixtures/make_block_goldens.py), by name."""
    base = make_unified_checkpoint(out, window=16)
    return {
        "unified": base,
        "dflash": make_dflash_checkpoint(out, base, block_size=6, target_layer_ids=BLOCK_IDS),
        # a sliding drafter layer whose window (6) the prompt's 21 context rows pass; a flat rope_theta
        "dflash_sliding": make_dflash_checkpoint(out, base, layers=(S, F), window=6, block_size=6,
                                                 target_layer_ids=BLOCK_IDS, seed=5, rope_form="theta",
                                                 name="dflash_sliding"),
        "dspark": make_dspark_checkpoint(out, base, block_size=5, target_layer_ids=BLOCK_IDS),
        "dspark_v": make_dspark_checkpoint(out, base, block_size=5, target_layer_ids=BLOCK_IDS, k_eq_v=False,
                                           markov_rank=4, confidence_head=False, nested=True, seed=6, name="dspark_v"),
    }


def checksum(path: Path) -> float:
    """Sum of |w| over a checkpoint's tensors (float64): the same files, or not."""
    weights = mx.load(str(Path(path) / "model.safetensors"))
    return float(sum(np.abs(np.array(w, dtype=np.float64)).sum() for w in weights.values()))
