"""A seed reproduces a run: the same tokens across calls and processes for every acceptance mode at fixed k,
and in the coupled (and match) modes the tokens of plain sampling with that seed, for every proposer, every
k, auto, drafting on or off. The noise for a position depends on (seed, position) alone (sampling.py)."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from conftest import ROOT, TINY_CODE
from mlx_spec import AutoTuner, generate, stream_generate
from mlx_spec.sampling import Sampler, SamplingParams, check_seed
from mlx_spec.tuning import Costs, CostsStore

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
N = 48
CHEAP = Costs(verify=[1.0 + 0.03 * k for k in range(9)], draft_fixed=0.02, draft_step=0.1, plain_step_s=1e-3)


def tokens(model, tokenizer, **kw):
    return [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=N, **kw)]


@pytest.mark.parametrize("acceptance", ["coupled", "rejection", "match"])
def test_same_seed_same_tokens_twice_in_one_process(trained_pair, acceptance):
    model, tokenizer, drafter = trained_pair
    kw = dict(drafter=drafter, num_draft_tokens=3, temp=0.8, seed=11, acceptance=acceptance)
    first = tokens(model, tokenizer, **kw)
    assert tokens(model, tokenizer, **kw) == first, f"{acceptance}: a seed reproduces the run"
    assert tokens(model, tokenizer, **dict(kw, seed=12)) != first, "another seed samples something else"


@pytest.mark.parametrize("acceptance", ["auto", "coupled", "match"])
def test_coupled_and_match_give_plain_samplings_tokens_for_every_k_and_proposer(trained_pair, acceptance):
    model, tokenizer, drafter = trained_pair
    sampling = dict(temp=1.0, top_p=0.95, seed=5, acceptance=acceptance)
    plain = tokens(model, tokenizer, **sampling)
    for k in (1, 2, 3, 5, 8):
        assert tokens(model, tokenizer, drafter=drafter, num_draft_tokens=k, **sampling) == plain, \
            f"{acceptance} mtp k={k}: speculative sampling == plain sampling, token for token"
    assert tokens(model, tokenizer, ngram=2, num_draft_tokens=4, **sampling) == plain, "ngram"
    assert tokens(model, tokenizer, draft_model=model, num_draft_tokens=3, **sampling) == plain, "draft model"
    tuner = AutoTuner(CostsStore(measure=lambda *a, **kw: CHEAP))
    for _ in range(2):  # what auto learnt in the first run changes its k in the second: not the tokens
        assert tokens(model, tokenizer, drafter=drafter, num_draft_tokens="auto", tuner=tuner, **sampling) == plain


def test_coupled_holds_with_every_filter(trained_pair):
    model, tokenizer, drafter = trained_pair
    for sampling in (dict(temp=0.7, top_k=5), dict(temp=1.3, min_p=0.05), dict(temp=0.5, top_p=0.5, top_k=20)):
        plain = tokens(model, tokenizer, seed=2, **sampling)
        assert tokens(model, tokenizer, drafter=drafter, num_draft_tokens=4, seed=2, **sampling) == plain, sampling


def test_the_default_mode_is_coupled_with_a_seed_and_rejection_without():
    assert Sampler(SamplingParams(temp=1.0), seed=3).mode == "coupled", "a seed asks for the same text every time"
    assert Sampler(SamplingParams(temp=1.0)).mode == "rejection", "no seed: the mode that accepts the most"
    assert Sampler(SamplingParams(temp=1.0, acceptance="rejection"), seed=3).mode == "rejection", "as asked"


def test_the_noise_of_a_position_depends_on_seed_and_position_only():
    import mlx.core as mx

    s = Sampler(SamplingParams(temp=1.0), seed=7)
    a = s.gumbel([10, 11, 12], 64, 0)
    b = s.gumbel([12], 64, 0)
    assert mx.array_equal(a[2], b[0]).item(), "row 12 is the same whether drawn alone or in a batch"
    assert not mx.array_equal(a[0], a[1]).item(), "neighbouring positions are independent draws"
    assert not mx.array_equal(s.gumbel([10], 64, 1)[0], a[0]).item(), "each stream has its own noise"
    assert not mx.array_equal(Sampler(SamplingParams(temp=1.0), seed=8).gumbel([10], 64, 0)[0], a[0]).item()


def test_any_integer_is_a_seed(trained_pair):
    model, tokenizer, _ = trained_pair
    assert check_seed(-1) == 2**64 - 1 and check_seed(10**30) == 10**30 % 2**64
    kw = dict(max_tokens=12, temp=0.9)
    assert generate(model, tokenizer, PROMPT, seed=-1, **kw) == generate(model, tokenizer, PROMPT, seed=2**64 - 1, **kw)
    with pytest.raises(Exception, match="seed must be an integer"):
        check_seed(1.5)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = str(TINY_CODE / "base")
    p = subprocess.run([sys.executable, "-m", "mlx_spec.generate", "--model", base, "--prompt", "def parse(line):",
                        "--ignore-chat-template", "-m", "40", "--temp", "0.8", "--seed", "3", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_command_prints_the_same_text_with_drafts_on_or_off():
    assistant = str(TINY_CODE / "assistant")
    plain = _cli("--no-draft")
    assert plain.strip(), "it generated something"
    for extra in (["--drafter", assistant], ["--drafter", assistant, "--num-draft-tokens", "1"],
                  ["--drafter", assistant, "--num-draft-tokens", "auto"]):
        assert _cli(*extra) == plain, f"{extra}: the same seed prints the same text (another process too)"


@pytest.mark.parametrize("temp, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (2.0, 3, 1.0), (1.0, 5, 0.9)])
def test_a_drafts_q_is_the_normalized_distribution_it_was_drawn_from(temp, top_k, top_p):
    """Rejection sampling divides by q(x) and subtracts q from p: q must sum to 1. The scores a draft is
    drawn with are log-probabilities only up to a constant once tempered or filtered (exp(scores) summed
    to 1.19 at temp 1.3, top-k 5), so q is their softmax: the base's own probs() for the same logits."""
    from mlx_spec.sampling import Sampler

    sampler = Sampler(SamplingParams(temp=temp, top_k=top_k, top_p=top_p, acceptance="rejection"), 3)
    logits = mx.random.normal((64,), key=mx.random.key(1)) * 3
    _, q = sampler.draft(logits, 10)
    assert abs(float(q.sum()) - 1.0) < 1e-5, "q sums to 1"
    assert mx.allclose(q, sampler.probs(logits), atol=1e-6), "q is the distribution the draft was drawn from"
