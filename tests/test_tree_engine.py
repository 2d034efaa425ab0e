"""Tree rounds end to end: greedy output equals plain decoding for every tree builder and every Gemma 4
variant, past the sliding window (16 here) and with quantized K/V; after every round the base's caches (and
a block drafter's context) hold exactly what a run that never saw the other nodes holds; and both checks
catch a wrong ancestor mask and a compaction one position off.

A decoy tree hides the base's own continuation as the second child at each depth, under decoys that have
children of their own, so every accepted branch runs through rows that are not consecutive."""

import mlx.core as mx
import pytest

from tiny_models import dflash_config, dspark_config, engine, make_base, make_block_drafter, make_drafter
from mlx_spec import cache as cache_module
from mlx_spec.batch import cache as rows_cache
from mlx_spec.cache import KVQuant
from mlx_spec.draft_policy import FixedK, FixedTree
from mlx_spec.engine import Engine
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.base import Draft
from mlx_spec.proposers.dflash import DFlashProposer
from mlx_spec.trees import views
from mlx_spec.request import Request

PROMPT = [2] + [(i * 37) % 250 + 3 for i in range(20)]
MAX_TOKENS = 48  # 21 + 48 positions: well past the window of 16
_bases = {}


def base(variant: str, quantizable: bool = False):
    key = (variant, quantizable)
    if key not in _bases:
        if quantizable:
            from tiny_models import _redraw, text_config
            from mlx_spec.models import gemma4_text

            model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict({**text_config(variant), "head_dim": 32,
                                                                       "global_head_dim": 64}))
            _redraw(model, 0, std=0.08)
        else:
            model = make_base(variant)
        _bases[key] = model
    return _bases[key]


def plain(model, prompt=PROMPT, max_tokens=MAX_TOKENS, **settings):
    return [e.token for e in engine(model, prompt, max_tokens=max_tokens, **settings).run()]


def continuation(model, history, n):
    """The base's greedy continuation of `history`, from a fresh cache."""
    c = model.make_cache()
    logits, _ = model.forward(mx.array([history], mx.int32), c)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits, _ = model.forward(mx.array([[out[-1]]], mx.int32), c)
    return out


def decoy_tree(truth, right: int, vocab: int) -> Draft:
    """Per depth: a decoy (first child), the truth (second; wrong past `right` depths), and a child under
    the decoy. The branch the base keeps is truth[:right] through the second children."""
    tokens, parents, prev = [], [], -1
    for d, t in enumerate(truth):
        tokens += [(t + 1) % vocab, t if d < right else (t + 2) % vocab]
        parents += [prev, prev]
        decoy, prev = len(tokens) - 2, len(tokens) - 1
        tokens.append(truth[d + 1] if d + 1 < len(truth) else t)
        parents.append(decoy)
    return Draft(mx.array(tokens, mx.int32), parents=mx.array(parents, mx.int32), depth=len(truth), branching=2)


class Checking:
    """At each round's start, the base's caches (and a reader's context) must equal a clean prefill of the
    accepted history; then it drafts a decoy tree."""

    def __init__(self, model, inner=None, kv=None):
        self.model, self.inner, self.name, self.checked = model, inner, "checking", 0
        self.kv = kv.as_dict() if kv is not None else {}
        self.base_layers = inner.base_layers if inner is not None else ()
        self.weights = None

    def __getattr__(self, name):  # a block drafter's context, extend, reset ... are the inner proposer's
        return getattr(self.inner, name)

    def start(self, prompt):
        if self.inner is not None:
            self.inner.start(prompt)

    def observe(self, result):
        pass

    def propose(self, ctx, k):
        return Draft.empty()

    def propose_tree(self, ctx, nodes, depth):
        self.check(ctx)
        self.checked += 1
        truth = continuation(self.model, ctx.history, depth)
        return decoy_tree(truth, len(ctx.history) % (depth + 1), self.model.args.vocab_size)

    def check(self, ctx):
        clean = self.model.make_cache(**self.kv)
        if self.base_layers:
            _, _, features = self.model.forward_layers(mx.array([ctx.history[:-1]]), clean, self.base_layers)
            ref = self.inner.drafter.make_context_cache()
            self.inner.drafter.extend_context(features, ref)
            for i, (ours, want) in enumerate(zip(self.inner.context_cache, ref)):
                assert ours.offset == want.offset and all(mx.allclose(a, b, atol=1e-5).item() for a, b in
                                                          zip(ours.state, want.state)), \
                    f"drafter context layer {i} differs from one that never saw the other nodes"
        else:
            self.model(mx.array([ctx.history[:-1]]), clean)
        for i, (ours, want) in enumerate(zip(ctx.base_cache, clean)):
            assert ours.offset == want.offset == ctx.position, "the cache ends at the bonus token's position"
            for x, y in zip(ours.drafter_view(), want.drafter_view()):
                x, y = (x.packed, y.packed) if isinstance(x, tuple) else (x, y)  # quantized: the packed K/V
                assert x.shape == y.shape and mx.allclose(x, y, atol=1e-5).item(), \
                    f"layer {i}: the cache differs from a run that never saw the other nodes (round at {ctx.position})"


