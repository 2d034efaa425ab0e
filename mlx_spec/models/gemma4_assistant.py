"""Gemma 4 MTP "assistant" drafter (`model_type: gemma4_assistant`), semantics of transformers'
`Gemma4AssistantForCausalLM` driven by `SinglePositionMultiTokenCandidateGenerator`.

One draft step (B=1, one query):
    x = concat(base.embed(token) * sqrt(H_base), h_prev)         (1, 2*H_base)
    h = pre_projection(x)                                          (1, H)
    4 Gemma blocks, attention Q-only onto the base's producer-layer K/V, scale 1.0, query at a constant
    position for the whole round
    h = norm(h); h_next = post_projection(h) (fed back); logits from the tied head (dense, or the
    centroid head: top-k clusters of `token_ordering`, scored without building a full-vocabulary tensor)

The drafter owns no KV cache: it reads the base's. Knows nothing of rounds or acceptance.

Speed (`DraftStepper`): a draft step is ~80 small kernels, so per-kernel dispatch, not arithmetic, is
what it costs (MLX's CPU backend: ~5 us a kernel). The stepper runs mlx-lm's block parameters through
fixed-shape `mx.compile`d segments that meet only at the attention, the one op whose shape (the K/V
length) changes each round; RoPE of the round's single query position becomes one (D, D) matrix per
layer type, built once per round. Measured on the trained tiny pair: 30% less drafting time than
calling mlx-lm's blocks. Same arithmetic up to float rounding (tests compare it with transformers).
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text as mlx_gemma4

from ..cache import QuantizedKV
from ..errors import UnsupportedModelError
from . import fields, gemma4_text

# model_type -> transformers' architecture, as Google publishes its assistants (families.MTP's model_types)
ARCHITECTURES = {"gemma4_assistant": "Gemma4AssistantForCausalLM",
                 "gemma4_unified_assistant": "Gemma4UnifiedAssistantForCausalLM"}
MODEL_TYPE, UNIFIED_MODEL_TYPE = ARCHITECTURES


def model_type_for(base_model_type: str) -> str:
    """The assistant's model_type for a base of this (text) model_type: a unified base has a unified one."""
    return UNIFIED_MODEL_TYPE if base_model_type == "gemma4_unified_text" else MODEL_TYPE


@dataclass
class ModelArgs:
    model_type: str = MODEL_TYPE
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    text_config: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        names = cls.__dataclass_fields__
        args = cls(**{k: v for k, v in params.items() if k in names})
        fields.integer(args.backbone_hidden_size, "backbone_hidden_size")
        if args.use_ordered_embeddings:
            fields.integer(args.num_centroids, "num_centroids")
            fields.integer(args.centroid_intermediate_top_k, "centroid_intermediate_top_k", 1, args.num_centroids)
        return args

    @property
    def text(self) -> gemma4_text.ModelArgs:
        config = dict(self.text_config)
        if not config.get("num_kv_shared_layers"):  # HF: 0 means every drafter layer reads the base's K/V
            config["num_kv_shared_layers"] = config.get("num_hidden_layers", 4)
        config.setdefault("hidden_size_per_layer_input", 0)
        config.setdefault("vocab_size_per_layer_input", 0)
        return gemma4_text.ModelArgs.from_dict(config)


def _validate(args: ModelArgs, text: gemma4_text.ModelArgs) -> None:
    problems = []
    if text.hidden_size_per_layer_input or text.enable_moe_block or text.use_double_wide_mlp:
        problems.append("per-layer inputs, MoE or double-wide MLP")
    if text.num_kv_shared_layers != text.num_hidden_layers:
        problems.append("layers with their own K/V")
    if args.use_ordered_embeddings and text.vocab_size % args.num_centroids:
        problems.append(f"vocab_size {text.vocab_size} not divisible by num_centroids {args.num_centroids}")
    if problems:
        raise UnsupportedModelError(f"gemma4_assistant config has {', '.join(problems)}, which drafters never have")


