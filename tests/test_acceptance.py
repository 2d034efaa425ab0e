"""Acceptance rules: crafted tables for the exact cases, sampled distributions for exactness."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from mlx_spec.acceptance import (
    greedy_accept,
    probs_from_logits,
    rejection_accept,
    sample_from_probs,
    token_match_accept,
)

# Chi-square critical value for 5 degrees of freedom (V=6) at p ~ 1e-5: a correct sampler with a
# fixed seed sits near 5, a wrong one in the hundreds.
CHI2_LIMIT_DF5 = 30.0
N_SAMPLES = 40_000


def ints(values):
    return mx.array(values, dtype=mx.int32)


def floats(values):
    return mx.array(values, dtype=mx.float32)


# --- greedy / token match --------------------------------------------------------------------

GREEDY_CASES = [
    # (invariant, drafts, targets, n_accepted, next_token)
    ("all drafts match: all kept, bonus is target[k]", [5, 6, 7], [5, 6, 7, 8], 3, 8),
    ("first draft misses: none kept, bonus is target[0]", [1, 6, 7], [5, 6, 7, 8], 0, 5),
    ("middle miss: prefix stops there though later drafts match", [5, 0, 7], [5, 6, 7, 8], 1, 6),
    ("last draft misses: bonus is the base's token at that position", [5, 6, 0], [5, 6, 7, 8], 2, 7),
    ("k=1 match: bonus is target[1]", [3], [3, 4], 1, 4),
    ("k=1 miss: bonus is target[0]", [2], [3, 4], 0, 3),
    ("k=0: the round is a plain step", [], [9], 0, 9),
]


@pytest.mark.parametrize("accept", [greedy_accept, token_match_accept])
@pytest.mark.parametrize("invariant, drafts, targets, n_want, next_want", GREEDY_CASES)
def test_prefix_match_table(accept, invariant, drafts, targets, n_want, next_want):
    n, nxt = accept(ints(drafts), ints(targets))
    assert n.dtype == mx.int32 and nxt.dtype == mx.int32, "outputs are int32 scalars"
    assert (n.item(), nxt.item()) == (n_want, next_want), invariant


def test_prefix_match_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="k\\+1"):
        greedy_accept(ints([1, 2]), ints([1, 2]))  # targets must have k+1 entries


# --- sample_from_probs -----------------------------------------------------------------------

SAMPLE_CASES = [
    # (invariant, probs, u, token)
    ("u=0 skips leading zero-probability tokens", [0, 0.5, 0, 0.5], 0.0, 1),
    ("bins are half-open: u on a boundary goes up", [0, 0.5, 0, 0.5], 0.5, 3),
    ("u just below 1 lands on the last token with mass", [0.5, 0.5, 0, 0], 0.9999999, 1),
    ("u*total rounding up to total clamps to a token with mass", [0.5, 0.5, 0, 0], 1.0, 1),
    ("unnormalized probs are normalized by their sum", [2, 6], 0.25, 1),
    ("unnormalized probs: below the first bin's end", [2, 6], 0.2499, 0),
]


@pytest.mark.parametrize("invariant, probs, u, token", SAMPLE_CASES)
def test_sample_from_probs_table(invariant, probs, u, token):
    assert sample_from_probs(floats(probs), u).item() == token, invariant


def test_sample_from_probs_rowwise():
    probs = floats([[0.25, 0.75], [0.75, 0.25]])
    assert sample_from_probs(probs, floats([0.5, 0.5])).tolist() == [1, 0], "one draw per row"


# --- rejection_accept: crafted ---------------------------------------------------------------

# Binary fractions, so every comparison below is exact in float32.
P0 = [0.25, 0.25, 0.25, 0.25]
Q0 = [0.125, 0.5, 0.25, 0.125]  # draft x=1 has p/q = 0.5; residual max(p-q, 0) = [.125, 0, 0, .125]
P_HALF = [0, 0.5, 0, 0.5]
ONE_HOT_1 = [0, 1, 0, 0]
ONE_HOT_2 = [0, 0, 1, 0]

REJECTION_CASES = [
    # (invariant, drafts, q, p, accept_uniforms, resample_uniform, n_accepted, next_token)
    ("u < p/q keeps the draft; bonus is drawn from p_k",
     [1], [Q0], [P0, P_HALF], [0.25], 0.75, 1, 3),
    ("u == p/q rejects (strict <)",
     [1], [Q0], [P0, P_HALF], [0.5], 0.25, 0, 0),
    ("rejection resamples from max(p-q, 0): low u picks its first token",
     [1], [Q0], [P0, P_HALF], [0.75], 0.25, 0, 0),
    ("rejection resamples from max(p-q, 0): high u picks its last token, never the rejected draft",
     [1], [Q0], [P0, P_HALF], [0.75], 0.75, 0, 3),
    ("greedy proposer (one-hot q): all kept while u < p(x), bonus from p_k",
     [1, 2], [ONE_HOT_1, ONE_HOT_2], [P0, [0, 0, 0.5, 0.5], P_HALF], [0.2, 0.4], 0.3, 2, 1),
    ("middle rejection resamples from row 1's residual, not row 0's and not p",
     [1, 1, 2], [Q0, Q0, ONE_HOT_2], [P0, [0.5, 0.25, 0, 0.25], P0, P0], [0.25, 0.75, 0.0], 0.5, 1, 0),
    ("q(x)=0 with p(x)>0: ratio +inf, kept even at u close to 1",
     [1], [[0.5, 0, 0.5, 0]], [P0, ONE_HOT_2], [0.999], 0.0, 1, 2),
    ("q(x)=0 with p(x)=0: rejected; residual max(p-q, 0) is used",
     [1], [[0.5, 0, 0.5, 0]], [[0.25, 0, 0.25, 0.5], P0], [0.0], 0.0, 0, 3),
    ("residual all zero (p == q, draft off both supports): fall back to p",
     [1], [[0.5, 0, 0.5, 0]], [[0.5, 0, 0.5, 0], P0], [0.0], 0.75, 0, 2),
    ("residual all zero (p <= q by rounding): fall back to p",
     [0], [[0.5, 0.5, 0, 0]], [[0.25, 0.25, 0, 0], P0], [0.75], 0.75, 0, 1),
    ("k=0: the bonus is drawn from p_0",
     [], np.zeros((0, 4)), [P_HALF], [], 0.25, 0, 1),
]


@pytest.mark.parametrize("invariant, drafts, q, p, au, ru, n_want, next_want", REJECTION_CASES)
def test_rejection_table(invariant, drafts, q, p, au, ru, n_want, next_want):
    n, nxt = rejection_accept(ints(drafts), floats(q), floats(p), floats(au), ru)
    assert n.dtype == mx.int32 and nxt.dtype == mx.int32, "outputs are int32 scalars"
    assert (n.item(), nxt.item()) == (n_want, next_want), invariant


def test_rejection_accepts_bfloat16_probs():
    n, nxt = rejection_accept(
        ints([1]), floats([Q0]).astype(mx.bfloat16), floats([P0, P_HALF]).astype(mx.bfloat16),
        floats([0.25]), 0.75,
    )
    assert (n.item(), nxt.item()) == (1, 3), "low-precision probs are promoted to float32"


# --- rejection_accept: statistical -----------------------------------------------------------


def _sample_rows(rng, probs, n):
    """n draws from each row of probs (R, V) -> (n, R), inverse CDF on a seeded numpy RNG."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((n, probs.shape[0], 1)) * cdf[None, :, -1:]
    return np.minimum((cdf[None] <= u).sum(-1), probs.shape[1] - 1)