def run_checked(model, prop, **settings):
    eng = engine(model, PROMPT, proposer=prop, policy=FixedTree(12, depth=4), max_tokens=MAX_TOKENS, **settings)
    got = [e.token for e in eng.run()]
    assert prop.checked > 5 and eng.stats.tree_rounds == prop.checked, "every round was a checked tree round"
    return got, eng


@pytest.mark.parametrize("variant", ["e2b", "e4b", "moe", "dense_keqv"])
def test_decoy_trees_keep_the_cache_exact(variant):
    model = base(variant)
    got, eng = run_checked(model, Checking(model))
    assert got == plain(model), "greedy output with trees equals plain decoding"
    assert eng.stats.accepted > 20, "branches through second children were kept"


@pytest.mark.parametrize("start", [0, 30])
def test_decoy_trees_with_quantized_kv(start):
    """--kv-bits 8; with start 30 the switch falls inside what the rounds verify (their depth stops at it)."""
    model = base("dense_keqv", quantizable=True)
    kv = KVQuant(8, 32, start)
    got, _ = run_checked(model, Checking(model, kv=kv), kv=kv)
    assert got == plain(model, kv=kv), "greedy output with trees equals plain decoding, quantized K/V"


def test_a_block_drafters_context_follows_the_branch():
    model = base("e2b")
    inner = make_proposer(model, drafter=make_block_drafter(dflash_config(model)))
    got, _ = run_checked(model, Checking(model, inner))
    assert got == plain(model), "greedy output equals plain decoding"


def _causal_mask(cache, depths, ancestors):
    return views_single_mask(cache, depths, mx.arange(depths.shape[0])[:, None] >= mx.arange(depths.shape[0])[None])


views_single_mask = views.single_mask


def _compact_one_off(self, keep, written):
    """The kept branch written one position too late (the bug the check must see)."""
    first, end = self._slots()
    if len(keep) > 1:
        index = mx.array(keep[1:], mx.int32) + (end - written)
        for buf in (self.keys, self.values):
            take = lambda x: mx.take(x, index, axis=2)  # noqa: E731
            cache_module._put(buf, tuple(map(take, buf)) if cache_module._is_quantized(buf) else take(buf),
                              end - written + 2)
    return self.rollback(written - len(keep))


@pytest.mark.parametrize("mutation", ["causal mask", "compaction one position off"])
def test_the_checks_catch_a_broken_tree(monkeypatch, mutation):
    model = base("e2b")
    if mutation == "causal mask":
        monkeypatch.setattr(views, "single_mask", _causal_mask)
    else:
        monkeypatch.setattr(cache_module._Quantizable, "compact", _compact_one_off)
    with pytest.raises(AssertionError):
        got, _ = run_checked(model, Checking(model))
        assert got == plain(model), "greedy output with trees equals plain decoding"


def _tree_proposer(model, family):
    if family == "mtp":
        return make_proposer(model, drafter=make_drafter(model))
    if family == "ngram":
        return make_proposer(model, ngram=2)
    config = dflash_config(model) if family == "dflash" else dspark_config(model)
    return make_proposer(model, drafter=make_block_drafter(config))


