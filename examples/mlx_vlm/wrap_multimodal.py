"""Wrap a text-only Gemma 4 HF checkpoint (`gemma4_text`) in Google's multimodal `gemma4` layout.

google/gemma-4-*-it ship as `gemma4` (text weights under `model.language_model.*`, plus vision/audio
towers). mlx-vlm's MTP path needs that model type as its target (its `gemma4_text` model returns no hidden
state), so to compare on the trained tiny pair, which is text-only, we wrap it first. No tower weights are
written; both mlx-vlm and mlx_spec drop towers that have none.

    python examples/mlx_vlm/wrap_multimodal.py tests/fixtures/gemma4-tiny-code/base /tmp/cmp/hf-base-mm
"""

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx


def wrap(src: Path, out: Path) -> None:
    text = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if k != "architectures"}
    vocab = text["vocab_size"]
    config = {
        "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
        "dtype": text.get("dtype", "float32"), "text_config": text, "tie_word_embeddings": True,
        "vocab_size": vocab, "eos_token_id": text.get("eos_token_id"), "bos_token_id": text.get("bos_token_id"),
        # special ids the multimodal config must name; the tiny vocabulary's last ids stand in for them
        "image_token_id": vocab - 1, "audio_token_id": vocab - 2, "boi_token_id": vocab - 3, "eoi_token_id": vocab - 4,
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 16, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "head_dim": 8, "patch_size": 4, "intermediate_size": 32},
        "audio_config": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = mx.load(str(src / "model.safetensors"))
    wrapped = {"model.language_model." + k.removeprefix("model."): v for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), wrapped, metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy2(f, out / f.name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: wrap_multimodal.py HF_TEXT_CHECKPOINT_DIR OUT_DIR")
    wrap(Path(sys.argv[1]), Path(sys.argv[2]))
