"""Draft-model speculation on tiny random mlx-lm models: speculative == plain, token for token.

Pairs: the base as its own draft (every draft accepted), a noisy copy of the base (partial acceptance,
so rollbacks of every length happen) and an unrelated model (almost nothing accepted). Layouts: full
attention, llama with a sliding-window layer and gemma3_text, both with window 8 and contexts far past it,
so the caches roll back after their window has wrapped.
"""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import gemma3_text, llama

from mlx_spec.engine import Engine
from mlx_spec.sampling import SamplingParams
from mlx_spec.proposers.base import RoundResult
from mlx_spec.errors import PairingError
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.draft_model import DraftModelProposer
from mlx_spec.request import Request

VOCAB = 96
WINDOW = 8
PROMPT = [3, 17, 42, 5, 88, 9, 61, 23, 7, 50, 11, 74]  # longer than the window
MAX_TOKENS = 40
# weight noise for the "noisy copy" draft: about half its drafts accepted (gemma3's embedding scale makes
# it more sensitive)
NOISE = {"llama": 0.15, "llama_sliding": 0.15, "gemma3_text": 0.05}


def tiny(kind: str, seed: int, vocab: int = VOCAB):
    mx.random.seed(seed)
    if kind == "gemma3_text":  # layer 0 sliding, layer 1 global
        args = gemma3_text.ModelArgs(
            model_type="gemma3_text", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
            vocab_size=vocab, sliding_window=WINDOW, sliding_window_pattern=2)
        model = gemma3_text.Model(args)
    else:
        layers = ["sliding_attention", "full_attention"] if kind == "llama_sliding" else None
        args = llama.ModelArgs(
            model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
            layer_types=layers, sliding_window=WINDOW if layers else None, tie_word_embeddings=False)
        model = llama.Model(args)
    model.eval()
    mx.eval(model.parameters())
    return model  # lm_head untied: a tied tiny model just repeats its input token


def noisy_copy(model, kind: str, seed: int, scale: float):
    """The same architecture with weights w + scale·std(w)·noise: a draft that agrees often, not always."""
    copy = tiny(kind, seed)
    mx.random.seed(seed)
    params = tree_map(lambda w: w + scale * mx.std(w) * mx.random.normal(w.shape), model.parameters())
    copy.update(params)
    mx.eval(copy.parameters())
    return copy


class FixedK:
    """A draft policy that always asks for k (0 on the rounds in `skip`) and records (k, n_accepted)."""

    def __init__(self, k: int, skip=()):
        self.k, self.skip, self.rounds = k, set(skip), []

    def next_k(self) -> int:
        return 0 if len(self.rounds) in self.skip else self.k

    def observe(self, result: RoundResult) -> None:
        self.rounds.append((result.drafted, result.accepted))


def generate(model, proposer=None, k=3, policy=None, max_tokens=MAX_TOKENS, seed=0, **sampling):
    eng = Engine(model, Request(PROMPT, sampling=SamplingParams(**sampling), max_tokens=max_tokens, seed=seed),
                 proposer=proposer, policy=policy or FixedK(k))
    return [ev.token for ev in eng.run()], eng


_cache = {}


def models(kind: str):
    """(base, noisy draft, unrelated draft, plain greedy output), built once per layout."""
    if kind not in _cache:
        base = tiny(kind, seed=0)
        plain, _ = generate(base)
        _cache[kind] = (base, noisy_copy(base, kind, seed=1, scale=NOISE[kind]), tiny(kind, seed=2), plain)
    return _cache[kind]


@pytest.mark.parametrize("kind", ["llama", "llama_sliding", "gemma3_text"])
@pytest.mark.parametrize("k", range(1, 9))
def test_self_draft_accepts_every_draft(kind, k):
    base, _, _, plain = models(kind)
    policy = FixedK(k)
    out, eng = generate(base, DraftModelProposer(base, base), k, policy)
    assert out == plain, "speculative greedy output equals plain greedy output"
    # first token comes from the prefill; each round drafts min(k, tokens left - 1) and keeps them all
    # (a round left with no room to draft asks the proposer nothing, so the policy learns nothing from it)
    expected, emitted = [], 1
    while emitted < MAX_TOKENS:
        kk = min(k, MAX_TOKENS - emitted - 1)
        if kk:
            expected.append((kk, kk))
        emitted += kk + 1
    assert policy.rounds == expected, "a model drafting for itself has every draft accepted (tau = k + 1)"
    verified = [kk for kk, _ in expected]
    assert eng.stats.tau == pytest.approx(sum(kk + 1 for kk in verified) / len(verified))


