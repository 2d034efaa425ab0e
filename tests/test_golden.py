"""Parity with Hugging Face transformers (goldens written by tests/fixtures/make_goldens.py, no torch here).

Each base checkpoint is loaded straight from its HF directory (converted in memory); its prompt logits must
match transformers' and its greedy continuation, which crosses the 16-token sliding window many times, must
be identical token for token.
"""


import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_spec import load
from mlx_spec.engine import Engine

HF, GOLDEN = FIXTURES / "hf", FIXTURES / "golden"
BASES = sorted(p.stem for p in GOLDEN.glob("*.npz") if (HF / p.stem / "config.json").exists()
               and "assistant" not in p.stem)
LOGIT_ATOL = 2e-4  # fp32 on both sides; differences come from summation order only


@pytest.fixture(scope="module", params=BASES)
def case(request):
    name = request.param
    model, tokenizer = load(str(HF / name))
    return name, model, np.load(GOLDEN / f"{name}.npz")


@pytest.mark.parametrize("which", ["short", "long"])
def test_prompt_logits_match_transformers(case, which):
    name, model, g = case
    logits = model(mx.array(g[f"prompt_{which}"])[None])[0]
    err = np.abs(np.array(logits) - g[f"logits_{which}"]).max()
    assert err < LOGIT_ATOL, f"{name}/{which}: logits differ from transformers by {err}"


@pytest.mark.parametrize("which", ["short", "long"])
def test_greedy_tokens_match_transformers(case, which):
    name, model, g = case
    want = g[f"greedy_{which}"].tolist()
    got = [ev.token for ev in Engine(model, g[f"prompt_{which}"].tolist(), max_tokens=len(want)).run()]
    assert got == want, f"{name}/{which}: greedy continuation must equal transformers' token for token"
