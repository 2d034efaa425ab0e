"""z-lab DFlash block drafter for Gemma 4 (mlx-vlm's `gemma4_dflash`): a small Qwen3-style transformer that
reads several base layers' outputs and fills a block of masked positions in one pass.

Checkpoint (z-lab's published layout, e.g. z-lab/gemma-4-31B-it-DFlash): config.json with Qwen3 fields
(`model_type` "gemma4" or "qwen3", `rope_theta` or transformers 5's `rope_parameters`) plus `block_size`,
`num_target_layers` and `dflash_config: {target_layer_ids, mask_token_id}`; weights without a `model.`
prefix (one is stripped if present): `fc` (n_ids*H -> H), `hidden_norm`, `layers.i.{self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}`, `norm`. No
embedding and no LM head: the block is embedded with the base's scaled embedding and scored with the
base's head (softcapped when the drafter's config has `final_logit_softcapping`).

Forward (B = 1), see block_context.py for the context and the visible positions:
    ctx  = hidden_norm(fc(features))                      (1, S, H)    every base position, once
    per layer: K/V of ctx (k_norm, RoPE at their positions; V without norm) into the context cache
    x    = base.embed(block) * sqrt(H)                    (1, L, H)    block = [last token, mask * (L-1)]
    per layer: h += attn(input_layernorm(h)); h += SwiGLU(post_attention_layernorm(h)); scale hd**-0.5
    logits of row j (j >= 1) predict the token at block position j  (fill-the-mask: row 0 is discarded)
Deviations from the references, none of which changes a published checkpoint's outputs: missing keys that
mlx-vlm fills with Qwen defaults (rope theta, target ids) are errors here; a file that carries its own
embed_tokens/lm_head is refused (the published layout never does).
"""

from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from ..cache import DEFAULT_MAX_ROLLBACK
from ..errors import ModelLoadError, UnsupportedModelError
from . import block_context as bc
from . import fields

DEFAULT_MASK_TOKEN_ID = 4  # Gemma's <mask>: z-lab's Gemma drafters and mlx-vlm's gemma4_dflash default
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "block_size", "target_layer_ids", "rope_theta")
DFLASH_KEYS = ("target_layer_ids", "mask_token_id", "num_target_layers", "block_size", "causal")


@dataclass
class ModelArgs:
    model_type: str = "gemma4_dflash"
    checkpoint_model_type: str = "gemma4"
    hidden_size: int = 0
    intermediate_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: Optional[int] = None
    vocab_size: int = 0
    block_size: int = 16
    target_layer_ids: List[int] = field(default_factory=list)
    num_target_layers: Optional[int] = None
    mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    layer_types: Optional[List[str]] = None
    sliding_window: Optional[int] = None
    final_logit_softcapping: Optional[float] = None
    attention_bias: bool = False
    causal: bool = False

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        flat = dict(params)
        nested = flat.pop("dflash_config", None) or {}
        flat.update({k: nested[k] for k in DFLASH_KEYS if k in nested})
        if nested.get("attention_sink_bias"):
            raise UnsupportedModelError("dflash_config.attention_sink_bias is not supported")
        rope = flat.pop("rope_parameters", None)
        if isinstance(rope, dict) and "rope_theta" in rope:  # transformers 5 exports
            rope = dict(rope)
            flat.setdefault("rope_theta", rope.pop("rope_theta"))
            flat["rope_scaling"] = rope or None
        missing = [k for k in REQUIRED if flat.get(k) is None]
        if missing:
            raise ModelLoadError(f"DFlash drafter config lacks {', '.join(missing)} (no defaults are guessed)")
        flat["checkpoint_model_type"] = flat.get("model_type", "?")
        flat["model_type"] = "gemma4_dflash"
        names = cls.__dataclass_fields__
        args = cls(**{k: v for k, v in flat.items() if k in names})
        args.target_layer_ids = bc.check_target_layers(args.target_layer_ids, "DFlash drafter config")
        check_ranges(args)
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        args.layer_types = list(args.layer_types or [bc.FULL] * args.num_hidden_layers)
        if len(args.layer_types) != args.num_hidden_layers or not set(args.layer_types) <= {bc.FULL, bc.SLIDING}:
            raise ModelLoadError(f"DFlash drafter config: layer_types {args.layer_types} do not describe "
                                 f"{args.num_hidden_layers} full/sliding attention layers")
        if bc.SLIDING in args.layer_types and not args.sliding_window:
            raise ModelLoadError("DFlash drafter config has sliding layers but no sliding_window")
        return args


