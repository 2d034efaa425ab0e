"""The EAGLE-3 drafter's objective (forge/objective.py has the contract): the training-time test.

At inference (proposers/eagle3.py) entry j of the drafter's context pairs the base's features at position j
with the token at j + 1 and predicts the token at j + 2; draft steps after the first feed back the drafter's
own output and the token just drafted, one position further. `Model.unroll_states` runs k such steps from
every position of a batch at once (the shape speculators trains, "training-time test"); step s of row j is
distilled to the base's distribution at j + 1 + s over the draft vocabulary (renormalized there, as the
draft logits only cover it), fed the sequence's tokens (the accepted drafts where the text is the base's own
greedy text, as MTP's objective feeds them), steps weighted decay**s. The held-out estimate feeds the base's
argmax instead (the accepted drafts on any text), and `drafts` its own drafts, as the proposer does.

From scratch (the Speculators layout): one Llama layer as wide as the base (its heads, head size and MLP
width), reading three of the base's layers (speculators' default aux ids [2, n/2, n-3], or evenly spread
where those are not three distinct layers), `norm_before_residual`; `embed_tokens` is the base's unscaled
table and stays frozen (speculators' `embed_requires_grad: false`), the LM head starts as the base's rows of
the draft vocabulary: the whole vocabulary up to 32000 tokens, else the training data's most frequent tokens
(`d2t`, `t2d`).

Knows nothing of files, optimizers or the engine.
"""

from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ...models import gemma4_eagle3
from ...proposers.eagle3 import validate_pairing
from ..objective import RECOMPUTE_VOCAB, Settings, head_loss_fn, probabilities, weighted
from . import blocks

SCRATCH_FLAGS = ("num_layers", "num_attention_heads", "intermediate_size", "target_layers", "draft_vocab_size")


@dataclass
class Eagle3Teacher:
    tokens: mx.array  # (B, T) int32
    mask: mx.array  # (B, T) bool
    features: mx.array  # (B, T, n_aux*W) the aux layers' features, ascending ids
    best: mx.array  # (B, T) the base's argmax (its vocabulary)
    probs: Optional[mx.array] = None  # (B, T, Vd) the base's distribution over the draft vocabulary
    entropy: Optional[mx.array] = None  # (B, T)
    best_draft: Optional[mx.array] = None  # (B, T) its argmax over the draft vocabulary, in draft ids

    def arrays(self) -> list:
        return [a for a in (self.features, self.best, self.probs, self.entropy, self.best_draft) if a is not None]


def teacher(base, drafter, tokens: mx.array, mask: mx.array, k: int, rng=None, light: bool = False) -> Eagle3Teacher:
    """The base once over tokens (B, T), capturing the aux layers (every position trains: rng unused)."""
    logits, _, features = base.forward_layers(tokens, base.make_cache(), validate_pairing(drafter, base))
    t = Eagle3Teacher(tokens, mask, mx.stop_gradient(features), mx.argmax(logits, axis=-1))
    if not light:
        draft_logits = logits[..., drafter.draft_to_target()] if drafter.reduced_vocab else logits
        t.probs, t.entropy, t.best_draft = probabilities(draft_logits)
    return t


def _head(x: mx.array, weight: mx.array, norm: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, norm, eps) @ weight.T  # Model.logits, its weights as arguments


def loss(drafter, t: Eagle3Teacher, settings: Settings):
    """(scalar, per-step losses (k,)): step s of row j scored against the base at j + 1 + s."""
    T = t.tokens.shape[1]
    S = T - 1
    states = drafter.unroll_states(t.features[:, :S], t.tokens[:, 1:], settings.k)
    eps = drafter.args.rms_norm_eps
    fn = head_loss_fn(lambda x, w, n: _head(x, w, n, eps), settings.kind, drafter.args.vocab_size >= RECOMPUTE_VOCAB)
    losses, valid, position = [], [], []
    for s, h in enumerate(states):
        n = S - s  # rows whose scored position j + 1 + s is inside the window
        if n < 1:
            break
        target = t.probs[:, 1 + s:] if settings.kind == "kl" else t.best_draft[:, 1 + s:]
        losses.append(fn(h[:, :n], target, t.entropy[:, 1 + s:], drafter.lm_head.weight, drafter.norm.weight))
        valid.append(t.mask[:, 1 + s:].astype(mx.float32))
        position.append(mx.full(valid[-1].shape, s + 1, mx.int32))
    cat = lambda xs: mx.concatenate(xs, axis=1)  # noqa: E731
    return weighted(cat(losses), cat(valid), cat(position), settings.k, settings.step_decay)


