"""End to end: with temp > 0, speculative decoding samples from the base's distribution (the acceptance
functions alone are tested in test_acceptance.py; this runs the engine, caches and proposers too).

The joint distribution of generated tokens 2-3 (made by a speculative round) over many seeds must match
plain sampling. A flat temperature and top-k 3 make the support small and rejections frequent. The
greedy-script proposer always drafts the base's argmax continuation: a classic bug (resampling from p
instead of the residual after a rejection) shifts its distribution enough to fail this test (checked
when the test was written: chi2 60 on 18 dof vs a 99.9% bound of ~42).
"""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_spec.engine import Engine
from mlx_spec.sampling import SamplingParams
from mlx_spec.tuning import FixedK
from mlx_spec.proposers.base import Draft
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.request import Request

N = 400
PROMPT_TEXT = "def parse(line):\n    "


class GreedyScript:
    """Deterministic drafts: the base's own argmax continuation (q is one-hot)."""

    name = "greedy-script"

    def __init__(self, model, memo=None):
        self.model = model
        self.memo = {} if memo is None else memo  # history -> drafts: shared by the runs of one test

    def start(self, prompt):
        pass

    def observe(self, result):
        pass

    def propose(self, ctx, k):
        key = (tuple(ctx.history), k)
        if key not in self.memo:
            self.memo[key] = self.script(ctx.history, k)
        return Draft(self.memo[key])

    def script(self, history, k):
        cache = self.model.make_cache()
        logits, _ = self.model.forward(mx.array([history]), cache)
        tokens = []
        for i in range(k):
            tokens.append(mx.argmax(logits[0, -1]).reshape(1))
            if i < k - 1:
                logits, _ = self.model.forward(tokens[-1][None], cache)
        return mx.concatenate(tokens).astype(mx.int32)


def samples(model, prompt, sampling, make_proposer=None, n=N):
    out = Counter()
    for seed in range(n):
        eng = Engine(model,
                     Request(prompt, sampling=sampling, max_tokens=3, seed=seed + (10_000 if make_proposer else 0)),
                     proposer=make_proposer() if make_proposer else None, policy=FixedK(2))
        out[tuple(e.token for e in eng.run())[1:]] += 1  # tokens 2-3 come from one speculative round
    return out


def two_sample_chi2(a: Counter, b: Counter):
    cells = sorted(set(a) | set(b))
    x = np.array([[a[c], b[c]] for c in cells], float)
    keep = x.sum(1) >= 10  # pool rare cells so the chi-square approximation holds
    x = np.vstack([x[keep], x[~keep].sum(0, keepdims=True)]) if (~keep).any() else x[keep]
    expected = x.sum(1, keepdims=True) * x.sum(0, keepdims=True) / x.sum()
    return ((x - expected) ** 2 / np.maximum(expected, 1e-9)).sum(), len(x) - 1


