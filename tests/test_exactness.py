"""Speculative greedy output == plain greedy output, token for token, for every proposer, k and variant,
with prompts shorter and longer than the sliding window and generations that cross it many times."""

import mlx.core as mx
import pytest
from tiny_models import WINDOW, engine, make_base, make_drafter

from mlx_spec.engine import Engine
from mlx_spec.sampling import SamplingParams
from mlx_spec.tuning import FixedK
from mlx_spec.proposers.base import Draft
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.proposers.ngram import NgramProposer
from mlx_spec.request import Request

MAX_TOKENS = 4 * WINDOW  # crosses the window several times
PROMPTS = {"short": [2, 17, 33, 4, 90], "long": [2] + [(i * 37) % 250 + 3 for i in range(3 * WINDOW)]}
_models = {}


def base(variant):
    if variant not in _models:
        m = make_base(variant)
        _models[variant] = (m, make_drafter(m, "dense" if variant == "dense_keqv" else "centroid"))
    return _models[variant]


def run(model, prompt, proposer=None, k=3, max_tokens=MAX_TOKENS, **kw):
    eng = engine(model, prompt, proposer=proposer, policy=FixedK(k), max_tokens=max_tokens, **kw)
    return [ev.token for ev in eng.run()], eng.stats


class ScriptedProposer:
    """Proposes the known plain continuation, with draft index `wrong_at` replaced in every round, so the
    accept pattern is known in advance: min(wrong_at, k) accepted per round."""

    name = "scripted"

    def __init__(self, prompt, reference, wrong_at):
        self.full, self.wrong_at = list(prompt) + list(reference), wrong_at

    def start(self, prompt):
        pass

    def propose(self, ctx, k):
        nxt = self.full[len(ctx.history) : len(ctx.history) + k]
        drafts = [(t + 1) % 256 if i == self.wrong_at else t for i, t in enumerate(nxt)]
        return Draft(mx.array(drafts, mx.int32))

    def observe(self, result):
        pass


@pytest.mark.parametrize("variant, prompt", [
    (v, p) if p == "long" or v in ("e2b", "dense_keqv") else pytest.param(v, p, marks=pytest.mark.slow)
    for v in ("e2b", "moe", "dense_keqv", "e4b") for p in ("short", "long")])  # every variant past the window
def test_mtp_greedy_equals_plain(variant, prompt):
    model, drafter = base(variant)
    plain, _ = run(model, PROMPTS[prompt])
    for k in range(1, 9):
        spec, stats = run(model, PROMPTS[prompt], MTPProposer(drafter, model), k=k)
        assert spec == plain, f"mtp k={k} {variant}/{prompt}: speculative greedy must equal plain greedy"
        assert stats.rounds > 0


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
@pytest.mark.parametrize("k", range(1, 9))
def test_every_k_with_known_accept_pattern(variant, k):
    """Half-right drafts: every round accepts exactly min(wrong_at, k) and emits that + 1 tokens."""
    model, _ = base(variant)
    prompt = PROMPTS["long"]
    plain, _ = run(model, prompt)
    wrong_at = k // 2
    spec, stats = run(model, prompt, ScriptedProposer(prompt, plain, wrong_at), k=k)
    assert spec == plain, f"k={k}: output must equal plain decoding whatever the drafts"
    # (the last round may draft fewer than k: it never drafts past max_tokens)
    assert stats.accepted_by_position[:wrong_at] == stats.drafted_by_position[:wrong_at], \
        "every draft before the corrupted one is right, so each must be accepted"
    assert stats.accepted_by_position[wrong_at:] == [0] * (len(stats.drafted_by_position) - wrong_at), \
        "the corrupted draft (and so everything after it) must never be accepted"


@pytest.mark.parametrize("variant", ["e2b", "moe"])
def test_perfect_drafts_accept_everything(variant):
    model, _ = base(variant)
    prompt = PROMPTS["short"]
    plain, _ = run(model, prompt, max_tokens=41)
    spec, stats = run(model, prompt, ScriptedProposer(prompt, plain, wrong_at=99), k=4, max_tokens=41)
    assert spec == plain
    # 1 token from prefill, then rounds of 4 drafts + bonus = 5 tokens: exactly 8 rounds, tau 5
    assert stats.rounds == 8 and stats.accepted == 32 and stats.tau == 5.0


@pytest.mark.parametrize("variant", ["e2b", "moe", "dense_keqv", "e4b"])
@pytest.mark.parametrize("prompt", ["short", "long"])
def test_ngram_greedy_equals_plain(variant, prompt):
    model, _ = base(variant)
    plain, _ = run(model, PROMPTS[prompt])
    for k in range(1, 9):
        spec, _ = run(model, PROMPTS[prompt], NgramProposer(2), k=k)
        assert spec == plain, f"ngram k={k}: speculative greedy must equal plain greedy"


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv", pytest.param("moe", marks=pytest.mark.slow),
                                     pytest.param("e4b", marks=pytest.mark.slow)])