def _shifted(x: mx.array, s: int, S: int) -> mx.array:
    """(B, S) x[:, s : s + S], zero-padded past its end."""
    part = x[:, s : s + S]
    pad = S - part.shape[1]
    return mx.concatenate([part, mx.zeros((x.shape[0], pad), x.dtype)], axis=1) if pad > 0 else part


def _greedy(drafter, h: mx.array) -> mx.array:
    """(B, S) the base's token id of each row's greedy draft."""
    return drafter.draft_to_target()[mx.argmax(drafter.logits(h), axis=-1)]


def acceptance_estimate(drafter, t: Eagle3Teacher, k: int) -> Tuple[mx.array, mx.array]:
    """Draft j counts where drafts 1..j all equal the base's argmax; a later step is fed the base's argmax,
    which is the draft before it wherever that draft counted."""
    T = t.tokens.shape[1]
    S = T - 1
    steps = [_shifted(t.best, s, S).astype(t.tokens.dtype) for s in range(1, k)]
    states = drafter.unroll_states(t.features[:, :S], t.tokens[:, 1:], k, steps)
    n = S - k + 1  # rows whose k scored positions j + 1 .. j + k are inside the window
    alive = t.mask[:, k : k + n] if n > 0 else t.mask[:, :0]
    run, accepted, counted = alive, [], []
    for s, h in enumerate(states):
        run = run & (_greedy(drafter, h[:, :n]) == t.best[:, 1 + s : 1 + s + n])
        accepted.append(run.sum())
        counted.append(alive.sum())
    return mx.stack(accepted), mx.stack(counted)


def drafts(drafter, t: Eagle3Teacher, k: int) -> mx.array:
    """(k, B, T-1) the greedy drafts of a round after every position (row j: the round whose bonus token is
    at j + 1), each step fed the drafts before it, as Eagle3Proposer drafts them."""
    S = t.tokens.shape[1] - 1
    out: List[mx.array] = []
    for s in range(k):
        states = drafter.unroll_states(t.features[:, :S], t.tokens[:, 1:], s + 1, out[:s] or None)
        out.append(_greedy(drafter, states[-1]).astype(t.tokens.dtype))
    return mx.stack(out)


def prepare(drafter) -> None:
    """The embedding is the base's (speculators' embed_requires_grad: false); d2t/t2d are an index."""
    drafter.embed_tokens.freeze()
    drafter.freeze(keys=["d2t", "t2d"], recurse=False, strict=False)


def max_drafts(drafter) -> Optional[int]:
    return None  # steps chain without limit


# -- a drafter from scratch

def aux_layers(num_base_layers: int, given) -> List[int]:
    """--target-layers, else speculators' default where it names three distinct layers, else three evenly
    spread (aux id a reads the input of base layer a, the output of layer a - 1)."""
    if given:
        return sorted(given)
    ids = gemma4_eagle3.default_aux_layers(num_base_layers)
    if len(set(ids)) == len(ids) and min(ids) >= 1:
        return sorted(ids)
    return [i + 1 for i in blocks.target_layers(num_base_layers, min(3, num_base_layers - 1))]


def draft_vocabulary(windows, vocab_size: int, size: int) -> np.ndarray:
    """The `size` most frequent token ids of the training windows (ties: lower id), ascending."""
    counts = Counter()
    for w in windows:
        counts.update(w.tokens)
    ranked = sorted(range(vocab_size), key=lambda i: (-counts.get(i, 0), i))
    return np.sort(np.array(ranked[:size], np.int64))


