"""Log-probabilities from the engine: the base model's distribution (log-softmax at temperature 1 of the
processed logits), the same with drafting on or off, equal to a direct log-softmax of a plain forward;
computed only when asked."""

import math

import mlx.core as mx
import pytest

from mlx_spec import stream_generate
from mlx_spec.request import Request

PROMPT = "import os\nimport sys\n\ndef main(argv):\n"
N_TOKENS = 20
TOP = 5


def run(model, tok, **kw):
    return [(r.token, r.logprob, r.top_logprobs) for r in stream_generate(model, tok, PROMPT, max_tokens=N_TOKENS,
                                                                          logprobs=TOP, **kw)]


@pytest.fixture(scope="module")
def plain(trained_pair):
    model, tok, _ = trained_pair
    return run(model, tok)


@pytest.mark.parametrize("proposer", ["mtp", "ngram"])
def test_logprobs_are_identical_with_drafting_on_and_off(trained_pair, plain, proposer):
    model, tok, drafter = trained_pair
    kw = {"drafter": drafter} if proposer == "mtp" else {"ngram": 2}
    for k in (1, 4):
        assert run(model, tok, num_draft_tokens=k, **kw) == plain, \
            f"{proposer}, k={k}: tokens and log-probabilities == plain decoding's (greedy)"


def test_logprobs_equal_a_direct_log_softmax_of_a_plain_forward(trained_pair, plain):
    model, tok, _ = trained_pair
    prompt = tok.encode(PROMPT)
    tokens = [t for t, _, _ in plain]
    logits = model(mx.array([prompt + tokens]))[0, len(prompt) - 1 : -1].astype(mx.float32)  # row i -> token i
    want = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    for i, (token, lp, top) in enumerate(plain):
        assert math.isclose(lp, want[i][token], abs_tol=1e-4), f"token {i}: logprob == log_softmax(forward)"
        best = sorted(range(len(want[i])), key=lambda j: -want[i][j])[:TOP]
        assert [t for t, _ in top] == best, f"token {i}: the top {TOP} in order"
        assert all(math.isclose(v, want[i][t], abs_tol=1e-4) for t, v in top)
        assert top[0][0] == token, "greedy: the emitted token is the most likely"


def test_sampled_logprobs_are_the_base_distribution_at_temperature_1(trained_pair):
    """With temp > 0 the reported log-probabilities are still the temperature-1 ones (as mlx-lm's server's),
    and a seeded coupled run reports the same with drafting on and off."""
    model, tok, drafter = trained_pair
    kw = dict(temp=0.8, seed=7, acceptance="coupled")
    plain = run(model, tok, **kw)
    assert run(model, tok, drafter=drafter, num_draft_tokens=3, **kw) == plain
    prompt = tok.encode(PROMPT)
    logits = model(mx.array([prompt + [t for t, _, _ in plain]]))[0, len(prompt) - 1 : -1].astype(mx.float32)
    want = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    assert all(math.isclose(lp, want[i][t], abs_tol=1e-4) for i, (t, lp, _) in enumerate(plain))


def test_no_logprobs_unless_asked(trained_pair):
    model, tok, drafter = trained_pair
    r = next(iter(stream_generate(model, tok, PROMPT, max_tokens=3, drafter=drafter)))
    assert r.logprob is None and r.top_logprobs is None
    with pytest.raises(ValueError, match="logprobs"):
        list(stream_generate(model, tok, PROMPT, max_tokens=3, logprobs=-1))


def test_strict_padding_reports_the_same_logprobs(trained_pair, plain):
    """Strict mode pads every decode pass to a fixed row count; the log-probabilities come from the real rows."""
    from mlx_spec.engine import Engine
    from mlx_spec.proposers import make_proposer
    from mlx_spec.tuning import FixedK

    model, tok, drafter = trained_pair
    for proposer in (None, make_proposer(model, drafter=drafter)):
        eng = Engine(model, Request(tok.encode(PROMPT), max_tokens=N_TOKENS, logprobs=TOP), proposer=proposer,
                     policy=FixedK(3), strict_rows=9)
        got = [(ev.token, ev.logprob, ev.top_logprobs) for ev in eng.run()]
        assert [t for t, _, _ in got] == [t for t, _, _ in plain]
        assert all(math.isclose(a[1], b[1], abs_tol=1e-5) for a, b in zip(got, plain)), "strict: same logprobs"
