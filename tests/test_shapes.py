"""Random models of the published Gemma 4 shapes (for cost measurements) build, pair and decode exactly."""

import mlx.core as mx
import pytest

from mlx_spec.drafting import validate_pairing
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.shapes import BASE_SHAPES, base_config, drafter_config, random_pair
from mlx_spec.request import Request


def test_tiny_pair_decodes_exactly():
    base, drafter = random_pair("tiny", dtype=mx.float32, q_bits=0)
    prompt = list(range(2, 40))
    plain = [e.token for e in Engine(base, Request(prompt, max_tokens=24)).run()]
    spec = [e.token for e in Engine(base, Request(prompt, max_tokens=24), proposer=MTPProposer(drafter, base),
                                    policy=FixedK(3)).run()]
    assert spec == plain


@pytest.mark.parametrize("shape", [s for s in BASE_SHAPES if s != "tiny"])
def test_published_shapes_pair(shape):
    """Configs only (no weights): every published base/drafter shape passes the pairing checks."""
    from mlx_spec.models import gemma4_assistant, gemma4_text

    base_args = gemma4_text.ModelArgs.from_dict(base_config(shape))
    assert base_args.layer_types[-1] == "full_attention"
    d_args = gemma4_assistant.ModelArgs.from_dict(drafter_config(shape))
    assert d_args.backbone_hidden_size == base_args.hidden_size and d_args.text.vocab_size == base_args.vocab_size


def test_quantized_tiny_pair_validates_and_decodes_exactly():
    """Quantized layer by layer from random weights (the whole unquantized model never exists): every layer
    that takes the group size is quantized, from non-degenerate weights, and the rest is randomized too."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    base, drafter = random_pair("tiny", dtype=mx.float32, q_bits=4, group_size=32)
    validate_pairing(drafter, base)
    layers = [(p, m) for p, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert layers and all(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) == (m.weight.shape[-1] % 32 == 0)
                          for _, m in layers)
    quantized = [m for _, m in base.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert len(quantized) > 10
    for m in quantized:
        w = mx.dequantize(m.weight, m.scales, m.biases, group_size=32, bits=4)
        assert 0.005 < float(w.std()) < 0.05, "dequantizes to the N(0, 0.02) it was drawn from"
    norms = [p for n, p in tree_flatten(base.parameters()) if "norm" in n and p.ndim == 1]
    assert norms and all(abs(float(p.mean()) - 1.0) < 0.05 for p in norms)
    prompt = list(range(2, 40))
    plain = [e.token for e in Engine(base, Request(prompt, max_tokens=24)).run()]
    spec = [e.token for e in Engine(base, Request(prompt, max_tokens=24), proposer=MTPProposer(drafter, base),
                                    policy=FixedK(3)).run()]
    assert spec == plain


@pytest.mark.parametrize("shape, family", [("31b", "dflash"), ("12b", "dspark"), ("e2b", "dflash")])
def test_block_drafter_shapes_pair(shape, family):
    """Configs only (modules are built lazily, no weights evaluated): the published block drafters fit."""
    from mlx_spec.drafting import validate_block_pairing
    from mlx_spec.models import gemma4_text, get_model_classes
    from mlx_spec.shapes import block_drafter_config

    base = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(base_config(shape)))
    config = block_drafter_config(shape, family)
    model_class, args_class = get_model_classes(config)
    validate_block_pairing(model_class(args_class.from_dict(config)), base)


def test_the_12b_is_unified_and_its_assistant_an_alias():
    from mlx_spec.models import gemma4_text

    args = gemma4_text.ModelArgs.from_dict(base_config("12b"))
    assert args.model_type == "gemma4_unified_text" and args.hidden_size_per_layer_input == 0
    assert args.layer_types.count("full_attention") == 8 and args.num_global_key_value_heads == 1
    assert drafter_config("12b")["model_type"] == "gemma4_unified_assistant"


def test_tiny_block_drafters_decode_exactly_and_a_cut_base_keeps_its_pattern():
    from mlx_spec.proposers import make_proposer
    from mlx_spec.shapes import random_block_drafter

    base, _ = random_pair("tiny", dtype=mx.float32, q_bits=0)
    prompt = list(range(2, 40))
    plain = [e.token for e in Engine(base, Request(prompt, max_tokens=24)).run()]
    for family, q in (("dflash", 0), ("dspark", 8)):
        drafter = random_block_drafter("tiny", family, dtype=mx.float32, q_bits=q, group_size=32)
        eng = Engine(base, Request(prompt, max_tokens=24), proposer=make_proposer(base, drafter=drafter),
                     policy=FixedK(3))
        assert [e.token for e in eng.run()] == plain, f"{family}: exact"
    cut = base_config("31b", layers=12)
    assert cut["num_hidden_layers"] == 12 and cut["layer_types"][-1] == "full_attention"
    assert cut["layer_types"].count("full_attention") == 2
