"""Block drafters (DFlash, DSpark) in the engine: speculative greedy == plain greedy past the sliding window
for every family and several block sizes; the drafter's context always equals one built from scratch
over the accepted history (a one-position slip anywhere changes its K/V); a block sees exactly its window;
prefill chunks, strict padding, auto-off plain steps and reused prompt caches keep the context in step."""

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import WINDOW, dflash_config, dspark_config, engine, make_base, make_block_drafter

from mlx_spec.engine import Engine
from mlx_spec.models.block_context import SLIDING, FULL
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.base import Draft
from mlx_spec.proposers.dflash import DFlashProposer
from mlx_spec.proposers.dspark import DSparkProposer
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request

MAX_TOKENS = 3 * WINDOW
PROMPTS = {"short": [2, 17, 33, 4, 90], "long": [2] + [(i * 37) % 250 + 3 for i in range(2 * WINDOW + 3)]}
FAMILIES = {
    "dflash": lambda b: dflash_config(b, block_size=8),
    "dflash_sliding_causal": lambda b: dflash_config(b, layer_types=(SLIDING, FULL), window=6, block_size=6, causal=True),
    "dflash_sliding": lambda b: dflash_config(b, layer_types=(SLIDING, SLIDING), window=5, block_size=8),
    "dspark": lambda b: dspark_config(b, block_size=7),
    "dspark_plain_head": lambda b: dspark_config(b, block_size=5, markov_rank=0, k_eq_v=False),
}
_cache = {}


def pair(variant: str, family: str):
    key = (variant, family)
    if key not in _cache:
        base = _cache.get(variant) or make_base(variant)
        _cache[variant] = base
        _cache[key] = (base, make_block_drafter(FAMILIES[family](base)))
    return _cache[key]


def run(model, prompt, proposer=None, k=3, max_tokens=MAX_TOKENS, **kw):
    eng = engine(model, prompt, proposer=proposer, policy=FixedK(k), max_tokens=max_tokens, **kw)
    tokens = [ev.token for ev in eng.run()]
    return tokens, eng


class Scripted:
    """Wraps a block proposer: runs its drafter every round (so its context is used and checked), but
    offers the known plain continuation with draft `wrong_at` corrupted, so rounds accept min(wrong_at, k)."""

    def __init__(self, inner, full, wrong_at):
        self.inner, self.full, self.wrong_at = inner, full, wrong_at
        self.name, self.identity, self.weights, self.base_layers = "scripted", "scripted", None, inner.base_layers

    context_cache = property(lambda self: self.inner.context_cache)
    context_length = property(lambda self: self.inner.context_length)

    def extend(self, f):
        self.inner.extend(f)

    def reset(self):
        self.inner.reset()

    def start(self, prompt):
        self.inner.start(prompt)

    def propose(self, ctx, k):
        real = self.inner.propose(ctx, k)  # raises if the context is out of step
        nxt = self.full[len(ctx.history): len(ctx.history) + real.k]
        drafts = [(t + 1) % 256 if i == self.wrong_at else t for i, t in enumerate(nxt)]
        return Draft(mx.array(drafts, mx.int32) + 0 * real.tokens[: len(drafts)])

    def observe(self, result):
        self.inner.observe(result)

    def fork(self):
        return self


def fresh_context(base, drafter, history, kv=None):
    """The drafter's context over history[:-1], built from one base pass from position 0 (through a cache
    quantized as `kv` says: the features past the switch come from a base reading quantized K/V)."""
    cache = base.make_cache(**kv.as_dict()) if kv is not None else base.make_cache()
    _, _, features = base.forward_layers(mx.array(history[:-1])[None], cache, tuple(drafter.target_layer_ids))
    cache = drafter.make_context_cache()
    drafter.extend_context(features, cache)
    return cache


