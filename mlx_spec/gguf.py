"""Loading a llama-architecture GGUF file (llama.cpp's single-file format) as an mlx-lm `llama` model.

MLX reads GGUF itself (`mx.load`): Q4_0, Q4_1 and Q8_0 tensors arrive as MLX affine-quantized triples
(`weight` uint32, `scales`, `biases`; group size 32), other quantization types arrive dequantized to
float16. This module renames the tensors to mlx-lm's names, builds the llama ModelArgs and a Hugging Face
fast tokenizer from the file's metadata, and wraps that in mlx-lm's TokenizerWrapper.

Two llama.cpp conventions matter:
- llama.cpp's converter permutes the rows of attn_q / attn_k so that rotary pairs are interleaved (its
  "normal" rope). We keep the rows as stored and run RoPE in MLX's traditional (interleaved) mode, which is
  the same computation (q·k is unchanged when both get the same per-head permutation) and needs no
  reshuffling of packed quantized rows.
- GGUF stores scales in float16. MLX's CPU quantized matmul is much slower with float16 scales than with
  float32 ones (activations follow the scales' dtype), so on the CPU backend they are cast to float32.

It knows GGUF metadata keys and tensor names; it knows nothing of drafting or decoding.
"""

from collections import Counter
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ModelLoadError, UnsupportedModelError
from .loading import DTYPES, default_dtype
GGUF_GROUP_SIZE = 32  # the block size of every GGUF type MLX keeps quantized (Q4_0, Q4_1, Q8_0)
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor-name piece -> mlx-lm llama name piece. mlx_lm.gguf only has the other direction (export:
# translate_weight_names); tests check that this table is its inverse.
TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp `tokenizer.ggml.pre` -> how text is split before byte-level BPE (llama.cpp llama-vocab.cpp).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": ("gpt2",), "gpt2": ("gpt2",), "gpt-2": ("gpt2",), "mpt": ("gpt2",), "olmo": ("gpt2",),
    # digits one by one, then GPT-2's split (StarCoder-family vocabularies)
    "smollm": ("digits", "gpt2"), "starcoder": ("digits", "gpt2"), "refact": ("digits", "gpt2"),
    "command-r": ("digits", "gpt2"), "codeshell": ("digits", "gpt2"),
    "llama3": ("llama3",), "llama-v3": ("llama3",), "llama-bpe": ("llama3",), "smaug-bpe": ("llama3",),
    "qwen2": ("qwen2",), "deepseek-r1-qwen": ("qwen2",),
}
SPLITS = {"gpt2": GPT2_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def gguf_path(path) -> Path:
    path = Path(path).expanduser()
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is not a .gguf file")
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return path


def read_gguf(path) -> Tuple[dict, dict]:
    """(tensors, metadata) as MLX reads them; metadata numbers become Python scalars."""
    path = gguf_path(path)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path} as GGUF: {e}") from e
    meta = {k: (v.item() if isinstance(v, mx.array) and v.ndim == 0 else v) for k, v in metadata.items()}
    return tensors, meta


def _need(meta: dict, key: str, path):
    if key not in meta:
        raise ModelLoadError(f"{path} lacks the GGUF metadata key {key!r}; the file is incomplete or not a llama model")
    return meta[key]