def _chi2(tokens, probs):
    counts = np.bincount(tokens, minlength=probs.shape[0])
    expected = len(tokens) * probs
    seen = expected > 0
    assert counts[~seen].sum() == 0, "emitted a token the base gives zero probability"
    return float((((counts - expected) ** 2)[seen] / expected[seen]).sum())


def _fixture(proposer, k=3, vocab=6, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(vocab), size=k + 1)  # (k+1, V)
    if proposer == "sampling":
        q = rng.dirichlet(np.ones(vocab), size=k)  # (k, V)
        q[:, -1] = 0.0  # a token the drafter never proposes: only the residual can emit it
        q /= q.sum(-1, keepdims=True)
    else:  # greedy drafter: proposes the base's most likely token, one-hot q
        q = np.zeros((k, vocab))
        q[np.arange(k), p[:k].argmax(-1)] = 1.0
    return rng, p.astype(np.float32), q.astype(np.float32)


def _run_rejection(p, q, drafts, accept_u, resample_u):
    # vmap over rounds only; each round goes through the real rejection_accept.
    P, Q = mx.array(p), mx.array(q)
    batched = mx.vmap(lambda d, a, r: rejection_accept(d, Q, P, a, r))
    n, nxt = batched(ints(drafts), floats(accept_u), floats(resample_u))
    return np.array(n), np.array(nxt)


