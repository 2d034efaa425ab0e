"""DeepSeek DSpark block drafter for Gemma 4 (DeepSpec's `Gemma4DSparkModel`; mlx-vlm's `gemma4_dspark`).

Checkpoint (DeepSpec's published layout, e.g. deepseek-ai/dspark_gemma4_12b_block7): config.json is a copy
of the target's text config (`model_type` gemma4_text or gemma4_unified_text) with `architectures:
["Gemma4DSparkModel"]` and the DSpark fields, flat or under `dflash_config`: `block_size` (drafts per
block), `mask_token_id`, `target_layer_ids`, `num_target_layers`, `markov_rank` (0: no Markov head),
`markov_head_type` ("vanilla"), `enable_confidence_head`, `confidence_head_with_markov`. Weights (a
`model.` prefix is stripped): own `embed_tokens` and `lm_head` (untied), `fc`, `hidden_norm`, `norm`,
Gemma 4 blocks `layers.i.*` (four sandwich norms, GeGLU, `layer_scalar`; full attention with the target's
global head geometry: `global_head_dim`, k_eq_v with `num_global_key_value_heads` and no `v_proj`),
`markov_head.markov_w1` (V x r embedding) and `.markov_w2` (r -> V), `confidence_head.proj`.

Forward (B = 1; block_context.py has the context):
    ctx  = hidden_norm(fc(features)); per layer K = rope(k_norm(k_proj ctx)), V = v_norm(v_proj or k_proj ctx)
    x    = embed_tokens([last token, mask * (P-1)]) * sqrt(H)          P rows = P drafts
    Gemma 4 blocks (attention scale 1.0, proportional RoPE of the full-attention layer type), norm
    base = softcap(lm_head(h))                    row j predicts the token at position p + 1 + j
    draft j = sample(base[j] + markov_w2(markov_w1(previous token)))   previous: the last token, then d_{j-1}
Values are normed (a weightless RMSNorm) as in DeepSpec's reference; mlx-vlm 0.7.10 leaves them un-normed
(and crashes on k_eq_v checkpoints), so its block logits differ from these: see tests/fixtures/README.md.
The confidence head is loaded and not used (DeepSpec's evaluator uses it only above a threshold, off by
default).
"""

from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma4_text import RMSNormNoScale
from mlx_lm.models.rope_utils import initialize_rope

from ..cache import DEFAULT_MAX_ROLLBACK
from ..errors import ModelLoadError, UnsupportedModelError
from . import block_context as bc
from . import fields

ARCHITECTURE = "Gemma4DSparkModel"
DSPARK_KEYS = ("block_size", "mask_token_id", "target_layer_ids", "num_target_layers", "markov_rank",
               "markov_head_type", "enable_confidence_head", "confidence_head_with_markov")
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "block_size", "mask_token_id", "target_layer_ids", "global_head_dim")
DEFAULT_FULL_ROPE = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}


def _global_geometry(flat: dict) -> None:
    """global_head_dim / num_global_key_value_heads from transformers 5's `per_layer_config` when absent."""
    for override in (flat.get("per_layer_config") or {}).values():
        flat.setdefault("global_head_dim", (override or {}).get("head_dim"))
        if (override or {}).get("num_key_value_heads") is not None:
            flat.setdefault("num_global_key_value_heads", override["num_key_value_heads"])


@dataclass
class ModelArgs:
    model_type: str = "gemma4_dspark"
    checkpoint_model_type: str = "gemma4_text"
    hidden_size: int = 0
    intermediate_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 1
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    attention_k_eq_v: bool = False
    vocab_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_parameters: Optional[dict] = None
    max_position_embeddings: int = 262144
    final_logit_softcapping: Optional[float] = None
    layer_types: Optional[List[str]] = None
    attention_bias: bool = False
    block_size: int = 7
    mask_token_id: int = 4
    target_layer_ids: List[int] = field(default_factory=list)
    num_target_layers: Optional[int] = None
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = True

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        flat = dict(params)
        nested = flat.pop("dflash_config", None)
        if isinstance(nested, dict):
            flat.update({k: nested[k] for k in DSPARK_KEYS if k in nested})
        _global_geometry(flat)
        missing = [k for k in REQUIRED if flat.get(k) is None]
        if missing:
            raise ModelLoadError(f"DSpark drafter config lacks {', '.join(missing)}")
        flat["checkpoint_model_type"] = flat.get("model_type", "?")
        flat["model_type"] = "gemma4_dspark"
        names = cls.__dataclass_fields__
        args = cls(**{k: v for k, v in flat.items() if k in names})
        args.target_layer_ids = bc.check_target_layers(args.target_layer_ids, "DSpark drafter config")
        check_ranges(args)
        args.layer_types = list(args.layer_types or [bc.FULL] * args.num_hidden_layers)
        if args.layer_types != [bc.FULL] * args.num_hidden_layers:
            raise UnsupportedModelError(f"DSpark drafter layers must all be full attention, got {args.layer_types}")
        if args.markov_rank and args.markov_head_type != "vanilla":
            raise UnsupportedModelError(f"DSpark markov_head_type {args.markov_head_type!r} is not supported "
                                        "(only 'vanilla')")
        return args

    @property
    def n_kv_heads(self) -> int:
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def full_rope(self) -> dict:
        return dict((self.rope_parameters or {}).get(bc.FULL) or DEFAULT_FULL_ROPE)