def check_ranges(args: ModelArgs) -> None:
    """Every number the drafter is built or run from, in range (ValueError naming the field; fields.py).
    block_size is checked here, at load, not where a round first reaches the native block."""
    fields.integers(args, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "num_key_value_heads", "vocab_size", "max_position_embeddings"))
    fields.integers(args, ("head_dim", "sliding_window", "num_target_layers"), optional=True)
    if args.head_dim is None and args.hidden_size % args.num_attention_heads:
        raise ValueError(f"hidden_size {args.hidden_size} is not a multiple of num_attention_heads "
                         f"{args.num_attention_heads} and no head_dim is given")
    fields.heads_divide(args.num_attention_heads, args.num_key_value_heads, "num_key_value_heads")
    fields.integer(args.block_size, "block_size (the last token and at least one mask)", low=2)
    fields.integer(args.mask_token_id, "mask_token_id", low=0)  # within the base's vocabulary: drafting.py
    fields.positive_number(args.rope_theta, "rope_theta")
    fields.rope(args.rope_scaling, "rope_scaling")
    fields.positive_number(args.rms_norm_eps, "rms_norm_eps")
    fields.positive_number(args.final_logit_softcapping, "final_logit_softcapping", optional=True)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        H, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.window = args.sliding_window if layer_type == bc.SLIDING else None
        self.scale = hd ** -0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = initialize_rope(hd, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings)

    def kv(self, x: mx.array, position: int):
        """K (normed, rotated from `position`) and V of x (1, L, H): each (1, n_kv, L, hd)."""
        k = self.rope(self.k_norm(bc.heads(self.k_proj(x), self.n_kv_heads)), offset=position)
        return k, bc.heads(self.v_proj(x), self.n_kv_heads)

    def __call__(self, x: mx.array, context, position: int, causal: bool) -> mx.array:
        q = self.rope(self.q_norm(bc.heads(self.q_proj(x), self.n_heads)), offset=position)
        k, v = self.kv(x, position)
        n_ctx = 0 if context is None else context[0].shape[2]
        mask = bc.block_mask(n_ctx, x.shape[1], self.window, causal)
        return self.o_proj(bc.merge_heads(bc.attend(q, k, v, context, self.scale, mask)))


class MLP(nn.Module):
    def __init__(self, H: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(args, layer_type)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h: mx.array, context, position: int, causal: bool) -> mx.array:
        h = h + self.self_attn(self.input_layernorm(h), context, position, causal)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        H = args.hidden_size
        self.fc = nn.Linear(len(args.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.layers = [DecoderLayer(args, t) for t in args.layer_types]
        self.norm = nn.RMSNorm(H, eps=args.rms_norm_eps)

    # -- what a proposer needs
    @property
    def target_layer_ids(self) -> List[int]:
        return self.args.target_layer_ids

    @property
    def max_drafts(self) -> int:
        """Drafts of a full block: every row but the last token's."""
        return self.args.block_size - 1

    def describe(self) -> str:
        a = self.args
        return (f"DFlash block drafter (z-lab layout, model_type {a.checkpoint_model_type}): {a.num_hidden_layers} "
                f"layers, block {a.block_size}, reads base layers {a.target_layer_ids}")

    def make_context_cache(self, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> list:
        return bc.make_context_cache(self.args.layer_types, self.args.sliding_window, max_rollback)

    def extend_context(self, features: mx.array, caches: list) -> None:
        """Project the base's features (1, S, n*H) at the next S positions into every layer's context cache."""
        ctx = self.hidden_norm(self.fc(features.astype(self.norm.weight.dtype)))
        for layer, cache in zip(self.layers, caches):
            cache.update_and_fetch(*layer.self_attn.kv(ctx, cache.offset))

    def block_hidden(self, embedded: mx.array, caches: list) -> mx.array:
        """The block's final-normed hidden states (1, L, H); embedded (1, L, H) sits right after the context."""
        position = caches[0].offset
        h = embedded.astype(self.norm.weight.dtype)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, bc.visible_context(cache, layer.self_attn.window), position, self.args.causal)
        return self.norm(h)

    def softcap(self, logits: mx.array) -> mx.array:
        c = self.args.final_logit_softcapping
        return mx.tanh(logits / c) * c if c else logits

    def sanitize(self, weights: dict) -> dict:
        weights = {k.removeprefix("model."): v for k, v in weights.items() if "rotary_emb" not in k}
        own = [k for k in weights if k.startswith(("embed_tokens.", "lm_head."))]
        if own:
            raise ValueError(f"a DFlash drafter takes the base's embedding and head, but this one carries {own[0]}")
        return weights