@pytest.mark.parametrize("kind", ["llama", "llama_sliding", "gemma3_text"])
def test_greedy_equals_plain_for_every_k(kind):
    base, noisy, unrelated, plain = models(kind)
    accepted = drafted = 0
    for k in range(1, 9):
        for draft in (noisy, unrelated):
            out, eng = generate(base, DraftModelProposer(draft, base), k)
            assert out == plain, f"speculative == plain (k={k}, {'noisy' if draft is noisy else 'unrelated'} draft)"
            if draft is noisy:
                accepted, drafted = accepted + eng.stats.accepted, drafted + eng.stats.drafted
    assert 0 < accepted < drafted, "the noisy draft is partly accepted, so rollbacks of many lengths ran"


def test_rounds_without_drafts_keep_the_draft_cache_in_step():
    base, noisy, _, plain = models("llama_sliding")
    out, _ = generate(base, DraftModelProposer(noisy, base), 4, FixedK(4, skip={0, 2, 3, 7}))
    assert out == plain, "rounds with k=0 leave history the draft model catches up on next round"


def test_draft_cache_holds_exactly_the_kept_prefix():
    base, noisy, _, _ = models("llama_sliding")
    proposer = DraftModelProposer(noisy, base)
    out, eng = generate(base, proposer, 5, max_tokens=25)
    assert proposer.cache[0].offset == proposer.consumed <= len(eng.history) - 1, \
        "after observe the draft cache holds a prefix of the history, never a rejected draft"


@pytest.mark.parametrize("acceptance", ["rejection", "match"])
def test_sampling_with_a_seed_is_valid_and_reproducible(acceptance):
    base, noisy, _, _ = models("llama_sliding")
    params = dict(temp=0.8, top_p=0.95, acceptance=acceptance)
    a, eng = generate(base, DraftModelProposer(noisy, base), 4, seed=7, **params)
    b, _ = generate(base, DraftModelProposer(noisy, base), 4, seed=7, **params)
    assert len(a) == MAX_TOKENS and all(0 <= t < VOCAB for t in a), "sampled tokens are ids of the vocabulary"
    assert a == b, "the same seed reproduces the same sampled output"
    if acceptance == "rejection":  # token match accepts sum(p*q): rare over a near-uniform tiny vocabulary
        assert eng.stats.accepted > 0, "a close draft model has drafts accepted when sampling too"


def resized_copy(model, vocab: int):
    """The base with its vocabulary cut to `vocab` ids, or padded to it with rows whose huge logits would
    win every argmax if the proposer let ids the base lacks through."""
    copy = tiny("llama", seed=0, vocab=vocab)
    params = dict(tree_flatten(model.parameters()))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = params[name]
        if vocab <= w.shape[0]:
            params[name] = w[:vocab]
        else:
            params[name] = mx.concatenate([w, 100.0 * mx.ones((vocab - w.shape[0], w.shape[1]))])
    copy.load_weights(list(params.items()))
    mx.eval(copy.parameters())
    return copy


def test_draft_vocabulary_padded_beyond_the_base_never_drafts_the_padding():
    base, _, _, plain = models("llama")
    out, eng = generate(base, DraftModelProposer(resized_copy(base, VOCAB + 16), base), 3)
    assert out == plain, "speculative == plain when the draft's vocabulary is padded further"
    assert eng.stats.accepted == eng.stats.drafted, "with the padding masked the draft is the base itself"
    sampled, _ = generate(base, DraftModelProposer(resized_copy(base, VOCAB + 16), base), 3, seed=3, temp=1.0)
    assert all(0 <= t < VOCAB for t in sampled), "sampled drafts stay inside the base's vocabulary"


def test_draft_vocabulary_smaller_than_the_base_gives_missing_ids_probability_zero():
    base, _, _, plain = models("llama")
    small = VOCAB - 16
    assert any(t >= small for t in plain), "the base emits ids the small draft lacks"
    out, eng = generate(base, DraftModelProposer(resized_copy(base, small), base), 3)
    assert out == plain, "speculative == plain when the draft's vocabulary is smaller"
    assert 0 < eng.stats.accepted < eng.stats.drafted, "drafts are accepted except where the base needs a missing id"
    sampled, eng = generate(base, DraftModelProposer(resized_copy(base, small), base), 3, seed=3, temp=1.0)
    assert len(sampled) == MAX_TOKENS and all(0 <= t < VOCAB for t in sampled)


def test_unrelated_vocabularies_raise_pairing_error():
    base, _, _, _ = models("llama")
    with pytest.raises(PairingError, match="do not share"):
        DraftModelProposer(tiny("llama", seed=0, vocab=VOCAB + 4096), base)


def test_make_proposer_builds_a_draft_model_proposer():
    base, noisy, _, plain = models("llama")
    proposer = make_proposer(base, draft_model=noisy)
    assert isinstance(proposer, DraftModelProposer)
    out, _ = generate(base, proposer, 3)
    assert out == plain


