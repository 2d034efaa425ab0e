"""The DFlash block drafter's objective (forge/objective.py has the contract; objectives/blocks.py the blocks).

At inference (proposers/dflash.py) a round after position p runs the block [x_p, mask * k] at positions
p..p+k over the drafter's context (its projection of the base's captured layers at positions < p), with
non-causal attention inside the block; row j >= 1, scored by the base's own head (softcapped), is the draft
for position p + j. Here every drawn block of a batch runs in one pass with exactly that conditioning,
and row j is distilled to the base's distribution at p + j - 1 (which predicts the token at p + j; exact
where the text is the base's own greedy text, as for MTP), rows weighted decay**(j-1).

From scratch (z-lab's layout: Qwen3 fields and a `dflash_config`): as wide as the base (its fc reads the
base's layers), the base's heads and head size, 5 layers (2 next to a base under 512 wide), block 8
(up to 7 drafts), five of the base's layers read (z-lab's rule; every readable one of a small base),
mask token the tokenizer's <mask> or <unk>. No embedding and no head: the base's are used.

Knows nothing of files, optimizers or the engine.
"""

from typing import Optional, Tuple

import mlx.core as mx

from ...drafting import validate_block_pairing
from ...models import block_context as bc
from ...models import gemma4_dflash
from ..objective import RECOMPUTE_VOCAB, Settings, head_loss_fn, weighted
from . import blocks

SCRATCH_FLAGS = ("num_layers", "num_attention_heads", "intermediate_size", "block_size", "target_layers")
DEFAULT_BLOCK_SIZE = 8
ARCHITECTURE = "DFlashDraftModel"


def teacher(base, drafter, tokens: mx.array, mask: mx.array, k: int, rng=None, light: bool = False):
    """Blocks of 2..k+1 rows (1..k drafts); the estimate's are k+1 rows at every round start."""
    return blocks.teacher(base, drafter.target_layer_ids, tokens, mask, 2, k + 1, k - 1, rng, light)


def hidden(drafter, t: blocks.BlockTeacher) -> mx.array:
    """(B, N, S, H) the drafter's final-normed states for every block row (models/gemma4_dflash.py's layers,
    batched over blocks)."""
    B, N = t.anchors.shape
    S = t.rows
    dtype = drafter.norm.weight.dtype
    h = t.embed(blocks.block_ids(t, drafter.args.mask_token_id).reshape(B, N * S)).astype(dtype)  # (B, Q, H)
    ctx = drafter.hidden_norm(drafter.fc(t.features.astype(dtype)))  # (B, T, H)
    masks = {}
    for layer in drafter.layers:
        at = layer.self_attn
        if at.window not in masks:
            masks[at.window] = blocks.attention_masks(t, S, at.window - 1 if at.window else None, at.window,
                                                      drafter.args.causal)
        x = layer.input_layernorm(h)
        q = blocks.rope_blocks(at.rope, at.q_norm(bc.heads(at.q_proj(x), at.n_heads)), t.anchors)
        k = blocks.rope_blocks(at.rope, at.k_norm(bc.heads(at.k_proj(x), at.n_kv_heads)), t.anchors)
        v = bc.heads(at.v_proj(x), at.n_kv_heads)
        o = blocks.attend(q, at.kv(ctx, 0), (k, v), at.scale, masks[at.window])
        h = h + at.o_proj(bc.merge_heads(o))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return drafter.norm(h).reshape(B, N, S, -1)


def _head(drafter, t: blocks.BlockTeacher):
    return lambda h: drafter.softcap(t.head(h))


def loss(drafter, t: blocks.BlockTeacher, settings: Settings):
    """(scalar, per-draft-position losses (k,)) over every drawn block's rows 1.."""
    S = t.rows
    idx, valid, position = blocks.scored(t, S, 1, -1)
    h = hidden(drafter, t)[:, :, 1:]  # (B, N, S-1, H)
    target = blocks.gather(t.probs, idx) if settings.kind == "kl" else blocks.gather(t.best, idx)
    entropy = blocks.gather(t.entropy, idx)
    recompute = drafter.args.vocab_size >= RECOMPUTE_VOCAB
    per_pos = head_loss_fn(_head(drafter, t), settings.kind, recompute)(h, target, entropy)
    return weighted(per_pos, valid, mx.broadcast_to(position, valid.shape), settings.k, settings.step_decay)


