"""The DSpark block drafter's objective (forge/objective.py has the contract; objectives/blocks.py the blocks).

At inference (proposers/dspark.py) a round after position p runs the block [x_p, mask * (k-1)] at positions
p..p+k-1 over the drafter's context (its projection of the base's captured layers at positions < p),
non-causally, through Gemma 4 layers with its own embedding and LM head (softcapped); draft j (0-based) is
row j's logits plus the Markov head's bias for the token before it (x_p, then draft j-1), the draft for
position p + 1 + j. Here every drawn block of a batch runs in one pass with that conditioning, and row j is
distilled to the base's distribution at p + j, with the Markov bias of the sequence's token at p + j: the
accepted draft j-1 where the text is the base's own greedy text (as MTP's objective feeds the previous
token); rows weighted decay**j. The held-out estimate and `drafts` chain the Markov head on their own
drafts, as the proposer does.

From scratch (DeepSpec's layout: a copy of the base's text config, `architectures: [Gemma4DSparkModel]`, the
DSpark fields flat): as wide as the base, with its attention geometry (global head size, k_eq_v), 5 layers
(2 next to a base under 512 wide), block 7, a Markov head of rank 16 (starting at zero), no confidence head,
the layers read as for DFlash; the embedding and LM head start as the base's own.

Knows nothing of files, optimizers or the engine.
"""

from typing import Optional, Tuple

import mlx.core as mx

from ...drafting import validate_block_pairing
from ...models import block_context as bc
from ...models import gemma4_dspark
from ..objective import RECOMPUTE_VOCAB, Settings, head_loss_fn, weighted
from . import blocks

SCRATCH_FLAGS = ("num_layers", "intermediate_size", "block_size", "markov_rank", "target_layers")
DEFAULT_BLOCK_SIZE = 7
DEFAULT_MARKOV_RANK = 16
BASE_ONLY = ("sliding_window_pattern", "global_partial_rotary_factor", "partial_rotary_factor", "rope_traditional",
             "per_layer_config", "eos_token_id")  # mlx-lm's derived fields, not the published config's


def teacher(base, drafter, tokens: mx.array, mask: mx.array, k: int, rng=None, light: bool = False):
    """Blocks of 1..k rows (k drafts); the estimate's are k rows at every round start."""
    return blocks.teacher(base, drafter.target_layer_ids, tokens, mask, 1, k, k - 1, rng, light)


def hidden(drafter, t: blocks.BlockTeacher) -> mx.array:
    """(B, N, S, H) the drafter's final-normed states for every block row (models/gemma4_dspark.py's layers,
    batched over blocks)."""
    B, N = t.anchors.shape
    S = t.rows
    h = drafter.embed(blocks.block_ids(t, drafter.args.mask_token_id).reshape(B, N * S))  # (B, Q, H)
    ctx = drafter.hidden_norm(drafter.fc(t.features.astype(drafter.norm.weight.dtype)))  # (B, T, H)
    masks = blocks.attention_masks(t, S, None, None, False)
    for layer in drafter.layers:
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q = blocks.rope_blocks(at.rope, at.q_norm(bc.heads(at.q_proj(x), at.n_heads)), t.anchors)
        keys = at.k_proj(x)
        values = keys if at.k_eq_v else at.v_proj(x)  # k_eq_v: V is the raw key projection
        k = blocks.rope_blocks(at.rope, at.k_norm(bc.heads(keys, at.n_kv_heads)), t.anchors)
        v = at.v_norm(bc.heads(values, at.n_kv_heads))
        o = blocks.attend(q, at.kv(ctx, 0), (k, v), 1.0, masks)
        h = h + layer.post_attention_layernorm(at.o_proj(bc.merge_heads(o)))
        h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        h = h * layer.layer_scalar
    return drafter.norm(h).reshape(B, N, S, -1)


def _previous(t: blocks.BlockTeacher, S: int) -> mx.array:
    """(B, N, S) the token before each row's draft, teacher-forced: the sequence's token at a + j."""
    idx = mx.minimum(t.anchors[..., None] + mx.arange(S), t.tokens.shape[1] - 1)
    return blocks.gather(t.tokens, idx)


def _softcapped(drafter):
    c = drafter.args.final_logit_softcapping
    return (lambda x: mx.tanh(x / c) * c) if c else (lambda x: x)


def loss(drafter, t: blocks.BlockTeacher, settings: Settings):
    """(scalar, per-draft-position losses (k,)) over every drawn block's rows."""
    S = t.rows
    idx, valid, position = blocks.scored(t, S, 0, 0)
    h = hidden(drafter, t)  # (B, N, S, H)
    target = blocks.gather(t.probs, idx) if settings.kind == "kl" else blocks.gather(t.best, idx)
    entropy = blocks.gather(t.entropy, idx)
    cap = _softcapped(drafter)
    bias = drafter.markov_bias(_previous(t, S))  # (B, N, S, V) or None
    recompute = drafter.args.vocab_size >= RECOMPUTE_VOCAB
    if bias is None:
        per_pos = head_loss_fn(lambda x, w: cap(x @ w.T), settings.kind, recompute)(
            h, target, entropy, drafter.lm_head.weight)
    else:
        per_pos = head_loss_fn(lambda x, w, b: cap(x @ w.T) + b, settings.kind, recompute)(
            h, target, entropy, drafter.lm_head.weight, bias)
    return weighted(per_pos, valid, mx.broadcast_to(position, valid.shape), settings.k, settings.step_decay)


