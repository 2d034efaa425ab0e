"""mlx-vlm's on-disk layouts load here and decode exactly like our own conversion (mlx-vlm is not needed).

What `mlx_vlm.convert` (mlx-vlm 0.7.10) writes for a Gemma 4 pair, as observed on the trained tiny pair:
- text-only base (`model_type: gemma4_text`): every tensor carries its wrapper's prefix,
  `language_model.model.*` (mlx-lm and we name them `model.*`; mlx_lm.load refuses this layout). The
  config is the HF one (`per_layer_config` kept, not resolved), with `generation_config` nested in it;
  tokenizer_config.json is rewritten by transformers 5 (no `add_bos_token`, the chat template moved to
  chat_template.jinja). Quantized: both `quantization` and `quantization_config`, and its mixed recipes
  write an entry for every quantized module, keyed by the prefixed path, with a group size that may differ
  from the top-level one.
- multimodal base (`model_type: gemma4`, Google's layout): `language_model.model.*` as in ours and
  mlx-lm's, plus `vision_config` and `audio_config: null` (we drop the towers' configs).
- drafter (`gemma4_assistant`): our tensor names; the checkpoint's dtype kept (float32; we default to
  bf16); with `-q` the centroid head is quantized too (we never quantize it).
The tests rebuild those layouts from our own conversion and check that the same tokens come out.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import TINY_CODE
from mlx.utils import tree_flatten

from convert import convert as convert_api
from mlx_spec import load, load_drafter
from mlx_spec.checkpoint import unwrap_language_model
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.loading import load_model
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.request import Request

PREFIX = "language_model."
WINDOW = 32  # the tiny pair's sliding window: prompt + generation below span more than two windows
N_NEW = 48
VLM_TOKENIZER_CONFIG = {  # tokenizer_config.json as mlx_vlm.convert rewrites it (transformers 5.24)
    "backend": "tokenizers", "bos_token": "<bos>", "clean_up_tokenization_spaces": False, "eos_token": "<eos>",
    "is_local": True, "local_files_only": False, "model_max_length": 2048, "pad_token": "<pad>",
    "tokenizer_class": "TokenizersBackend", "unk_token": "<unk>",
}


def convert(*args, **kwargs) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        return convert_api(*args, **kwargs)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our conversion of the trained tiny pair (fp32 base, fp32 drafter) and the prompt ids."""
    root = tmp_path_factory.mktemp("ours")
    base = convert(TINY_CODE / "base", root / "base", dtype="float32")
    drafter = convert(TINY_CODE / "assistant", root / "assistant", dtype="float32")
    _, tokenizer = load(str(base))
    prompt = tokenizer.encode('import os\nimport sys\n\n\ndef main(argv):\n    """Parse the arguments and run."""\n'
                              "    parser = argparse.ArgumentParser()\n")
    assert len(prompt) + N_NEW > 2 * WINDOW
    return base, drafter, prompt


def hf_config(name: str) -> dict:
    """The HF config as mlx-vlm writes it back: unresolved, generation_config nested."""
    config = json.loads((TINY_CODE / name / "config.json").read_text())
    config["generation_config"] = json.loads((TINY_CODE / name / "generation_config.json").read_text())
    return config


def write_vlm_dir(out: Path, config: dict, weights: dict, tokenizer_from: Path) -> Path:
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
             "weight_map": {k: "model.safetensors" for k in sorted(weights)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (out / "config.json").write_text(json.dumps(config, indent=4))
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy2(tokenizer_from / name, out / name)
    (out / "tokenizer_config.json").write_text(json.dumps(VLM_TOKENIZER_CONFIG, indent=2))
    chat = json.loads((tokenizer_from / "tokenizer_config.json").read_text()).get("chat_template")
    if chat:
        (out / "chat_template.jinja").write_text(chat)
    return out


def saved(model_dir: Path) -> dict:
    return mx.load(str(model_dir / "model.safetensors"))


def greedy(model, prompt, drafter=None, k=3) -> list:
    proposer = MTPProposer(drafter, model) if drafter is not None else None
    eng = Engine(model, Request(list(prompt), max_tokens=N_NEW), proposer=proposer, policy=FixedK(k))
    return [ev.token for ev in eng.run()]  # no eos ids: always N_NEW tokens


def quantize_like_mlx_vlm(model: nn.Module, skip=()) -> dict:
    """Quantize as mlx-vlm's mixed recipe does (per-module entries, group size 64 although the top level
    says 32); returns the per-module quantization entries, keyed by our paths."""
    entries = {}

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or any(s in path for s in skip):
            return False
        entries[path] = {"group_size": 64, "bits": 6 if ("embed" in path or "down_proj" in path) else 4}
        return entries[path]

    nn.quantize(model, group_size=32, bits=4, class_predicate=predicate)
    return entries


def test_text_only_base_as_mlx_vlm_writes_it(ours, tmp_path):
    base_dir, drafter_dir, prompt = ours
    weights = {PREFIX + k: v for k, v in saved(base_dir).items()}
    assert all(k.startswith("language_model.model.") for k in weights)
    vlm = write_vlm_dir(tmp_path / "vlm-base", hf_config("base"), weights, TINY_CODE / "base")

    ref, ref_tok = load(str(base_dir))
    got, got_tok = load(str(vlm))
    assert got_tok.encode("def f(x):") == ref_tok.encode("def f(x):"), "BOS and ids as with our tokenizer_config"
    ids = mx.array([prompt])
    assert mx.array_equal(ref(ids), got(ids)), "same weights under mlx-vlm's names: identical logits"

    drafter = load_drafter(str(drafter_dir), got)
    plain = greedy(ref, prompt)
    assert greedy(got, prompt) == plain
    for k in (1, 3, 5):
        assert greedy(got, prompt, drafter, k) == plain, f"MTP k={k} on mlx-vlm's text layout == plain"


def test_quantized_text_base_with_mlx_vlm_per_module_entries(ours, tmp_path):
    base_dir, drafter_dir, prompt = ours
    model, _, _ = load_model(str(base_dir))
    entries = quantize_like_mlx_vlm(model)
    q = {"group_size": 32, "bits": 4, "mode": "affine", **{PREFIX + p: e for p, e in entries.items()}}
    config = dict(hf_config("base"), quantization=q, quantization_config=q)
    weights = {PREFIX + k: v for k, v in tree_flatten(model.parameters())}
    vlm = write_vlm_dir(tmp_path / "vlm-base-q", config, weights, TINY_CODE / "base")

    got, _ = load(str(vlm))
    embed = got.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.bits, embed.group_size) == (6, 64), \
        "per-module entries are read under our names (not guessed from shapes)"
    drafter = load_drafter(str(drafter_dir), got)
    plain = greedy(model, prompt)
    assert greedy(got, prompt) == plain, "same quantized weights: same greedy tokens"
    assert greedy(got, prompt, drafter, 3) == plain