def assert_same_context(got, want, where):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.offset == w.offset, f"{where}: layer {i} context holds {g.offset} positions, expected {w.offset}"
        gk, gv = (g.state if hasattr(g, "window") else g.drafter_view())
        wk, wv = (w.state if hasattr(w, "window") else w.drafter_view())
        n = min(gk.shape[2], wk.shape[2])  # a sliding layer may keep more slack on one side
        assert np.allclose(np.array(gk[..., -n:, :]), np.array(wk[..., -n:, :]), atol=1e-5) and \
            np.allclose(np.array(gv[..., -n:, :]), np.array(wv[..., -n:, :]), atol=1e-5), \
            f"{where}: layer {i} context K/V differ from a fresh prefill over the accepted history"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
def test_greedy_equals_plain_past_the_window(variant, family):
    base, drafter = pair(variant, family)
    for name, prompt in PROMPTS.items():
        plain, _ = run(base, prompt)
        for k in (1, 3, drafter.max_drafts):
            spec, eng = run(base, prompt, make_proposer(base, drafter=drafter), k=k)
            assert spec == plain, f"{family} k={k} {variant}/{name}: speculative greedy must equal plain greedy"
            assert eng.stats.rounds > 0


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("k", [2, 5])
def test_context_follows_the_accepted_history_exactly(family, k):
    """Rounds that accept some drafts and reject the rest: after the run (and at every round, which
    propose() checks) the context equals a fresh one over the accepted history; a slip of one position
    (a rejected draft kept, an accepted one dropped, a RoPE offset off by one) would change it."""
    base, drafter = pair("e2b", family)
    prompt = PROMPTS["long"]
    plain, _ = run(base, prompt)
    proposer = Scripted(make_proposer(base, drafter=drafter), list(prompt) + plain, wrong_at=k // 2)
    spec, eng = run(base, prompt, proposer, k=k)
    assert spec == plain
    assert eng.stats.accepted > 0 and eng.stats.accepted < eng.stats.drafted, "rounds must accept and reject"
    assert_same_context(proposer.context_cache, fresh_context(base, drafter, eng.history), family)


def test_the_block_sees_its_window_on_a_sliding_layer():
    """Cached == uncached: the proposer's block logits deep into a long context equal a reference that
    attends to exactly the W-1 positions before the block on sliding layers (and to all on full ones)."""
    base, drafter = pair("e2b", "dflash_sliding")
    history = PROMPTS["long"] + [5, 9]
    proposer = make_proposer(base, drafter=drafter)
    proposer.start(history[:-1])
    _, _, feats = base.forward_layers(mx.array(history[:-1])[None], base.make_cache(), proposer.base_layers)
    proposer.extend(feats)
    block = mx.array([[history[-1]] + [drafter.args.mask_token_id] * 4], mx.int32)
    got = drafter.block_hidden(base.embed_scaled(block), proposer.context_cache)
    # reference: only the last W-1 features exist, at their true positions
    W, p = drafter.args.sliding_window, len(history) - 1
    ref = drafter.make_context_cache()
    for c in ref:  # positions before the window: never seen
        c.offset = p - (W - 1)
    drafter.extend_context(feats[:, p - (W - 1):], ref)
    want = drafter.block_hidden(base.embed_scaled(block), ref)
    assert np.allclose(np.array(got), np.array(want), atol=1e-5), "a sliding layer must see exactly W-1 positions"


@pytest.mark.parametrize("family", ["dflash", "dspark"])
def test_prefill_chunks_strict_padding_and_auto_off_keep_the_context_in_step(family):
    base, drafter = pair("dense_keqv", family)
    prompt = PROMPTS["long"]
    plain, _ = run(base, prompt, max_tokens=24)
    for kw in ({"prefill_step": 5}, {"prefill_step": 17}, {"strict_rows": 9}):
        proposer = make_proposer(base, drafter=drafter)
        spec, eng = run(base, prompt, proposer, k=4, max_tokens=24, **kw)
        assert spec == plain, f"{family} {kw}: must equal plain"
        assert_same_context(proposer.context_cache, fresh_context(base, drafter, eng.history), f"{family} {kw}")

    class OnOff:  # plain steps (k = 0) between rounds, as auto-off runs them
        def __init__(self):
            self.n = 0

        def next_k(self):
            self.n += 1
            return 0 if self.n % 3 else 3

        def observe(self, result):
            pass

    proposer = make_proposer(base, drafter=drafter)
    eng = Engine(base, Request(prompt, max_tokens=24), proposer=proposer, policy=OnOff())
    assert [e.token for e in eng.run()] == plain
    assert eng.stats.plain_steps > 0 and eng.stats.rounds > 0
    assert_same_context(proposer.context_cache, fresh_context(base, drafter, eng.history), f"{family} plain steps")


def test_plain_steps_hand_features_over_in_batches():
    """While auto decodes plainly the drafter's context is not extended per token: the features wait and go
    in at most MAX_PENDING at a time (one drafter pass instead of one per token), and the context the next
    round reads equals a fresh one over the history."""
    from mlx_spec.proposers.block import MAX_PENDING

    base, drafter = pair("dense_keqv", "dflash")
    prompt = PROMPTS["short"]
    plain, _ = run(base, prompt, max_tokens=150)

    class LongPlainStretch:
        def __init__(self):
            self.n = 0

        def next_k(self):
            self.n += 1
            return 3 if self.n in (1, 140) else 0

        def observe(self, result):
            pass

    proposer = make_proposer(base, drafter=drafter)
    calls = []
    extend_context = drafter.extend_context
    drafter.extend_context = lambda f, c: (calls.append(f.shape[1]), extend_context(f, c))[1]
    try:
        eng = Engine(base, Request(prompt, max_tokens=150), proposer=proposer, policy=LongPlainStretch())
        assert [e.token for e in eng.run()] == plain
    finally:
        del drafter.extend_context
    assert eng.stats.plain_steps > 100 and eng.stats.rounds == 2
    assert max(calls) <= max(MAX_PENDING, len(prompt)) and len(calls) <= 10, \
        f"{len(calls)} context extensions for ~150 positions: the plain steps extended it one by one"
    assert_same_context(proposer.context_cache, fresh_context(base, drafter, eng.history), "after a plain stretch")


@pytest.mark.parametrize("family", ["dflash", "dspark"])
def test_a_reused_prompt_cache_reuses_the_context(family):
    """A chat's turns through Conversations: each turn equals a from-scratch run, the second turn reuses
    the base's K/V and the drafter's context with it, and stopping inside accepted drafts trims both."""
    from mlx_spec.conversation import Conversations
    from mlx_spec.sampling import SamplingParams

    base, drafter = pair("e2b", family)

    class Tok:
        eos_token_ids = []

        class detokenizer:
            last_segment = ""
            reset = add_token = finalize = staticmethod(lambda *a: None)

    conv = Conversations(base, Tok(), make_proposer(base, drafter=drafter))
    ids = list(PROMPTS["long"])
    for turn in range(3):
        t = conv.turn(Request(ids, sampling=SamplingParams(), max_tokens=11 + turn, num_draft_tokens=3))
        got = [r.token for r in t]
        want, _ = run(base, ids, max_tokens=11 + turn)
        assert got == want, f"{family} turn {turn}: equals a run from scratch"
        if turn:
            assert t.reused > 0, "the next turn reuses the kept K/V"
        slot = conv.prompt_cache.latest
        assert slot.proposer.context_length == slot.cache[0].offset, "context and base cache hold the same positions"
        assert_same_context(slot.proposer.context_cache, fresh_context(base, drafter, ids + got),
                            f"{family} turn {turn}")
        ids = ids + got + [7, 8, 9]


def test_a_shorter_block_is_its_own_input():
    """k drafts run a block of k+1 rows (DFlash) / k rows (DSpark), not the first rows of the full block."""
    base, drafter = pair("e2b", "dflash")
    proposer = DFlashProposer(drafter, base)
    history = PROMPTS["short"] + [11]
    proposer.start(history[:-1])
    _, _, feats = base.forward_layers(mx.array(history[:-1])[None], base.make_cache(), proposer.base_layers)
    proposer.extend(feats)
    mask = drafter.args.mask_token_id
    rows = lambda n: drafter.block_hidden(base.embed_scaled(mx.array([[11] + [mask] * n], mx.int32)),  # noqa: E731
                                          proposer.context_cache)
    assert not np.allclose(np.array(rows(2)), np.array(rows(7)[:, :3]), atol=1e-4), "bidirectional: the rows differ"
    from mlx_spec.proposers.base import RoundContext
    from mlx_spec.sampling import Sampler, SamplingParams

    ctx = RoundContext(history, len(history) - 1, None, [], Sampler(SamplingParams(), 0))
    draft = proposer.propose(ctx, 2)
    want = mx.argmax(drafter.softcap(base.head(rows(2)[0, 1:])), axis=-1)
    assert draft.tokens.tolist() == want.tolist(), "k=2 drafts come from the 3-row block"
    assert proposer.propose(ctx, 50).k == drafter.max_drafts, "never more drafts than the native block gives"
    assert isinstance(make_proposer(base, drafter=pair("e2b", "dspark")[1]), DSparkProposer)


@pytest.mark.parametrize("family", ["dflash", "dspark"])
def test_seeded_coupled_sampling_is_plain_sampling_for_any_k(family):
    """Drafts are drawn through the request's sampler at their own positions, so in the coupled mode a
    seeded run gives plain sampling's tokens whatever the block size (DSpark's Markov chain included)."""
    from mlx_spec.sampling import SamplingParams

    base, drafter = pair("e2b", family)
    sampling = SamplingParams(temp=0.9, top_k=20, acceptance="coupled")
    plain, _ = run(base, PROMPTS["long"], sampling=sampling, seed=5, max_tokens=30)
    for k in (1, 3, drafter.max_drafts):
        spec, _ = run(base, PROMPTS["long"], make_proposer(base, drafter=drafter), k=k, sampling=sampling, seed=5,
                      max_tokens=30)
        assert spec == plain, f"{family} k={k}: coupled seeded output must be plain sampling's"


def test_auto_sizes_the_block_with_the_cost_model():
    """The policy's k is the block's drafts: with verification about free, auto grows the block while the
    drafts are right (capped by the drafter's native block) and stays exact; with a drafter that never
    agrees it turns drafting off (plain steps, the context still in step)."""
    from mlx_spec.tuning.costs import Costs
    from mlx_spec.tuning.policy import AutoDraftPolicy

    base, drafter = pair("e2b", "dflash")
    prompt = PROMPTS["long"]
    plain, _ = run(base, prompt)
    cheap = Costs(verify=[1.0 + 0.01 * k for k in range(9)], draft_fixed=0.05, draft_step=0.01, plain_step_s=1e-3)
    right = Scripted(make_proposer(base, drafter=drafter), list(prompt) + plain, wrong_at=99)
    eng = Engine(base, Request(prompt, max_tokens=MAX_TOKENS), proposer=right, policy=AutoDraftPolicy(cheap))
    assert [e.token for e in eng.run()] == plain
    assert max(i + 1 for i, d in enumerate(eng.stats.drafted_by_position) if d) == drafter.max_drafts, \
        "all-correct drafts: auto reaches the native block"
    cpu = Costs(verify=[1.0 + 0.4 * k for k in range(9)], draft_fixed=0.2, draft_step=0.05, plain_step_s=1e-3)
    wrong = make_proposer(base, drafter=drafter)  # random weights: accepts ~nothing
    eng = Engine(base, Request(prompt, max_tokens=MAX_TOKENS), proposer=wrong, policy=AutoDraftPolicy(cpu))
    assert [e.token for e in eng.run()] == plain
    assert eng.stats.plain_steps > MAX_TOKENS // 2, "a drafter that never agrees: auto decodes plainly"
    assert_same_context(wrong.context_cache, fresh_context(base, drafter, eng.history), "auto-off")


def test_dspark_rejection_q_is_the_markov_conditional():
    """Rejection sampling divides by the distribution each draft was drawn from: for DSpark that is row j's
    logits plus the Markov bias of draft j-1 (the anchor for j = 0), filtered and tempered as the base's."""
    from mlx_spec.proposers.base import RoundContext
    from mlx_spec.sampling import Sampler, SamplingParams

    base, drafter = pair("e2b", "dspark")
    head = drafter.markov_head.markov_w2
    head.weight = head.weight * 40  # a bias that matters
    proposer = make_proposer(base, drafter=drafter)
    history = PROMPTS["short"] + [11]
    proposer.start(history[:-1])
    proposer.extend(base.forward_layers(mx.array(history[:-1])[None], base.make_cache(), proposer.base_layers)[2])
    sampler = Sampler(SamplingParams(temp=1.3, top_k=5, acceptance="rejection"), 7)
    draft = proposer.propose(RoundContext(history, len(history) - 1, None, [], sampler), 4)
    block = mx.array([[11] + [drafter.args.mask_token_id] * 3], mx.int32)
    logits = drafter.block_logits(drafter.block_hidden(drafter.embed(block), proposer.context_cache)[0])
    previous = [11] + draft.tokens.tolist()[:-1]
    want = mx.stack([sampler.probs(logits[j] + drafter.markov_bias(mx.array([previous[j]]))[0]) for j in range(4)])
    assert np.allclose(np.array(draft.probs), np.array(want), atol=1e-5), "q_j: the Markov conditional on d_{j-1}"
    head.weight = head.weight / 40



@pytest.mark.parametrize("family", ["dflash", "dspark"])
def test_quantized_kv_with_a_switch_mid_prompt_stays_exact(family):
    """--kv-bits with a block drafter, on the trained tiny base (head dims 32/64, window 32): the base's pass
    that straddles --quantized-kv-start is split there, and the features captured on both sides reach the
    drafter in step; output == plain with the same quantized cache, past the window, at several k."""
    from conftest import TINY_CODE
    from tiny_models import dspark_config

    from mlx_spec import load, load_drafter
    from mlx_spec.cache import KVQuant

    base, tokenizer = load(str(TINY_CODE / "base"))
    if family == "dflash":
        drafter = load_drafter(str(TINY_CODE / "dflash"), base)
    else:
        drafter = make_block_drafter(dspark_config(base, block_size=5, markov_rank=8), seed=3)
    prompt = tokenizer.encode("import os\n\n\ndef walk(root):\n    for name in sorted(os.listdir(root)):\n")
    kv = KVQuant(bits=8, group_size=32, start=len(prompt) // 2)  # the switch falls inside the prompt
    plain, _ = run(base, prompt, kv=kv, max_tokens=48)
    assert len(prompt) + len(plain) > 2 * 32, "past the sliding window"
    for k in (1, 3, drafter.max_drafts):
        proposer = make_proposer(base, drafter=drafter)
        spec, eng = run(base, prompt, proposer, k=k, kv=kv, max_tokens=48)
        assert spec == plain, f"{family} k={k} kv_bits=8: speculative greedy must equal plain greedy"
        assert eng.stats.rounds > 0 and all(c.quantized for c in eng.cache)
        want = fresh_context(base, drafter, eng.history, kv)
        assert_same_context(proposer.context_cache, want, f"{family} k={k}")


def test_auto_never_weighs_more_drafts_than_the_block_has(tmp_path):
    """A block of B rows gives at most B - 1 drafts a round: the tuner's policy (chains and trees) weighs k up
    to that, so with verification about free and every draft right it asks the block's drafts, never more
    (asking more would count rounds at a k that was never drafted)."""
    from mlx_spec.tuning import AutoTuner
    from mlx_spec.tuning.costs import Costs
    from mlx_spec.tuning.store import CostsStore

    base, drafter = pair("e2b", "dflash")
    proposer = make_proposer(base, drafter=drafter)
    cheap = Costs(verify=[1.0 + 0.01 * k for k in range(17)], draft_fixed=0.05, draft_step=0.01, plain_step_s=1e-3)
    store = CostsStore(tmp_path / "tuning.json", measure=lambda *a, **kw: cheap)
    policy = AutoTuner(store).policy(base, proposer)
    assert drafter.max_drafts < 16 and policy.k_max == drafter.max_drafts, "auto's k stops at the block's drafts"
    for _ in range(20):
        assert policy.next_k() <= drafter.max_drafts, "auto asked more drafts than a block can give"
