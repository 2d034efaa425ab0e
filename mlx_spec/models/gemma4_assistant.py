"""Gemma 4 MTP "assistant" drafter (`model_type: gemma4_assistant`), semantics of transformers'
`Gemma4AssistantForCausalLM` driven by `SinglePositionMultiTokenCandidateGenerator`.

One draft step (B=1, one query):
    x = concat(base.embed(token) * sqrt(H_base), h_prev)         (1, 1, 2*H_base)
    h = pre_projection(x)                                          (1, 1, H)
    4 Gemma blocks, attention Q-only onto the base's producer-layer K/V, scale 1.0, query at a constant
    position for the whole round
    h = norm(h); h_next = post_projection(h) (fed back); logits from the tied head (dense, or the
    centroid head: top-k clusters of `token_ordering`, scored without building a full-vocabulary tensor)

The drafter owns no KV cache: it reads the base's. Knows nothing of rounds or acceptance.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text as mlx_gemma4

from ..errors import UnsupportedModelError
from . import gemma4_text


@dataclass
class ModelArgs:
    model_type: str = "gemma4_assistant"
    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    text_config: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in params.items() if k in names})

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
        """(token ids (N,), scores (N,)) for h (1, 1, H); N = top_k * vocab / num_centroids."""
        centroid_logits = self.centroids(h)[0, 0]  # (C,)
        top = mx.argpartition(-centroid_logits, kth=self.top_k - 1)[: self.top_k]  # (top_k,), order irrelevant
        ordering = self.token_ordering.reshape(self.num_centroids, -1)  # (C, V/C)
        ids = ordering[top].reshape(-1)  # (N,) canonical token ids
        scores = embed(ids) @ h[0, 0]  # (N,); gathers rows (dequantized if the embedding is quantized)
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

    def layer_types(self):
        return list(self.text_args.layer_types)

    def step(self, embedded: mx.array, hidden: mx.array, shared_kv: dict, position: int):
        """One draft step. embedded, hidden: (1, 1, H_base); shared_kv: layer type -> (K, V) as the base
        caches them (B, n_kv, T, hd). Returns (h (1, 1, H) for the head, h_next (1, 1, H_base))."""
        h = self.pre_projection(mx.concatenate([embedded, hidden], axis=-1))
        for layer in self.model.layers:
            # one query sees all K/V it is given: the caller hands sliding layers only their window
            h, _, _ = layer(h, None, None, shared_kv=shared_kv[layer.layer_type], offset=position)
        h = self.model.norm(h)
        return h, self.post_projection(h)

    def candidates(self, h: mx.array):
        """(ids (N,) or None for the whole vocabulary, scores (N,) or (V,)) for h (1, 1, H)."""
        if self.args.use_ordered_embeddings:
            return self.masked_embedding.candidates(h, self.model.embed_tokens)
        return None, self.model.embed_tokens.as_linear(h)[0, 0]

    def full_logits(self, h: mx.array) -> mx.array:
        """(V,) logits; tokens outside the selected clusters get -inf (probability 0, not min-1)."""
        ids, scores = self.candidates(h)
        if ids is None:
            return scores
        out = mx.full((self.text_args.vocab_size,), -mx.inf, dtype=scores.dtype)
        out[ids] = scores
        return out

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
