#!/usr/bin/env bash
# Convert a Hugging Face Gemma 4 checkpoint and its assistant to 4-bit MLX, then chat with speculation on.
#
#   bash examples/convert_then_chat.sh [HF_BASE] [HF_ASSISTANT] [OUT_DIR]
#
# Defaults to the trained tiny pair in tests/fixtures and answers two scripted turns, so it runs anywhere.
# For the real thing: bash examples/convert_then_chat.sh google/gemma-4-E2B-it google/gemma-4-E2B-it-assistant
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
base="${1:-$here/tests/fixtures/gemma4-tiny-code/base}"
assistant="${2:-$here/tests/fixtures/gemma4-tiny-code/assistant}"
out="${3:-$(mktemp -d)/models}"

mlx_spec.convert --hf-path "$base" --mlx-path "$out/base-4bit" -q --q-bits 4 --q-group-size 32
mlx_spec.convert --hf-path "$assistant" --mlx-path "$out/assistant"

if [ -t 0 ]; then   # a terminal: chat interactively
  exec mlx_spec.chat --model "$out/base-4bit" --drafter "$out/assistant"
fi
printf 'def read_config(path):\n/stats\n' | mlx_spec.chat --model "$out/base-4bit" --drafter "$out/assistant" \
  --max-tokens 60
