"""Acceptance of the three sampling modes on the trained tiny pair, over held-out prompts (heldout.py).

coupled (the drafter draws with the base's own noise; output = plain sampling with the seed), rejection
(Leviathan/Chen) and match (token match, independent noise), at k = 3, several temperatures and seeds.
Prints τ and acceptance by position per mode: the median over prompts with its interquartile range.

    python examples/measure/acceptance_modes.py [--prompts 24] [--seeds 2] [--tokens 128] [--k 3]
                                                [--temps 0.7,1.0] [--modes rejection,coupled,match]
"""

import argparse
import statistics
from pathlib import Path

from heldout import heldout_prompts

from mlx_spec import load, load_drafter, stream_generate
from mlx_spec.stats import GenerationStats

PAIR = Path(__file__).resolve().parents[2] / "tests/fixtures/gemma4-tiny-code"


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[1], q[0], q[2]


def run(model, tok, drafter, ids, mode, temp, seed, k, n):
    stats = None
    for r in stream_generate(model, tok, ids, drafter=drafter, num_draft_tokens=k, temp=temp, seed=seed,
                             acceptance=mode, max_tokens=n):
        stats = r.stats
    return stats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--temps", default="0.7,1.0")
    p.add_argument("--modes", default="rejection,coupled,match")
    a = p.parse_args()
    model, tok = load(str(PAIR / "base"))
    drafter = load_drafter(str(PAIR / "assistant"), model)
    prompts = heldout_prompts(tok, a.prompts)
    print(f"{len(prompts)} held-out prompts x {a.seeds} seeds x {a.tokens} tokens, k={a.k}")
    print(f"{'temp':>5} {'mode':<10} {'tau median (IQR)':<22} {'acceptance by position (pooled)'}")
    for temp in [float(t) for t in a.temps.split(",")]:
        for mode in a.modes.split(","):
            taus, total = [], GenerationStats()
            for ids in prompts:
                per_prompt = GenerationStats.total(run(model, tok, drafter, ids, mode, temp, s, a.k, a.tokens)
                                                   for s in range(a.seeds))
                taus.append(per_prompt.tau)
                total.merge(per_prompt)
            med, lo, hi = quartiles(taus)
            pos = ", ".join(f"{x:.2f}" for x in total.acceptance_by_position)
            print(f"{temp:>5} {mode:<10} {med:.2f} ({lo:.2f}-{hi:.2f})        {pos}", flush=True)


if __name__ == "__main__":
    main()
