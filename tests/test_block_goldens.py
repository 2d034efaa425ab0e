"""Conformance with mlx-vlm 0.7.10 (goldens from tests/fixtures/make_block_goldens.py; mlx-vlm not needed):
the 12B-style `gemma4_unified` base computes mlx-vlm's logits, captures the same layer outputs and decodes
the same greedy tokens; DFlash drafters give mlx-vlm's block logits and drafts for the same base features
at every block width; DSpark drafters give DeepSpec's (mlx-vlm with the v_norm it omits patched in), and
demonstrably not mlx-vlm's own; speculative decoding with each equals mlx-vlm's plain output."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_block_checkpoints, checksum
from conftest import FIXTURES

from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.base import RoundContext
from mlx_spec.sampling import Sampler, SamplingParams
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request

ATOL = 2e-4  # fp32 on both sides; sums may be ordered differently


@pytest.fixture(scope="module")
def gold():
    return dict(np.load(FIXTURES / "golden" / "block_goldens.npz"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, gold):
    """The checkpoints the goldens were made from, rebuilt (same helper, same seeds) and checked."""
    paths = build_block_checkpoints(tmp_path_factory.mktemp("block"))
    for name, path in paths.items():
        assert abs(checksum(path) - float(gold[f"{name}_checksum"])) < 1e-6 * float(gold[f"{name}_checksum"]), \
            f"{name}: tests/checkpoints.py no longer builds the checkpoint the goldens were made from"
    return paths


@pytest.fixture(scope="module")
def base(ckpt):
    model, _ = load(str(ckpt["unified"]))
    return model


def test_unified_base_matches_mlx_vlm(base, gold):
    prompt = mx.array(gold["prompt"])[None]
    logits, _, features = base.forward_layers(prompt, base.make_cache(), tuple(gold["target_layer_ids"].tolist()))
    assert np.allclose(np.array(logits[0]), gold["logits"], atol=ATOL), "unified base logits must equal mlx-vlm's"
    assert np.allclose(np.array(features[0]), gold["features"], atol=ATOL), \
        "captured layer outputs must equal mlx-vlm's capture_layer_ids"
    eng = Engine(base, Request(gold["prompt"].tolist(), max_tokens=len(gold["plain"])))
    assert [e.token for e in eng.run()] == gold["plain"].tolist(), "plain greedy must equal mlx-vlm's, past the window"


def _context(proposer, gold):
    proposer.reset()
    proposer.start(gold["prompt"].tolist())
    proposer.extend(mx.array(gold["features"])[None])
    return RoundContext(gold["prompt"].tolist() + [int(gold["anchor"])], len(gold["prompt"]), None, [],
                        Sampler(SamplingParams(), 0))


def _block_logits(proposer, width: int, family: str) -> mx.array:
    d, anchor = proposer.drafter, proposer._history[-1]
    if family == "dflash":
        block = mx.array([[anchor] + [d.args.mask_token_id] * (width - 1)], mx.int32)
        h = d.block_hidden(proposer.base.embed_scaled(block), proposer.context_cache)
        return d.softcap(proposer.base.head(h[0, 1:]))
    block = mx.array([[anchor] + [d.args.mask_token_id] * (width - 2)], mx.int32)
    return d.block_logits(d.block_hidden(d.embed(block), proposer.context_cache)[0])


@pytest.mark.parametrize("name", ["dflash", "dflash_sliding"])
def test_dflash_block_matches_mlx_vlm(base, gold, ckpt, name):
    drafter = load_drafter(str(ckpt[name]), base)
    proposer = make_proposer(base, drafter=drafter)
    widths = sorted(int(k.split("_bs")[1].split("_")[0]) for k in gold if k.startswith(f"{name}_bs") and k.endswith("_logits"))
    assert widths, "goldens for several block widths"
    for width in widths:
        ctx = _context(proposer, gold)
        got = _block_logits(proposer, width, "dflash")
        assert np.allclose(np.array(got), gold[f"{name}_bs{width}_logits"], atol=ATOL), \
            f"{name} block logits at verify width {width} must equal mlx-vlm's"
        draft = proposer.propose(ctx, width - 1)
        assert draft.tokens.tolist() == gold[f"{name}_bs{width}_drafts"].tolist(), f"{name} width {width}: same drafts"


@pytest.mark.parametrize("name", ["dspark", "dspark_v"])
def test_dspark_block_matches_deepspec(base, gold, ckpt, name):
    """DeepSpec norms the values (v_norm); mlx-vlm 0.7.10 does not. We follow DeepSpec: equal to mlx-vlm with
    v_norm patched in, different from mlx-vlm as shipped."""
    proposer = make_proposer(base, drafter=load_drafter(str(ckpt[name]), base))
    for width in (2, 4, 6):
        ctx = _context(proposer, gold)
        got = np.array(_block_logits(proposer, width, "dspark"))
        assert np.allclose(got, gold[f"{name}_bs{width}_deepspec_logits"], atol=ATOL), \
            f"{name} width {width}: block logits must equal DeepSpec's (mlx-vlm + v_norm)"
        assert not np.allclose(got, gold[f"{name}_bs{width}_logits"], atol=1e-2), \
            "mlx-vlm's DSpark (no v_norm) gives other logits: if this fails, mlx-vlm or the goldens changed"
        draft = proposer.propose(ctx, width - 1)
        assert draft.tokens.tolist() == gold[f"{name}_bs{width}_deepspec_drafts"].tolist(), \
            f"{name} width {width}: the Markov chain must pick DeepSpec's drafts"


def test_a_cut_block_is_not_a_prefix_of_the_full_one(base, gold, ckpt):
    """Attention inside a block is bidirectional: the rows of a shorter block differ from the first rows of
    the full block, and mlx-vlm (the reference for short blocks) computes the shorter one, as we do."""
    proposer = make_proposer(base, drafter=load_drafter(str(ckpt["dflash"]), base))
    _context(proposer, gold)
    full = _block_logits(proposer, 6, "dflash")
    cut = _block_logits(proposer, 3, "dflash")
    assert not np.allclose(np.array(cut), np.array(full[:2]), atol=1e-3), "a cut block is a different input"
    assert np.allclose(np.array(cut), gold["dflash_bs3_logits"], atol=ATOL)


@pytest.mark.parametrize("name", ["dflash", "dflash_sliding", "dspark", "dspark_v"])
def test_speculative_equals_mlx_vlm_plain(base, gold, ckpt, name):
    proposer = make_proposer(base, drafter=load_drafter(str(ckpt[name]), base))
    for k in (1, 3, 5):
        eng = Engine(base, Request(gold["prompt"].tolist(), max_tokens=len(gold["plain"])), proposer=proposer.fork(),
                     policy=FixedK(k))
        assert [e.token for e in eng.run()] == gold["plain"].tolist(), f"{name} k={k} must equal plain decoding"
    assert gold[f"{name}_loop"].tolist() == gold["plain"].tolist()