def _emitted(drafts, n, nxt, position):
    """Token emitted at `position` in each round (valid where n >= position)."""
    return np.where(n > position, drafts[:, min(position, drafts.shape[1] - 1)], nxt)


@pytest.mark.parametrize("proposer", ["sampling", "greedy"])
def test_rejection_emits_the_target_distribution(proposer):
    rng, p, q = _fixture(proposer)
    k = q.shape[0]
    drafts = _sample_rows(rng, q, N_SAMPLES)  # (N, k), x_i ~ q_i
    accept_u = rng.random((N_SAMPLES, k))
    resample_u = rng.random(N_SAMPLES)
    n, nxt = _run_rejection(p, q, drafts, accept_u, resample_u)

    first = _emitted(drafts, n, nxt, 0)
    chi2 = _chi2(first, p[0])
    assert chi2 < CHI2_LIMIT_DF5, f"first emitted token ~ p_0 (chi2={chi2:.1f})"
    # The base's p here ignores context, so given a kept first draft the second token ~ p_1.
    kept = n >= 1
    chi2 = _chi2(_emitted(drafts, n, nxt, 1)[kept], p[1])
    assert chi2 < CHI2_LIMIT_DF5, f"second emitted token ~ p_1 given the first was kept (chi2={chi2:.1f})"

    # Negative controls: the same statistic must reject algorithms that are not exact.
    always_accept = drafts[:, 0]
    assert _chi2(always_accept, p[0]) > 10 * CHI2_LIMIT_DF5, "control: always accepting emits q_0"
    kept0 = accept_u[:, 0] * q[0, drafts[:, 0]] < p[0, drafts[:, 0]]
    from_p = np.where(kept0, drafts[:, 0], _sample_rows(rng, p[:1], N_SAMPLES)[:, 0])
    assert _chi2(from_p, p[0]) > 10 * CHI2_LIMIT_DF5, "control: resampling from p, not p-q, is biased"


def test_rejection_accepts_more_than_token_match():
    rng, p, q = _fixture("sampling", k=1)
    p0, q0 = p[0], q[0]
    alpha_rejection = float(np.minimum(p0, q0).sum())
    alpha_match = float((p0 * q0).sum())
    assert alpha_rejection >= alpha_match, "sum min(p, q) >= sum p*q, since min(a, b) >= a*b on [0, 1]"
    for _ in range(20):  # the inequality holds for any pair, with equality for one-hot q
        a, b = rng.dirichlet(np.ones(6), size=2)
        assert np.minimum(a, b).sum() >= (a * b).sum(), "sum min(p, q) >= sum p*q"

    drafts = _sample_rows(rng, q, N_SAMPLES)  # (N, 1)
    n_rej, _ = _run_rejection(p, q, drafts, rng.random((N_SAMPLES, 1)), rng.random(N_SAMPLES))
    samples = _sample_rows(rng, p, N_SAMPLES)  # (N, 2), the base's independent samples
    n_match, _ = mx.vmap(token_match_accept)(ints(drafts), ints(samples))
    rate_rej, rate_match = n_rej.mean(), np.array(n_match).mean()

    tol = 4 * math.sqrt(0.25 / N_SAMPLES)
    assert abs(rate_rej - alpha_rejection) < tol, "rejection acceptance rate ~ sum min(p, q)"
    assert abs(rate_match - alpha_match) < tol, "token-match acceptance rate ~ sum p*q"
    assert rate_rej > rate_match, "rejection sampling keeps more drafts than token match"


# --- probs_from_logits -----------------------------------------------------------------------

BASE = np.array([0.4, 0.3, 0.2, 0.1])


def _norm(x):
    x = np.asarray(x, dtype=np.float64)
    return x / x.sum()


FILTER_CASES = [
    # (invariant, kwargs, expected distribution)
    ("temp=1, no filters: softmax of the logits", dict(temp=1.0), BASE),
    ("temp=0: one-hot on the argmax (greedy)", dict(temp=0.0), [1, 0, 0, 0]),
    ("temp=0.5 squares the probabilities", dict(temp=0.5), _norm(BASE**2)),
    ("top_k=2 keeps the two most likely", dict(temp=1.0, top_k=2), _norm([0.4, 0.3, 0, 0])),
    ("top_k >= V is no filter", dict(temp=1.0, top_k=4), BASE),
    ("top_p=0.6 keeps tokens whose mass above is < 0.6", dict(temp=1.0, top_p=0.6), _norm([0.4, 0.3, 0, 0])),
    ("top_p=0.75 keeps three", dict(temp=1.0, top_p=0.75), _norm([0.4, 0.3, 0.2, 0])),
    ("top_p=1.0 is no filter", dict(temp=1.0, top_p=1.0), BASE),
    ("min_p=0.4 drops p < 0.4 * max = 0.16", dict(temp=1.0, min_p=0.4), _norm([0.4, 0.3, 0.2, 0])),
    ("min_p=0.6 drops p < 0.24", dict(temp=1.0, min_p=0.6), _norm([0.4, 0.3, 0, 0])),
    ("filters see temp-1 probs, then survivors are tempered",
     dict(temp=2.0, top_k=3), _norm(np.sqrt([0.4, 0.3, 0.2, 0]))),
]