def scratch_config(base, tokenizer, options, dtype: str) -> dict:
    """A Speculators EAGLE-3 config.json for a drafter of `base`."""
    b = base.text_args
    heads = options.num_attention_heads or b.num_attention_heads
    kv = b.num_key_value_heads if heads % b.num_key_value_heads == 0 else heads
    layers = options.num_layers or 1
    theta = ((b.rope_parameters or {}).get("sliding_attention") or {}).get("rope_theta", 10000.0)
    layer = {"model_type": "llama", "hidden_size": b.hidden_size, "num_hidden_layers": layers,
             "intermediate_size": options.intermediate_size or b.intermediate_size, "num_attention_heads": heads,
             "num_key_value_heads": kv, "head_dim": b.head_dim, "vocab_size": b.vocab_size,
             "rms_norm_eps": b.rms_norm_eps, "max_position_embeddings": b.max_position_embeddings,
             "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
             "rope_parameters": {"rope_theta": float(theta), "rope_type": "default"}}
    vocab = min(b.vocab_size, options.draft_vocab_size or gemma4_eagle3.DEFAULT_DRAFT_VOCAB)
    verifier = {"name_or_path": str(getattr(base, "source_path", "") or ""), "architectures": []}
    methods = [{"proposal_type": "greedy", "speculative_tokens": options.num_draft_tokens, "verifier_accept_k": 1,
                "accept_tolerance": 0.0}]
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.3.0",
            "dtype": dtype, "transformer_layer_config": layer, "draft_vocab_size": vocab,
            "norm_before_residual": True, "norm_before_fc": False, "fc_norm": False, "norm_output": False,
            "embed_requires_grad": False, "target_hidden_size": None,
            "eagle_aux_hidden_state_layer_ids": aux_layers(b.num_hidden_layers, options.target_layers),
            "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                   "proposal_methods": methods, "verifier": verifier}}


def build(base, config: dict, seed: int, windows=()):
    """A new drafter paired with the base: the base's embedding, an LM head of the base's rows of the draft
    vocabulary, the rest MLX's default initialization."""
    from ..build import base_embeddings

    mx.random.seed(seed)
    drafter = gemma4_eagle3.Model(gemma4_eagle3.ModelArgs.from_dict(config))
    a = drafter.args
    targets = np.arange(a.vocab_size)
    if drafter.reduced_vocab:
        targets = draft_vocabulary(windows, a.vocab_size, a.draft_vocab_size)
        drafter.d2t = mx.array(targets - np.arange(a.draft_vocab_size), mx.int64)
        t2d = np.zeros(a.vocab_size, bool)
        t2d[targets] = True
        drafter.t2d = mx.array(t2d)
    drafter.embed_tokens.weight = mx.array(base_embeddings(base))
    head = base.head(mx.eye(base.text_args.hidden_size)).T.astype(mx.float32)  # (V, H), dequantized if need be
    drafter.lm_head.weight = head[mx.array(targets)]
    validate_pairing(drafter, base)
    prepare(drafter)
    mx.eval(drafter.parameters())
    return drafter


def output_config(config: dict, dtype: Optional[str]) -> dict:
    from ..output import with_dtype

    return with_dtype(config, dtype)  # as published: speculators', vLLM's and mlx-vlm's loaders read it so


def activation_bytes(base, drafter, batch_size: int, seq_len: int, k: int) -> int:
    """The base's distribution over the draft vocabulary, and per step the layers' activations (keys and
    values of every earlier step stay) and the draft-vocabulary logits with their gradients."""
    a = drafter.args
    tokens = batch_size * seq_len
    teacher = tokens * (3 * a.draft_vocab_size + 2 * a.vocab_size // 8 + a.n_aux * a.feature_width) * 4
    per_step = tokens * a.num_hidden_layers * (6 * a.intermediate_size + 16 * a.hidden_size) * 4 \
        + batch_size * a.num_hidden_layers * a.num_attention_heads * seq_len * seq_len * k * 4
    vocab = tokens * 4 * a.draft_vocab_size * 4
    return teacher + k * per_step + (1 if a.draft_vocab_size >= RECOMPUTE_VOCAB else k) * vocab
