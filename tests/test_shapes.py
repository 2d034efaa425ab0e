"""Random models of the published Gemma 4 shapes (for cost measurements) build, pair and decode exactly."""

import mlx.core as mx
import pytest

from mlx_spec.drafting import validate_pairing
from mlx_spec.engine import Engine
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.shapes import BASE_SHAPES, base_config, drafter_config, random_pair


def test_tiny_pair_decodes_exactly():
    base, drafter = random_pair("tiny", dtype=mx.float32, q_bits=0)
    prompt = list(range(2, 40))
    plain = [e.token for e in Engine(base, prompt, max_tokens=24).run()]
    spec = [e.token for e in Engine(base, prompt, proposer=MTPProposer(drafter, base), num_draft_tokens=3,
                                    max_tokens=24).run()]
    assert spec == plain


@pytest.mark.parametrize("shape", [s for s in BASE_SHAPES if s != "tiny"])
def test_published_shapes_pair(shape):
    """Configs only (no weights): every published base/drafter shape passes the pairing checks."""
    from mlx_spec.models import gemma4_assistant, gemma4_text

    base_args = gemma4_text.ModelArgs.from_dict(base_config(shape))
    assert base_args.layer_types[-1] == "full_attention"
    d_args = gemma4_assistant.ModelArgs.from_dict(drafter_config(shape))
    assert d_args.backbone_hidden_size == base_args.hidden_size and d_args.text.vocab_size == base_args.vocab_size


def test_quantized_tiny_pair_validates():
    base, drafter = random_pair("tiny", q_bits=4, group_size=32)
    validate_pairing(drafter, base)
