"""EAGLE-3 drafters in the vllm-project/speculators layout (`speculators_model_type: eagle3`; RedHatAI's
gemma-4-*-speculator.eagle3): a Llama or Qwen3 decoder layer (or a few) that reads three of the base's
decoder-layer outputs and drafts one token at a time, feeding its own hidden state back.

Checkpoint: config.json with `speculators_model_type: eagle3`, `transformer_layer_config` (a Llama or Qwen3
config of the drafter's layers; its vocab_size is the base's), `draft_vocab_size`, `norm_before_residual`,
`norm_before_fc`, `fc_norm`, `norm_output`, `target_hidden_size`, `eagle_aux_hidden_state_layer_ids` and
`speculators_config.proposal_methods` (`speculative_tokens`: the k it was trained for). Weights (no prefix):
`embed_tokens` (V x H: the verifier's own unscaled table), `fc` (n_aux*H_base -> H), `layers.i.*` (layer 0's
q/k/v read 2H: [embedding; hidden], plus its `hidden_norm`), `norm`, `lm_head` (H -> the draft vocabulary
Vd), and when Vd < V `d2t` (Vd,) int (draft id d is target token d + d2t[d]) and `t2d` (V,) bool; optional
`input_norm` (norm_before_fc) and `fc_norm.i` (fc_norm).

Entry j of the context pairs the base's features at position j with the token at j + 1, at RoPE position
j + 1 (speculators' training and mlx-vlm; vLLM's j is the same attention); its output predicts token j + 2:

    g_j      = fc(features_j)                                 (1, S, H)  after input_norm / fc_norm if set
    layer 0: e = input_layernorm(embed(token_{j+1})); n = hidden_norm(g_j); r = n if norm_before_residual else g_j
             h = r + attn([e; n]) ; h = h + mlp(post_attention_layernorm(h))        causal over the context
    layers 1..: Llama (Qwen3: q_norm/k_norm) decoder layers
    logits   = lm_head(norm(h))                               (1, S, Vd) over the draft vocabulary
A draft step is the same pass with h (norm(h) with `norm_output`, Eagle 3.1) in place of g and the drafted
token, one position further. `unroll` runs k such steps for every position at once (training-time test).

Aux layer ids mean what they mean in vLLM, whose features the drafters were trained on: id a is the input of
base layer a, i.e. the output of layer a - 1 (0: the scaled embedding), concatenated in ascending order;
absent ids are [2, n // 2, n - 3] over the base's n layers. Deviations from mlx-vlm 0.7.10, none of which
changes a published checkpoint's drafts: mlx-vlm derives absent ids from the drafter's own layer count and
reads layer 0 for id 0; ignores rope_scaling; has no Qwen3 layers, fc_norm or norm_output. Sliding-window
drafter layers and partial rotary are refused.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope

from ..cache import FullKVCache
from ..errors import ModelLoadError, UnsupportedModelError
from .gemma4_text import compile_norms

EAGLE3 = "gemma4_eagle3"
LAYER_KINDS = ("llama", "qwen3")
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
DEFAULT_AUX_LAYERS = 3  # vLLM's and speculators' count when the config names none
DEFAULT_DRAFT_VOCAB = 32000  # speculators' default draft_vocab_size
DEFAULT_SPECULATIVE_TOKENS = 5  # speculators' GreedyTokenProposalConfig default
IGNORED_TENSORS = ("verifier_lm_head.", "verifier_norm.", "rotary_emb.")  # training-only (speculators)


def default_aux_layers(num_base_layers: int) -> List[int]:
    n = num_base_layers
    return [2, n // 2, n - 3]


def _aux_ids(ids) -> Optional[List[int]]:
    """Distinct non-negative ids, ascending (the order vLLM concatenates them in), or None."""
    if ids is None:
        return None
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                 and i >= 0 for i in ids):
        raise ModelLoadError(f"EAGLE-3 config: eagle_aux_hidden_state_layer_ids must be a list of layer ids >= 0, "
                             f"got {ids!r}")
    if len(set(ids)) != len(ids):
        raise ModelLoadError(f"EAGLE-3 config: eagle_aux_hidden_state_layer_ids repeats a layer: {ids!r}")
    return sorted(ids)


def _speculative_tokens(spec: dict) -> int:
    """The k of the default proposal method (speculators_config), else speculators' default."""
    methods = [m for m in (spec or {}).get("proposal_methods") or [] if isinstance(m, dict)]
    default = (spec or {}).get("default_proposal_method")
    chosen = next((m for m in methods if m.get("proposal_type") == default), methods[0] if methods else {})
    k = chosen.get("speculative_tokens", DEFAULT_SPECULATIVE_TOKENS)
    return k if isinstance(k, int) and k >= 1 else DEFAULT_SPECULATIVE_TOKENS