@pytest.mark.parametrize("family", ["mtp", "ngram", "dflash", "dspark"])
@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
def test_every_builder_greedy_equals_plain(family, variant):
    model = base(variant)
    want = plain(model)
    for nodes in (4, 16):
        eng = Engine(model, Request(PROMPT, max_tokens=MAX_TOKENS), proposer=_tree_proposer(model, family),
                     policy=FixedTree(nodes))
        assert [e.token for e in eng.run()] == want, f"{family} trees of {nodes}: greedy equals plain decoding"
        assert eng.stats.tree_rounds > 0, "the rounds verified trees"


def test_trained_pair_trees_accept_more_than_chains(trained_pair):
    """On the trained tiny pair: greedy trees equal plain decoding, and at equal verified rows a tree keeps
    at least as many tokens per round as the chain (a chain is one tree)."""
    model, tokenizer, drafter = trained_pair
    prompt = tokenizer.encode("def parse(line):\n    ")
    want = plain(model, prompt, 80)
    tau = {}
    for name, policy in [("tree", FixedTree(8)), ("chain", FixedK(8))]:
        eng = Engine(model, Request(prompt, max_tokens=80), proposer=make_proposer(model, drafter=drafter),
                     policy=policy)
        assert [e.token for e in eng.run()] == want, f"{name}: greedy equals plain decoding"
        tau[name] = eng.stats.tau
    assert tau["tree"] >= tau["chain"], f"tau of a tree of 8 ({tau['tree']:.2f}) >= a chain of 8 ({tau['chain']:.2f})"


@pytest.mark.parametrize("family", ["assistant", "dflash"])
def test_seeded_trees_give_plain_samplings_text(trained_pair, family):
    """Coupled mode (a seed): each node is drawn with the base's own noise at its position and a child is kept
    when it equals the base's draw, so the text is plain sampling's, token for token."""
    from conftest import TINY_CODE

    from mlx_spec import load_drafter
    from mlx_spec.sampling import SamplingParams

    model, tokenizer, _ = trained_pair
    prop = make_proposer(model, drafter=load_drafter(str(TINY_CODE / family), model))
    prompt, sampling = tokenizer.encode("def parse(line):\n    "), SamplingParams(temp=1.0, top_k=50)
    want = plain(model, prompt, 60, sampling=sampling, seed=5)
    eng = Engine(model, Request(prompt, max_tokens=60, sampling=sampling, seed=5), proposer=prop, policy=FixedTree(8))
    assert [e.token for e in eng.run()] == want, "seeded tree decoding gives plain sampling's tokens"
    assert eng.stats.accepted > 0, "some nodes were kept"


def test_logprobs_with_trees_equal_plain():
    model = base("e2b")
    want = [(e.token, e.logprob, e.top_logprobs) for e in Engine(model,
                                                                 Request(PROMPT, max_tokens=30, logprobs=3)).run()]
    eng = Engine(model, Request(PROMPT, max_tokens=30, logprobs=3), proposer=Checking(model),
                 policy=FixedTree(12, depth=4))
    got = [(e.token, e.logprob, e.top_logprobs) for e in eng.run()]
    assert got == want, "a tree round reports the log-probabilities plain decoding reports"


def test_stopping_inside_a_branch_leaves_the_cache_at_the_history():
    model = base("e2b")
    eng = Engine(model, Request(PROMPT, max_tokens=60), proposer=Checking(model), policy=FixedTree(12, depth=4))
    gen = eng.run()
    for _ in range(17):
        next(gen)
    gen.close()
    assert eng.cache[0].offset == len(eng.history) - 1, "the cache holds history[:-1], a queued tree round undone"


# --- rows of a batch: a tree row beside chain rows and plain rows equals its output alone ---------------

BATCH_PROMPTS = [PROMPT, [2, 7] * 10, list(range(3, 40)), [4, 5, 6, 4, 5, 7, 4, 5]]
BATCH_POLICIES = [FixedTree(8), FixedK(3), FixedTree(16, depth=5), FixedTree(4)]


def _batched(model, make, policies=BATCH_POLICIES, **settings):
    from mlx_spec.batch.scheduler import Scheduler

    sched, out, engines = Scheduler(model, decode_concurrency=8), {}, []
    for i, (prompt, policy) in enumerate(zip(BATCH_PROMPTS, policies)):
        engines.append(engine(model, prompt, proposer=make(), policy=policy, max_tokens=40 + 5 * i, **settings))
        sched.submit(engines[-1], lambda events, finished, i=i: out.setdefault(i, []).extend(e.token for e in events))
    sched.drain()
    return [out[i] for i in range(len(BATCH_PROMPTS))], engines