def check_ranges(args: ModelArgs) -> None:
    """Every number the drafter is built or run from, in range (ValueError naming the field; fields.py).
    block_size is checked here, at load, not where a round first reaches the native block."""
    fields.integers(args, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "num_key_value_heads", "global_head_dim", "vocab_size", "max_position_embeddings"))
    fields.integers(args, ("num_global_key_value_heads", "num_target_layers"), optional=True)
    fields.heads_divide(args.num_attention_heads, args.n_kv_heads, "the full layers' K/V heads")
    fields.integer(args.block_size, "block_size")
    fields.integer(args.mask_token_id, "mask_token_id", low=0)  # within the base's vocabulary: drafting.py
    fields.integer(args.markov_rank, "markov_rank", low=0)
    fields.rope(args.full_rope, "rope_parameters.full_attention")
    fields.positive_number(args.rms_norm_eps, "rms_norm_eps")
    fields.positive_number(args.final_logit_softcapping, "final_logit_softcapping", optional=True)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H, hd = args.hidden_size, args.global_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.n_kv_heads, hd
        self.k_eq_v = args.attention_k_eq_v
        bias = args.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * hd, bias=bias)
        if not self.k_eq_v:
            self.v_proj = nn.Linear(H, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(hd, eps=args.rms_norm_eps)
        rope = args.full_rope
        self.rope = initialize_rope(hd, rope.get("rope_theta", 1e6), False, rope, args.max_position_embeddings)

    def kv(self, x: mx.array, position: int):
        """K (normed, rotated from `position`) and V (normed, not rotated) of x (1, L, H): (1, n_kv, L, hd)."""
        k = self.k_proj(x)
        v = k if self.k_eq_v else self.v_proj(x)  # k_eq_v: V is the raw key projection, before k_norm
        k = self.rope(self.k_norm(bc.heads(k, self.n_kv_heads)), offset=position)
        return k, self.v_norm(bc.heads(v, self.n_kv_heads))

    def __call__(self, x: mx.array, context, position: int) -> mx.array:
        q = self.rope(self.q_norm(bc.heads(self.q_proj(x), self.n_heads)), offset=position)
        k, v = self.kv(x, position)
        return self.o_proj(bc.merge_heads(bc.attend(q, k, v, context, 1.0, None)))


class MLP(nn.Module):
    """Gemma's GeGLU (gelu_pytorch_tanh gate)."""

    def __init__(self, H: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(H, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, h: mx.array, context, position: int) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), context, position))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class MarkovHead(nn.Module):
    """Low-rank token-transition bias: logits of draft j += markov_w2(markov_w1(token before it))."""

    def __init__(self, vocab: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, vocab, bias=False)

    def __call__(self, previous: mx.array) -> mx.array:
        return self.markov_w2(self.markov_w1(previous))


class ConfidenceHead(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.proj = nn.Linear(features, 1, bias=True)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        H, V = args.hidden_size, args.vocab_size
        self.embed_tokens = nn.Embedding(V, H)
        self.fc = nn.Linear(len(args.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.lm_head = nn.Linear(H, V, bias=False)
        if args.markov_rank:
            self.markov_head = MarkovHead(V, args.markov_rank)
        if args.enable_confidence_head:
            self.confidence_head = ConfidenceHead(H + (args.markov_rank if args.confidence_head_with_markov else 0))
        self.embed_scale = H ** 0.5

    # -- what a proposer needs
    @property
    def target_layer_ids(self) -> List[int]:
        return self.args.target_layer_ids

    @property
    def max_drafts(self) -> int:
        return self.args.block_size

    def describe(self) -> str:
        a = self.args
        markov = f"Markov head rank {a.markov_rank}" if a.markov_rank else "no Markov head"
        return (f"DSpark block drafter (DeepSpec layout, model_type {a.checkpoint_model_type}): {a.num_hidden_layers} "
                f"layers, block {a.block_size}, {markov}, reads base layers {a.target_layer_ids}")

    def make_context_cache(self, max_rollback: int = DEFAULT_MAX_ROLLBACK) -> list:
        return bc.make_context_cache(self.args.layer_types, None, max_rollback)

    def extend_context(self, features: mx.array, caches: list) -> None:
        ctx = self.hidden_norm(self.fc(features.astype(self.norm.weight.dtype)))
        for layer, cache in zip(self.layers, caches):
            cache.update_and_fetch(*layer.self_attn.kv(ctx, cache.offset))

    def embed(self, tokens: mx.array) -> mx.array:
        return self.embed_tokens(tokens) * self.embed_scale  # the scalar is cast to the table's dtype, as HF does

    def block_hidden(self, embedded: mx.array, caches: list) -> mx.array:
        position = caches[0].offset
        h = embedded
        for layer, cache in zip(self.layers, caches):
            h = layer(h, bc.visible_context(cache, None), position)
        return self.norm(h)

    def block_logits(self, h: mx.array) -> mx.array:
        """Softcapped logits before the Markov bias (…, V)."""
        logits = self.lm_head(h)
        c = self.args.final_logit_softcapping
        return mx.tanh(logits / c) * c if c else logits

    def markov_bias(self, previous: mx.array) -> Optional[mx.array]:
        """(…, V) added to the next draft's logits given the token before it; None without a Markov head."""
        return self.markov_head(previous) if self.args.markov_rank else None

    def sanitize(self, weights: dict) -> dict:
        return {k.removeprefix("model."): v for k, v in weights.items() if "rotary_emb" not in k}
