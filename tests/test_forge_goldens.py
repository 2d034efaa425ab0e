"""What forge writes, mlx-vlm 0.7.10 reads and computes with as mlx_spec does (goldens from
tests/fixtures/make_forge_goldens.py, made in a venv with mlx-vlm; mlx-vlm is not needed here).

The goldens' script forged a DFlash, a DSpark and an EAGLE-3 drafter from scratch for the block goldens'
`unified` base, loaded them (and trained and fine-tuned ones) with mlx-vlm's own loader and recorded mlx-vlm's
block logits and drafts (DSpark: DeepSpec's, mlx-vlm with its missing v_norm patched in) and EAGLE-3's
drafts for the base's features of a prompt. Here forge writes the same directories again (`--steps 0`: its
initialization, byte for byte the same files, checked by checksum), mlx_spec loads them, and its block
logits and drafts equal mlx-vlm's.
"""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import checksum, make_unified_checkpoint
from conftest import FIXTURES
from forge_checkpoints import FAMILIES, forge_args, write_text

from mlx_spec import load, load_drafter
from mlx_spec.forge.__main__ import main as forge_main
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.base import RoundContext
from mlx_spec.sampling import Sampler, SamplingParams

ATOL = 2e-4  # fp32 on both sides; sums may be ordered differently


@pytest.fixture(scope="module")
def gold():
    return dict(np.load(FIXTURES / "golden" / "forge_goldens.npz"))


@pytest.fixture(scope="module")
def forged(tmp_path_factory, gold):
    """The base and the forged directories the goldens were made from, written again and checked."""
    work = tmp_path_factory.mktemp("forge")
    base = make_unified_checkpoint(work, window=16)
    data = write_text(work / "text.jsonl")
    paths = {"base": base}
    for family in FAMILIES:
        paths[family] = work / family
        assert forge_main(forge_args(family, base, data, paths[family])) == 0
        want = float(gold[f"{family}_checksum"])
        assert abs(checksum(paths[family]) - want) < 1e-6 * want, \
            f"{family}: forge no longer writes the drafter the goldens were made from"
    return paths


@pytest.fixture(scope="module")
def base(forged):
    return load(str(forged["base"]))[0]


def test_mlx_vlm_loaded_every_forged_directory(gold):
    """The script loaded, with mlx-vlm's own loader, the initial, trained and fine-tuned drafter of each family,
    each as the round loop it runs in."""
    assert sorted(gold["loaded"].tolist()) == sorted(
        f"{family} {stage}: {'eagle3' if family == 'eagle3' else 'dflash'}"
        for family in FAMILIES for stage in ("init", "trained", "fine-tuned"))


def _round(proposer, gold, family: str) -> RoundContext:
    prompt = gold["prompt"].tolist()
    proposer.reset()
    proposer.start(prompt)
    proposer.extend(mx.array(gold[f"{family}_features"])[None])
    return RoundContext(prompt + [int(gold["anchor"])], len(prompt), None, [], Sampler(SamplingParams(), 0))


def _widths(gold, family):
    return sorted(int(k.split("_bs")[1].split("_")[0]) for k in gold if k.startswith(f"{family}_bs")
                  and k.endswith("_logits"))


@pytest.mark.parametrize("family", ["dflash", "dspark"])
def test_forged_block_drafters_match_mlx_vlm(base, gold, forged, family):
    proposer = make_proposer(base, drafter=load_drafter(str(forged[family]), base))
    d = proposer.drafter
    _, _, features = base.forward_layers(mx.array([gold["prompt"].tolist()]), base.make_cache(), proposer.base_layers)
    assert np.allclose(np.array(features[0]), gold[f"{family}_features"], atol=ATOL), "the layers it reads"
    assert _widths(gold, family), "goldens for several verify widths"
    for width in _widths(gold, family):
        ctx = _round(proposer, gold, family)
        anchor = int(gold["anchor"])
        if family == "dflash":
            block = mx.array([[anchor] + [d.args.mask_token_id] * (width - 1)], mx.int32)
            logits = d.softcap(base.head(d.block_hidden(base.embed_scaled(block), proposer.context_cache)[0, 1:]))
        else:
            block = mx.array([[anchor] + [d.args.mask_token_id] * (width - 2)], mx.int32)
            logits = d.block_logits(d.block_hidden(d.embed(block), proposer.context_cache)[0])
        assert np.allclose(np.array(logits), gold[f"{family}_bs{width}_logits"], atol=ATOL), \
            f"forged {family}, verify width {width}: block logits equal mlx-vlm's"
        drafts = proposer.propose(ctx, width - 1).tokens.tolist()
        assert drafts == gold[f"{family}_bs{width}_drafts"].tolist(), f"forged {family} width {width}: mlx-vlm's drafts"


def test_forged_eagle3_matches_mlx_vlm(base, gold, forged):
    proposer = make_proposer(base, drafter=load_drafter(str(forged["eagle3"]), base))
    ks = sorted(int(k.split("_k")[1].split("_")[0]) for k in gold if k.startswith("eagle3_k") and k.endswith("_drafts"))
    assert ks, "goldens for several k"
    for k in ks:
        draft = proposer.propose(_round(proposer, gold, "eagle3"), k)
        assert draft.tokens.tolist() == gold[f"eagle3_k{k}_drafts"].tolist(), f"forged EAGLE-3 k={k}: mlx-vlm's drafts"