def test_multimodal_base_as_mlx_vlm_writes_it(ours, tmp_path):
    base_dir, drafter_dir, prompt = ours
    text = hf_config("base")
    text.pop("generation_config")
    config = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "dtype": "float32",
              "text_config": text, "tie_word_embeddings": True, "vocab_size": text["vocab_size"],
              "vision_config": {"model_type": "gemma4_vision", "hidden_size": 16, "num_hidden_layers": 1},
              "audio_config": None, "eos_token_id": 1, "bos_token_id": 2,
              "generation_config": hf_config("base")["generation_config"]}
    weights = {PREFIX + k: v for k, v in saved(base_dir).items()}
    vlm = write_vlm_dir(tmp_path / "vlm-mm", config, weights, TINY_CODE / "base")

    ref, _ = load(str(base_dir))
    got, _ = load(str(vlm))
    drafter = load_drafter(str(drafter_dir), got)
    plain = greedy(ref, prompt)
    assert greedy(got, prompt) == plain
    assert greedy(got, prompt, drafter, 3) == plain


def test_drafter_as_mlx_vlm_writes_it_fp32_and_quantized_centroids(ours, tmp_path):
    base_dir, drafter_dir, prompt = ours
    base, _ = load(str(base_dir))
    plain = greedy(base, prompt)

    fp32 = write_vlm_dir(tmp_path / "vlm-assistant", hf_config("assistant"), saved(drafter_dir), TINY_CODE / "base")
    ref_drafter = load_drafter(str(drafter_dir), base)
    got_drafter = load_drafter(str(fp32), base)
    ref_spec = Engine(base, Request(list(prompt), max_tokens=N_NEW), proposer=MTPProposer(ref_drafter, base),
                      policy=FixedK(3))
    got_spec = Engine(base, Request(list(prompt), max_tokens=N_NEW), proposer=MTPProposer(got_drafter, base),
                      policy=FixedK(3))
    assert [e.token for e in got_spec.run()] == [e.token for e in ref_spec.run()] == plain
    assert got_spec.stats.accepted == ref_spec.stats.accepted, "same drafter weights: same drafts"

    drafter, _, _ = load_model(str(drafter_dir))
    quantize_like_mlx_vlm(drafter)
    assert any(k.startswith("masked_embedding.centroids.") and k.endswith("scales")
               for k, _ in tree_flatten(drafter.parameters())), "mlx-vlm quantizes the centroid head too"
    q = {"group_size": 32, "bits": 4, "mode": "affine"}
    quant = write_vlm_dir(tmp_path / "vlm-assistant-q", dict(hf_config("assistant"), quantization=q,
                                                              quantization_config=q),
                          dict(tree_flatten(drafter.parameters())), TINY_CODE / "base")
    # No per-module entries and a top level (4 bits, group 32) that fits none of the tensors (group 64):
    # mlx-lm's rule reads each module's bits and group size from the stored shapes.
    got = load_drafter(str(quant), base)
    assert greedy(base, prompt, got, 3) == plain


def test_unwrap_only_when_the_model_has_no_wrapper():
    w = {"language_model.model.norm.weight": mx.zeros(2)}
    cfg = {"quantization": {"group_size": 64, "bits": 4, "language_model.model.embed_tokens": {"bits": 6}}}
    out, out_cfg = unwrap_language_model(["model.norm.weight"], w, cfg)
    assert list(out) == ["model.norm.weight"]
    assert out_cfg["quantization"] == {"group_size": 64, "bits": 4, "model.embed_tokens": {"bits": 6}}
    assert "language_model.model.embed_tokens" in cfg["quantization"], "the caller's config is not modified"
    # the multimodal model expects the prefix: unchanged
    assert unwrap_language_model(["language_model.model.norm.weight"], w, cfg) == (w, cfg)
    # a mix of prefixed and plain names is not mlx-vlm's layout: left for check_weights to report
    mixed = dict(w, **{"model.norm.weight": mx.zeros(2)})
    assert unwrap_language_model(["model.norm.weight"], mixed, cfg)[0] is mixed