def _rope(layer: dict):
    """(theta, scaling or None) from either form: transformers 5's `rope_parameters` or `rope_theta`."""
    rope = layer.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return float(rope["rope_theta"]), (scaling if scaling.get("rope_type", "default") != "default" else None)
    return float(layer.get("rope_theta", 10000.0)), layer.get("rope_scaling")


@dataclass
class ModelArgs:
    model_type: str = EAGLE3
    layer_kind: str = "llama"  # transformer_layer_config.model_type
    hidden_size: int = 0
    intermediate_size: int = 0
    num_hidden_layers: int = 1
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0  # the base's vocabulary (embed_tokens' rows)
    draft_vocab_size: int = DEFAULT_DRAFT_VOCAB
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    target_hidden_size: Optional[int] = None
    aux_layer_ids: Optional[List[int]] = None  # eagle_aux_hidden_state_layer_ids, ascending; None: the default
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    verifier: Optional[str] = None  # speculators_config.verifier.name_or_path: the base it was trained for

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        if params.get("speculators_model_type") != "eagle3":
            raise UnsupportedModelError(f"speculators_model_type {params.get('speculators_model_type')!r} is not "
                                        "supported; only eagle3")
        layer = params.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise ModelLoadError("EAGLE-3 config lacks transformer_layer_config (the drafter's decoder layers)")
        kind = layer.get("model_type", "qwen3")  # speculators' default layer config is Qwen3's
        if kind not in LAYER_KINDS:
            raise UnsupportedModelError(f"EAGLE-3 drafter layers of model_type {kind!r} are not supported; "
                                        f"only {', '.join(LAYER_KINDS)}")
        _refuse_unsupported(layer)
        missing = [k for k in REQUIRED if layer.get(k) is None]
        if missing:
            raise ModelLoadError(f"EAGLE-3 transformer_layer_config lacks {', '.join(missing)}")
        theta, scaling = _rope(layer)
        heads = layer["num_attention_heads"]
        spec = params.get("speculators_config") or {}
        args = cls(layer_kind=kind, hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
                   num_hidden_layers=layer["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=layer.get("num_key_value_heads") or heads,
                   head_dim=layer.get("head_dim") or layer["hidden_size"] // heads, vocab_size=layer["vocab_size"],
                   draft_vocab_size=params.get("draft_vocab_size", DEFAULT_DRAFT_VOCAB),
                   rms_norm_eps=layer.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                   max_position_embeddings=layer.get("max_position_embeddings", 2048),
                   attention_bias=bool(layer.get("attention_bias")), mlp_bias=bool(layer.get("mlp_bias")),
                   target_hidden_size=params.get("target_hidden_size"),
                   aux_layer_ids=_aux_ids(params.get("eagle_aux_hidden_state_layer_ids")),
                   norm_before_residual=bool(params.get("norm_before_residual")),
                   norm_before_fc=bool(params.get("norm_before_fc")), fc_norm=bool(params.get("fc_norm")),
                   norm_output=bool(params.get("norm_output")), speculative_tokens=_speculative_tokens(spec),
                   verifier=((spec.get("verifier") or {}).get("name_or_path")))
        if args.norm_before_fc and args.fc_norm:
            raise ModelLoadError("EAGLE-3 config sets both norm_before_fc and fc_norm (speculators refuses that too)")
        if not 0 < args.draft_vocab_size <= args.vocab_size:
            raise ModelLoadError(f"EAGLE-3 config: draft_vocab_size {args.draft_vocab_size} must be in "
                                 f"[1, vocab_size {args.vocab_size}]")
        return args

    @property
    def n_aux(self) -> int:
        return len(self.aux_layer_ids) if self.aux_layer_ids else DEFAULT_AUX_LAYERS

    @property
    def feature_width(self) -> int:
        """Width of one base layer's output (the base's hidden size)."""
        return self.target_hidden_size or self.hidden_size


def _refuse_unsupported(layer: dict) -> None:
    if layer.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"EAGLE-3 drafter hidden_act {layer['hidden_act']!r} is not supported (silu)")
    if any(t != "full_attention" for t in layer.get("layer_types") or []) or layer.get("use_sliding_window"):
        raise UnsupportedModelError("EAGLE-3 drafters with sliding-window layers are not supported")
    rope = layer.get("rope_parameters") if isinstance(layer.get("rope_parameters"), dict) else {}
    if layer.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("EAGLE-3 drafters with partial rotary embeddings are not supported")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, in_dim: int):
        super().__init__()
        hd, bias = args.head_dim, args.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.scale = hd ** -0.5
        self.q_proj = nn.Linear(in_dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(in_dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(in_dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=bias)
        if args.layer_kind == "qwen3":
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = initialize_rope(hd, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings)

    def _heads(self, x: mx.array, n: int, norm: Optional[nn.Module]) -> mx.array:
        """(1, L, n*hd) -> (1, n, L, hd), normed per head (Qwen3) before the heads move."""
        B, L, _ = x.shape
        x = x.reshape(B, L, n, self.head_dim)
        return (norm(x) if norm is not None else x).transpose(0, 2, 1, 3)

    def project(self, x: mx.array, position: int):
        """q (1, nh, L, hd), k and v (1, nkv, L, hd) of x (1, L, in_dim); q and k rotated from `position`."""
        q = self._heads(self.q_proj(x), self.n_heads, getattr(self, "q_norm", None))
        k = self._heads(self.k_proj(x), self.n_kv_heads, getattr(self, "k_norm", None))
        v = self._heads(self.v_proj(x), self.n_kv_heads, None)
        return self.rope(q, offset=position), self.rope(k, offset=position), v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # (1, nh, L, hd)
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H, inter, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(H, inter, bias=bias)
        self.up_proj = nn.Linear(H, inter, bias=bias)
        self.down_proj = nn.Linear(inter, H, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A Llama/Qwen3 decoder layer; the first reads [input_layernorm(embedding); hidden_norm(hidden)]."""

    def __init__(self, args: ModelArgs, first: bool):
        super().__init__()
        H = args.hidden_size
        self.first, self.norm_before_residual = first, args.norm_before_residual
        self.input_layernorm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        if first:
            self.hidden_norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.self_attn = Attention(args, 2 * H if first else H)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.mlp = MLP(args)

    def attention_input(self, h: mx.array, embeds: mx.array):
        """(the attention's input, the residual it adds to)."""
        if not self.first:
            return self.input_layernorm(h), h
        normed = self.hidden_norm(h)
        x = mx.concatenate([self.input_layernorm(embeds), normed], axis=-1)  # (1, L, 2H)
        return x, (normed if self.norm_before_residual else h)

    def finish(self, residual: mx.array, attended: mx.array) -> mx.array:
        h = residual + attended
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(nn.Module):
    family = "eagle3"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        H, W = args.hidden_size, args.feature_width
        self.embed_tokens = nn.Embedding(args.vocab_size, H)
        self.fc = nn.Linear(args.n_aux * W, H, bias=False)
        if args.norm_before_fc:
            self.input_norm = nn.RMSNorm(args.n_aux * W, eps=args.rms_norm_eps)
        if args.fc_norm:
            self.fc_norm = [nn.RMSNorm(W, eps=args.rms_norm_eps) for _ in range(args.n_aux)]
        self.layers = [DecoderLayer(args, i == 0) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.lm_head = nn.Linear(H, args.draft_vocab_size, bias=False)
        if self.reduced_vocab:
            self.d2t = mx.zeros((args.draft_vocab_size,), mx.int64)
            self.t2d = mx.zeros((args.vocab_size,), mx.bool_)
        compile_norms(self)

    # -- what a proposer needs
    @property
    def reduced_vocab(self) -> bool:
        return self.args.draft_vocab_size < self.args.vocab_size

    def aux_layer_ids(self, num_base_layers: int) -> List[int]:
        """The aux ids, ascending: the config's, else the default for a base of that many layers."""
        return self.args.aux_layer_ids or sorted(default_aux_layers(num_base_layers))

    def draft_to_target(self) -> mx.array:
        """(Vd,) int32: the base's token id for each draft id."""
        ids = mx.arange(self.args.draft_vocab_size, dtype=mx.int32)
        return ids + self.d2t.astype(mx.int32) if self.reduced_vocab else ids

    def describe(self) -> str:
        a = self.args
        vocab = f"draft vocabulary {a.draft_vocab_size} of {a.vocab_size}" if self.reduced_vocab else "full vocabulary"
        made_for = f", made for {a.verifier}" if a.verifier else ""
        return (f"EAGLE-3 drafter (Speculators layout, {a.num_hidden_layers} {a.layer_kind} layer(s)): reads aux "
                f"layers {a.aux_layer_ids or 'default'}, {vocab}, trained for k={a.speculative_tokens}{made_for}")

    def make_cache(self) -> list:
        return [FullKVCache() for _ in self.layers]

    def project(self, features: mx.array) -> mx.array:
        """The base's features (1, S, n_aux*W) -> the drafter's hidden (1, S, H)."""
        x = features.astype(self.norm.weight.dtype)
        if self.args.norm_before_fc:
            x = self.input_norm(x)
        if self.args.fc_norm:
            x = mx.concatenate([n(c) for n, c in zip(self.fc_norm, mx.split(x, self.args.n_aux, axis=-1))], axis=-1)
        return self.fc(x)

    def run(self, tokens: mx.array, hidden: mx.array, caches: list) -> mx.array:
        """The layers' output (1, L, H) for L entries after the caches' (tokens (1, L), hidden (1, L, H)),
        appending their K/V; causal among themselves, seeing every cached entry."""
        embeds = self.embed_tokens(tokens)
        position = caches[0].offset + 1  # entry j sits at RoPE position j + 1
        mask = "causal" if tokens.shape[1] > 1 else None
        h = hidden.astype(self.norm.weight.dtype)
        for layer, cache in zip(self.layers, caches):
            x, residual = layer.attention_input(h, embeds)
            q, k, v = layer.self_attn.project(x, position)
            k, v = cache.update_and_fetch(k, v)
            h = layer.finish(residual, layer.self_attn.attend(q, k, v, mask))
        return h

    def context(self, features: mx.array, tokens: mx.array, caches: list) -> mx.array:
        """Context entries for features (1, S, n_aux*W) at the next S base positions and the tokens that
        follow each (1, S): their output (1, S, H); the last row's logits are the first draft's."""
        return self.run(tokens, self.project(features), caches)

    def feedback(self, h: mx.array) -> mx.array:
        """What a draft step reads in place of the projected features."""
        return self.norm(h) if self.args.norm_output else h

    def logits(self, h: mx.array) -> mx.array:
        """(..., H) -> (..., Vd) over the draft vocabulary."""
        return self.lm_head(self.norm(h))

    # -- training-time test
    def unroll(self, features: mx.array, tokens: mx.array, steps: int,
               step_tokens: Optional[List[mx.array]] = None) -> mx.array:
        """Draft `steps` tokens from every position at once, as `steps` autoregressive rounds would (the
        shape speculators trains): features (1, S, n_aux*W) at base positions 0..S-1; tokens (1, S), row j's
        the token at j + 1; step_tokens[s - 1] (1, S) what step s feeds at row j (a draft for the token at
        j + 1 + s; default: tokens shifted left by s, zero-padded: teacher forcing). Returns logits
        (steps, S, Vd): [s, j] predicts the token at j + 2 + s. Step s of row j sees the context rows <= j
        and its own steps 1..s, at RoPE positions j + 1 + s."""
        return mx.stack([self.logits(h)[0] for h in self.unroll_states(features, tokens, steps, step_tokens)])

    def unroll_states(self, features: mx.array, tokens: mx.array, steps: int,
                      step_tokens: Optional[List[mx.array]] = None) -> List[mx.array]:
        """`unroll` for B rows at once (features (B, S, n_aux*W), tokens (B, S), step_tokens (B, S) each),
        before the head: the layers' output (B, S, H) of each step (forge scores them)."""
        B, S = tokens.shape
        rows = mx.arange(S)
        causal = rows[None] <= rows[:, None]
        diagonal = rows[None] == rows[:, None]
        h, inputs, out = self.project(features), tokens, []
        keys, values = [[] for _ in self.layers], [[] for _ in self.layers]
        for s in range(steps):
            if s:
                h = self.feedback(h)
                inputs = step_tokens[s - 1] if step_tokens is not None else mx.concatenate(
                    [tokens[:, s:], mx.zeros((B, s), tokens.dtype)], axis=1)
            embeds, mask = self.embed_tokens(inputs), mx.concatenate([causal] + [diagonal] * s, axis=1)
            for i, layer in enumerate(self.layers):
                x, residual = layer.attention_input(h, embeds)
                q, k, v = layer.self_attn.project(x, 1 + s)
                keys[i].append(k)
                values[i].append(v)
                k, v = mx.concatenate(keys[i], axis=2), mx.concatenate(values[i], axis=2)
                h = layer.finish(residual, layer.self_attn.attend(q, k, v, mask))
            out.append(h)
        return out

    # -- loading
    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if not k.startswith(IGNORED_TENSORS) and "rotary_emb" not in k}
        if not self.reduced_vocab:  # speculators ignores identity maps too
            return {k: v for k, v in weights.items() if k not in ("d2t", "t2d")}
        if "d2t" not in weights and "t2d" in weights:  # the draft ids are the t2d tokens, in order
            targets = np.flatnonzero(np.array(weights["t2d"]))
            weights["d2t"] = mx.array(targets - np.arange(targets.shape[0]), mx.int64)
        if "d2t" in weights:
            targets = np.arange(self.args.draft_vocab_size) + np.array(weights["d2t"]).astype(np.int64)
            _check_vocab_map(targets, weights.get("t2d"), self.args)
            if "t2d" not in weights:  # mlx-vlm's conversions drop it
                t2d = np.zeros(self.args.vocab_size, bool)
                t2d[targets] = True
                weights["t2d"] = mx.array(t2d)
        return weights


def _check_vocab_map(targets: np.ndarray, t2d: Optional[mx.array], args: ModelArgs) -> None:
    """The draft vocabulary must name distinct tokens of the base's vocabulary (and t2d exactly those)."""
    if targets.shape[0] != args.draft_vocab_size:
        raise ValueError(f"d2t has {targets.shape[0]} entries for draft_vocab_size {args.draft_vocab_size}")
    if targets.min() < 0 or targets.max() >= args.vocab_size:
        raise ValueError(f"d2t maps draft ids to tokens [{targets.min()}, {targets.max()}], outside the vocabulary "
                         f"[0, {args.vocab_size})")
    if np.unique(targets).shape[0] != targets.shape[0]:
        raise ValueError("d2t maps two draft ids to the same token")
    if t2d is not None:
        marked = np.array(t2d).astype(bool)
        if marked.shape != (args.vocab_size,) or marked.sum() != args.draft_vocab_size or not marked[targets].all():
            raise ValueError("t2d does not mark exactly the tokens d2t maps the draft vocabulary to")
