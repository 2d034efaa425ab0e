"""Gemma 4 text backbone (`model_type: gemma4_text`): all four variants (E2B/E4B, 26B-A4B MoE, 31B).

mlx-lm's decoder block is reused as is (it matches transformers on plain decoding: PLE, KV sharing,
double-wide MLP, k_eq_v, MoE, layer_scalar). What this file adds:
- `ModelArgs.from_dict` reads HF configs the way transformers does: HF defaults for missing keys and both
  head-geometry forms (`global_head_dim`/`num_global_key_value_heads`, or `per_layer_config`).
- `forward()` returns the final-normed hidden state next to the logits, which the MTP drafter consumes,
  and `producer_layers` names the last non-shared layer of each type, whose K/V the drafter reads.
- `forward_layers()` also returns the outputs of chosen decoder layers from the same pass, which block
  drafters (DFlash, DSpark) read.
- `make_cache()` builds rewindable caches (see cache.py), so rejected drafts can be rolled back exactly,
  optionally with quantized K/V (mlx-lm's --kv-bits). `Attention` is mlx-lm's except for quantized K/V,
  which it attends without a per-head copy (`quantized_attention`); KV-shared layers attend their
  producer's quantized K/V, and a pass that straddles --quantized-kv-start runs as two.
"""

import functools
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text as mlx_gemma4

from ..cache import (DEFAULT_KV_GROUP_SIZE, DEFAULT_MAX_ROLLBACK, FullKVCache, KVQuant, SharedQuantizedKV,
                     SlidingKVCache, forward_split_at_switch, quantization_split)
from ..errors import UnsupportedModelError
from ..families import LAYER_OUTPUTS, PRODUCER_KV, TREE_PASS
from . import fields
from .base import EMBEDDING_OUTPUT, SpeculativeBase  # noqa: F401  (EMBEDDING_OUTPUT: re-exported)

SLIDING, FULL = "sliding_attention", "full_attention"
UNIFIED_TEXT = "gemma4_unified_text"  # the text config of gemma4_unified (12B): gemma4_text without PLE keys
# transformers' defaults where the two text configs differ (a key missing from config.json means these);
# gemma4_unified_text has no per-layer inputs at all, so a missing PLE key means 0 there, not 256
GEMMA4_TEXT_DEFAULTS = (("hidden_size_per_layer_input", 256), ("vocab_size_per_layer_input", 262144))
UNIFIED_DEFAULTS = (("hidden_size_per_layer_input", 0), ("vocab_size_per_layer_input", 0), ("sliding_window", 1024),
                    ("max_position_embeddings", 262144))


@dataclass
class ModelArgs(mlx_gemma4.ModelArgs):
    """mlx-lm's field set with transformers' defaults (a key missing from config.json means HF's default)."""

    model_type: str = "gemma4_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 30
    intermediate_size: int = 9216
    num_key_value_heads: int = 4
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    final_logit_softcapping: Optional[float] = None
    sliding_window_pattern: int = 6
    eos_token_id: Optional[object] = 1

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        params = normalize_text_config(params)
        names = {f.name for f in dataclass_fields(cls)}
        args = cls(**{k: v for k, v in params.items() if k in names})
        check_ranges(args)
        return args


def check_ranges(args: ModelArgs) -> None:
    """Every size the model is built from, in range (ValueError naming the field otherwise; fields.py)."""
    fields.integers(args, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "num_key_value_heads", "head_dim", "global_head_dim", "sliding_window",
                           "max_position_embeddings"))
    fields.integers(args, ("hidden_size_per_layer_input", "vocab_size_per_layer_input"), low=0)
    fields.integer(args.num_kv_shared_layers, "num_kv_shared_layers", 0, args.num_hidden_layers)
    fields.heads_divide(args.num_attention_heads, args.num_key_value_heads, "num_key_value_heads")
    if fields.integer(args.num_global_key_value_heads, "num_global_key_value_heads", optional=True):
        fields.heads_divide(args.num_attention_heads, args.num_global_key_value_heads, "num_global_key_value_heads")
    fields.positive_number(args.rms_norm_eps, "rms_norm_eps")
    fields.positive_number(args.final_logit_softcapping, "final_logit_softcapping", optional=True)
    if args.enable_moe_block:
        fields.integers(args, ("num_experts", "moe_intermediate_size"))
        fields.integer(args.top_k_experts, "top_k_experts", 1, args.num_experts)
    for layer_type, params in (args.rope_parameters or {}).items():
        fields.rope(params, f"rope_parameters.{layer_type}")