class Trunk(nn.Module):
    """`model.*` of the checkpoint: tied embedding (the LM head only), blocks, final norm."""

    def __init__(self, text: gemma4_text.ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = [mlx_gemma4.DecoderLayer(text, i) for i in range(text.num_hidden_layers)]
        self.norm = nn.RMSNorm(text.hidden_size, eps=text.rms_norm_eps)


class MaskedEmbedding(nn.Module):
    """Centroid head: score 2048 cluster centroids, keep the top-k clusters, score only their tokens."""

    def __init__(self, args: ModelArgs, hidden: int, vocab: int):
        super().__init__()
        self.centroids = nn.Linear(hidden, args.num_centroids, bias=False)
        # A vocabulary permutation, cluster-major; an integer table that is saved, never cast or quantized.
        self.token_ordering = mx.zeros((vocab,), mx.int32)
        self.top_k = args.centroid_intermediate_top_k
        self.num_centroids = args.num_centroids

    def candidates(self, h: mx.array, embed: nn.Module):
        """(token ids (N,), scores (N,)) for h (1, H) or (1, 1, H); N = top_k * vocab / num_centroids."""
        h = h.reshape(-1)
        centroid_logits = self.centroids(h)  # (C,)
        # the first top_k of the partition (order irrelevant); a take, not a slice, so it compiles shapeless
        top = mx.take(mx.argpartition(-centroid_logits, kth=self.top_k - 1), mx.arange(self.top_k))
        ordering = self.token_ordering.reshape(self.num_centroids, -1)  # (C, V/C)
        ids = ordering[top].reshape(-1)  # (N,) canonical token ids
        scores = embed(ids) @ h  # (N,); gathers rows (dequantized if the embedding is quantized)
        return ids, scores

    def candidates_rows(self, h: mx.array, embed: nn.Module):
        """`candidates` for B rows at once: h (B, H) -> (ids (B, N), scores (B, N))."""
        B = h.shape[0]
        centroid_logits = self.centroids(h)  # (B, C)
        top = mx.argpartition(-centroid_logits, kth=self.top_k - 1, axis=-1)[:, : self.top_k]  # (B, top_k)
        ids = self.token_ordering.reshape(self.num_centroids, -1)[top].reshape(B, -1)  # (B, N)
        scores = (embed(ids) @ h[:, :, None])[..., 0]  # (B, N)
        return ids, scores


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.text_args = text = args.text
        _validate(args, text)
        self.model = Trunk(text)
        self.pre_projection = nn.Linear(2 * args.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, args.backbone_hidden_size, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(args, text.hidden_size, text.vocab_size)
        self.freeze(keys=["token_ordering"], strict=False)
        gemma4_text.compile_norms(self)

    def describe(self) -> str:
        t = self.text_args
        head = "centroid head" if self.args.use_ordered_embeddings else "dense head"
        return f"MTP assistant ({self.model_type}): {t.num_hidden_layers} layers, hidden {t.hidden_size}, {head}"

    def stepper(self) -> "DraftStepper":
        """Compiled draft steps bound to this model's current weights (cheap to build: one per request)."""
        return DraftStepper(self)

    def rows_stepper(self) -> "RowsStepper":
        """Draft steps for several rows of a batch at once."""
        return RowsStepper(self)

    def step(self, embedded: mx.array, hidden: mx.array, shared_kv: dict, position: int):
        """One draft step. embedded, hidden: (1, 1, H_base); shared_kv: layer type -> (K, V) as the base
        caches them (B, n_kv, T, hd). Returns (h (1, 1, H) for the head, h_next (1, 1, H_base)).
        Convenience for one-off steps; a proposer keeps one `stepper()` for a whole request."""
        stepper = self.stepper()
        h, h_next = stepper.step(stepper.begin_round(shared_kv, position), embedded, hidden)
        return h[None], h_next[None]

    def candidates(self, h: mx.array):
        """(ids (N,) or None for the whole vocabulary, scores (N,) or (V,)) for h (1, H) or (1, 1, H)."""
        if self.args.use_ordered_embeddings:
            return self.masked_embedding.candidates(h, self.model.embed_tokens)
        return None, self.model.embed_tokens.as_linear(h.reshape(-1))

    def candidates_rows(self, h: mx.array):
        """`candidates` for B rows: h (B, H) -> (ids (B, N) or None for the whole vocabulary, scores)."""
        if self.args.use_ordered_embeddings:
            return self.masked_embedding.candidates_rows(h, self.model.embed_tokens)
        return None, self.model.embed_tokens.as_linear(h)

    def greedy_tokens(self, h: mx.array) -> mx.array:
        """(B,) int32: the drafter's most likely token for each row of h (B, H)."""
        ids, scores = self.candidates_rows(h)
        best = mx.argmax(scores, axis=-1)
        if ids is not None:
            best = mx.take_along_axis(ids, best[:, None], axis=-1)[:, 0]
        return best.astype(mx.int32)

    def greedy_token(self, h: mx.array) -> mx.array:
        """(1,) int32: the drafter's most likely token for h (1, H)."""
        ids, scores = self.candidates(h)
        best = mx.argmax(scores)
        return (best if ids is None else ids[best]).astype(mx.int32).reshape(1)

    def full_logits(self, h: mx.array) -> mx.array:
        """(V,) logits; tokens outside the selected clusters get -inf (probability 0, not min-1)."""
        ids, scores = self.candidates(h)
        if ids is None:
            return scores
        out = mx.full((self.text_args.vocab_size,), -mx.inf, dtype=scores.dtype)
        out[ids] = scores
        return out

    def full_logits_rows(self, h: mx.array) -> mx.array:
        """`full_logits` for B rows: h (B, H) -> (B, V)."""
        ids, scores = self.candidates_rows(h)
        if ids is None:
            return scores
        out = mx.full((h.shape[0], self.text_args.vocab_size), -mx.inf, dtype=scores.dtype)
        return mx.put_along_axis(out, ids, scores, axis=-1)

    def sanitize(self, weights: dict) -> dict:
        return {k: v for k, v in weights.items() if not k.startswith("lm_head.")}  # tied to model.embed_tokens

    @property
    def quant_predicate(self):
        def predicate(path, module):
            return "centroids" not in path  # centroid scores pick the clusters; keep them exact
        return predicate

    @property
    def layers(self):
        return self.model.layers


def _compute_dtype(linear: nn.Module):
    """The activation dtype a (possibly quantized) linear layer computes in: its weight's, or its scales'."""
    weight = linear["weight"]
    return weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else linear["scales"].dtype


def _attend_quantized(q: mx.array, k: QuantizedKV, v: QuantizedKV) -> mx.array:
    """_attend on quantized K (n_kv, T, *) and V, through quantized matmuls (nothing dequantized)."""
    n_kv = k.packed.shape[0]
    qk = dict(group_size=k.group_size, bits=k.bits)
    scores = mx.quantized_matmul(q.reshape(n_kv, -1, q.shape[-1]).astype(k.scales.dtype), k.packed, k.scales,
                                 k.biases, transpose=True, **qk)  # (n_kv, rep, T)
    p = mx.softmax(scores, axis=-1, precise=True)
    return mx.quantized_matmul(p, v.packed, v.scales, v.biases, transpose=False, **qk).astype(q.dtype)


class DraftStepper:
    """The drafter's blocks as fixed-shape compiled segments joined by the attention (see module docstring).

    Per round: `begin_round(shared_kv, position)` -> state; per step: `step(state, embedded, hidden)` ->
    (h (1, H), h_next (1, H_base)), or `greedy_step` -> (token (1,), h_next) with the head folded in.
    Weights are read when a segment is first traced, so build a stepper after loading, not before.
    """

    def __init__(self, model: Model):
        self.model = model
        layers = model.model.layers
        self.types = [layer.layer_type for layer in layers]
        self._rope_layer = {t: layers[self.types.index(t)].self_attn for t in dict.fromkeys(self.types)}
        last = len(layers) - 1
        # the drafter's own dtype: inputs from a base in another one (fp32 base, bf16 drafter) are cast once
        # here, rather than promoting every matmul (which would cast the drafter's weights each step)
        self.dtype = _compute_dtype(model.pre_projection)
        self._enter = mx.compile(lambda e, hidden, R: self._query(0, model.pre_projection(
            mx.concatenate([e, hidden], axis=-1).astype(self.dtype)), R))
        self._between = [mx.compile(lambda h, o, R, i=i: self._query(i + 1, self._finish_layer(i, h, o), R))
                         for i in range(last)]
        self._exit = mx.compile(lambda h, o: self._head(self._finish_layer(last, h, o)))
        self._exit_greedy = mx.compile(lambda h, o: self._greedy_head(self._finish_layer(last, h, o)))
        self._rope_matrices = mx.compile(self._make_rope_matrices)

    # -- traced pieces (fixed shapes: one query, one position)
    def _query(self, i: int, h: mx.array, R: dict):
        """Layer i's normed, rotated query (n_heads, D) from the residual stream h (1, H); returns (h, q)."""
        layer = self.model.model.layers[i]
        attn = layer.self_attn
        q = attn.q_norm(attn.q_proj(layer.input_layernorm(h)).reshape(attn.n_heads, attn.head_dim))
        return h, (q @ R[self.types[i]]).astype(q.dtype)  # R is float32: keep the drafter's dtype after it

    def _finish_layer(self, i: int, h: mx.array, attended: mx.array) -> mx.array:
        """The rest of block i after its attention (n_kv, rep, D): output projection, MLP, residuals."""
        layer = self.model.model.layers[i]
        h = h + layer.post_attention_layernorm(layer.self_attn.o_proj(attended.reshape(1, -1)))
        h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        return h * layer.layer_scalar

    def _head(self, h: mx.array):
        h = self.model.model.norm(h)
        return h, self.model.post_projection(h)

    def _greedy_head(self, h: mx.array):
        h, h_next = self._head(h)
        return self.model.greedy_token(h), h_next

    def _make_rope_matrices(self, position: mx.array) -> dict:
        """RoPE at one position is linear in the query: rope(q) = q @ R with R's rows rope(e_i)."""
        out = {}
        for t, attn in self._rope_layer.items():
            D = attn.head_dim
            out[t] = attn.rope(mx.eye(D).reshape(1, D, 1, D), offset=position).reshape(D, D)
        return out

    # -- per round / per step
    def begin_round(self, shared_kv: dict, position: int) -> dict:
        """shared_kv: layer type -> (K, V) (1, n_kv, T, D) as the base caches them, arrays or `QuantizedKV`
        (then attended through quantized matmuls: see cache.py for why not dequantized). The query sits
        at `position` for every step of the round (transformers' convention)."""
        R = self._rope_matrices(mx.array(position, mx.int32))
        out = {}
        for t, (k, v) in shared_kv.items():
            if isinstance(k, QuantizedKV):
                out[t] = (k.first(), v.first(), R[t])
            else:
                out[t] = (k[0].swapaxes(-1, -2), v[0], R[t])
        return out

    @staticmethod
    def _attend(q: mx.array, kt: mx.array, v: mx.array) -> mx.array:
        """One query's heads q (n_heads, D) onto K^T (n_kv, D, T), V (n_kv, T, D); scale 1.0 (Gemma 4).
        Head h reads K/V head h // (n_heads / n_kv), as mlx's and transformers' GQA do."""
        if isinstance(kt, QuantizedKV):
            return _attend_quantized(q, kt, v)
        scores = q.reshape(kt.shape[0], -1, q.shape[-1]) @ kt
        # the base's K/V may be wider than the drafter's dtype (fp32 base): back to the query's dtype
        return (mx.softmax(scores, axis=-1, precise=True) @ v).astype(q.dtype)

    def _layers(self, state: dict, embedded: mx.array, hidden: mx.array):
        R = {t: r for t, (_, _, r) in state.items()}
        h, q = self._enter(embedded.reshape(1, -1), hidden.reshape(1, -1), R)
        for i, between in enumerate(self._between):
            h, q = between(h, self._attend(q, *state[self.types[i]][:2]), R)
        return h, self._attend(q, *state[self.types[-1]][:2])

    def step(self, state: dict, embedded: mx.array, hidden: mx.array):
        """embedded, hidden: (1, H_base) (or with a leading 1). Returns (h (1, H), h_next (1, H_base))."""
        return self._exit(*self._layers(state, embedded, hidden))

    def greedy_step(self, state: dict, embedded: mx.array, hidden: mx.array):
        """Returns (the drafter's argmax token (1,) int32, h_next (1, H_base))."""
        return self._exit_greedy(*self._layers(state, embedded, hidden))


class RowsStepper:
    """Draft steps for B rows at once (continuous batching): the same blocks as `DraftStepper`, each row
    with its own query position and its own valid slots of the base's K/V (the rows-caches of
    batch/cache.py: one buffer for all rows, masked per row; a masked slot scores -inf). As in
    DraftStepper, the blocks run as compiled segments that meet at the attention (a compiled segment is
    traced once per row count)."""

    def __init__(self, model: Model):
        self.model = model
        layers = model.model.layers
        self.types = [layer.layer_type for layer in layers]
        self._rope_layer = {t: layers[self.types.index(t)].self_attn for t in dict.fromkeys(self.types)}
        self.dtype = _compute_dtype(model.pre_projection)
        last = len(layers) - 1
        self._enter = mx.compile(lambda e, hidden, R: self._query(0, model.pre_projection(
            mx.concatenate([e, hidden], axis=-1).astype(self.dtype)), R))
        self._between = [mx.compile(lambda h, o, R, i=i: self._query(i + 1, self._finish_layer(i, h, o), R))
                         for i in range(last)]
        self._exit = mx.compile(lambda h, o: self._head(self._finish_layer(last, h, o)))
        self._exit_greedy = mx.compile(lambda h, o: self._greedy_head(self._finish_layer(last, h, o)))

    # -- traced pieces
    def _greedy_head(self, h: mx.array):
        h, h_next = self._head(h)
        return self.model.greedy_tokens(h), h_next

    def _query(self, i: int, h: mx.array, R: dict):
        """Layer i's normed, rotated queries (B, n_heads, D) from the residual stream h (B, H)."""
        layer = self.model.model.layers[i]
        attn = layer.self_attn
        q = attn.q_norm(attn.q_proj(layer.input_layernorm(h)).reshape(h.shape[0], attn.n_heads, attn.head_dim))
        return h, (q @ R[self.types[i]]).astype(q.dtype)

    def _finish_layer(self, i: int, h: mx.array, attended: mx.array) -> mx.array:
        layer = self.model.model.layers[i]
        h = h + layer.post_attention_layernorm(layer.self_attn.o_proj(attended))
        h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        return h * layer.layer_scalar

    def _head(self, h: mx.array):
        h = self.model.model.norm(h)
        return h, self.model.post_projection(h)

    # -- per round / per step
    def begin_round(self, shared_kv: dict, positions: mx.array) -> dict:
        """shared_kv: layer type -> ((K, V) (B, n_kv, C, D), arrays or `QuantizedKV`, valid (B, C));
        positions (B,) int32: each row's query position for the whole round."""
        out = {}
        for t, ((k, v), valid) in shared_kv.items():
            attn = self._rope_layer[t]
            D = attn.head_dim
            eye = mx.broadcast_to(mx.eye(D).reshape(1, D, 1, D), (positions.shape[0], D, 1, D))
            R = attn.rope(eye, offset=positions).reshape(-1, D, D)  # (B, D, D): rope(q) = q @ R per row
            bias = mx.where(valid, 0.0, -mx.inf)[:, None, None, :]  # (B, 1, 1, C)
            if not isinstance(k, QuantizedKV):
                k = k.swapaxes(-1, -2)  # (B, n_kv, D, C), once a round
            out[t] = (k, v, R, bias)
        return out

    @staticmethod
    def _attend(q: mx.array, k, v, bias: mx.array) -> mx.array:
        """Queries (B, n_heads, D) onto K^T (B, n_kv, D, C) (or quantized K), V (B, n_kv, C, D) ->
        (B, n_heads * D)."""
        B = q.shape[0]
        if isinstance(k, QuantizedKV):
            n_kv = k.packed.shape[1]
            qk = dict(group_size=k.group_size, bits=k.bits)
            x = q.reshape(B, n_kv, -1, q.shape[-1]).astype(k.scales.dtype)
            scores = mx.quantized_matmul(x, k.packed, k.scales, k.biases, transpose=True, **qk)
            p = mx.softmax(scores + bias, axis=-1, precise=True)
            out = mx.quantized_matmul(p, v.packed, v.scales, v.biases, transpose=False, **qk)
        else:
            scores = q.reshape(B, k.shape[1], -1, q.shape[-1]) @ k  # (B, n_kv, rep, C)
            out = mx.softmax(scores + bias, axis=-1, precise=True) @ v
        return out.astype(q.dtype).reshape(B, -1)

    def step(self, state: dict, embedded: mx.array, hidden: mx.array):
        """embedded, hidden: (B, H_base). Returns (h (B, H) for the head, h_next (B, H_base))."""
        return self._exit(*self._layers(state, embedded, hidden))

    def greedy_step(self, state: dict, embedded: mx.array, hidden: mx.array):
        """Returns (each row's argmax token (B,) int32, h_next (B, H_base)), the head folded in."""
        return self._exit_greedy(*self._layers(state, embedded, hidden))

    def _layers(self, state: dict, embedded: mx.array, hidden: mx.array):
        R = {t: r for t, (_, _, r, _) in state.items()}
        h, q = self._enter(embedded, hidden, R)
        for i, between in enumerate(self._between):
            h, q = between(h, self._attend(q, *self._kv(state, i)), R)
        return h, self._attend(q, *self._kv(state, len(self.types) - 1))

    def _kv(self, state: dict, i: int):
        k, v, _, bias = state[self.types[i]]
        return k, v, bias