def _left_exact(model, engines):
    """A row that left the batch holds exactly its history minus the last token, as a clean prefill does."""
    for i, eng in enumerate(engines):
        clean = model.make_cache()
        model(mx.array([eng.history[:-1]]), clean)
        for layer, (ours, want) in enumerate(zip(eng.cache, clean)):
            assert ours.offset == want.offset, f"row {i}: its cache ends at its history"
            for x, y in zip(ours.drafter_view(), want.drafter_view()):
                assert x.shape == y.shape and mx.allclose(x, y, atol=1e-5).item(), \
                    f"row {i}, layer {layer}: K/V differ from a run that never saw the other nodes"


@pytest.mark.parametrize("family", ["ngram", "mtp", "dflash", "dspark"])
def test_tree_rows_equal_alone(family):
    model = base("e2b")
    prop = _tree_proposer(model, family)
    got, engines = _batched(model, prop.fork)
    for i, prompt in enumerate(BATCH_PROMPTS):
        assert got[i] == plain(model, prompt, 40 + 5 * i), f"row {i}: in a batch with trees, greedy equals plain"
    assert sum(e.stats.tree_rounds for e in engines) > 10, "rows verified trees"
    _left_exact(model, engines)
    if family == "ngram":
        assert sum(e.stats.accepted for e in engines) > 30, "tree rows kept nodes"


def _rows_causal(self, depths, ancestors):
    return self.make_mask(depths.shape[1])


def _rows_compact_one_off(self, keeps):
    """Each row's kept branch written one slot too late (the bug the checks must see)."""
    L = self.last_written
    M = max(len(k) for k in keeps)
    src = mx.array([[e - L + (k[j] if j < len(k) else j) for j in range(M)] for e, k in zip(self.ends, keeps)])
    dst = mx.array([[e - L + min(j + (0 < j < len(k)), L - 1) for j in range(M)] for e, k in zip(self.ends, keeps)])
    self.keys = rows_cache._scatter(self.keys, rows_cache._gather(self.keys, src), dst)
    self.values = rows_cache._scatter(self.values, rows_cache._gather(self.values, src), dst)
    self.rollback([L - len(k) for k in keeps])


@pytest.mark.parametrize("mutation", ["causal mask", "compaction one position off"])
def test_the_rows_checks_catch_a_broken_tree(monkeypatch, mutation):
    model = base("e2b")
    if mutation == "causal mask":
        monkeypatch.setattr(rows_cache._RowsCache, "tree_mask", _rows_causal)
    else:
        monkeypatch.setattr(rows_cache._RowsCache, "compact", _rows_compact_one_off)
    with pytest.raises(AssertionError):
        got, engines = _batched(model, _tree_proposer(model, "ngram").fork)
        assert all(got[i] == plain(model, p, 40 + 5 * i) for i, p in enumerate(BATCH_PROMPTS)), "equals plain"
        _left_exact(model, engines)


def test_tree_rows_with_quantized_kv_equal_alone():
    model = base("dense_keqv", quantizable=True)
    kv = KVQuant(8, 32, 30)  # rows cross the switch in different rounds and change batches
    got, engines = _batched(model, lambda: make_proposer(model, ngram=2), kv=kv)
    for i, prompt in enumerate(BATCH_PROMPTS):
        assert got[i] == plain(model, prompt, 40 + 5 * i, kv=kv), f"row {i}: quantized K/V, trees, equals plain"


def test_trained_pair_tree_rows_sample_plain_text(trained_pair):
    from mlx_spec.sampling import SamplingParams

    model, tokenizer, drafter = trained_pair
    sampling = SamplingParams(temp=1.0, top_k=50)
    prop = make_proposer(model, drafter=drafter)
    got, engines = _batched(model, prop.fork, sampling=sampling, seed=3)
    for i, prompt in enumerate(BATCH_PROMPTS):
        assert got[i] == plain(model, prompt, 40 + 5 * i, sampling=sampling, seed=3), \
            f"row {i}: seeded tree rows give plain sampling's text"
    assert sum(e.stats.accepted for e in engines if e.stats.tree_rounds) > 0, "tree rows kept nodes"
