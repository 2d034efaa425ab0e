"""MTP drafter parity with transformers' Gemma4AssistantForCausalLM (goldens from make_goldens.py).

Given the same inputs and shared K/V, the drafter's logits and fed-back hidden state must match, for a
centroid-head and a dense-head drafter; speculative decoding with it must give transformers' assisted
(= plain greedy) output; and the K/V our base hands the drafter after prefill must be what HF hands it.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.request import Request

HF, GOLDEN = FIXTURES / "hf", FIXTURES / "golden"
DRAFTERS = ["assistant_centroid", "assistant_dense"]
ATOL = 1e-4  # fp32 both sides; hidden states of magnitude ~10 also get a relative 1e-5


def close(ours, theirs) -> bool:
    return np.allclose(np.array(ours), theirs, rtol=1e-5, atol=ATOL)


@pytest.fixture(scope="module", params=DRAFTERS)
def pair(request):
    g = np.load(GOLDEN / f"{request.param}.npz")
    base, _ = load(str(HF / str(g["target"])))
    return request.param, base, load_drafter(str(HF / request.param), base), g


def _step(base, drafter, token, hidden, kv, position):
    """One drafter step from HF's inputs; sliding K/V limited to the last W+1 entries as HF's mask does."""
    W = base.text_args.sliding_window
    shared = {"full_attention": (mx.array(kv[0]), mx.array(kv[1])),
              "sliding_attention": (mx.array(kv[2])[..., -(W + 1):, :], mx.array(kv[3])[..., -(W + 1):, :])}
    embedded = base.embed_scaled(mx.array([[int(token)]]))
    h, h_next = drafter.step(embedded, mx.array(hidden).reshape(1, 1, -1), shared, int(position))
    return drafter.full_logits(h), h_next[0, 0]


def _compare_logits(name, ours, theirs, what):
    ours = np.array(ours)
    finite = np.isfinite(ours)  # centroid head: unselected tokens are -inf here, min(selected)-1 in HF
    sel = theirs > theirs.min() if not finite.all() else np.ones_like(finite)
    assert (finite == sel).all(), f"{name} {what}: the centroid head must select the same tokens as HF"
    err = np.abs(ours[finite] - theirs[finite]).max()
    assert err < ATOL, f"{name} {what}: drafter logits differ from transformers by {err}"
    assert ours.argmax() == theirs.argmax(), f"{name} {what}: the drafted token must be HF's"


def test_first_step_matches_transformers(pair):
    name, base, drafter, g = pair
    kv = (g["kv_full_k"], g["kv_full_v"], g["kv_sliding_k"], g["kv_sliding_v"])
    logits, h_next = _step(base, drafter, g["drafter_input_token"], g["drafter_hidden_in"], kv, g["drafter_position"])
    _compare_logits(name, logits, g["drafter_logits"], "step 1")
    assert close(h_next, g["drafter_hidden_out"]), f"{name}: post_projection hidden differs from transformers"


def test_chained_steps_match_transformers(pair):
    name, base, drafter, g = pair
    kv = (g["kv_full_k"], g["kv_full_v"], g["kv_sliding_k"], g["kv_sliding_v"])
    for i in range(len(g["chain_tokens"])):
        logits, h_next = _step(base, drafter, g["chain_input_tokens"][i], g["chain_hidden_in"][i], kv,
                               g["drafter_position"])
        _compare_logits(name, logits, g["chain_logits"][i], f"chain step {i}")
        assert close(h_next, g["chain_hidden_out"][i]), f"{name}: chain step {i} hidden differs from transformers"


def test_our_prefill_hands_the_drafter_hfs_kv_and_hidden(pair):
    """After prefill, the producer caches' drafter views equal HF's shared K/V (last W+1 for sliding)."""
    name, base, drafter, g = pair
    W = base.text_args.sliding_window
    cache = base.make_cache()
    _, hidden = base.forward(mx.array(g["prompt_long"])[None], cache)
    assert close(hidden[0, -1], g["drafter_hidden_in"]), "the final-normed hidden at the last prompt position"
    full = cache[base.producer_layers["full_attention"]].drafter_view()
    sliding = cache[base.producer_layers["sliding_attention"]].drafter_view()
    for ours, theirs in ((full[0], g["kv_full_k"]), (full[1], g["kv_full_v"]),
                         (sliding[0], g["kv_sliding_k"][..., -(W + 1):, :]),
                         (sliding[1], g["kv_sliding_v"][..., -(W + 1):, :])):
        assert ours.shape == theirs.shape and close(ours, theirs), "producer K/V as HF shares them"


@pytest.mark.parametrize("k", [1, 3, 8])
def test_speculative_output_equals_transformers_assisted_generation(pair, k):
    name, base, drafter, g = pair
    want = g[f"assisted_greedy_k{k}"].tolist()
    eng = Engine(base, Request(g["prompt_long"].tolist(), max_tokens=len(want)), proposer=MTPProposer(drafter, base),
                 policy=FixedK(k))
    got = [ev.token for ev in eng.run()]
    assert got == want, f"{name} k={k}: must equal transformers' assisted generation token for token"
    hf_rounds = g[f"assisted_rounds_k{k}"]
    hf_tau = (hf_rounds[:, 2].sum() + len(hf_rounds)) / len(hf_rounds)
    # our drafter sees clean K/V (no rejected drafts), so it may accept more, never clearly fewer
    assert eng.stats.tau >= hf_tau - 0.15, f"{name} k={k}: tau {eng.stats.tau:.2f} vs transformers' {hf_tau:.2f}"


def test_later_round_with_hfs_kv_matches_transformers(pair):
    """Round 2 of HF's loop (after a verify and rollback): the same inputs give the same logits."""
    name, base, drafter, g = pair
    kv = (g["round2_kv_full_k"], g["round2_kv_full_v"], g["round2_kv_sliding_k"], g["round2_kv_sliding_v"])
    logits, h_next = _step(base, drafter, g["round2_input_token"], g["round2_hidden_in"], kv, g["round2_position"])
    _compare_logits(name, logits, g["round2_logits"], "round 2")
    assert close(h_next, g["round2_hidden_out"])
