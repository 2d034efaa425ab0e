"""Acceptance when sampling: mlx-vlm's Gemma 4 MTP vs mlx_spec's (k = 3), same converted files and prompts.

mlx-vlm accepts a draft when the base's own sample equals it (token match); mlx_spec uses rejection
sampling (accept with probability min(1, p/q), resample from the residual). Both keep the base's
distribution; rejection sampling accepts more. Prints the mean tokens per round (tau) of each.

    python examples/mlx_vlm/acceptance_at_temperature.py BASE_DIR DRAFTER_DIR   (after run.sh: OUT/base ...)
"""

import statistics
import sys
from pathlib import Path

import mlx.core as mx

import mlx_spec
from mlx_vlm.generate.ar import generate_step
from mlx_vlm.speculative.drafters import load_drafter as vlm_load_drafter
from mlx_vlm.utils import load_model as vlm_load_model
base, drafter = sys.argv[1], sys.argv[2]
vm = vlm_load_model(Path(base)); vd, _ = vlm_load_drafter(drafter, kind="mtp")
om, tok = mlx_spec.load(base); od = mlx_spec.load_drafter(drafter, om)
prompts = ["def fibonacci(n):", "import os\nimport sys\n\ndef main(argv):\n", "class Config:\n    def __init__(self"]
N = 120
for temp in (0.7, 1.0):
    vt, ot = [], []
    for seed in range(3):
        for p in prompts:
            ids = mlx_spec.api.encode_prompt(tok, p)
            mx.random.seed(seed)
            vd.accept_lens, vd.draft_lens = [], []
            out = []
            for t, _ in generate_step(mx.array([ids]), vm, None, None, max_tokens=N, temperature=temp,
                                      draft_model=vd, draft_kind="mtp", draft_block_size=4):
                out.append(int(t))
                if len(out) >= N: break
            acc, rounds = sum(vd.accept_lens), len(vd.accept_lens)
            vt.append((acc + rounds) / rounds)
            stats = None
            for r in mlx_spec.stream_generate(om, tok, ids, max_tokens=N, drafter=od, num_draft_tokens=3, temp=temp,
                                              seed=seed):
                stats = r.stats
            ot.append(stats.tau)
    print(f"temp {temp}: tau mlx-vlm {statistics.mean(vt):.2f} (token match) | "
          f"mlx_spec {statistics.mean(ot):.2f} (rejection sampling); {len(vt)} runs of {N} tokens")
