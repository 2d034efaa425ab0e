"""The MTP assistant's objective (forge/objective.py has the contract): the drafter's k draft steps for
every position of a sequence at once, conditioned exactly as at inference, distilled from the base's own
distribution.

At inference (proposers/mtp.py) a round starts at the bonus token x_p at position p, which the base has
not run yet. Draft step 1 reads concat(base.embed_scaled(x_p), the base's final-normed hidden at p-1); its
query sits at position p (for every step of the round) and attends to the base's producer-layer K/V of
positions < p, on sliding layers only the last W+1 of them (`SlidingKVCache.drafter_view`). Step j > 1
reads its own previous post_projection output and the embedding of the previous token.

Here one base forward over a sequence (B, L) gives the hidden states, logits and producer K/V of every
position; then each draft step is one parallel pass over all round starts p. Step j runs the P_j = L-j
queries p = 1..L-j: query i is position p = i+1 and key m is position m, so "keys of positions < p" is the
causal mask m <= i and "the last W+1 of them" is i - m <= W. Step j feeds the embedding of the sequence's
token at p+j-1 (the bonus for j = 1; later the token the base emitted there, exactly so when the data is
the base's own greedy text) and is scored against the base's distribution at p+j-1, which predicts the
token at p+j that draft j must guess.

Shapes: B batch, L tokens, P_j = L-j queries of step j, H_b base width, H drafter width, V vocabulary,
C centroids.

Knows nothing of files, optimizers or the engine.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ...cache import SlidingKVCache
from ..objective import DEFAULT_CENTROID_WEIGHT, DEFAULT_STEP_DECAY, RECOMPUTE_VOCAB, Settings

SCRATCH_FLAGS = ("hidden_size", "num_layers", "num_attention_heads", "intermediate_size", "head", "num_centroids",
                 "centroid_top_k")


@dataclass
class Teacher:
    """What one frozen base forward gives for a batch (every array is a constant to the drafter's gradient).

    The vocabulary-wide work is done here once per batch, not once per draft step: on MLX's CPU backend a
    transcendental over (B, L, V) is the costliest elementwise op (exp: ~20x numpy's time)."""

    tokens: mx.array  # (B, L) int32
    mask: mx.array  # (B, L) bool: real tokens (rows are right-padded)
    embedded: mx.array  # (B, L, H_b) base.embed_scaled(tokens)
    hidden: mx.array  # (B, L, H_b) final-normed hidden state
    best: mx.array  # (B, L) the base's argmax (greedy) token
    kv: Dict[str, Tuple[mx.array, mx.array]]  # layer type -> (K, V) (B, n_kv, L, D) of the producer layer
    # the distribution, for the loss (None in a light teacher, which only estimates acceptance):
    probs: Optional[mx.array] = None  # (B, L, V) float32 softmax of the base's logits (for token l+1)
    entropy: Optional[mx.array] = None  # (B, L) of probs, so the loss can report KL = cross-entropy - entropy
    mass: Optional[mx.array] = None  # (B, L, C) probs summed per centroid cluster (centroid heads)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def arrays(self) -> list:
        return [a for a in (self.embedded, self.hidden, self.best, self.kv, self.probs, self.entropy, self.mass)
                if a is not None]


def teacher_forward(base, tokens: mx.array, mask: mx.array, token_ordering: Optional[mx.array] = None,
                    num_centroids: int = 0, light: bool = False) -> Teacher:
    """Run the base once over tokens (B, L): fresh caches keep every position's K/V after one pass.
    With a centroid head's token_ordering, also the base's probability mass per cluster. light: only the
    argmax, not the distribution (held-out batches kept for the acceptance estimate: at V = 262144 the
    distribution of one 256-token window is 270 MB)."""
    cache = base.make_cache()
    logits, hidden = base.forward(tokens, cache)  # (B, L, V), (B, L, H_b)
    kv = {}
    for layer_type, i in base.producer_layers.items():
        c = cache[i]  # one pass from empty: a sliding cache still holds every position, in order
        keys, values = c.state if isinstance(c, SlidingKVCache) else c.drafter_view()
        if keys.shape[2] != tokens.shape[1]:
            raise RuntimeError(f"producer cache {i} kept {keys.shape[2]} of {tokens.shape[1]} positions")
        kv[layer_type] = (mx.stop_gradient(keys), mx.stop_gradient(values))
    logits = mx.stop_gradient(logits.astype(mx.float32))
    embedded, hidden = mx.stop_gradient(base.embed_scaled(tokens)), mx.stop_gradient(hidden)
    if light:
        return Teacher(tokens, mask, embedded, hidden, mx.argmax(logits, axis=-1), kv)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = mx.exp(logp)
    mass = None
    if token_ordering is not None:
        B, L, V = probs.shape
        mass = mx.take(probs, token_ordering, axis=-1).reshape(B, L, num_centroids, V // num_centroids).sum(-1)
    return Teacher(tokens, mask, embedded, hidden, mx.argmax(logits, axis=-1), kv, probs, -(probs * logp).sum(-1),
                   mass)


def teacher_for(base, drafter, tokens: mx.array, mask: mx.array, light: bool = False) -> Teacher:
    """teacher_forward with what this drafter's head needs."""
    if drafter.args.use_ordered_embeddings and not light:
        me = drafter.masked_embedding
        return teacher_forward(base, tokens, mask, me.token_ordering, me.num_centroids)
    return teacher_forward(base, tokens, mask, light=light)


def attention_masks(layer_types: Sequence[str], n: int, window: int) -> Dict[str, object]:
    """(n, n) masks for n round starts: query i (position i+1) sees keys m <= i; sliding ones i - m <= W."""
    out = {}
    for t in set(layer_types):
        if t == "sliding_attention":
            i = mx.arange(n)[:, None]
            m = mx.arange(n)[None]
            out[t] = (m <= i) & (i - m <= window)
        else:
            out[t] = "causal"
    return out


@dataclass
class StepOutput:
    h: mx.array  # (B, P_j, H) after the drafter's final norm: what the head scores
    logits: mx.array  # (B, P_j, V) the tied head over the whole vocabulary (float32)
    centroid_logits: Optional[mx.array]  # (B, P_j, C) for a centroid head


def drafter_pass(drafter, embedded: mx.array, hidden: mx.array, kv: dict, masks: dict):
    """One draft step for P round starts at once: embedded, hidden (B, P, H_b); kv type -> (K, V) of
    positions 0..P-1. Query i sits at position i+1. Returns (h (B, P, H), h_next (B, P, H_b))."""
    x = drafter.pre_projection(mx.concatenate([embedded, hidden], axis=-1).astype(drafter.pre_projection.weight.dtype))
    for layer in drafter.model.layers:
        x, _, _ = layer(x, masks[layer.layer_type], None, shared_kv=kv[layer.layer_type], offset=1)
    h = drafter.model.norm(x)
    return h, drafter.post_projection(h)


def head_logits(drafter, h: mx.array) -> StepOutput:
    logits = drafter.model.embed_tokens.as_linear(h).astype(mx.float32)
    centroids = None
    if drafter.args.use_ordered_embeddings:
        centroids = drafter.masked_embedding.centroids(h).astype(mx.float32)
    return StepOutput(h, logits, centroids)


def rollout(drafter, teacher: Teacher, k: int, window: int, head: bool = True) -> List[StepOutput]:
    """The drafter's k chained steps for every round start p = 1..L-j of every row (see module docstring).
    head=False leaves the vocabulary-wide logits to the caller (StepOutput.logits is None)."""
    L = teacher.length
    outs = []
    hidden = teacher.hidden[:, : L - 1]  # step 1 reads the base's hidden at p-1
    for j in range(1, k + 1):
        n = L - j
        if n < 1:
            break
        kv = {t: (K[:, :, :n], V[:, :, :n]) for t, (K, V) in teacher.kv.items()}
        masks = attention_masks(teacher.kv.keys(), n, window)
        h, h_next = drafter_pass(drafter, teacher.embedded[:, j : j + n], hidden[:, :n], kv, masks)
        outs.append(head_logits(drafter, h) if head else StepOutput(h, None, None))
        hidden = h_next
    return outs


def token_clusters(drafter) -> mx.array:
    """(V,) int32: the centroid cluster of every token (token_ordering is cluster-major)."""
    me = drafter.masked_embedding
    per = me.token_ordering.shape[0] // me.num_centroids
    clusters = mx.zeros(me.token_ordering.shape, mx.int32)
    clusters[me.token_ordering] = mx.arange(me.token_ordering.shape[0], dtype=mx.int32) // per
    return clusters


def greedy_drafts(drafter, out: StepOutput, clusters: Optional[mx.array]) -> mx.array:
    """(B, P) the token the inference head drafts: the argmax over the tokens of the top-k clusters."""
    if out.centroid_logits is None:
        return mx.argmax(out.logits, axis=-1)
    top_k = drafter.masked_embedding.top_k
    kth = mx.sort(out.centroid_logits, axis=-1)[..., -top_k][..., None]  # (B, P, 1)
    chosen = out.centroid_logits >= kth  # (B, P, C)
    allowed = mx.take(chosen, clusters, axis=-1)  # (B, P, V)
    return mx.argmax(mx.where(allowed, out.logits, -mx.inf), axis=-1)


def _valid(teacher: Teacher, j: int, n: int) -> mx.array:
    """(B, n) float: round starts whose scored position p+j-1 is a real token."""
    return teacher.mask[:, j : j + n].astype(mx.float32)


def distill(drafter, teacher: Teacher, k: int, window: int, kind: str = "kl",
            step_decay: float = DEFAULT_STEP_DECAY, centroid_weight: float = DEFAULT_CENTROID_WEIGHT,
            recompute_head: Optional[bool] = None):
    """(scalar loss, per-step losses (k,)): the step-weighted distillation loss over all round starts.

    kl: KL(base || drafter) over the whole vocabulary (reported as such; the gradient is the
    cross-entropy's, the base's entropy being a constant); ce: cross-entropy to the base's argmax. A
    centroid head adds the cross-entropy of its cluster scores to the base's probability mass per
    cluster, so the clusters it keeps at inference are those that hold the base's likely tokens.

    recompute_head (default: for vocabularies of RECOMPUTE_VOCAB or more) recomputes each step's
    (B, n, V) logits in the backward pass instead of keeping k of them: one more head matmul a step for
    k-1 fewer vocabulary-wide activations (at Gemma 4's V = 262144, ~1 GB each at 512 tokens)."""
    outs = rollout(drafter, teacher, k, window, head=False)
    embed = drafter.model.embed_tokens.weight  # (V, H) the tied head
    centroids = drafter.masked_embedding.centroids.weight if drafter.args.use_ordered_embeddings else None
    if recompute_head is None:
        recompute_head = embed.shape[0] >= RECOMPUTE_VOCAB

    def head_loss(h, embed, centroids, target, entropy, mass):
        """(B, n) loss per round start for drafter states h (B, n, H)."""
        logq = nn.log_softmax((h @ embed.T).astype(mx.float32), axis=-1)  # (B, n, V)
        if kind == "kl":
            per_pos = -(target * logq).sum(-1) - entropy
        else:
            per_pos = -mx.take_along_axis(logq, mx.stop_gradient(target)[..., None], axis=-1)[..., 0]
        if centroids is not None:
            logc = nn.log_softmax((h @ centroids.T).astype(mx.float32), axis=-1)
            per_pos = per_pos - centroid_weight * (mass * logc).sum(-1)
        return per_pos

    head_fn = mx.checkpoint(head_loss) if recompute_head else head_loss
    total, weights, per_step = 0.0, 0.0, []
    for j, out in enumerate(outs, 1):
        n = out.h.shape[1]
        valid = _valid(teacher, j, n)
        target = teacher.probs[:, j : j + n] if kind == "kl" else teacher.best[:, j : j + n]
        mass = teacher.mass[:, j : j + n] if centroids is not None else None
        per_pos = head_fn(out.h, embed, centroids, target, teacher.entropy[:, j : j + n], mass)
        step = (per_pos * valid).sum() / mx.maximum(valid.sum(), 1.0)
        w = step_decay ** (j - 1)
        total = total + w * step
        weights += w
        per_step.append(step)
    return total / weights, mx.stack(per_step)


def acceptance(drafter, teacher: Teacher, k: int, window: int) -> Tuple[mx.array, mx.array]:
    """(accepted (k,), counted (k,)) as the engine counts greedy rounds: draft j counts as accepted where
    drafts 1..j all equal the base's argmax. Exact where the sequence is the base's own greedy text; on
    other text, steps after the first read the text's tokens rather than the drafts."""
    outs = rollout(drafter, teacher, k, window)
    clusters = token_clusters(drafter) if drafter.args.use_ordered_embeddings else None
    L = teacher.length
    n = L - k  # round starts that have all k scored positions
    alive = teacher.mask[:, k : k + n]  # (B, n): the last scored position p+k-1 is real
    accepted, counted = [], []
    run = alive
    for j, out in enumerate(outs, 1):
        drafts = greedy_drafts(drafter, out, clusters)[:, :n]
        target = teacher.best[:, j : j + n]
        run = run & (drafts == target)
        accepted.append(run.sum())
        counted.append(alive.sum())
    return mx.stack(accepted), mx.stack(counted)


# -- the contract (forge/objective.py)

def teacher(base, drafter, tokens: mx.array, mask: mx.array, k: int, rng=None, light: bool = False) -> Teacher:
    """Every round start of every row is trained at once: no blocks to draw (rng unused)."""
    return teacher_for(base, drafter, tokens, mask, light)


def loss(drafter, teacher: Teacher, settings: Settings):
    return distill(drafter, teacher, settings.k, drafter.text_args.sliding_window, settings.kind,
                   settings.step_decay, settings.centroid_weight)


def acceptance_estimate(drafter, teacher: Teacher, k: int) -> Tuple[mx.array, mx.array]:
    return acceptance(drafter, teacher, k, drafter.text_args.sliding_window)


def prepare(drafter) -> None:
    pass  # the model freezes token_ordering itself


def max_drafts(drafter) -> Optional[int]:
    return None  # draft steps chain without limit


def scratch_config(base, tokenizer, options, dtype: str) -> dict:
    from .. import build

    return build.scratch_config(base, options.hidden_size, options.num_layers, options.num_attention_heads,
                                options.intermediate_size, options.head, options.num_centroids,
                                options.centroid_top_k, dtype)


def build(base, config: dict, seed: int, windows=()):
    from .. import build as scratch

    return scratch.build_from_scratch(base, config, seed)


def output_config(config: dict, dtype: Optional[str]) -> dict:
    """Google's assistant layout: a forged drafter keeps its starting one's model_type (unified or not)."""
    from ...models import gemma4_assistant
    from ..output import with_dtype

    config = with_dtype(config, dtype)
    if config.get("model_type") not in gemma4_assistant.ARCHITECTURES:
        config["model_type"] = gemma4_assistant.MODEL_TYPE
    config.setdefault("architectures", [gemma4_assistant.ARCHITECTURES[config["model_type"]]])
    return config


def activation_bytes(base, drafter, batch_size: int, seq_len: int, k: int) -> int:
    """The vocabulary-wide arrays dominate: the base's distribution (probabilities and logits) and, per draft
    step, the drafter's logits and log-softmax with their gradients (kept for one step at a time when the
    head is recomputed, as for Gemma 4's 262k vocabulary)."""
    t = drafter.text_args
    V, H_d = t.vocab_size, t.hidden_size
    tokens = batch_size * seq_len
    teacher = tokens * (3 * V + 4 * base.text_args.hidden_size) * 4
    vocab_step = tokens * 4 * V * 4
    trunk_step = tokens * t.num_hidden_layers * (6 * t.intermediate_size + 12 * H_d) * 4 \
        + batch_size * t.num_hidden_layers * t.num_attention_heads * seq_len * seq_len * 4 * 2
    kept = 1 if V >= RECOMPUTE_VOCAB else k
    return teacher + k * trunk_step + kept * vocab_step