def drafts(drafter, t: blocks.BlockTeacher) -> mx.array:
    """(B, N, S-1) the greedy drafts of every block (what DFlashProposer drafts for that block)."""
    return mx.argmax(_head(drafter, t)(hidden(drafter, t)[:, :, 1:]), axis=-1)


def acceptance_estimate(drafter, t: blocks.BlockTeacher, k: int) -> Tuple[mx.array, mx.array]:
    idx, _, _ = blocks.scored(t, k + 1, 1, -1)
    return blocks.acceptance(drafts(drafter, t)[..., :k], t, idx, k)


def prepare(drafter) -> None:
    pass  # every tensor trains (the embedding and head are the base's, outside the drafter)


def max_drafts(drafter) -> Optional[int]:
    return drafter.max_drafts


# -- a drafter from scratch

def local_rope_theta(text_args) -> float:
    """The RoPE base of the base's sliding (local) layers: a block reads mostly its nearest positions."""
    sliding = (text_args.rope_parameters or {}).get(bc.SLIDING) or {}
    return float(sliding.get("rope_theta", 10000.0))


def scratch_config(base, tokenizer, options, dtype: str) -> dict:
    """z-lab's DFlash config.json for a drafter of `base`."""
    b = base.text_args
    layers = options.num_layers or (2 if b.hidden_size < 512 else 5)
    heads = options.num_attention_heads or b.num_attention_heads
    kv = b.num_key_value_heads if heads % b.num_key_value_heads == 0 else heads
    ids = list(options.target_layers or blocks.target_layers(b.num_hidden_layers,
                                                             min(blocks.ZLAB_TARGET_LAYERS, b.num_hidden_layers - 1)))
    return {"architectures": [ARCHITECTURE], "model_type": "qwen3", "hidden_size": b.hidden_size,
            "intermediate_size": options.intermediate_size or b.intermediate_size, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": b.head_dim,
            "vocab_size": b.vocab_size, "rms_norm_eps": b.rms_norm_eps,
            "max_position_embeddings": b.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": local_rope_theta(b)},
            "block_size": options.block_size or DEFAULT_BLOCK_SIZE, "num_target_layers": b.num_hidden_layers,
            "layer_types": [bc.FULL] * layers, "final_logit_softcapping": b.final_logit_softcapping,
            "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "dtype": dtype,
            "dflash_config": {"target_layer_ids": ids,
                              "mask_token_id": blocks.mask_token(tokenizer, gemma4_dflash.DEFAULT_MASK_TOKEN_ID)}}


def build(base, config: dict, seed: int, windows=()):
    """A new drafter (MLX's default initialization), paired with the base."""
    mx.random.seed(seed)
    drafter = gemma4_dflash.Model(gemma4_dflash.ModelArgs.from_dict(config))
    validate_block_pairing(drafter, base)
    mx.eval(drafter.parameters())
    return drafter


def output_config(config: dict, dtype: Optional[str]) -> dict:
    from ..output import with_dtype

    return with_dtype(config, dtype)  # as published: z-lab's and mlx-vlm's loaders read it so


def activation_bytes(base, drafter, batch_size: int, seq_len: int, k: int) -> int:
    """Per block row: the layers' activations and the vocabulary-wide logits with the base's distribution;
    per context position: the projected features and each layer's K/V."""
    a = drafter.args
    V, H = a.vocab_size, a.hidden_size
    n = max(1, seq_len // blocks.BLOCKS_PER_TOKENS)
    rows = batch_size * n * (k + 2) // 2  # block lengths are drawn up to k + 1
    per_row = a.num_hidden_layers * (6 * a.intermediate_size + 12 * H + 2 * a.num_attention_heads * seq_len) * 4
    vocab = rows * (4 * V * 4 if V < RECOMPUTE_VOCAB else V * 4)
    teacher = batch_size * seq_len * (3 * V + len(a.target_layer_ids) * H) * 4
    return teacher + rows * per_row + vocab + batch_size * seq_len * a.num_hidden_layers * 4 * H * 4