def test_trained_gemma4_base_drafting_for_itself():
    """Our Gemma 4 model (hidden-state forward, its own sliding caches) works as a draft model too."""
    from pathlib import Path

    from mlx_spec import load

    model, tokenizer = load(str(Path(__file__).parent / "fixtures" / "gemma4-tiny-code" / "base"))
    ids = tokenizer.encode("def fibonacci(n):\n")
    plain = [ev.token for ev in Engine(model, Request(ids, max_tokens=48)).run()]
    eng = Engine(model, Request(ids, max_tokens=48), proposer=DraftModelProposer(model, model), policy=FixedK(4))
    assert [ev.token for ev in eng.run()] == plain, "speculative == plain with a Gemma 4 draft model"
    assert eng.stats.accepted == eng.stats.drafted, "a model drafting for itself has every draft accepted"



@pytest.mark.parametrize("kind", ["llama", "llama_sliding"])
@pytest.mark.parametrize("stop_early", [False, True])
def test_a_next_request_reuses_the_draft_cache_up_to_the_common_prefix(kind, stop_early, monkeypatch):
    """A chat's next turn repeats the conversation: start() keeps what the cache holds of it (also after a
    request stopped mid-round) and leaves the cache as a fresh prefill would, so drafts and output are the
    same as with a fresh proposer."""
    base, noisy, _, _ = models(kind)
    reused = DraftModelProposer(noisy, base)
    events = Engine(base, Request(PROMPT, max_tokens=MAX_TOKENS), proposer=reused, policy=FixedK(4)).run()
    first = [ev.token for _, ev in zip(range(7 if stop_early else MAX_TOKENS), events)]
    events.close()  # stopping early leaves a queued round's drafts in the draft cache
    turn2 = PROMPT + first + [5, 9, 13]
    known = min(reused.consumed, len(PROMPT) + len(first))  # the cache trails the history by at most a round
    assert known >= len(PROMPT) + len(first) - 5
    forwarded = []
    real_forward = reused.base.forward
    monkeypatch.setattr(reused.base, "forward", lambda t, c: forwarded.append(t.shape[1]) or real_forward(t, c))
    reused.start(turn2)
    monkeypatch.setattr(reused.base, "forward", real_forward)
    assert sum(forwarded) == len(turn2) - known and reused.consumed == len(turn2), "only the new tokens run"
    fresh = DraftModelProposer(noisy, base)
    fresh.start(turn2)
    for a, b in zip(reused.cache, fresh.cache):
        assert a.offset == b.offset
        for x, y in zip(a.drafter_view(), b.drafter_view()):  # all positions (full), the window + 1 (sliding)
            assert x.shape == y.shape and mx.allclose(x, y, atol=1e-5).item()
    outs = []
    for proposer in (reused, fresh):
        e = Engine(base, Request(turn2, max_tokens=30), proposer=proposer, policy=FixedK(4))
        outs.append(([ev.token for ev in e.run()], e.stats.accepted))
    plain = [ev.token for ev in Engine(base, Request(turn2, max_tokens=30)).run()]
    assert outs[0] == outs[1] and outs[0][0] == plain, "same drafts accepted, output = plain"


def test_an_unrelated_next_prompt_starts_the_draft_cache_over():
    base, noisy, _, _ = models("llama")
    proposer = DraftModelProposer(noisy, base)
    generate(base, proposer, 3, max_tokens=10)
    other = [7, 7, 7, 1, 2, 3]
    proposer.start(other)
    assert proposer.consumed == len(other) and proposer.cache[0].offset == len(other)


def test_a_rollback_past_the_sliding_window_starts_the_draft_cache_over():
    """Keeping only the first 5 tokens would need the sliding layer's dropped positions: start over, and
    the cache is then what a fresh prefill gives."""
    base, noisy, _, _ = models("llama_sliding")
    proposer = DraftModelProposer(noisy, base)
    generate(base, proposer, 3)
    prompt = PROMPT[:5] + [8, 6, 4, 2]
    proposer.start(prompt)
    fresh = DraftModelProposer(noisy, base)
    fresh.start(prompt)
    for a, b in zip(proposer.cache, fresh.cache):
        for x, y in zip(a.drafter_view(), b.drafter_view()):
            assert x.shape == y.shape and mx.allclose(x, y).item()


def test_a_path_given_as_draft_model_is_one_clear_error():
    """draft_model= takes a loaded model: a path says how to load it, not an AttributeError from inside."""
    from mlx_spec.proposers import make_proposer

    with pytest.raises(ValueError, match=r"draft_model= takes a loaded model.*mlx_spec.load"):
        make_proposer(object(), draft_model="some/dir")
