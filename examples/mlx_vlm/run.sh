#!/usr/bin/env bash
# mlx_spec next to mlx-vlm's Gemma 4 MTP decoding, on the same converted files, in one process.
#
# Needs a venv with mlx_spec and mlx-vlm (0.7.10 tested). mlx-vlm's MTP path needs neither torch nor its
# vision/audio extras:   pip install -e . && pip install --no-deps mlx-vlm==0.7.10 && \
#                        pip install "transformers>=5.14" jinja2 sentencepiece tqdm Pillow requests safetensors
# Usage: bash examples/mlx_vlm/run.sh OUT_DIR [MAX_TOKENS] [REPEATS]
set -euo pipefail
OUT=${1:?usage: run.sh OUT_DIR [MAX_TOKENS] [REPEATS]}; N=${2:-200}; R=${3:-5}
HERE=$(cd "$(dirname "$0")" && pwd); FIX="$HERE/../../tests/fixtures/gemma4-tiny-code"
mkdir -p "$OUT"
# mlx-vlm's MTP target must be `gemma4` (Google's multimodal layout); the tiny base is text-only: wrap it.
python "$HERE/wrap_multimodal.py" "$FIX/base" "$OUT/hf-base-mm"
mlx_spec.convert --hf-path "$OUT/hf-base-mm" --mlx-path "$OUT/base" --dtype float32 --force
mlx_spec.convert --hf-path "$FIX/assistant" --mlx-path "$OUT/assistant" --dtype float32 --force
python "$HERE/compare.py" --base "$OUT/base" --drafter "$OUT/assistant" --prompt "def fibonacci(n):" \
    --prompt LONG --max-tokens "$N" --k 3 --ours-auto --repeats "$R" --json "$OUT/compare.json"
python "$HERE/acceptance_at_temperature.py" "$OUT/base" "$OUT/assistant"
