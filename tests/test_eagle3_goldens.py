"""Conformance of EAGLE-3 drafters with mlx-vlm 0.7.10 (goldens from tests/fixtures/make_eagle3_goldens.py;
mlx-vlm not needed): for the base's captured features after a prompt, our drafter gives mlx-vlm's logits and
greedy drafts for every k, by the proposer's rounds and by the training-time unroll alike; speculative
decoding with either drafter equals plain decoding (mlx-vlm's own loop does not with one of them)."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import checksum
from conftest import FIXTURES
from eagle3_checkpoints import build_eagle3_checkpoints

from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.proposers import make_proposer
from mlx_spec.proposers.base import RoundContext
from mlx_spec.sampling import Sampler, SamplingParams
from mlx_spec.tuning import FixedK
from mlx_spec.request import Request

ATOL = 2e-4  # fp32 on both sides; sums may be ordered differently
DRAFTERS = ("eagle3", "eagle3_wide")


@pytest.fixture(scope="module")
def gold():
    return dict(np.load(FIXTURES / "golden" / "eagle3_goldens.npz"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, gold):
    """The checkpoints the goldens were made from, rebuilt (same helpers, same seeds) and checked."""
    paths = build_eagle3_checkpoints(tmp_path_factory.mktemp("eagle3"))
    for name, path in paths.items():
        assert abs(checksum(path) - float(gold[f"{name}_checksum"])) < 1e-6 * float(gold[f"{name}_checksum"]), \
            f"{name}: the helpers no longer build the checkpoint the goldens were made from"
    return paths


@pytest.fixture(scope="module")
def base(ckpt):
    return load(str(ckpt["unified"]))[0]


def ks(gold, name):
    return sorted(int(key.split("_k")[1].split("_")[0]) for key in gold if key.startswith(f"{name}_k") and
                  key.endswith("_drafts"))


@pytest.mark.parametrize("name", DRAFTERS)
def test_drafts_and_logits_match_mlx_vlm(base, gold, ckpt, name):
    drafter = load_drafter(str(ckpt[name]), base)
    proposer = make_proposer(base, drafter=drafter)
    prompt, bonus = gold["prompt"].tolist(), int(gold["bonus"])
    _, _, features = base.forward_layers(mx.array([prompt]), base.make_cache(), proposer.base_layers)
    assert np.allclose(np.array(features[0]), gold["features"], atol=ATOL), \
        "the base layers read for aux ids [1, 2, 3] must be mlx-vlm's captured layers [0, 1, 2]"
    assert ks(gold, name), "goldens for several k"
    for k in ks(gold, name):
        proposer.reset()
        proposer.start(prompt)
        proposer.extend(mx.array(gold["features"])[None])
        draft = proposer.propose(RoundContext(prompt + [bonus], len(prompt), None, [], Sampler(SamplingParams(), 0)), k)
        assert draft.tokens.tolist() == gold[f"{name}_k{k}_drafts"].tolist(), f"{name} k={k}: mlx-vlm's drafts"
        steps = [draft.tokens[i : i + 1][None] for i in range(k - 1)]  # the last row's tokens; others unused
        rows = len(prompt)
        steps = [mx.concatenate([mx.zeros((1, rows - 1), mx.int32), t], axis=1) for t in steps]
        logits = drafter.unroll(mx.array(gold["features"])[None], mx.array([prompt[1:] + [bonus]]), k, steps)
        assert np.allclose(np.array(logits[:, -1]), gold[f"{name}_k{k}_logits"], atol=ATOL), \
            f"{name} k={k}: each draft's logits must equal mlx-vlm's"


@pytest.mark.parametrize("name", DRAFTERS)
def test_speculative_equals_plain(base, gold, ckpt, name):
    proposer = make_proposer(base, drafter=load_drafter(str(ckpt[name]), base))
    plain = [e.token for e in Engine(base, Request(gold["prompt"].tolist(), max_tokens=len(gold["plain"]))).run()]
    assert plain == gold["plain"].tolist(), "plain greedy equals mlx-vlm's, past the window"
    for k in (1, 3, 5):
        eng = Engine(base, Request(gold["prompt"].tolist(), max_tokens=len(gold["plain"])), proposer=proposer.fork(),
                     policy=FixedK(k))
        assert [e.token for e in eng.run()] == plain, f"{name} k={k} must equal plain decoding"
    # mlx-vlm's own loop leaves plain decoding with eagle3_wide (its rotating-cache rollback after the window
    # wraps: see make_eagle3_goldens.py); if this changes, mlx-vlm or the goldens did
    assert (gold[f"{name}_loop"].tolist() == plain) == (name == "eagle3")
