"""EAGLE-3 drafters (Speculators layout) in the engine: speculative greedy == plain greedy past the sliding
window for every layout option and several k; the drafter's context always equals one built from scratch over
the accepted history (its waiting features and taken-in entries roll back as one cache); a round's drafts
are what the training-time unroll computes for the same steps; sampling keeps the base's distribution with
q over the reduced vocabulary placed into the base's."""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from eagle3_checkpoints import eagle3_config, eagle3_weights
from tiny_models import WINDOW, engine, make_base

from mlx_spec.engine import Engine
from mlx_spec.models.gemma4_eagle3 import Model, ModelArgs
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.base import Draft, RoundContext
from mlx_spec.proposers.eagle3 import MAX_PENDING, Eagle3Proposer
from mlx_spec.sampling import Sampler, SamplingParams
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request

MAX_TOKENS = 3 * WINDOW
PROMPTS = {"short": [2, 17, 33, 4, 90], "long": [2] + [(i * 37) % 250 + 3 for i in range(2 * WINDOW + 3)]}
FAMILIES = {  # aux ids fit a 4-layer base: id 3 reads the last readable layer, 0 the embedding
    "llama_reduced_vocab": dict(aux=(1, 2, 3), draft_vocab=128),
    "qwen3_two_layers_norm_output": dict(kind="qwen3", layers=2, aux=(1, 3), norm_before_residual=False,
                                         norm_output=True),
    "norm_before_fc_unsorted_ids": dict(aux=(3, 1, 2), draft_vocab=200, norm_before_fc=True),
    "fc_norm_embedding": dict(aux=(0, 2, 3), draft_vocab=96, fc_norm=True),
}
_cache = {}


def make_eagle3(base, seed: int = 7, targets=None, **options) -> Model:
    """An EAGLE-3 drafter for `base` with random weights (its embedding: the base's table, as trained)."""
    config = eagle3_config({"hidden_size": base.args.hidden_size, "vocab_size": base.args.vocab_size}, **options)
    drafter = Model(ModelArgs.from_dict(config))
    weights = eagle3_weights(config, base.model.embed_tokens.weight, seed, targets)
    drafter.load_weights(list(drafter.sanitize(weights).items()))
    mx.eval(drafter.parameters())
    return drafter


def pair(variant: str, family: str):
    key = (variant, family)
    if key not in _cache:
        base = _cache.get(variant) or make_base(variant)
        _cache[variant] = base
        _cache[key] = (base, make_eagle3(base, **FAMILIES[family]))
    return _cache[key]


def run(model, prompt, proposer=None, k=3, max_tokens=MAX_TOKENS, **kw):
    eng = engine(model, prompt, proposer=proposer, policy=FixedK(k), max_tokens=max_tokens, **kw)
    return [ev.token for ev in eng.run()], eng


class Scripted:
    """Runs the real proposer every round (so its context is used, and checked by propose), but offers the known
    plain continuation with draft `wrong_at` corrupted, so rounds accept min(wrong_at, k)."""

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
        real = self.inner.propose(ctx, k)
        nxt = self.full[len(ctx.history): len(ctx.history) + real.k]
        drafts = [(t + 1) % 256 if i == self.wrong_at else t for i, t in enumerate(nxt)]
        return Draft(mx.array(drafts, mx.int32) + 0 * real.tokens[: len(drafts)])

    def observe(self, result):
        self.inner.observe(result)

    def fork(self):
        return self