@pytest.mark.parametrize("invariant, kwargs, expected", FILTER_CASES)
def test_probs_from_logits_table(invariant, kwargs, expected):
    probs = probs_from_logits(mx.array(np.log(BASE) + 1.7, dtype=mx.float32), **kwargs)  # shift: logits
    assert probs.dtype == mx.float32, "probabilities are float32"
    np.testing.assert_allclose(np.array(probs), expected, atol=1e-6, err_msg=invariant)


def test_probs_from_logits_rowwise():
    logits = mx.random.normal((2, 3, 16), key=mx.random.key(1)) * 3  # (..., V)
    kw = dict(temp=0.8, top_p=0.9, top_k=5, min_p=0.05)
    whole = np.array(probs_from_logits(logits, **kw))
    rows = np.stack([np.array(probs_from_logits(logits[i, j], **kw)) for i in range(2) for j in range(3)])
    np.testing.assert_allclose(whole.reshape(6, 16), rows, atol=1e-7, err_msg="filters act per row")


def _mlx_lm_probs(logits, temp, top_p=0.0, top_k=0, min_p=0.0):
    """The distribution mlx-lm's make_sampler draws from: its filter chain, then categorical(x/temp)."""
    x = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # as generate_step feeds the sampler
    if 0 < top_p < 1.0:
        x = apply_top_p(x, top_p)
    if min_p != 0.0:
        x = apply_min_p(x, min_p)
    if top_k > 0:
        x = apply_top_k(x, top_k)
    return mx.softmax(x * (1.0 / temp), axis=-1)


MLX_LM_SETTINGS = [
    dict(temp=1.0),
    dict(temp=0.7, top_p=0.9),
    dict(temp=1.3, top_k=7),
    dict(temp=0.6, min_p=0.1),
    dict(temp=0.8, top_p=0.8, min_p=0.05, top_k=10),
    dict(temp=1.0, top_p=0.5, top_k=3),
]


@pytest.mark.parametrize("settings", MLX_LM_SETTINGS, ids=str)
def test_probs_match_mlx_lm_filter_chain(settings):
    logits = mx.random.normal((4, 50), key=mx.random.key(7)) * 3
    ours = np.array(probs_from_logits(logits, **settings))
    ref = np.array(_mlx_lm_probs(logits, **settings))
    assert ((ours > 0) == (ref > 0)).all(), f"same support as mlx-lm's filters for {settings}"
    np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=f"same distribution as mlx-lm for {settings}")


def test_probs_match_mlx_lm_sampler_draws():
    # make_sampler itself (not our copy of its chain): its draws follow our distribution.
    settings = dict(temp=0.7, top_p=0.9, min_p=0.05, top_k=8)
    logits = mx.random.normal((20,), key=mx.random.key(3)) * 2
    ours = np.array(probs_from_logits(logits, **settings), dtype=np.float64)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    mx.random.seed(11)
    draws = np.array(make_sampler(**settings)(mx.broadcast_to(logprobs, (N_SAMPLES, 20))))
    chi2 = _chi2(draws, ours)
    df = int((ours > 0).sum()) - 1
    limit = df + 8 * math.sqrt(2 * df)  # mean + 8 standard deviations of chi-square(df)
    assert chi2 < limit, f"mlx-lm's sampler draws ~ probs_from_logits (chi2={chi2:.1f}, df={df})"

    assert (
        np.array(probs_from_logits(logits, temp=0.0)).argmax() == np.array(make_sampler(0.0)(logprobs))
    ), "temp=0 matches mlx-lm's greedy sampler"


def test_probs_from_logits_rejects_bad_settings():
    logits = mx.zeros((4,))
    for kwargs in (dict(temp=-1.0), dict(temp=1.0, min_p=1.5), dict(temp=1.0, top_k=-1)):
        with pytest.raises(ValueError):
            probs_from_logits(logits, **kwargs)
