"""Memory known in advance: the K/V estimate equals the caches' measured bytes after a real prefill (and
after speculative decoding), from config.json or from the loaded model; the advice names the flag that fits."""

import mlx.core as mx
import pytest
from conftest import TINY_CODE
from tiny_models import _redraw, make_base, make_drafter, text_config

from mlx_spec import memory
from mlx_spec.cache import KVQuant
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.models import gemma4_text
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.request import Request

CONTEXTS = [5, 17, 40, 257, 600]


def quantizable(variant):
    cfg = {**text_config(variant), "head_dim": 32, "global_head_dim": 64}
    model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(cfg))
    _redraw(model, 0, std=0.08)
    return model, cfg


def prefill(model, n, cache, chunk=256):
    toks = mx.array([(i * 37) % 250 + 3 for i in range(n)], mx.int32)[None]
    for s in range(0, n, chunk):
        model(toks[:, s : s + chunk], cache)
        mx.eval([c.state for c in cache])
    return cache


@pytest.mark.parametrize("variant", ["e2b", "moe", "dense_keqv", "e4b"])
def test_kv_estimate_equals_measured_bytes(variant):
    """KV-shared layers store nothing, k_eq_v layers K and V, sliding layers a constant buffer."""
    model = make_base(variant)
    layers = memory.kv_layers_from_config(text_config(variant))
    from_model, dtype = memory.kv_layers_from_model(model)
    assert layers == from_model and dtype == mx.float32
    for n in CONTEXTS:
        cache = prefill(model, n, model.make_cache(17))
        measured = sum(c.nbytes for c in cache)
        assert memory.kv_cache_bytes(layers, n, 4) == measured, f"{variant} at {n} tokens: estimate == measured"


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kv_estimate_equals_measured_bytes(variant, bits):
    model, cfg = quantizable(variant)
    layers = memory.kv_layers_from_config(cfg)
    for n, chunk in ((40, 7), (300, 256), (600, 2048)):  # any chunking gives the same sizes
        kv = KVQuant(bits, 32)
        cache = prefill(model, n, model.make_cache(17, kv_bits=bits, kv_group_size=32), chunk)
        assert memory.kv_cache_bytes(layers, n, 4, kv) == sum(c.nbytes for c in cache)
    full = memory.kv_cache_bytes(layers, 4096, 4)
    ratio = memory.kv_cache_bytes(layers, 4096, 4, KVQuant(bits, 32)) / full
    assert ratio == pytest.approx((bits / 8 + 2 * 4 / 32) / 4), "packed bits + fp32 scale and bias per 32"


def test_estimate_holds_after_speculative_decoding():
    """Rounds append k+1 positions and roll back: capacity follows the context, not the rounds."""
    model = make_base("e2b")
    prompt = [(i * 37) % 250 + 3 for i in range(250)]
    eng = Engine(model, Request(prompt, max_tokens=40), proposer=MTPProposer(make_drafter(model), model),
                 policy=FixedK(5))
    list(eng.run())
    n = eng.cache[0].offset
    layers = memory.kv_layers_from_config(text_config("e2b"))
    assert n > 256 and memory.kv_cache_bytes(layers, n, 4) == sum(c.nbytes for c in eng.cache)


def test_switch_keeps_full_precision_for_one_pass_and_the_peak_counts_it():
    model, cfg = quantizable("e2b")
    layers = memory.kv_layers_from_config(cfg)
    kv = KVQuant(4, 32, start=40)
    cache = prefill(model, 40, model.make_cache(17, kv_bits=4, kv_group_size=32, quantized_kv_start=40))
    model(mx.array([[5]]), cache)  # the switch
    held = sum(c.nbytes + sum(x.nbytes for x in c._fallback[0][:2]) for c in cache)
    assert memory.kv_peak_bytes(layers, 41, 4, kv) == held


def test_trained_pair_weights_and_geometry():
    from mlx_spec import load

    model, _ = load(str(TINY_CODE / "base"))
    on_disk = memory.weights_bytes_on_disk(TINY_CODE / "base")
    assert 0 < on_disk - memory.weight_bytes(model) < 64 * 1024, "the file holds the arrays plus a header"
    layers, _ = memory.kv_layers_from_model(model)
    import json
    config = json.loads((TINY_CODE / "base" / "config.json").read_text())
    assert memory.kv_layers_from_config(config) == layers
    assert [l.window for l in layers] == [32, 32, 32, None] and layers[3].k_head_dim == 64


def test_mlx_lm_model_geometry():
    from mlx_lm.models import llama

    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96,
               layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    model = llama.Model(llama.ModelArgs(**cfg))
    layers, _ = memory.kv_layers_from_model(model)
    assert memory.kv_layers_from_config(cfg) == layers == [memory.LayerKV(2, 16, 16, 8), memory.LayerKV(2, 16, 16)]


def test_memory_limit_falls_back_to_ram(monkeypatch):
    monkeypatch.setattr(memory, "recommended_working_set", lambda: 0)
    limit, source = memory.memory_limit()
    assert limit > 2**28 and "RAM" in source
    monkeypatch.setattr(memory, "recommended_working_set", lambda: 123)
    assert memory.memory_limit() == (123, "the device's recommended working set")


# E2B's cached layers: 15 of 35 (the rest share K/V), 3 of them full attention; 128k tokens of bf16 K/V
# take 0.76 GiB next to 3.4 GiB of weights
E2B_LIKE = [memory.LayerKV(1, 256, 256, 512)] * 12 + [memory.LayerKV(1, 512, 512)] * 3
GIB = 2**30


@pytest.mark.parametrize("limit_gib, kv_bits, want", [
    (16, None, ""),                        # 4.1 GiB fits as asked
    (4.4, None, "--kv-bits 8"),            # 8-bit K/V: 3.8 GiB
    (4.1, None, "--kv-bits 4"),            # 4-bit K/V: 3.6 GiB
    (4.1, 8, "--kv-bits 4"),
    (3.85, None, "--kv-bits 4 --max-context "),
    (3.0, None, None),                     # the weights alone do not fit
])
def test_advice_names_the_flag_that_fits(limit_gib, kv_bits, want):
    kv = KVQuant(kv_bits, 64) if kv_bits else None
    a = memory.advise(E2B_LIKE, 131072, weights=int(3.3 * GIB), drafter=80 * 2**20, dtype_bytes=2, kv=kv,
                      limit=int(limit_gib * GIB))
    if want == "":
        assert a.fits and a.flags == ""
        return
    assert not a.fits
    if want is None:
        assert a.flags == "" and "weights alone" in a.message
        return
    assert a.flags.startswith(want), a.message
    if "--max-context" in a.flags:
        ctx = int(a.flags.split()[-1])
        fitted = memory.estimate_memory(E2B_LIKE, ctx, weights=int(3.3 * GIB), drafter=80 * 2**20,
                                        kv=KVQuant(4, 64))
        assert 0 < ctx < 131072 and fitted.total <= 0.9 * limit_gib * GIB
