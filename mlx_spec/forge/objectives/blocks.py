"""What the block drafters' objectives (dflash.py, dspark.py) share: the teacher (one frozen base forward that
captures the layers the drafter reads), the training blocks drawn over a batch, their attention masks, RoPE
at each block's own positions, and the defaults of a drafter built from scratch.

A training block is what a round runs at inference (proposers/block.py, models/block_context.py): its first
row is the token at the anchor a (the round's last token, at position p = a, which the base has not run),
the other rows the mask token, at positions a, a+1, ...; it attends to the context the base's captured
layers give at positions < a (a sliding drafter layer: the W-1 positions before a) and, non-causally (or
causally with `causal`), to its own rows, which are as many as the round's k asks. Every block of a batch
runs in one pass: the blocks are one sequence of queries (B, N*S) over [context (T); every block (N*S)],
with a mask that keeps each block to its context and its own present rows, and RoPE at each block's
positions (the model's own rotary module, fed one offset per block).

Training draws N anchors per row and a length per block (every length up to the longest k asks for, so a
cut block is an input the drafter has seen); the held-out estimate runs a block at every round start.

Shapes: B batch, T tokens, N blocks per row, S rows per block (the longest drawn), H width, V vocabulary.
Knows nothing of files, optimizers or the engine.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..objective import probabilities

BLOCKS_PER_TOKENS = 4  # one training block per this many tokens of a row (DFlash trains many anchors a sequence)
ESTIMATE_STRIDE = 4  # the held-out estimate's round starts: every 4th position (a block at each costs 4x more)
ZLAB_TARGET_LAYERS = 5  # z-lab's DFlash drafters read five of the base's layers


@dataclass
class BlockTeacher:
    """One batch's base forward and its blocks (every array a constant to the drafter's gradient)."""

    tokens: mx.array  # (B, T) int32
    mask: mx.array  # (B, T) bool: real tokens (rows are right-padded)
    features: mx.array  # (B, T, n*H) the captured layers' outputs, concatenated
    best: mx.array  # (B, T) the base's argmax: the token it emits after position t
    anchors: mx.array  # (B, N) int32: each block's first position a
    lengths: mx.array  # (B, N) int32: each block's rows (>= 1)
    used: mx.array  # (B, N) bool: a drawn block (False: padding, a row with fewer anchors than N)
    embed: Callable[[mx.array], mx.array]  # the base's scaled embedding (a DFlash drafter's input)
    head: Callable[[mx.array], mx.array]  # the base's output layer (a DFlash drafter scores with it)
    probs: Optional[mx.array] = None  # (B, T, V) the base's distribution (None in a light teacher)
    entropy: Optional[mx.array] = None  # (B, T)

    @property
    def rows(self) -> int:
        return int(self.lengths.max().item())

    def arrays(self) -> list:
        return [a for a in (self.features, self.best, self.anchors, self.lengths, self.used, self.probs, self.entropy)
                if a is not None]


def draw_blocks(mask: np.ndarray, n: int, shortest: int, longest: int, rng: np.random.Generator):
    """(anchors, lengths, used) (B, n) for training: distinct anchors a in [1, len-1] of each row (the context
    is never empty, and the block's first token is real), lengths uniform in [shortest, longest]."""
    B = mask.shape[0]
    anchors = np.ones((B, n), np.int32)
    lengths = np.full((B, n), shortest, np.int32)
    used = np.zeros((B, n), bool)
    for b in range(B):
        real = int(mask[b].sum())
        m = min(n, real - 1)
        if m < 1:
            continue
        anchors[b, :m] = np.sort(rng.choice(np.arange(1, real), m, replace=False))
        lengths[b, :m] = rng.integers(shortest, longest + 1, m)
        used[b, :m] = True
    return anchors, lengths, used


def every_block(mask: np.ndarray, rows: int, last_scored: int, stride: int = 1):
    """(anchors, lengths, used) for the estimate: a block of `rows` rows at every `stride`-th round start
    a = 1, 1 + stride, ..., used where its last scored position (a + last_scored) is a real token."""
    B, T = mask.shape
    starts = np.arange(1, T, stride, dtype=np.int32)
    anchors = np.broadcast_to(starts, (B, len(starts))).copy()
    real = mask.sum(axis=1, keepdims=True)
    return anchors, np.full(anchors.shape, rows, np.int32), anchors + last_scored <= real - 1


def teacher(base, layers: Sequence[int], tokens: mx.array, mask: mx.array, shortest: int, longest: int,
            last_scored: int, rng: Optional[np.random.Generator], light: bool,
            stride: int = ESTIMATE_STRIDE) -> BlockTeacher:
    """The base once over tokens (B, T), capturing `layers`; blocks drawn with rng (lengths shortest..longest
    rows), or `longest` rows at every `stride`-th round start (rng None). light: no distribution."""
    logits, _, features = base.forward_layers(tokens, base.make_cache(), tuple(layers))
    m = np.array(mask)
    if rng is None:
        anchors, lengths, used = every_block(m, longest, last_scored, stride)
    else:
        n = max(1, min(tokens.shape[1] - 1, tokens.shape[1] // BLOCKS_PER_TOKENS))
        anchors, lengths, used = draw_blocks(m, n, shortest, longest, rng)
    t = BlockTeacher(tokens, mask, mx.stop_gradient(features), mx.argmax(logits, axis=-1), mx.array(anchors),
                     mx.array(lengths), mx.array(used), base.embed_scaled, base.head)
    if not light:
        t.probs, t.entropy, _ = probabilities(logits)
    return t


def block_ids(t: BlockTeacher, mask_token: int) -> mx.array:
    """(B, N, S) the blocks' input ids: the token at the anchor, then mask tokens."""
    first = mx.take_along_axis(t.tokens, t.anchors, axis=1)[..., None]  # (B, N, 1)
    return mx.where(mx.arange(t.rows) == 0, first, mask_token).astype(mx.int32)


def rope_blocks(rope, x: mx.array, anchors: mx.array) -> mx.array:
    """x (B, n, N*S, d) rotated so that row j of block i sits at position anchors[:, i] + j."""
    B, n, Q, d = x.shape
    N = anchors.shape[1]
    S = Q // N
    blocks = x.reshape(B, n, N, S, d).transpose(0, 2, 1, 3, 4).reshape(B * N, n, S, d)
    blocks = rope(blocks, offset=anchors.reshape(-1))
    return blocks.reshape(B, N, n, S, d).transpose(0, 2, 1, 3, 4).reshape(B, n, Q, d)


def attention_masks(t: BlockTeacher, S: int, context_window: Optional[int], window: Optional[int], causal: bool):
    """(context (B, 1, N*S, T), own (B, 1, N, S, S)) bool: query row j of block i sees the context positions
    m < a_i (with context_window: m >= a_i - context_window) and its block's present rows (causal: rows <= j,
    and with window: positions within it, as block_context.block_mask states it)."""
    B, N = t.anchors.shape
    T = t.tokens.shape[1]
    a = mx.repeat(t.anchors, S, axis=1)[:, :, None]  # (B, Q, 1)
    j = mx.tile(mx.arange(S), N)[None, :, None]  # (1, Q, 1)
    m = mx.arange(T)[None, None]  # (1, 1, T)
    ctx = m < a
    if context_window is not None:
        ctx = ctx & (m >= a - context_window)
    if causal and window is not None:
        ctx = ctx & (a + j - m < window)
    rows = mx.arange(S)
    own = (rows[None, None, None] < t.lengths[:, :, None, None])  # (B, N, 1, S) present keys
    if causal:
        own = own & (rows[None] <= rows[:, None])
        if window is not None:
            own = own & (rows[:, None] - rows[None] < window)
    own = mx.broadcast_to(own, (B, N, S, S))
    return ctx[:, None], own[:, None]


def attend(q: mx.array, context, block, scale: float, masks) -> mx.array:
    """Block queries q (B, nh, N*S, d) onto the context's K/V (B, nkv, T, d) and each block's own (B, nkv,
    N*S, d), one softmax over both (what the inference kernel computes over [context; block]), without
    a (N*S, N*S) score matrix: (B, nh, N*S, d)."""
    B, nh, Q, d = q.shape
    ctx_mask, own_mask = masks
    N, S = own_mask.shape[2], own_mask.shape[3]
    rep = nh // context[0].shape[1]
    kc, vc, kb, vb = (mx.repeat(x, rep, axis=1) if rep > 1 else x for x in (*context, *block))
    s_ctx = (q * scale) @ kc.swapaxes(-1, -2)  # (B, nh, Q, T)
    s_ctx = mx.where(ctx_mask, s_ctx, -mx.inf).reshape(B, nh, N, S, -1)
    qb, kb, vb = (x.reshape(B, nh, N, S, d) for x in (q, kb, vb))
    s_own = mx.where(own_mask, (qb * scale) @ kb.swapaxes(-1, -2), -mx.inf)  # (B, nh, N, S, S)
    T = s_ctx.shape[-1]
    p = mx.softmax(mx.concatenate([s_ctx, s_own], axis=-1).astype(mx.float32), axis=-1).astype(q.dtype)
    out = p[..., :T].reshape(B, nh, Q, T) @ vc + (p[..., T:] @ vb).reshape(B, nh, Q, d)
    return out


def scored(t: BlockTeacher, S: int, first_row: int, shift: int):
    """For rows first_row..S-1 of every block: (index (B, N, R) of the base position each row is scored
    against, a + j + shift, clipped; valid (B, N, R) float; draft position (1, 1, R) 1-based)."""
    T = t.tokens.shape[1]
    j = mx.arange(first_row, S)
    idx = t.anchors[..., None] + j + shift  # (B, N, R)
    inside = idx <= T - 1
    idx = mx.minimum(idx, T - 1)
    real = mx.take_along_axis(t.mask, idx.reshape(idx.shape[0], -1), axis=1).reshape(idx.shape)
    valid = t.used[..., None] & (j < t.lengths[..., None]) & inside & real
    return idx, valid.astype(mx.float32), (j - first_row + 1)[None, None]


def gather(a: mx.array, idx: mx.array) -> mx.array:
    """a (B, T, ...) at positions idx (B, N, R): (B, N, R, ...)."""
    B, N, R = idx.shape
    flat = idx.reshape(B, N * R)
    if a.ndim == 2:
        return mx.take_along_axis(a, flat, axis=1).reshape(B, N, R)
    return mx.take_along_axis(a, flat[..., None], axis=1).reshape(B, N, R, -1)


def acceptance(drafts: mx.array, t: BlockTeacher, idx: mx.array, k: int):
    """(accepted (k,), counted (k,)) of greedy drafts (B, N, k) against the base's argmax at idx: draft j
    counts where drafts 1..j all match, over the blocks whose k scored positions are real."""
    alive = t.used
    run = alive
    accepted, counted = [], []
    target = gather(t.best, idx)
    for j in range(k):
        run = run & (drafts[..., j] == target[..., j])
        accepted.append(run.sum())
        counted.append(alive.sum())
    return mx.stack(accepted), mx.stack(counted)


# -- a drafter from scratch

def target_layers(num_base_layers: int, want: int) -> List[int]:
    """z-lab's rule for the base layers a DFlash drafter reads (`want` of them, evenly from layer 1 to n-3);
    where that does not give `want` distinct readable layers (a small base), every readable layer, the
    last ones first."""
    n = num_base_layers
    if want == 1:
        ids = [n // 2]
    else:
        start, end = 1, n - 3
        ids = [int(round(start + i * (end - start) / (want - 1))) for i in range(want)]
    if len(set(ids)) == want and 0 <= min(ids) and max(ids) <= n - 2:
        return ids
    return list(range(max(0, n - 1 - want), n - 1))


def mask_token(tokenizer, default: int) -> int:
    """The token a block's masked rows carry: the tokenizer's <mask> if it has one (Gemma's id 4, what z-lab's
    drafters use), else <unk> (never produced by byte-level BPE), else `default`."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<mask>" in vocab:
        return int(vocab["<mask>"])
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(unk) if unk is not None else default