def drafts(drafter, t: blocks.BlockTeacher) -> mx.array:
    """(B, N, S) the greedy drafts of every block, the Markov head chained on its own drafts (what
    DSparkProposer drafts for that block)."""
    logits = drafter.block_logits(hidden(drafter, t))  # (B, N, S, V)
    if not drafter.args.markov_rank:
        return mx.argmax(logits, axis=-1)
    previous = mx.take_along_axis(t.tokens, t.anchors, axis=1)  # (B, N)
    out = []
    for j in range(logits.shape[2]):
        previous = mx.argmax(logits[:, :, j] + drafter.markov_bias(previous), axis=-1)
        out.append(previous)
    return mx.stack(out, axis=-1)


def acceptance_estimate(drafter, t: blocks.BlockTeacher, k: int) -> Tuple[mx.array, mx.array]:
    idx, _, _ = blocks.scored(t, k, 0, 0)
    return blocks.acceptance(drafts(drafter, t)[..., :k], t, idx, k)


def prepare(drafter) -> None:
    pass  # every tensor trains (an unused confidence head gets no gradient)


def max_drafts(drafter) -> Optional[int]:
    return drafter.max_drafts


# -- a drafter from scratch

def scratch_config(base, tokenizer, options, dtype: str) -> dict:
    """DeepSpec's DSpark config.json for a drafter of `base`: a copy of the base's text config."""
    import dataclasses

    b = base.text_args
    layers = options.num_layers or (2 if b.hidden_size < 512 else 5)
    ids = list(options.target_layers or blocks.target_layers(b.num_hidden_layers,
                                                             min(blocks.ZLAB_TARGET_LAYERS, b.num_hidden_layers - 1)))
    config = {k: v for k, v in dataclasses.asdict(b).items() if k not in BASE_ONLY}
    config.update(architectures=[gemma4_dspark.ARCHITECTURE], num_hidden_layers=layers, layer_types=[bc.FULL] * layers,
                  global_head_dim=b.global_head_dim or b.head_dim,
                  intermediate_size=options.intermediate_size or b.intermediate_size,
                  num_kv_shared_layers=0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                  enable_moe_block=False, num_experts=None, top_k_experts=None, moe_intermediate_size=None,
                  use_double_wide_mlp=False, tie_word_embeddings=False, dtype=dtype,
                  num_target_layers=b.num_hidden_layers, block_size=options.block_size or DEFAULT_BLOCK_SIZE,
                  mask_token_id=blocks.mask_token(tokenizer, gemma4_dspark.ModelArgs.mask_token_id),
                  target_layer_ids=ids, markov_rank=DEFAULT_MARKOV_RANK if options.markov_rank is None
                  else options.markov_rank, markov_head_type="vanilla", enable_confidence_head=False,
                  confidence_head_with_markov=True)
    return config


def build(base, config: dict, seed: int, windows=()):
    """A new drafter paired with the base: its embedding and LM head the base's, the Markov bias zero, the rest
    MLX's default initialization."""
    from ..build import base_embeddings

    mx.random.seed(seed)
    drafter = gemma4_dspark.Model(gemma4_dspark.ModelArgs.from_dict(config))
    validate_block_pairing(drafter, base)
    H = drafter.args.hidden_size
    drafter.embed_tokens.weight = mx.array(base_embeddings(base))
    drafter.lm_head.weight = base.head(mx.eye(H)).T.astype(mx.float32)  # (V, H), dequantized if need be
    if drafter.args.markov_rank:
        drafter.markov_head.markov_w2.weight = mx.zeros_like(drafter.markov_head.markov_w2.weight)
    mx.eval(drafter.parameters())
    return drafter


def output_config(config: dict, dtype: Optional[str]) -> dict:
    from ..output import with_dtype

    return with_dtype(config, dtype)  # as published: DeepSpec's and mlx-vlm's loaders read it so


def activation_bytes(base, drafter, batch_size: int, seq_len: int, k: int) -> int:
    """As DFlash's, with the drafter's own LM head and the Markov bias (one more vocabulary-wide array)."""
    a = drafter.args
    V, H = a.vocab_size, a.hidden_size
    rows = batch_size * max(1, seq_len // blocks.BLOCKS_PER_TOKENS) * (k + 1) // 2
    per_row = a.num_hidden_layers * (6 * a.intermediate_size + 12 * H + 2 * a.num_attention_heads * seq_len) * 4
    vocab = rows * ((5 if a.markov_rank else 4) * V * 4 if V < RECOMPUTE_VOCAB else 2 * V * 4)
    teacher = batch_size * seq_len * (3 * V + len(a.target_layer_ids) * H) * 4
    return teacher + rows * per_row + vocab