def assert_fresh_context(proposer, base, history, where, kv=None):
    """The proposer's context equals one built in one pass over history (features of history[:-1], each
    with its next token, from a base cache quantized as `kv` says), entry for entry, in every drafter layer."""
    context = proposer.context_cache[0]
    drafter = proposer.drafter
    assert context.offset == len(history) - 1 and context.waiting == 0, \
        f"{where}: the context covers {context.offset} positions ({context.waiting} waiting), not history[:-1]"
    cache = base.make_cache(**kv.as_dict()) if kv is not None else base.make_cache()
    _, _, features = base.forward_layers(mx.array(history[:-1])[None], cache, proposer.base_layers)
    want = drafter.make_cache()
    drafter.context(features, mx.array([history[1:]]), want)
    for i, (g, w) in enumerate(zip(context.caches, want)):
        (gk, gv), (wk, wv) = g.keys_and_values(), w.keys_and_values()
        same = np.allclose(np.array(gk), np.array(wk), atol=1e-5) and np.allclose(np.array(gv), np.array(wv), atol=1e-5)
        assert same, f"{where}: layer {i} context K/V differ from a fresh pass over the accepted history"


SLOW = pytest.mark.slow  # the default run keeps every family on the e2b base and one on the 31B-like one


@pytest.mark.parametrize("variant, family", [("e2b", f) for f in FAMILIES] + [("dense_keqv", "llama_reduced_vocab")] +
                         [pytest.param("dense_keqv", f, marks=SLOW) for f in list(FAMILIES)[1:]])
