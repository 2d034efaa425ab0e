"""Acceptance: how many drafts the base keeps, and which token it adds after them.

This module knows token ids and probabilities: the drafts a proposer offered, the distribution
the proposer drew each draft from (q), the base's distribution at each verified position (p), and
uniform random numbers the caller supplies. It knows nothing about models, KV caches, tokenization
or rounds gone by; the engine brings the numbers and rolls back what was not accepted.

Every function is pure and lazy: no `.item()`, no host conversion, so the engine can build a whole
round and evaluate it once. Random numbers come in as arguments, so tests are exact and the engine
can draw all of a round's uniforms at once.

Shapes (batch size 1; k drafts, vocabulary V):
    draft_tokens   (k,)      int32    tokens the proposer offered
    target_tokens  (k+1,)    int32    the base's own token at each verified position
    draft_probs    (k, V)    float    q_i: the distribution draft i was drawn from
    target_probs   (k+1, V)  float    p_i: the base's filtered distribution at position i
Each acceptance function returns (n_accepted, next_token), both int32 scalars: the first
n_accepted drafts are kept and next_token, the bonus, follows them, so a round emits
n_accepted + 1 tokens (τ).
"""

import math

import mlx.core as mx


def scores_from_logits(
    logits: mx.array,
    temp: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
) -> mx.array:
    """Log-probabilities of the distribution the sampler draws from, up to a constant per row: float32
    (..., V), filtered tokens -inf. softmax(scores) is `probs_from_logits`; argmax(scores + Gumbel noise)
    is a sample from it.

    Matches `mlx_lm.sample_utils.make_sampler(temp, top_p, min_p, top_k=top_k)`: the filters run on
    the temperature-1 log-probs in mlx-lm's order (top-p, min-p, top-k), then survivors are scaled
    by 1/temp. temp == 0 keeps only the argmax, the greedy sampler's choice.
    Differences from mlx-lm: everything here is float32 (mlx-lm filters in the logits' dtype, so
    a bf16 token sitting exactly on a threshold may fall the other way); top_k >= V means "no
    filter" instead of an error; min_tokens_to_keep is fixed at 1 (mlx-lm's default); no XTC.
    Use the same call for drafter and base, and for the plain (no-draft) path.
    """
    if temp < 0:
        raise ValueError(f"temp must be >= 0, got {temp}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    logits = logits.astype(mx.float32)  # (..., V)
    vocab = logits.shape[-1]
    if temp == 0:
        best = mx.argmax(logits, axis=-1, keepdims=True)  # (..., 1)
        return mx.where(mx.arange(vocab) == best, 0.0, -mx.inf)

    # Filters see temperature-1 log-probs, as mlx-lm's sampler does (generate_step normalizes first).
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0.0 < top_p < 1.0:
        logprobs = _apply_top_p(logprobs, top_p)
    if min_p > 0.0:
        logprobs = _apply_min_p(logprobs, min_p)
    if 0 < top_k < vocab:
        logprobs = _apply_top_k(logprobs, top_k)
    return logprobs * (1.0 / temp)


def probs_from_logits(
    logits: mx.array,
    temp: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
) -> mx.array:
    """The distribution the plain sampler draws from, float32, row-wise over (..., V) (see
    `scores_from_logits`). temp == 0 gives a one-hot on the argmax."""
    return mx.softmax(scores_from_logits(logits, temp, top_p, top_k, min_p), axis=-1)


def _apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    # A token survives when the mass ranked strictly above it is < top_p (mlx-lm's rule); ties at
    # the threshold all survive.
    sorted_logprobs = mx.sort(logprobs, axis=-1)  # (..., V) ascending
    sorted_probs = mx.exp(sorted_logprobs)
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total = mass_above[..., :1] + sorted_probs[..., :1]  # (..., 1)
    n_dropped = mx.sum(mass_above >= top_p * total, axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, n_dropped, axis=-1)  # (..., 1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def _apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    # Relative to the top token, so it does not matter that top-p already removed mass.
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs < floor, -mx.inf, logprobs)


def _apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    # Same ops as mlx-lm, so exact ties break the same way.
    dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(-mx.inf, logprobs.dtype), axis=-1)


def sample_from_probs(probs: mx.array, u) -> mx.array:
    """Inverse-CDF draw: probs (V,) unnormalized is fine, u in [0, 1) -> token, int32 scalar.

    Works row-wise too: probs (..., V) with u (...) gives tokens (...).
    """
    probs = probs.astype(mx.float32)
    u = mx.expand_dims(mx.array(u, dtype=mx.float32), -1)  # (..., 1)
    cdf = mx.cumsum(probs, axis=-1)  # (..., V)
    # Half-open bins [cdf[j-1], cdf[j]): a zero-probability token has an empty bin.
    token = mx.sum(cdf <= u * cdf[..., -1:], axis=-1)
    # u * total can round up to total; clamp to the last token that has mass.
    has_mass = mx.where(probs > 0, mx.arange(probs.shape[-1]), 0)
    return mx.minimum(token, mx.max(has_mass, axis=-1)).astype(mx.int32)