def test_draft_model_greedy_equals_plain(variant):
    """A second (differently seeded) Gemma 4 of the same variant as the draft model, k from 1 to 8 (the
    rollback of both caches is checked the same way at every k: 1, 3 and 8 here; `-m slow` adds the MoE and E4B variants)."""
    from mlx_spec.proposers.draft_model import DraftModelProposer

    model, _ = base(variant)
    draft = make_base(variant, seed=7)
    plain, _ = run(model, PROMPTS["long"])
    for k in (1, 3, 8):
        spec, stats = run(model, PROMPTS["long"], DraftModelProposer(draft, model), k=k)
        assert spec == plain, f"draft model k={k} {variant}: speculative greedy must equal plain greedy"


def test_eos_inside_accepted_drafts_stops_exactly():
    model, _ = base("e2b")
    prompt = PROMPTS["short"]
    plain, _ = run(model, prompt)
    eos = plain[10]
    want = plain[: plain.index(eos) + 1]
    got, _ = run(model, prompt, ScriptedProposer(prompt, plain, 99), k=8, eos_ids=[eos])
    assert got == want, "generation must stop at the first EOS, even inside a run of accepted drafts"
    got_plain, _ = run(model, prompt, eos_ids=[eos])
    assert got_plain == want


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 13])
def test_max_tokens_inside_a_round(max_tokens):
    model, _ = base("e2b")
    prompt = PROMPTS["short"]
    plain, _ = run(model, prompt, max_tokens=max_tokens)
    spec, _ = run(model, prompt, ScriptedProposer(prompt, plain + [0] * 20, 99), k=5, max_tokens=max_tokens)
    assert spec == plain and len(spec) == max_tokens


def test_trained_pair_matches_plain_and_accepts(trained_pair):
    model, tokenizer, drafter = trained_pair
    prompt = tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(")
    plain, _ = run(model, prompt, max_tokens=120)
    for k in (1, 3, 6):
        spec, stats = run(model, prompt, MTPProposer(drafter, model), k=k, max_tokens=120)
        assert spec == plain, f"trained pair k={k}: must equal plain greedy"
        assert stats.acceptance_by_position[0] > 0.6, "the trained drafter should agree most of the time"


def test_repetition_penalty_sees_verified_prefix():
    """A history-dependent logits processor must see history + d1..di at verified row i."""
    from mlx_lm.sample_utils import make_repetition_penalty

    model, _ = base("e2b")
    prompt = PROMPTS["short"]
    proc = [make_repetition_penalty(1.5, context_size=20)]
    plain, _ = run(model, prompt, logits_processors=proc)
    spec, _ = run(model, prompt, ScriptedProposer(prompt, plain, 99), k=4, logits_processors=proc)
    assert spec == plain


def test_sampling_runs_and_is_seeded():
    model, drafter = base("e2b")
    sampling = SamplingParams(temp=0.8, top_p=0.95)
    a, _ = run(model, PROMPTS["short"], MTPProposer(drafter, model), sampling=sampling, seed=3, max_tokens=30)
    b, _ = run(model, PROMPTS["short"], MTPProposer(drafter, model), sampling=sampling, seed=3, max_tokens=30)
    assert a == b and len(a) == 30 and all(0 <= t < 256 for t in a)


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
def test_chunked_prefill_equals_one_pass(variant):
    """Long prompts are prefilled in chunks (bounded attention matrices); chunk edges inside and across the
    sliding window must not change a single token, plain or speculative."""
    model, drafter = base(variant)
    prompt = PROMPTS["long"]
    want, _ = run(model, prompt, max_tokens=24)
    for step in (5, 16, 17):
        got, _ = run(model, prompt, max_tokens=24, prefill_step=step)
        assert got == want, f"prefill in chunks of {step} must equal one pass"
        spec, _ = run(model, prompt, MTPProposer(drafter, model), k=3, max_tokens=24, prefill_step=step)
        assert spec == want


def test_should_stop_ends_the_prefill_between_chunks_and_leaves_a_consistent_cache():
    """A client that goes away during a long prefill: asked before each chunk, should_stop ends the request
    with no tokens; the cache holds the prefilled chunks, and a later request that reuses it (a chat's next
    attempt) gives the plain tokens."""
    model, drafter = base("e2b")
    prompt = PROMPTS["long"]
    want, _ = run(model, prompt, max_tokens=12)
    asked = []
    eng = Engine(model, Request(prompt, max_tokens=12), prefill_step=16,
                 should_stop=lambda: asked.append(1) or len(asked) > 2)
    assert list(eng.run()) == [], "stopped during the prefill: no tokens"
    assert len(asked) == 3 and all(c.offset == 32 for c in eng.cache), "two chunks of 16 ran, then it stopped"
    again = Engine(model, Request(prompt, max_tokens=12), proposer=MTPProposer(drafter, model), policy=FixedK(3),
                   cache=eng.cache, prefill_step=16)
    assert [ev.token for ev in again.run()] == want, "the rest of the prompt prefills from there, exactly"