def _layer_types(config: dict) -> List[str]:
    """transformers' rule: the config's layer_types, else 5 sliding + 1 full repeated; the last layer full."""
    n = fields.integer(config.get("num_hidden_layers", 30), "num_hidden_layers")
    given = config.get("layer_types")
    if given is None:
        types = default_layer_types(n)
    elif isinstance(given, list) and len(given) == n and set(given) <= {SLIDING, FULL}:
        types = list(given)
    else:
        raise ValueError(f"layer_types must list num_hidden_layers = {n} entries, each {SLIDING!r} or {FULL!r}; "
                         f"got {given!r}"[:300])
    types[-1] = FULL  # transformers forces the last layer to full attention
    if given is None:
        _check_pattern(config.get("sliding_window_pattern"), types)
    return types


def default_layer_types(n: int) -> List[str]:
    """transformers' layout when a config lists none: 5 sliding + 1 full, repeated, the last layer full."""
    types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    return types[:-1] + [FULL] if types else types


def _check_pattern(pattern, types: List[str]) -> None:
    """A sliding_window_pattern without layer_types is read two ways: transformers (5.5 to 5.25) ignores it
    for Gemma 4 and derives `types`; mlx-lm and mlx-vlm repeat (pattern - 1) sliding + 1 full. Where the
    two layouts differ (the last layer full in both, as Gemma 4 requires), which one the weights were
    trained with cannot be known, so the config is refused rather than read one way silently."""
    if pattern is None:
        return
    p = fields.integer(pattern, "sliding_window_pattern")
    theirs = (([SLIDING] * (p - 1) + [FULL]) * (len(types) // p + 1))[: len(types)]
    theirs[-1] = FULL
    if theirs != types:
        raise ValueError(
            f"sliding_window_pattern {p} without layer_types is read two ways: transformers ignores it for Gemma 4 "
            f"(layers {layout(types)}), mlx-lm and mlx-vlm follow it (layers {layout(theirs)}); write the "
            "layer_types the weights were trained with into config.json")


def layout(types: Sequence[str]) -> str:
    """'S S F ...': a layer list, S for sliding, F for full attention."""
    return " ".join("S" if t == SLIDING else "F" for t in types)


def layer_pattern_note(config: dict) -> Optional[str]:
    """For a weight mismatch: when the config (or its text_config) has no layer_types, the layout was
    derived, and a layout other than the one the weights were made with shows up as missing or misshapen
    attention tensors. None when the config states its layer_types (or is no Gemma 4 text config)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if text.get("layer_types") is not None or not isinstance(text.get("num_hidden_layers", 30), int):
        return None
    types = default_layer_types(text.get("num_hidden_layers", 30))
    return (f"config.json has no layer_types, so its layers were taken as transformers derives them ({layout(types)}); "
            "if the weights were made with another layout, write their layer_types into config.json")


def normalize_text_config(config: dict) -> dict:
    """Resolve the head geometry of full-attention layers from either config form, as transformers does.

    Returns a copy with explicit `layer_types`, `global_head_dim` and `num_global_key_value_heads`,
    which is also the form mlx-lm reads, so a converted config loads there unchanged.
    """
    config = dict(config)
    if config.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError("use_bidirectional_attention='all' (an encoder config) cannot generate text")
    if config.get("attention_bias"):
        raise UnsupportedModelError("attention_bias=true is not used by any Gemma 4 checkpoint and is not supported")
    types = _layer_types(config)
    config["layer_types"] = types
    sliding_hd = config.get("head_dim", 256)
    sliding_kv = config.get("num_key_value_heads", 4)
    k_eq_v = config.get("attention_k_eq_v", False)

    per_layer = config.get("per_layer_config")
    if per_layer is not None:  # {} too: transformers writes that when no layer differs (no 512 default then)
        overrides = {int(i): dict(v or {}) for i, v in per_layer.items()}
    else:  # the older form: two scalars that transformers expands into per_layer_config
        o = {"head_dim": config.get("global_head_dim", 512)}
        if config.get("num_global_key_value_heads") is not None and k_eq_v:
            o["num_key_value_heads"] = config["num_global_key_value_heads"]
        overrides = {i: o for i, t in enumerate(types) if t == FULL}

    geometry = {}
    for i, t in enumerate(types):
        o = overrides.get(i, {})
        unknown = set(o) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise UnsupportedModelError(f"per_layer_config[{i}] overrides {sorted(unknown)}, which is not supported")
        geometry.setdefault(t, set()).add((o.get("head_dim", sliding_hd), o.get("num_key_value_heads", sliding_kv)))
    for t, g in geometry.items():
        if len(g) > 1:
            raise UnsupportedModelError(f"{t} layers have different head geometries {sorted(g)}; not supported")
    if SLIDING in geometry and geometry[SLIDING] != {(sliding_hd, sliding_kv)}:
        raise UnsupportedModelError("per_layer_config overrides on sliding layers are not supported")
    if FULL in geometry:
        full_hd, full_kv = next(iter(geometry[FULL]))
        if full_kv != sliding_kv and not k_eq_v:
            raise UnsupportedModelError(
                "per_layer_config gives full-attention layers their own num_key_value_heads without "
                "attention_k_eq_v; mlx-lm's Gemma 4 block cannot represent that"
            )
        config["global_head_dim"] = full_hd
        config["num_global_key_value_heads"] = full_kv if k_eq_v else None
    for key, default in (UNIFIED_DEFAULTS if config.get("model_type") == UNIFIED_TEXT else GEMMA4_TEXT_DEFAULTS):
        config.setdefault(key, default)
    return config


@functools.cache  # one compiled function per eps (a memo of a pure function: same results either way)
def _rms_norm(eps: float):
    return mx.compile(lambda x, w: mx.fast.rms_norm(x, w, eps), shapeless=True)


class CompiledRMSNorm(nn.RMSNorm):
    """nn.RMSNorm through mx.compile. On MLX's CPU backend the plain op runs as several kernels (measured
    here: ~8x slower for decode-sized inputs, a fifth of a tiny model's step); on Metal it is one kernel
    either way. Same parameters and, as tested, bit-identical results."""

    def __call__(self, x: mx.array) -> mx.array:
        return _rms_norm(self.eps)(x, self["weight"])


def compile_norms(model: nn.Module) -> None:
    """Switch every nn.RMSNorm inside model (mlx-lm's blocks create them) to CompiledRMSNorm in place."""
    for _, module in model.named_modules():
        if type(module) is nn.RMSNorm:
            module.__class__ = CompiledRMSNorm


class Gemma4TextModel(mlx_gemma4.Gemma4TextModel):
    """mlx-lm's trunk; `__call__` is rewritten only to build masks from our caches per layer type."""

    def __call__(self, inputs: mx.array, cache=None, per_layer_inputs: Optional[mx.array] = None):
        return self.run(inputs, cache, per_layer_inputs)[0]

    def run(self, inputs: mx.array, cache=None, per_layer_inputs: Optional[mx.array] = None,
            capture: Sequence[int] = ()):
        """(final-normed hidden (B, L, H), [the output of decoder layer i (B, L, H), before the final norm,
        for i in `capture`, in that order; EMBEDDING_OUTPUT: the scaled embedding])."""
        h = self.embed_tokens(inputs) * self.embed_scale  # (B, L, H); the scalar is cast to h.dtype, as HF does
        if self.hidden_size_per_layer_input:
            if per_layer_inputs is None:
                per_layer_inputs = self._get_per_layer_inputs(inputs)
            per_layer_inputs = self._project_per_layer_inputs(h, per_layer_inputs)  # (B, L, n_layers, P)
        cache = list(cache or []) + [None] * (len(self.layers) - len(cache or []))
        masks = self._make_masks(h, cache)
        captured = {EMBEDDING_OUTPUT: h} if EMBEDDING_OUTPUT in capture else {}
        intermediates = [(None, None)] * len(self.layers)
        for i, (layer, c, mask, prev) in enumerate(zip(self.layers, cache, masks, self.previous_kvs)):
            kvs, offset = intermediates[prev]  # KV-shared layers reuse their producer's K/V and offset
            if c is None and prev != i and getattr(cache[prev], "quantized", False):
                c = SharedQuantizedKV(cache[prev])  # the producer's K/V are quantized triples
            pli = per_layer_inputs[:, :, i, :] if per_layer_inputs is not None else None
            h, kvs, offset = layer(h, mask, c, per_layer_input=pli, shared_kv=kvs, offset=offset)
            intermediates[i] = (kvs, offset)
            if i in capture:
                captured[i] = h
        return self.norm(h), [captured[i] for i in capture]


def quantized_attention(queries: mx.array, q_keys, q_values, scale: float, mask, group_size: int, bits: int):
    """Attention onto quantized K/V (mlx-lm's triples (B, n_kv, T, *)); queries (B, H, L, D) -> (B, H, L, D).

    mlx-lm's quantized_scaled_dot_product_attention gives each query head of a GQA group its own broadcast
    of K/V, which MLX's CPU backend materializes: an E2B full layer at 32k tokens took +300 MB and 1.7x the
    time (8-bit, fp32: 577 vs 336 ms). Here a group's heads and positions are rows of one matmul against
    the group's K/V: same result, bit for bit (tested), nothing broadcast."""
    B, H, L, D = queries.shape
    n_kv = q_keys[0].shape[1]
    rep = H // n_kv
    q = (queries * scale).reshape(B, n_kv, rep * L, D)
    scores = mx.quantized_matmul(q, *q_keys, transpose=True, group_size=group_size, bits=bits)  # (B, n_kv, rep*L, T)
    if mask is not None:
        T = scores.shape[-1]
        scores = scores.reshape(B, n_kv, rep, L, T)
        if isinstance(mask, str):  # "causal": the L queries are the last L positions
            mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
        elif mask.ndim == 4:  # per-row masks (B, 1, L, T) of a batch (batch/cache.py)
            mask = mask[:, :, None]
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
        scores = scores.reshape(B, n_kv, rep * L, T)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *q_values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, H, L, -1)


def node_positions(cache, offset) -> Optional[mx.array]:
    """(B, L) int32: each query's position in a tree verify pass (trees/views.py), or None for a pass over
    consecutive positions. A KV-shared layer has no cache: its producer hands it the positions as `offset`."""
    positions = getattr(cache, "node_positions", None)
    if positions is None and isinstance(offset, mx.array) and offset.ndim == 2:
        positions = offset
    return positions


def rope_at(rope, x: mx.array, positions: mx.array) -> mx.array:
    """x (B, n, L, D) with query i of row b rotated to positions[b, i]: each query becomes a batch row with
    its own offset, which is the arithmetic of a one-token step (bit for bit on MLX's CPU backend, tested)."""
    B, n, L, D = x.shape
    y = rope(x.transpose(0, 2, 1, 3).reshape(B * L, n, 1, D), offset=positions.reshape(-1))
    return y.reshape(B, L, n, D).transpose(0, 2, 1, 3)


class Attention(mlx_gemma4.Attention):
    """mlx-lm's Gemma 4 attention, unchanged for full-precision K/V at consecutive positions; with quantized
    K/V (the cache's next update stores them quantized) it attends through `quantized_attention`, and in a
    tree verify pass it rotates each query to its node's position (`node_positions`)."""

    def __call__(self, x, mask=None, cache=None, shared_kv=None, offset=None):
        positions = node_positions(cache, offset)
        quantized = getattr(cache, "quantized_next", False)
        if positions is None and not quantized:
            return super().__call__(x, mask, cache, shared_kv, offset)
        B, L, _ = x.shape  # the rest mirrors mlx-lm's Attention.__call__
        queries = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        if shared_kv is not None:
            keys, values = shared_kv
        else:
            keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
            values = keys if self.use_k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
            offset = mx.array(cache.offset) if positions is None else positions
            keys = self._rotate(self.k_norm(keys).transpose(0, 2, 1, 3), offset)
            values = self.v_norm(values).transpose(0, 2, 1, 3)
        queries = self._rotate(queries.transpose(0, 2, 1, 3), offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        if quantized:
            output = quantized_attention(queries, keys, values, self.scale, mask, cache.group_size, cache.bits)
        else:
            output = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1)), (keys, values), offset

    def _rotate(self, x: mx.array, offset) -> mx.array:
        if isinstance(offset, mx.array) and offset.ndim == 2:  # node positions (B, L)
            return rope_at(self.rope, x, offset)
        return self.rope(x, offset=offset)


class Model(nn.Module, SpeculativeBase):
    # MTP: producer_layers, hidden; blocks: forward_layers; trees: node positions (Attention) and tree masks
    features = frozenset({PRODUCER_KV, LAYER_OUTPUTS, TREE_PASS})

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma4TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        compile_norms(self)
        for layer in self.layers:
            layer.self_attn.__class__ = Attention  # same parameters; quantized K/V attended without copies

    def forward(self, inputs: mx.array, cache=None):
        """Return (logits (B, L, V) softcapped, hidden (B, L, H) after the final norm)."""
        if quantization_split(cache, inputs.shape[1]):  # a switch to quantized K/V inside this pass
            return forward_split_at_switch(lambda x: self.forward(x, cache), inputs, cache)
        hidden = self.model(inputs, cache=cache)
        return self._softcap(self.head(hidden)), hidden

    def forward_layers(self, inputs: mx.array, cache, layers: Sequence[int]):
        """forward() that also returns the outputs of decoder `layers` (0-based; EMBEDDING_OUTPUT for the
        embedding) at every position, concatenated in the order given: (logits, hidden, (B, L, n*H))."""
        self.check_layers(layers)
        if quantization_split(cache, inputs.shape[1]):  # a switch to quantized K/V inside this pass
            return forward_split_at_switch(lambda x: self.forward_layers(x, cache, layers), inputs, cache)
        hidden, captured = self.model.run(inputs, cache, capture=tuple(layers))
        return self._softcap(self.head(hidden)), hidden, mx.concatenate(captured, axis=-1)

    def check_layers(self, layers: Sequence[int]) -> None:
        """Raise ValueError unless every id names a decoder layer before the last (whose output the final
        norm would follow) or the embedding."""
        n = self.args.num_hidden_layers
        bad = [i for i in layers if not (i == EMBEDDING_OUTPUT or 0 <= i < n - 1)]
        if bad or not layers:
            raise ValueError(f"layers {list(layers)}: ids must be in [0, {n - 2}] (or {EMBEDDING_OUTPUT}, the "
                             f"embedding) for a base of {n} decoder layers")

    def head(self, hidden: mx.array) -> mx.array:
        """The output layer (the tied embedding, or lm_head), without the softcap: (..., H) -> (..., V)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def _softcap(self, logits: mx.array) -> mx.array:
        if self.args.final_logit_softcapping:
            return mlx_gemma4.logit_softcap(self.args.final_logit_softcapping, logits)
        return logits

    def __call__(self, inputs: mx.array, cache=None):
        return self.forward(inputs, cache)[0]

    @property
    def text_args(self) -> ModelArgs:
        return self.args

    def embed_scaled(self, tokens: mx.array) -> mx.array:
        """The base's scaled input embedding (what the MTP drafter concatenates with the hidden)."""
        return self.model.embed_tokens(tokens) * self.model.embed_scale

    @property
    def first_kv_shared(self) -> int:
        return self.args.num_hidden_layers - self.args.num_kv_shared_layers

    @property
    def producer_layers(self) -> Dict[str, int]:
        """Layer type -> index of the last non-KV-shared layer of that type (its K/V feed the drafter)."""
        out = {}
        for i, t in enumerate(self.args.layer_types[: self.first_kv_shared]):
            out[t] = i
        return out

    def attention_geometry(self, layer_type: str):
        """(head_dim, n_kv_heads) of the K/V that layers of this type cache."""
        attn = self.layers[self.producer_layers[layer_type]].self_attn
        return attn.head_dim, attn.n_kv_heads

    def make_cache(self, max_rollback: int = DEFAULT_MAX_ROLLBACK, kv_bits: Optional[int] = None,
                   kv_group_size: int = DEFAULT_KV_GROUP_SIZE, quantized_kv_start: int = 0):
        """One rewindable cache per non-shared layer; kv_bits (4 or 8) quantizes K/V as mlx-lm's --kv-bits
        does, from the update after the cache holds `quantized_kv_start` positions."""
        types = self.args.layer_types[: self.first_kv_shared]
        head_dims = [self.attention_geometry(t)[0] for t in set(types)]
        kv = KVQuant.from_flags(kv_bits, kv_group_size, quantized_kv_start, head_dims)
        return [FullKVCache(kv) if t == FULL else SlidingKVCache(self.args.sliding_window, max_rollback, kv)
                for t in types]

    def shard(self, group) -> str:
        """Tensor parallel over an mx.distributed group, in place (mlx-lm's method name; distributed/tensor.py).
        Returns what each rank holds, in words."""
        from ..distributed.tensor import shard_text_model

        return shard_text_model(self, group)

    def pipeline(self, group) -> str:
        """Pipeline parallel over an mx.distributed group, in place (distributed/pipeline.py). Returns which
        layers each rank runs, in words."""
        from ..distributed.pipeline import pipeline_text_model

        return pipeline_text_model(self, group)

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:  # some exports store the tied head too; it is embed_tokens
            weights = {k: v for k, v in weights.items() if not k.endswith("lm_head.weight")}
        return mlx_gemma4.Model.sanitize(self, weights)

    @property
    def quant_predicate(self):
        return mlx_gemma4.Model.quant_predicate.fget(self)

    @property
    def layers(self):
        return self.model.layers
