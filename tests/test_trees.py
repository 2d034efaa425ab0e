"""Draft trees, piece by piece: structure from parents, the tree mask, acceptance on crafted trees, the
multi-candidate rejection rule's distribution for each way siblings are drawn (with a wrong residual caught),
and compaction of every cache kind (tests/test_tree_engine.py runs them together)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_spec.batch.cache import stack_rows
from mlx_spec.cache import FullKVCache, KVQuant, SlidingKVCache
from mlx_spec.errors import CacheRollbackError
from mlx_spec.trees.accept import follow_accept, sibling_outcomes
from mlx_spec.trees.ngram import lookup_tree
from mlx_spec.trees.shape import TreeShape
from mlx_spec.trees.views import rows_layout, single_mask

# root -> a(0), b(1); a -> c(2), d(3); c -> e(4); b -> f(5)
PARENTS = [-1, -1, 0, 0, 2, 1]
TOKENS = [10, 11, 12, 13, 14, 15]


def shape(parents=PARENTS, depth=3, branching=2):
    return TreeShape(mx.array(parents, mx.int32), depth, branching)


def test_structure_from_parents():
    s = shape()
    assert s.depths.tolist() == [0, 1, 1, 2, 2, 3, 2], "depth: root 0, each node its parent's + 1"
    assert s.children.tolist() == [[1, 2], [3, 4], [6, -1], [5, -1], [-1, -1], [-1, -1], [-1, -1]], \
        "children: each row's children's rows in node order"
    anc = s.ancestors.tolist()
    assert anc[5] == [True, True, False, True, False, True, False], "node e (row 5) sees root, a, c and itself"
    assert anc[6] == [True, False, True, False, False, False, True], "node f (row 6) sees root, b and itself"


FOLLOW_CASES = [
    # (invariant, base's token after each row (root, a, b, c, d, e, f), n, next, branch rows)
    ("root's token is b, b's is f: the branch root-b-f", [11, 0, 15, 0, 0, 0, 99], 2, 99, [2, 6]),
    ("the longest agreeing branch: a, then c's sibling d", [10, 13, 0, 0, 0, 0, 0], 2, 0, [1, 4]),
    ("down to the deepest node", [10, 12, 0, 14, 0, 77, 0], 3, 77, [1, 3, 5]),
    ("no child agrees: the base's own token", [9, 0, 0, 0, 0, 0, 0], 0, 9, []),
]


@pytest.mark.parametrize("invariant, targets, n_want, next_want, rows", FOLLOW_CASES)
def test_follow_accept_table(invariant, targets, n_want, next_want, rows):
    n, nxt, path = follow_accept(shape(), mx.array(TOKENS, mx.int32), mx.array(targets, mx.int32))
    assert (n.item(), nxt.item(), path.tolist()[: n.item()]) == (n_want, next_want, rows), invariant


def test_a_chain_is_a_tree():
    n, nxt, path = follow_accept(TreeShape.chain(3), mx.array([5, 6, 7]), mx.array([5, 6, 8, 9]))
    assert (n.item(), nxt.item(), path.tolist()[:2]) == (2, 8, [1, 2]), "a chain's tree keeps greedy's prefix"


def test_repeated_sibling_tokens_keep_the_first():
    n, _, path = follow_accept(shape([-1, -1], 1, 2), mx.array([4, 4]), mx.array([4, 0, 0]))
    assert (n.item(), path.tolist()) == (1, [1]), "two siblings with the base's token: the first drawn is kept"


def test_chain_layout_is_the_causal_mask():
    cache = SlidingKVCache(8, 17)
    cache.update_and_fetch(mx.zeros((1, 1, 20, 4)), mx.zeros((1, 1, 20, 4)))
    s = TreeShape.chain(4)
    got = single_mask(cache, s.depths, s.ancestors)
    want = cache.make_mask(5, return_array=True)
    assert mx.array_equal(got, want).item(), "a chain's tree mask is the sliding cache's own causal mask"


# --- the multi-candidate rejection rule, per way of drawing siblings ------------------------------

V, K, TRIALS = 6, 3, 40_000
CHI2_LIMIT_DF5 = 30.0  # p ~ 1e-5 at 5 dof: a correct rule sits near 5


def _siblings(rng, q, scheme):
    """K candidates per trial (T, K) and what each was drawn from (T, K, V), or None (deterministic)."""
    if scheme == "top-k":
        return np.tile(np.argsort(-q)[:K], (TRIALS, 1)), None
    tokens, drawn_from, remaining = np.zeros((TRIALS, K), np.int64), np.zeros((TRIALS, K, V), np.float32), \
        np.tile(q, (TRIALS, 1))
    for j in range(K):
        cur = remaining / remaining.sum(1, keepdims=True)
        x = np.minimum((np.cumsum(cur, 1) <= rng.random((TRIALS, 1))).sum(1), V - 1)
        tokens[:, j], drawn_from[:, j] = x, cur if scheme == "without replacement" else q
        if scheme == "without replacement":
            remaining[np.arange(TRIALS), x] = 0
    return tokens, drawn_from


def _forest(rng, p, tokens, drawn_from):
    """Each trial is a row with K children (one forest, every row worked out at once): (the child it kept
    or -1, the token it emits) per trial."""
    R, base = TRIALS * (K + 1), np.arange(TRIALS) * (K + 1)
    kids = base[:, None] + 1 + np.arange(K)
    children = -np.ones((R, K), np.int32)
    children[base] = kids
    row_tokens = np.zeros(R, np.int32)
    row_tokens[kids.ravel()] = tokens.ravel()
    q = None
    if drawn_from is not None:
        q = np.zeros((R, V), np.float32)
        q[kids.ravel()] = drawn_from.reshape(-1, V)
        q = mx.array(q)
    kept, after = sibling_outcomes(mx.array(children), mx.array(row_tokens), q, mx.array(np.tile(p, (R, 1))),
                                   mx.array(rng.random((R, K)), mx.float32), mx.array(rng.random(R), mx.float32))
    kept, after = np.array(kept)[base], np.array(after)[base]
    return kept, np.where(kept >= 0, row_tokens[np.maximum(kept, 0)], after)


def _chi2(tokens, p):
    counts, expected = np.bincount(tokens, minlength=V), len(tokens) * p
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture
def dists():
    rng = np.random.default_rng(0)
    return rng, rng.dirichlet(np.ones(V)).astype(np.float32), rng.dirichlet(np.ones(V) * 0.7).astype(np.float32)


@pytest.mark.parametrize("scheme", ["with replacement", "without replacement", "top-k"])
def test_sibling_rejection_emits_the_base_distribution(dists, scheme):
    rng, p, q = dists
    tokens, drawn_from = _siblings(rng, q, scheme)
    chi2 = _chi2(_forest(rng, p, tokens, drawn_from)[1], p)
    assert chi2 < CHI2_LIMIT_DF5, f"siblings drawn {scheme}: the emitted token follows p (chi2 {chi2:.1f})"


def test_a_wrong_residual_is_caught(dists):
    """Siblings drawn without replacement but tried as if each came from the parent's q: every residual
    after the first subtracts the wrong distribution, and the statistic sees it."""
    rng, p, q = dists
    tokens, drawn_from = _siblings(rng, q, "without replacement")
    chi2 = _chi2(_forest(rng, p, tokens, np.broadcast_to(q, drawn_from.shape).copy())[1], p)
    assert chi2 > 10 * CHI2_LIMIT_DF5, f"a residual of the wrong q must move the distribution (chi2 {chi2:.1f})"


def test_siblings_accept_more_than_one_draft(dists):
    rng, p, q = dists
    tokens, drawn_from = _siblings(rng, q, "without replacement")
    alpha_tree = float((_forest(rng, p, tokens, drawn_from)[0] >= 0).mean())
    alpha_chain = float(np.minimum(p, q).sum())
    assert alpha_tree > alpha_chain + 0.05, \
        f"three siblings are kept more often ({alpha_tree:.3f}) than one draft (sum min(p, q) = {alpha_chain:.3f})"


# --- compaction: the kept branch's K/V at consecutive positions, the rest given back ----------------


def _kv(n, start=0, width=4):
    """K/V whose entry at position t is t (every element): a moved entry shows where it came from."""
    x = mx.broadcast_to((mx.arange(start, start + n, dtype=mx.float32))[None, None, :, None], (1, 1, n, width))
    return x, x + 1000


def _positions(keys):
    return keys[0, 0, :, 0].tolist()


@pytest.mark.parametrize("make", [lambda: FullKVCache(), lambda: SlidingKVCache(8, 17)])
def test_compact_moves_the_branch_into_place(make):
    cache = make()
    cache.update_and_fetch(*_kv(30))  # past the sliding window
    cache.update_and_fetch(*_kv(7, start=100))  # a pass of 7 rows: 100..106
    assert cache.compact([0, 2, 5], 7) == 4, "4 rows given back"
    keys, values = cache.state
    assert cache.offset == 33 and _positions(keys)[-3:] == [100.0, 102.0, 105.0], \
        "rows 0, 2, 5 of the pass now sit at positions 30, 31, 32"
    assert values[0, 0, -1, 0].item() == 1105.0, "values move with their keys"


def test_compact_is_checked():
    cache = SlidingKVCache(8, 2)
    cache.update_and_fetch(*_kv(30))
    cache.update_and_fetch(*_kv(7, start=100))
    with pytest.raises(CacheRollbackError):
        cache.compact([0, 3], 40)  # a pass longer than what the cache holds
    with pytest.raises(CacheRollbackError):
        cache.compact([1, 3], 7)  # the bonus row (0) always stays
    with pytest.raises(CacheRollbackError):
        cache.compact([0, 9], 7)  # past the pass


def test_compact_quantized():
    kv = KVQuant(8, 32, 0)
    cache = FullKVCache(kv)
    k, v = _kv(10, width=32)
    cache.update_and_fetch(k, v)
    k2, v2 = _kv(5, start=100, width=32)
    cache.update_and_fetch(k2, v2)
    cache.compact([0, 3], 5)
    ref = FullKVCache(kv)
    ref.update_and_fetch(k, v)
    ref.update_and_fetch(mx.concatenate([k2[:, :, :1], k2[:, :, 3:4]], axis=2),
                         mx.concatenate([v2[:, :, :1], v2[:, :, 3:4]], axis=2))
    for a, b in zip(cache.keys_and_values(), ref.keys_and_values()):
        assert all(mx.array_equal(x, y).item() for x, y in zip(a, b)), \
            "quantized K/V after compaction equal a cache that only ever saw the kept rows"


def test_rows_compact_per_row():
    rows = []
    for n in (12, 30):
        a, b = FullKVCache(), SlidingKVCache(8, 17)
        a.update_and_fetch(*_kv(n))
        b.update_and_fetch(*_kv(n))
        rows.append([a, b])
    batch = stack_rows(rows)
    x = mx.concatenate([_kv(5, start=100)[0], _kv(5, start=200)[0]])
    for c in batch:
        c.update_and_fetch(x, x)
    for c in batch:
        c.compact([[0, 1, 4], [0, 3]])
    for c in batch:
        for b, (n, want) in enumerate([(12, [100.0, 101.0, 104.0]), (30, [200.0, 203.0])]):
            assert c.offsets[b] == n + len(want), "each row keeps its own branch"
            assert _positions(c.keys[b : b + 1, :, c.ends[b] - len(want) : c.ends[b]])[:] == want, \
                f"row {b}: its branch at consecutive slots"


def test_rows_layout_pads_rows_nobody_sees():
    depths, anc = rows_layout([None, shape()], [2, 0], 9)
    a = np.array(anc)
    assert depths[0].tolist()[:3] == [0, 1, 2] and (a[0, :3, :3] == np.tril(np.ones((3, 3), bool))).all(), \
        "a chain row keeps the causal layout"
    assert not a[0, :3, 3:].any() and not a[1, :7, 7:].any(), "no real row sees a padding row"
    assert (a[:, 7:, 7:] == np.eye(2, dtype=bool)).all(), "a padding row sees itself (never an empty softmax)"


def test_ngram_tree_merges_continuations():
    history = [1, 2, 3, 1, 2, 4, 1, 2, 3, 9, 1, 2]
    tokens, parents = lookup_tree(history, 2, 6, 3)
    assert tokens[:3] == [3, 9, 1] and parents[:3] == [-1, 0, 1], "the first branch is the chain's lookup"
    assert 4 in tokens and parents[tokens.index(4)] == -1, "another match's continuation branches at the root"


def test_rank_acceptance_counts_what_each_round_tried():
    from mlx_spec.trees.ranks import RankAcceptance

    r = RankAcceptance()
    r.observe([0, 1], 2)  # kept: a first child, then a second child; its node's two children both rejected
    assert [c[:2] for c in r.first] == [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]], \
        "first children: kept at depth 0, rejected at depths 1 and 2"
    assert r.later == [[2.0, 1.0]], "second children: kept at depth 1, rejected at depth 2"
    fresh = RankAcceptance().log_probs(3, 2)
    assert fresh[2][0] * 3 > fresh[0][1], "before evidence, three first children are worth more than a sibling"
