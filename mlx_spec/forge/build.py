"""A drafter from nothing for a given base (`--from-scratch`).

Shapes come from the base: the K/V geometry the drafter reads (head_dim, global_head_dim, kv heads,
k_eq_v, sliding window, RoPE) must be the base's; width and depth follow Google's assistants (hidden 256
and 4 layers S,S,S,F next to E2B/E4B, 1024 next to the 26B/31B; half the base's width and 2 layers next to
a tiny base), each overridable.

The tied head starts from the base's own token embeddings, projected onto their top principal directions
(the drafter's width). A centroid head (E2B/E4B style: a small drafter, where the head dominates a step)
clusters those projected embeddings with balanced spherical k-means into clusters of exactly V/C tokens:
`token_ordering` lists the tokens cluster by cluster (int32) and each centroid starts as the mean of its
cluster's embeddings. Everything else is MLX's default initialization.

Knows nothing of training or files.
"""

import math
from typing import Optional

import mlx.core as mx
import numpy as np

from ..drafting import validate_pairing
from ..models import gemma4_assistant
from ..models.gemma4_text import FULL, SLIDING

HEADS = ("auto", "centroid", "dense")
KMEANS_ITERS = 12
EMBED_CHUNK = 16384


def _defaults(base_hidden: int):
    """(hidden, layers, intermediate multiple) of Google's assistant for a base of this width."""
    if base_hidden < 512:
        return max(32, base_hidden // 2), 2, 4
    return (256 if base_hidden <= 2560 else 1024), 4, 8


def scratch_config(base, hidden_size: Optional[int] = None, num_layers: Optional[int] = None,
                   num_attention_heads: Optional[int] = None, intermediate_size: Optional[int] = None,
                   head: str = "auto", num_centroids: Optional[int] = None,
                   centroid_top_k: Optional[int] = None, dtype: str = "float32") -> dict:
    """A `gemma4_assistant` config.json (transformers' field names) that pairs with `base`."""
    b = base.text_args
    hidden, layers, mult = _defaults(b.hidden_size)
    hidden, layers = hidden_size or hidden, num_layers or layers
    types = list(base.producer_layers)
    if SLIDING in types and FULL in types:
        layer_types = [SLIDING] * (layers - 1) + [FULL]
    else:
        layer_types = [types[0]] * layers
    kv = {t: base.attention_geometry(t)[1] for t in types}
    heads = num_attention_heads
    if heads is None:
        heads = math.lcm(*kv.values())
        while heads < 4:
            heads *= 2
    if head == "auto":
        head = "centroid" if hidden <= 256 else "dense"
    C = num_centroids or min(2048, max(8, b.vocab_size // 64))
    top_k = centroid_top_k or max(min(8, C), C // 64)
    text = {
        "model_type": "gemma4_text", "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": intermediate_size or mult * hidden, "num_attention_heads": heads,
        "num_key_value_heads": b.num_key_value_heads, "head_dim": b.head_dim,
        "global_head_dim": b.global_head_dim, "num_global_key_value_heads": b.num_global_key_value_heads,
        "attention_k_eq_v": b.attention_k_eq_v, "layer_types": layer_types,
        "sliding_window": b.sliding_window, "rope_parameters": b.rope_parameters,
        "max_position_embeddings": b.max_position_embeddings, "rms_norm_eps": b.rms_norm_eps,
        "vocab_size": b.vocab_size, "num_kv_shared_layers": layers, "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0, "final_logit_softcapping": None, "use_double_wide_mlp": False,
        "enable_moe_block": False, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "attention_dropout": 0.0, "pad_token_id": b.pad_token_id,
        "dtype": dtype,
    }
    return {
        "architectures": [gemma4_assistant.ARCHITECTURES[gemma4_assistant.MODEL_TYPE]],
        "model_type": gemma4_assistant.MODEL_TYPE,
        "backbone_hidden_size": b.hidden_size, "use_ordered_embeddings": head == "centroid",
        "num_centroids": C, "centroid_intermediate_top_k": top_k, "tie_word_embeddings": True,
        "dtype": dtype, "text_config": text,
    }


def base_embeddings(base) -> np.ndarray:
    """(V, H_b) float32: the base's token embeddings (dequantized if quantized), unscaled."""
    V = base.text_args.vocab_size
    scale = base.text_args.hidden_size ** 0.5
    rows = []
    for s in range(0, V, EMBED_CHUNK):
        e = base.embed_scaled(mx.arange(s, min(V, s + EMBED_CHUNK))).astype(mx.float32) / scale
        rows.append(np.array(e))
    return np.concatenate(rows)


def principal_projection(E: np.ndarray, dims: int) -> np.ndarray:
    """E (V, D) onto its top `dims` principal directions (uncentered): (V, dims)."""
    cov = (E.T @ E).astype(np.float64)  # (D, D); a float64 copy of E would be 3 GB for Gemma 4 E2B
    _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    top = vectors[:, ::-1][:, :dims]
    if dims > E.shape[1]:  # a drafter wider than its base: pad with zero directions
        top = np.pad(top, ((0, 0), (0, dims - E.shape[1])))
    return (E @ top).astype(np.float32)


def _top_choices(X: np.ndarray, cent: np.ndarray, m: int):
    """(V, m) indices and scores of each row's m best centroids, best first."""
    idx, val = [], []
    for s in range(0, len(X), EMBED_CHUNK):
        sc = X[s:s + EMBED_CHUNK] @ cent.T
        part = np.argpartition(-sc, m - 1, axis=1)[:, :m] if m < sc.shape[1] else np.argsort(-sc, axis=1)
        ps = np.take_along_axis(sc, part, axis=1)
        order = np.argsort(-ps, axis=1)
        idx.append(np.take_along_axis(part, order, axis=1))
        val.append(np.take_along_axis(ps, order, axis=1))
    return np.concatenate(idx), np.concatenate(val)


def _grant(labels, remaining, rows, clusters, scores) -> None:
    """Each cluster takes its best-scoring proposers, up to its remaining capacity (in place)."""
    order = np.lexsort((-scores, clusters))
    c = clusters[order]
    rank = np.arange(len(c)) - np.searchsorted(c, c, side="left")
    ok = rank < remaining[c]
    labels[rows[order[ok]]] = c[ok]
    remaining -= np.bincount(c[ok], minlength=len(remaining))


def balanced_assign(X: np.ndarray, cent: np.ndarray, cap: int, m: int = 16) -> np.ndarray:
    """Every row to a centroid, at most `cap` rows each, preferring each row's best centroids."""
    C = len(cent)
    labels = np.full(len(X), -1, np.int64)
    remaining = np.full(C, cap, np.int64)
    choices, scores = _top_choices(X, cent, min(m, C))
    for r in range(choices.shape[1]):
        rows = np.flatnonzero(labels < 0)
        if not len(rows):
            break
        _grant(labels, remaining, rows, choices[rows, r], scores[rows, r])
    while (labels < 0).any():  # the rest: to their best cluster that still has room
        rows = np.flatnonzero(labels < 0)
        open_ = np.flatnonzero(remaining > 0)
        sc = X[rows] @ cent[open_].T
        best = sc.argmax(axis=1)
        _grant(labels, remaining, rows, open_[best], sc[np.arange(len(rows)), best])
    return labels


def balanced_kmeans(X: np.ndarray, C: int, iters: int = KMEANS_ITERS, seed: int = 0) -> np.ndarray:
    """Spherical k-means with clusters of exactly len(X)/C rows; returns labels (V,)."""
    V = len(X)
    if V % C:
        raise ValueError(f"{V} tokens do not split into {C} equal clusters")
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    cent = Xn[rng.choice(V, C, replace=False)]
    for _ in range(iters):
        labels = balanced_assign(Xn, cent, V // C)
        sums = np.zeros_like(cent)
        np.add.at(sums, labels, Xn)
        cent = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return labels


def build_from_scratch(base, config: dict, seed: int = 0):
    """A freshly initialized drafter for `base` (float32), validated against it."""
    mx.random.seed(seed)
    drafter = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    validate_pairing(drafter, base)
    H = drafter.text_args.hidden_size
    E = principal_projection(base_embeddings(base), H)  # (V, H)
    drafter.model.embed_tokens.weight = mx.array(E)
    if drafter.args.use_ordered_embeddings:
        C = drafter.args.num_centroids
        labels = balanced_kmeans(E, C, seed=seed)
        ordering = np.argsort(labels, kind="stable").astype(np.int32)  # cluster-major, ascending within
        sums = np.zeros((C, H), np.float64)
        np.add.at(sums, labels, E)
        drafter.masked_embedding.token_ordering = mx.array(ordering)
        drafter.masked_embedding.centroids.weight = mx.array((sums / (len(E) // C)).astype(np.float32))
    mx.eval(drafter.parameters())
    return drafter