def model_config(meta: dict, tensors: dict, path="the GGUF file") -> dict:
    """An mlx-lm llama config.json (as a dict) from GGUF metadata, with a `quantization` block when the
    file holds quantized tensors."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path} holds a {arch!r} model; GGUF loading supports {', '.join(SUPPORTED_ARCHITECTURES)} only "
            "(convert the original Hugging Face checkpoint instead)"
        )
    if "rope_freqs.weight" in tensors or meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
        raise UnsupportedModelError(
            f"{path} uses a RoPE scaling (llama3-style rope_freqs) that GGUF loading does not map yet")
    heads = int(_need(meta, f"{arch}.attention.head_count", path))
    hidden = int(_need(meta, f"{arch}.embedding_length", path))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{path} rotates {rope_dim} of {head_dim} head dims (partial RoPE); not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size", len(tokens) if tokens else tensors["token_embd.weight"].shape[0]))
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_need(meta, f"{arch}.block_count", path)),
        "intermediate_size": int(_need(meta, f"{arch}.feed_forward_length", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_need(meta, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "vocab_size": vocab,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        # rows of attn_q/attn_k are in llama.cpp's interleaved-pair order (see the module docstring)
        "rope_traditional": True,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token_id"] = int(eos)
    quantization = _quantization(tensors)
    if quantization:
        config["quantization"] = quantization
    return config


def _quantization(tensors: dict) -> dict:
    """mlx-lm's quantization block: the common bits, plus per-layer entries where a tensor differs."""
    bits = {}
    for name, scales in tensors.items():
        if name.endswith(".scales"):
            base = name[: -len(".scales")]
            bits[rename_tensor(base)] = tensors[f"{base}.weight"].shape[-1] // scales.shape[-1]
    if not bits:
        return {}
    common = Counter(bits.values()).most_common(1)[0][0]
    block = {"group_size": GGUF_GROUP_SIZE, "bits": common, "mode": "affine"}
    block.update({path: {"group_size": GGUF_GROUP_SIZE, "bits": b} for path, b in bits.items() if b != common})
    return block


def rename_tensor(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (a module path when no suffix)."""
    parts = name.split(".")
    prefix = []
    if parts[0] == "blk":
        prefix, parts = ["model", "layers", parts[1]], parts[2:]
    if parts[0] not in TENSOR_NAMES:
        raise UnsupportedModelError(f"GGUF tensor {name!r} has no llama counterpart")
    return ".".join(prefix + [TENSOR_NAMES[parts[0]]] + parts[1:])


def build_model(tensors: dict, config: dict, path="the GGUF file", dtype=None) -> nn.Module:
    """The mlx-lm llama model for `config`, quantized where the file is, with the file's tensors loaded.
    `dtype` casts every floating tensor (scales, biases, norms, float16-dequantized weights)."""
    from mlx_lm.models import llama

    from .checkpoint import check_weights

    weights = {rename_tensor(k): v for k, v in tensors.items()}
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    quantization = config.get("quantization")
    if quantization:
        def predicate(module_path, module):
            if f"{module_path}.scales" not in weights:
                return False
            return quantization.get(module_path, {"group_size": GGUF_GROUP_SIZE, "bits": quantization["bits"]})

        nn.quantize(model, group_size=GGUF_GROUP_SIZE, bits=quantization["bits"], class_predicate=predicate)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_weights(expected, weights, Path(path))
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def build_tokenizer(meta: dict, path="the GGUF file"):
    """mlx-lm's TokenizerWrapper around a fast tokenizer rebuilt from the file's byte-level BPE vocabulary."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path} has a {kind!r} tokenizer; GGUF loading supports byte-level BPE ('gpt2') only")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path} splits text with llama.cpp pre-tokenizer {pre!r}, which mlx_spec.gguf does not know "
            f"(known: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    tokens = list(_need(meta, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _need(meta, "tokenizer.ggml.merges", path)]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    steps = []
    for step in PRE_TOKENIZERS[pre]:
        if step == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(SPLITS[step]), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()

    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if isinstance(types, mx.array) else (types or [])
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    backend.add_special_tokens(control)
    backend.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"),
        pad_token=token("padding"), chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return TokenizerWrapper(hf, BPEStreamingDetokenizer, eos_token_ids=[int(eos)] if eos is not None else None)


def _cast(dtype: Optional[str]):
    """The dtype to compute in: as asked, else float32 on the CPU backend (its half-precision matmuls,
    quantized or not, are slow), else the file's."""
    if dtype is None:
        return default_dtype(quantized=True)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_gguf(path, dtype: Optional[str] = None):
    """(model, tokenizer) from a llama-architecture .gguf file (mlx_lm.load's shape)."""
    path = gguf_path(path)
    tensors, meta = read_gguf(path)
    config = model_config(meta, tensors, path)
    return build_model(tensors, config, path, _cast(dtype)), build_tokenizer(meta, path)
