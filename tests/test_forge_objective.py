"""forge's training-time draft rollout computes exactly what the drafter computes at inference.

The invariant: for a sequence and a round starting at its position p (bonus token x_p), the k draft steps
the training objective computes in parallel for all p give, at p, the same hidden state, logits and
greedy drafts as `DraftStepper` (and `MTPProposer`) on a base cache filled with the first p tokens, at
positions before, at and past the sliding window. Every base variant (GQA, k_eq_v, KV sharing, PLE) and
both heads; an off-by-one in the window or the query position shows up as a difference (checked too).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny_models import VARIANTS, make_base, make_drafter

from mlx_spec.forge.objectives import mtp as objective

K = 3


def sequence(base, length: int, seed: int = 3) -> mx.array:
    return mx.random.randint(0, base.args.vocab_size, (2, length), key=mx.random.key(seed))


def inference_steps(base, drafter, tokens: mx.array, row: int, p: int, k: int, position_shift: int = 0):
    """DraftStepper's k steps for a round at position p of tokens[row], fed the sequence's tokens."""
    cache = base.make_cache()
    _, hidden = base.forward(tokens[row : row + 1, :p], cache)
    shared = {t: cache[i].drafter_view() for t, i in base.producer_layers.items()}
    stepper = drafter.stepper()
    state = stepper.begin_round(shared, p + position_shift)
    hidden = hidden[:, -1:]
    out = []
    for j in range(1, k + 1):
        h, hidden = stepper.step(state, base.embed_scaled(tokens[row, p + j - 1 : p + j]), hidden)
        out.append(h)
    return out


def round_starts(window: int, length: int):
    return (1, 4, window, window + 1, window + 2, 2 * window + 3, length - K)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("head", ["centroid", "dense"])
def test_training_rollout_equals_inference_steps(variant, head):
    base = make_base(variant)
    drafter = make_drafter(base, head)
    W = base.args.sliding_window
    tokens = sequence(base, 3 * W + 8)
    teacher = objective.teacher_for(base, drafter, tokens, mx.ones(tokens.shape, mx.bool_))
    outs = objective.rollout(drafter, teacher, K, W)
    clusters = objective.token_clusters(drafter) if head == "centroid" else None
    drafts = [objective.greedy_drafts(drafter, o, clusters) for o in outs]
    for p in round_starts(W, tokens.shape[1]):
        for j, h in enumerate(inference_steps(base, drafter, tokens, 1, p, K), 1):
            trained = outs[j - 1]
            np.testing.assert_allclose(np.array(h[0]), np.array(trained.h[1, p - 1]), rtol=1e-5, atol=1e-5,
                                       err_msg=f"p={p} step {j}: drafter hidden, training vs inference")
            ids, scores = drafter.candidates(h)
            logits = trained.logits[1, p - 1]
            np.testing.assert_allclose(np.array(scores), np.array(logits if ids is None else logits[ids]),
                                       rtol=1e-5, atol=1e-5, err_msg=f"p={p} step {j}: draft logits")
            assert drafter.greedy_token(h).item() == drafts[j - 1][1, p - 1].item(), f"p={p} step {j}: draft"


def test_an_off_by_one_would_show():
    """The comparison above is sharp: a window one shorter, or the query one position later, differs."""
    base = make_base("e4b")
    drafter = make_drafter(base, "dense")
    W = base.args.sliding_window
    tokens = sequence(base, 3 * W + 8)
    teacher = objective.teacher_for(base, drafter, tokens, mx.ones(tokens.shape, mx.bool_))
    p = 2 * W + 3
    short = objective.rollout(drafter, teacher, 1, W - 1)[0].h[1, p - 1]
    right = inference_steps(base, drafter, tokens, 1, p, 1)[0][0]
    shifted = inference_steps(base, drafter, tokens, 1, p, 1, position_shift=1)[0][0]
    exact = objective.rollout(drafter, teacher, 1, W)[0].h[1, p - 1]
    assert np.allclose(np.array(right), np.array(exact), atol=1e-5)
    assert not np.allclose(np.array(right), np.array(short), atol=1e-3), "window W-1 must differ"
    assert not np.allclose(np.array(shifted), np.array(exact), atol=1e-3), "query at p+1 must differ"


def test_mtp_proposer_drafts_are_the_training_greedy_drafts():
    """Through the engine's proposer: its k drafts at a round start are the rollout's greedy drafts when the
    sequence continues with those drafts (the case where every draft is accepted)."""
    from mlx_spec.proposers.base import RoundContext
    from mlx_spec.proposers.mtp import MTPProposer
    from mlx_spec.sampling import Sampler, SamplingParams

    base = make_base("e2b")
    drafter = make_drafter(base, "centroid")
    W = base.args.sliding_window
    prefix = sequence(base, 2 * W + 6)[0].tolist()
    cache = base.make_cache()
    _, hidden = base.forward(mx.array([prefix[:-1]]), cache)
    ctx = RoundContext(prefix, len(prefix) - 1, hidden[:, -1:], cache, Sampler(SamplingParams(), 0))
    drafts = MTPProposer(drafter, base).propose(ctx, K).tokens.tolist()
    tokens = mx.array([prefix + drafts])
    teacher = objective.teacher_for(base, drafter, tokens, mx.ones(tokens.shape, mx.bool_))
    outs = objective.rollout(drafter, teacher, K, W)
    clusters = objective.token_clusters(drafter)
    p = len(prefix) - 1
    trained = [objective.greedy_drafts(drafter, o, clusters)[0, p - 1].item() for o in outs]
    assert trained == drafts, "training-time greedy drafts == MTPProposer drafts"


def test_loss_reports_kl_and_its_gradient_is_the_cross_entropy():
    """The reported loss is KL(base || drafter) (zero for a drafter equal to the base's distribution is not
    reachable here, so checked against a direct computation), and padding rows count for nothing."""
    base = make_base("e4b")
    drafter = make_drafter(base, "dense")
    W = base.args.sliding_window
    tokens = sequence(base, 40)
    mask = mx.ones(tokens.shape, mx.bool_)
    teacher = objective.teacher_for(base, drafter, tokens, mask)
    total, per_step = objective.distill(drafter, teacher, 2, W, step_decay=1.0)
    logits, _ = base.forward(tokens, base.make_cache())
    logp = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    outs = objective.rollout(drafter, teacher, 2, W)
    for j, out in enumerate(outs, 1):
        n = out.logits.shape[1]
        target = logp[:, j : j + n]
        kl = (mx.exp(target) * (target - nn.log_softmax(out.logits, axis=-1))).sum(-1).mean()
        assert abs(kl.item() - per_step[j - 1].item()) < 1e-3, f"step {j}: reported loss is the KL"
    padded = mx.concatenate([tokens, mx.zeros((2, 9), tokens.dtype)], axis=1)
    pmask = mx.concatenate([mask, mx.zeros((2, 9), mx.bool_)], axis=1)
    t2 = objective.teacher_for(base, drafter, padded, pmask)
    total2, _ = objective.distill(drafter, t2, 2, W, step_decay=1.0)
    assert abs(total.item() - total2.item()) < 1e-4, "right padding changes nothing"


def test_acceptance_estimate_counts_like_the_engine():
    """On the base's own greedy text, the estimate's position-1 acceptance is the fraction of round starts
    whose first draft equals the base's next greedy token (checked by brute force)."""
    base = make_base("e4b")
    drafter = make_drafter(base, "dense")
    W = base.args.sliding_window
    tokens = sequence(base, 30)
    teacher = objective.teacher_for(base, drafter, tokens, mx.ones(tokens.shape, mx.bool_))
    accepted, counted = objective.acceptance(drafter, teacher, 2, W)
    outs = objective.rollout(drafter, teacher, 2, W)
    L = tokens.shape[1]
    d1 = np.array(mx.argmax(outs[0].logits, axis=-1))[:, : L - 2]
    d2 = np.array(mx.argmax(outs[1].logits, axis=-1))[:, : L - 2]
    best = np.array(teacher.best)
    first = d1 == best[:, 1 : L - 1]
    both = first & (d2 == best[:, 2:L])
    assert counted.tolist() == [first.size, first.size]
    assert accepted.tolist() == [int(first.sum()), int(both.sum())]


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_recomputing_the_head_gives_the_same_gradient(kind):
    """recompute_head (used for Gemma 4's 262k vocabulary to save memory) changes nothing but memory."""
    from mlx.utils import tree_flatten

    base = make_base("e2b")
    drafter = make_drafter(base, "centroid")
    tokens = sequence(base, 40)
    teacher = objective.teacher_for(base, drafter, tokens, mx.ones(tokens.shape, mx.bool_))
    results = []
    for recompute in (False, True):
        fn = nn.value_and_grad(drafter, lambda t: objective.distill(drafter, t, K, base.args.sliding_window, kind,
                                                                 recompute_head=recompute))
        (value, _), grads = fn(teacher)
        results.append((value.item(), dict(tree_flatten(grads))))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for name, g in results[0][1].items():
        np.testing.assert_allclose(np.array(results[1][1][name]), np.array(g), rtol=1e-5, atol=1e-6, err_msg=name)