def test_greedy_equals_plain_past_the_window(variant, family):
    base, drafter = pair(variant, family)
    for name, prompt in PROMPTS.items():
        plain, _ = run(base, prompt)
        for k in (1, 3, 6):
            spec, eng = run(base, prompt, make_proposer(base, drafter=drafter), k=k)
            assert spec == plain, f"{family} k={k} {variant}/{name}: speculative greedy must equal plain greedy"
            assert eng.stats.rounds > 0


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("k", [2, 5])
def test_context_follows_the_accepted_history_exactly(family, k):
    """Rounds that accept some drafts and reject the rest: the context then equals a fresh one over the accepted
    history; a slip of one position (a rejected draft kept, a token paired with the wrong features, a RoPE
    offset off by one, a draft step left in the cache) would change it."""
    base, drafter = pair("e2b", family)
    prompt = PROMPTS["long"]
    plain, _ = run(base, prompt)
    proposer = Scripted(make_proposer(base, drafter=drafter), list(prompt) + plain, wrong_at=k // 2)
    spec, eng = run(base, prompt, proposer, k=k)
    assert spec == plain
    assert 0 < eng.stats.accepted < eng.stats.drafted, "rounds must accept and reject"
    assert_fresh_context(proposer.inner, base, eng.history, f"{family} k={k}")


def test_rollback_drops_waiting_features_first_and_is_checked():
    from mlx_spec.errors import CacheRollbackError

    base, drafter = pair("e2b", "llama_reduced_vocab")
    proposer = make_proposer(base, drafter=drafter)
    history = PROMPTS["long"]
    proposer.start(history[:20])
    _, _, feats = base.forward_layers(mx.array(history[:24])[None], base.make_cache(), proposer.base_layers)
    proposer.extend(feats)  # 24 positions; ids known for 19 of them (their next token is in the prompt)
    context = proposer.context_cache[0]
    assert (context.taken, context.waiting) == (19, 5), "entries whose next token is known are taken in"
    context.rollback(3)
    assert (context.taken, context.waiting) == (19, 2), "a rollback gives back waiting features first"
    context.rollback(4)
    assert (context.taken, context.waiting) == (17, 0) and context.seed is None
    with pytest.raises(CacheRollbackError):
        context.rollback(18)
    proposer.extend(feats[:, 17:21])
    proposer.propose(RoundContext(history[:22], 21, None, [], Sampler(SamplingParams(), 0)), 3)
    assert_fresh_context(proposer, base, history[:22], "after rolling back into the taken entries and a round")


def test_a_reused_prompt_cache_reuses_the_context():
    """A chat's turns through Conversations: each turn equals a run from scratch, the next turn reuses the base's
    K/V and the drafter's context with it (an entry is kept only while the token after it is unchanged)."""
    from mlx_spec.conversation import Conversations

    base, drafter = pair("e2b", "llama_reduced_vocab")

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
        assert got == want, f"turn {turn}: equals a run from scratch"
        if turn:
            assert t.reused > 0, "the next turn reuses the kept K/V"
        slot = conv.prompt_cache.latest
        assert slot.proposer.context_length == slot.cache[0].offset, "context and base cache hold the same positions"
        assert_fresh_context(slot.proposer, base, ids + got, f"turn {turn}")
        ids = ids + got + [7, 8, 9]


def test_prefill_chunks_and_strict_padding_keep_the_context_in_step():
    """Each prefill chunk takes in the positions whose next id the prompt holds; strict mode pads every pass:
    the context still follows the base's positions exactly."""
    base, drafter = pair("dense_keqv", "qwen3_two_layers_norm_output")
    prompt = PROMPTS["long"]
    plain, _ = run(base, prompt, max_tokens=24)
    for kw in ({"prefill_step": 5}, {"prefill_step": 17}, {"strict_rows": 9}):
        proposer = make_proposer(base, drafter=drafter)
        spec, eng = run(base, prompt, proposer, k=4, max_tokens=24, **kw)
        assert spec == plain, f"{kw}: must equal plain"
        assert_fresh_context(proposer, base, eng.history, f"{kw}")


def test_quantized_kv_with_a_switch_mid_prompt_stays_exact(trained_pair):
    """--kv-bits on the trained tiny base (head dims 32/64, window 32): the base's pass that straddles
    --quantized-kv-start is split there and both sides' features reach the context in step."""
    from mlx_spec.cache import KVQuant

    base, tokenizer, _ = trained_pair
    drafter = make_eagle3(base, aux=(1, 2, 3), draft_vocab=1024, intermediate=128)
    prompt = tokenizer.encode("import os\n\n\ndef walk(root):\n    for name in sorted(os.listdir(root)):\n")
    kv = KVQuant(bits=8, group_size=32, start=len(prompt) // 2)
    plain, _ = run(base, prompt, kv=kv, max_tokens=48)
    assert len(prompt) + len(plain) > 2 * 32, "past the sliding window"
    for k in (1, 4):
        proposer = make_proposer(base, drafter=drafter)
        spec, eng = run(base, prompt, proposer, k=k, kv=kv, max_tokens=48)
        assert spec == plain and all(c.quantized for c in eng.cache), f"k={k} kv_bits=8: speculative == plain"
        assert_fresh_context(proposer, base, eng.history, f"k={k} kv_bits=8", kv)


def test_plain_steps_hand_features_over_in_batches():
    """While auto decodes plainly, features wait and are taken in MAX_PENDING at a time (one drafter pass, not
    one per token), and the next round reads a context equal to a fresh one."""
    base, drafter = pair("dense_keqv", "llama_reduced_vocab")
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
    context = drafter.context
    drafter.context = lambda f, t, c: (calls.append(f.shape[1]), context(f, t, c))[1]
    try:
        eng = Engine(base, Request(prompt, max_tokens=150), proposer=proposer, policy=LongPlainStretch())
        assert [e.token for e in eng.run()] == plain
    finally:
        del drafter.context
    assert eng.stats.plain_steps > 100 and eng.stats.rounds == 2
    assert max(calls) <= MAX_PENDING and len(calls) <= 10, \
        f"{len(calls)} context passes for ~150 positions: the plain steps took features in one by one"
    assert_fresh_context(proposer, base, eng.history, "after a plain stretch")


def test_the_cost_probe_drafts_after_restarting_on_the_same_ids():
    """The tuner's probe (auto k) calls start(history[:-1]) and then proposes after the same history, again and
    again: the context's newest entry (paired with the id the prompt stops before) must stay."""
    from mlx_spec.tuning.probe import measure_drafting

    base, drafter = pair("e2b", "llama_reduced_vocab")
    times = measure_drafting(base, make_proposer(base, drafter=drafter), [1, 3], reps=2, context=40)
    assert set(times) == {1, 3} and all(t >= 0 for t in times.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_drafts_are_the_training_time_unroll(family):
    """Cached == uncached: the drafts of a round after every position equal the argmax of `unroll` fed the same
    drafts (all positions at once, each step seeing the context up to its row and its own earlier steps)."""
    base, drafter = pair("e2b", family)
    history, k = PROMPTS["long"][:22], 4
    proposer = Eagle3Proposer(drafter, base)
    _, _, feats = base.forward_layers(mx.array(history)[None], base.make_cache(), proposer.base_layers)
    drafts = []
    for p in range(1, len(history)):  # the round after position p: context 0..p-1, bonus token history[p]
        proposer.reset()
        proposer.start(history[:p])
        proposer.extend(feats[:, :p])
        ctx = RoundContext(history[: p + 1], p, None, [], Sampler(SamplingParams(), 0))
        drafts.append(proposer.propose(ctx, k).tokens.tolist())
    drafts = mx.array(drafts)  # (S, k): row j is the round after position j + 1
    S = drafts.shape[0]
    logits = drafter.unroll(feats[:, :S], mx.array([history[1 : S + 1]]), k, [drafts[:, s][None] for s in range(k - 1)])
    assert logits.shape == (k, S, drafter.args.draft_vocab_size)
    want = proposer.targets[mx.argmax(logits, axis=-1)].T  # (S, k), in the base's vocabulary
    assert want.tolist() == drafts.tolist(), f"{family}: the proposer's drafts must be the unroll's"


def test_seeded_coupled_sampling_is_plain_sampling_for_any_k():
    """Drafts are drawn through the request's sampler at their own positions from the reduced vocabulary placed
    into the base's, so in the coupled mode a seeded run gives plain sampling's tokens for every k."""
    base, drafter = pair("e2b", "llama_reduced_vocab")
    sampling = SamplingParams(temp=0.9, top_k=20, acceptance="coupled")
    plain, _ = run(base, PROMPTS["long"], sampling=sampling, seed=5, max_tokens=30)
    for k in (1, 3, 6):
        spec, _ = run(base, PROMPTS["long"], make_proposer(base, drafter=drafter), k=k, sampling=sampling, seed=5,
                      max_tokens=30)
        assert spec == plain, f"k={k}: coupled seeded output must be plain sampling's"


def test_q_is_the_draft_distribution_in_the_base_vocabulary():
    """Rejection sampling divides by q: each draft's distribution over the base's vocabulary, zero outside the
    draft vocabulary, the drafter's logits (filtered and tempered as the base's) at the mapped ids."""
    base, drafter = pair("e2b", "llama_reduced_vocab")
    proposer = make_proposer(base, drafter=drafter)
    history = PROMPTS["short"] + [11]
    proposer.start(history[:-1])
    proposer.extend(base.forward_layers(mx.array(history[:-1])[None], base.make_cache(), proposer.base_layers)[2])
    sampler = Sampler(SamplingParams(temp=1.3, top_k=5, acceptance="rejection"), 7)
    draft = proposer.propose(RoundContext(history, len(history) - 1, None, [], sampler), 3)
    q = np.array(draft.probs)
    targets = np.array(proposer.targets)
    outside = np.setdiff1d(np.arange(base.args.vocab_size), targets)
    assert q.shape == (3, base.args.vocab_size) and np.allclose(q.sum(-1), 1, atol=1e-5)
    assert np.all(q[:, outside] == 0), "no mass outside the draft vocabulary"
    assert all(q[i, t] > 0 for i, t in enumerate(draft.tokens.tolist())), "each draft is drawn from its q"
    first = np.array(sampler.probs(drafter.logits(proposer._context.seed)[0, -1]))  # over draft ids
    assert np.allclose(q[0, targets], first, atol=1e-5), "q_0 is the first step's distribution, mapped through d2t"


def _sample_counts(model, prompt, sampling, make=None, n=400):
    """(counts of tokens 2-3, drafts accepted) over n seeds: tokens 2-3 come from one speculative round."""
    out, accepted = Counter(), 0
    for seed in range(n):
        eng = Engine(model, Request(prompt, sampling=sampling, max_tokens=3, seed=seed + (10_000 if make else 0)),
                     proposer=make() if make else None, policy=FixedK(2))
        out[tuple(e.token for e in eng.run())[1:]] += 1
        accepted += eng.stats.accepted
    return out, accepted


def fit_head(drafter, model, prompt, targets, noise: float, seed: int = 0) -> None:
    """Give the drafter an lm_head fitted (least squares) to the base's logits at its draft ids, plus N(0, noise)
    in every state a round after `prompt` visits (each of the base's likely first tokens, then one draft step
    with each of the base's likely drafts), so its drafts are right often but not always."""
    from mlx_spec.cache import rollback_all

    rng = np.random.default_rng(seed)
    layers = Eagle3Proposer(drafter, model).base_layers
    logits = lambda ids: model.forward(mx.array([ids]), model.make_cache())[0][0, -1]  # noqa: E731
    _, _, features = model.forward_layers(mx.array([prompt]), model.make_cache(), layers)
    states, wanted = [], []
    for first in np.argsort(-np.array(logits(prompt)))[:5].tolist():
        caches = drafter.make_cache()
        h = drafter.context(features, mx.array([prompt[1:] + [first]]), caches)[:, -1:]
        after = np.array(logits(prompt + [first]))
        states.append(drafter.norm(h)[0, 0])
        wanted.append(after[targets])
        for draft in np.argsort(-after)[:5].tolist():
            h1 = drafter.run(mx.array([[draft]]), drafter.feedback(h), caches)
            rollback_all(caches, 1)
            states.append(drafter.norm(h1)[0, 0])
            wanted.append(np.array(logits(prompt + [first, draft]))[targets])
    X, Y = np.array(mx.stack(states)), np.array(wanted)
    W = np.linalg.lstsq(X, Y + noise * rng.standard_normal(Y.shape), rcond=None)[0]  # (H, Vd)
    drafter.lm_head.weight = mx.array(W.T.astype(np.float32))


def test_rejection_sampling_keeps_the_base_distribution(trained_pair):
    """Chi-square, as tests/test_sampling_distribution.py, on the trained tiny base with rejection sampling: a
    drafter whose head is fitted to the base's logits there (plus noise), over a reduced vocabulary (the
    tokens plain sampling produced and as many others), so rounds both accept and reject. A q that is not
    the distribution the draft was drawn from (placed at the draft ids, not their token ids) fails it (checked
    when the test was written: chi2 55 on 19 dof vs a 99.9% bound of 44; this drafter accepts 272 of 800)."""
    from test_sampling_distribution import PROMPT_TEXT, SAMPLING, chi2_bound, two_sample_chi2

    model, tokenizer, _ = trained_pair
    prompt = tokenizer.encode(PROMPT_TEXT)
    plain, _ = _sample_counts(model, prompt, SamplingParams(**SAMPLING))
    seen = sorted({t for key in plain for t in key})
    others = np.random.default_rng(0).choice(np.setdiff1d(np.arange(model.args.vocab_size), seen), len(seen), False)
    targets = sorted(seen + others.tolist())
    drafter = make_eagle3(model, aux=(1, 2, 3), draft_vocab=len(targets), targets=targets, intermediate=128, seed=3)
    fit_head(drafter, model, prompt, targets, noise=1.0)
    spec, accepted = _sample_counts(model, prompt, SamplingParams(**SAMPLING, acceptance="rejection"),
                                    lambda: make_proposer(model, drafter=drafter))
    assert 200 < accepted < 700, f"{accepted} of 800 drafts accepted: the test needs rounds that accept and reject"
    stat, dof = two_sample_chi2(plain, spec)
    assert stat < chi2_bound(dof), f"chi2 {stat:.1f} on {dof} dof: the distribution moved"