def _accepted_prefix(accepts: mx.array) -> mx.array:
    # (k,) bool -> () int32. cumprod zeroes everything after the first miss; the sum counts the prefix.
    if accepts.shape[0] == 0:  # a round with no drafts; MLX before 0.32.4 dies (SIGFPE) on an empty cumprod
        return mx.array(0, dtype=mx.int32)
    return mx.sum(mx.cumprod(accepts.astype(mx.int32))).astype(mx.int32)


def _check_drafts(draft_tokens: mx.array, target: mx.array, name: str) -> int:
    k = draft_tokens.shape[0]
    if draft_tokens.ndim != 1 or target.shape[0] != k + 1:
        raise ValueError(
            f"expected draft_tokens (k,) and {name} (k+1, ...), got "
            f"{tuple(draft_tokens.shape)} and {tuple(target.shape)}"
        )
    return k


def greedy_accept(draft_tokens: mx.array, target_tokens: mx.array) -> tuple[mx.array, mx.array]:
    """Keep the longest prefix where draft_tokens[i] == target_tokens[i]; the bonus is target_tokens[n].

    draft_tokens (k,), target_tokens (k+1,): the base's argmax (or any deterministic choice) at each
    verified position. Exact for any proposer: every emitted token is the base's own.
    """
    k = _check_drafts(draft_tokens, target_tokens, "target_tokens")
    n = _accepted_prefix(draft_tokens == target_tokens[:k])
    return n, mx.take(target_tokens, n).astype(mx.int32)


def token_match_accept(
    draft_tokens: mx.array, target_samples: mx.array
) -> tuple[mx.array, mx.array]:
    """Sampling by token match: the base samples each position independently (target_samples (k+1,));
    keep drafts while they equal the sample, and the bonus is target_samples[n].

    Lossless for any proposer, even one with no probabilities: each emitted token is the base's
    sample at its position. Accepts less often than `rejection_accept` (sum q*p vs sum min(p, q)).
    """
    return greedy_accept(draft_tokens, target_samples)


def rejection_accept(
    draft_tokens: mx.array,
    draft_probs: mx.array,
    target_probs: mx.array,
    accept_uniforms: mx.array,
    resample_uniforms,
) -> tuple[mx.array, mx.array]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): emitted tokens follow p exactly.

    draft_tokens (k,), draft_probs q (k, V), target_probs p (k+1, V), accept_uniforms (k,) and
    resample_uniforms in [0, 1): one () for the resample, or (k+1,) with entry n used after n acceptances
    (so each position has its own draw). Draft i is kept while u_i < min(1, p_i(x_i) / q_i(x_i)). At the
    first rejection i the next token is drawn from normalize(max(p_i - q_i, 0)), or from p_i if that
    residual is all zero (p_i <= q_i everywhere: only rounding gets there); after k acceptances the
    bonus is drawn from p_k. A greedy proposer passes a one-hot q.
    q_i(x_i) == 0 means x_i was not drawn from q (the caller's q and drafts disagree): the ratio is
    taken as +inf, so such a draft is kept iff p_i(x_i) > 0, and the base never emits a token it
    gives zero probability.
    """
    k = _check_drafts(draft_tokens, target_probs, "target_probs")
    p = target_probs.astype(mx.float32)  # (k+1, V)
    q = draft_probs.astype(mx.float32)  # (k, V)
    x = draft_tokens[:, None]  # (k, 1)
    p_x = mx.take_along_axis(p[:k], x, axis=-1)[:, 0]  # (k,)
    q_x = mx.take_along_axis(q, x, axis=-1)[:, 0]  # (k,)
    # u < p/q written as u*q < p: no division, and q(x) == 0 keeps the draft exactly when p(x) > 0.
    n = _accepted_prefix(accept_uniforms.astype(mx.float32) * q_x < p_x)

    # A zero row after q makes the residual at n == k equal p_k, so the bonus needs no branch.
    q = mx.concatenate([q, mx.zeros((1, p.shape[-1]), mx.float32)])  # (k+1, V)
    p_n = mx.take(p, n, axis=0)  # (V,)
    residual = mx.maximum(p_n - mx.take(q, n, axis=0), 0.0)  # (V,)
    residual = mx.where(mx.sum(residual) > 0, residual, p_n)
    u = mx.array(resample_uniforms, dtype=mx.float32)
    return n, sample_from_probs(residual, mx.take(u, n) if u.ndim else u)