def chi2_bound(dof: int, z: float = 3.09) -> float:
    """99.9% quantile of chi-square (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


SAMPLING = dict(temp=2.0, top_k=3)


@pytest.fixture(scope="module")
def plain(trained_pair):
    model, tokenizer, _ = trained_pair
    return samples(model, tokenizer.encode(PROMPT_TEXT), SamplingParams(**SAMPLING))


SLOW = pytest.mark.slow  # each case is 400 engine runs; the default run keeps every mode and every family


@pytest.mark.parametrize("proposer, rule", [("greedy-script", "rejection"), ("greedy-script", "match"),
                                            pytest.param("mtp", "rejection", marks=SLOW), ("mtp", "coupled")])
def test_speculative_samples_have_the_plain_distribution(trained_pair, plain, proposer, rule):
    model, tokenizer, drafter = trained_pair
    memo = {}
    make = (lambda: GreedyScript(model, memo)) if proposer == "greedy-script" else (lambda: MTPProposer(drafter, model))
    spec = samples(model, tokenizer.encode(PROMPT_TEXT), SamplingParams(**SAMPLING, acceptance=rule), make)
    stat, dof = two_sample_chi2(plain, spec)
    assert stat < chi2_bound(dof), f"{proposer}/{rule}: chi2 {stat:.1f} on {dof} dof: the distribution moved"


def _block_proposer(model, family):
    """DFlash: the trained tiny drafter for this base; DSpark: random weights (its Markov chain draws each
    draft from a distribution that depends on the previous draft: q_j is that conditional)."""
    from conftest import TINY_CODE
    from tiny_models import dspark_config, make_block_drafter

    from mlx_spec import load_drafter
    from mlx_spec.proposers import make_proposer

    if family == "dflash":
        drafter = load_drafter(str(TINY_CODE / "dflash"), model)
    else:
        drafter = make_block_drafter(dspark_config(model, block_size=3, markov_rank=8), seed=3)
        head = drafter.markov_head.markov_w2
        head.weight = head.weight * 40  # a bias that moves q (random weights give a negligible one)
    return lambda: make_proposer(model, drafter=drafter)


@pytest.mark.parametrize("family, rule", [("dflash", "rejection"), pytest.param("dflash", "coupled", marks=SLOW),
                                          ("dspark", "rejection"), pytest.param("dspark", "match", marks=SLOW)])
def test_block_drafter_samples_have_the_plain_distribution(trained_pair, plain, family, rule):
    model, tokenizer, _ = trained_pair
    spec = samples(model, tokenizer.encode(PROMPT_TEXT), SamplingParams(**SAMPLING, acceptance=rule),
                   _block_proposer(model, family))
    stat, dof = two_sample_chi2(plain, spec)
    assert stat < chi2_bound(dof), f"{family}/{rule}: chi2 {stat:.1f} on {dof} dof: the distribution moved"


def batch_samples(model, prompt, sampling, make_proposer, n=N, rows=8):
    """As `samples`, but the requests decode as rows of batches of `rows`, each with its own seed and its
    own fork of the proposer (test_batch.py checks directly that each row's drafts and q are its own)."""
    from mlx_spec.batch.scheduler import Scheduler

    out = Counter()
    for first in range(0, n, rows):
        sched, got = Scheduler(model, decode_concurrency=rows), {}
        for seed in range(first, first + rows):
            eng = Engine(model, Request(prompt, sampling=sampling, max_tokens=3, seed=seed + 20_000),
                         proposer=make_proposer(), policy=FixedK(2))
            sched.submit(eng, lambda events, done, s=seed: got.setdefault(s, []).extend(e.token for e in events))
        sched.drain()
        for tokens in got.values():
            out[tuple(tokens[1:])] += 1
    return out


def test_batched_rows_sample_the_plain_distribution(trained_pair, plain):
    """Rejection sampling per row of a batch, the MTP rows drafting together, each from its own noise."""
    model, tokenizer, drafter = trained_pair
    spec = batch_samples(model, tokenizer.encode(PROMPT_TEXT), SamplingParams(**SAMPLING, acceptance="rejection"),
                         lambda: MTPProposer(drafter, model))
    stat, dof = two_sample_chi2(plain, spec)
    assert stat < chi2_bound(dof), f"batched mtp/rejection: chi2 {stat:.1f} on {dof} dof: the distribution moved"


# --- trees: the multi-candidate rule in the engine (siblings at the first depth, then the kept node's row) ---
# (the rule's own chi-square per way of drawing siblings, with a wrong residual caught: tests/test_trees.py)

def tree_samples(model, prompt, sampling, make_proposer, nodes=4, n=N, max_tokens=3):
    """As `samples`, with a tree of `nodes` nodes per round: tokens 2-3 are a sibling the base kept (or the
    token drawn after all were rejected) and the token after it, from the kept node's own row. With
    max_tokens 4 the tree is two deep (its first depth's siblings compete for the nodes with the second's),
    and a round that keeps no node is followed by another for token 3."""
    from mlx_spec.draft_policy import FixedTree

    out = Counter()
    for seed in range(n):
        eng = Engine(model, Request(prompt, sampling=sampling, max_tokens=max_tokens, seed=seed + 20_000),
                     proposer=make_proposer(), policy=FixedTree(nodes))
        out[tuple(e.token for e in eng.run())[1:3]] += 1
        assert eng.stats.tree_rounds == eng.stats.rounds >= 1, "the speculative rounds verified trees"
    return out


def _tree_proposer(model, drafter, family):
    if family == "mtp":
        shared = MTPProposer(drafter, model)  # no per-request state: one proposer (and its compiled steps)
        return lambda: shared
    return _block_proposer(model, family)


@pytest.mark.parametrize("family, rule, max_tokens", [
    ("mtp", "rejection", 4), pytest.param("mtp", "rejection", 3, marks=SLOW),  # 4 runs depth 1's rule too
    pytest.param("mtp", "coupled", 3, marks=SLOW),
    ("dflash", "rejection", 3), pytest.param("dflash", "rejection", 4, marks=SLOW),
    pytest.param("dspark", "rejection", 4, marks=SLOW)])
def test_tree_samples_have_the_plain_distribution(trained_pair, plain, family, rule, max_tokens):
    model, tokenizer, drafter = trained_pair
    spec = tree_samples(model, tokenizer.encode(PROMPT_TEXT), SamplingParams(**SAMPLING, acceptance=rule),
                        _tree_proposer(model, drafter, family), max_tokens=max_tokens)
    stat, dof = two_sample_chi2(plain, spec)
    assert stat < chi2_bound(dof), f"{family} trees/{rule}: chi2 {stat:.1f} on {dof} dof: the distribution moved"

