"""Trees against chains on the trained tiny pair, at equal verified rows: tau, wall time here, and a projection.

For each drafter (the MTP assistant, the tiny DFlash) and temperature, over held-out prompts (heldout.py):
a chain of k = N drafts and a tree of N nodes both verify N + 1 rows per round. Prints per configuration
the pooled tau (tokens per round), its median over prompts, the speedup over plain decoding measured here
(median over prompts, each against a plain run of the same prompt right before it), and the speedup the
measured tau would give where a round of K drafts costs 0.83 + 0.17 K plain steps (mlxcel's M3 Ultra
curve, 31B 4-bit), K the drafts or nodes a round verified on average (a DFlash block caps a chain at its
block): a projection from tau alone, drafting cost left out. `auto` rows: --num-draft-tokens
auto with chains only, and with --tree-nodes auto (costs measured here on first use).

    python examples/measure/trees.py [--prompts 8] [--tokens 96] [--temps 0,0.7,1.0] [--sizes 4,8,16]
                                     [--drafters assistant,dflash] [--acceptance rejection] [--no-auto]
                                     [--shift S]

--shift S multiplies every weight of the base by (1 + S * N(0, 1)) (seed 0): a base the drafter was not
trained for, where it is less sure of the base's next token.
"""

import argparse
import statistics
import time
from pathlib import Path

from heldout import heldout_prompts

from mlx_spec import load, load_drafter, stream_generate
from mlx_spec.stats import GenerationStats
from mlx_spec.tuning import AutoTuner

PAIR = Path(__file__).resolve().parents[2] / "tests/fixtures/gemma4-tiny-code"


def projected(stats: GenerationStats) -> float:
    return stats.tau / (0.83 + 0.17 * stats.drafted / stats.rounds)


def shift(model, scale: float) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    key = mx.random.key(0)
    params = []
    for name, w in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        params.append((name, w * (1 + scale * mx.random.normal(w.shape, key=sub))))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def run(model, tok, ids, drafter, temp, acceptance, tokens, seed, **drafting):
    stats, start = None, time.perf_counter()
    for r in stream_generate(model, tok, ids, drafter=drafter, temp=temp, acceptance=acceptance, seed=seed,
                             max_tokens=tokens, **drafting):
        stats = r.stats
    return stats, stats.generation_tokens / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--temps", default="0,0.7,1.0")
    p.add_argument("--sizes", default="4,8,16")
    p.add_argument("--drafters", default="assistant,dflash")
    p.add_argument("--acceptance", default="rejection", help="the rule at temp > 0 (rejection, coupled, match)")
    p.add_argument("--no-auto", action="store_true")
    p.add_argument("--shift", type=float, default=0.0)
    a = p.parse_args()
    model, tok = load(str(PAIR / "base"))
    if a.shift:
        shift(model, a.shift)
    prompts = heldout_prompts(tok, a.prompts)
    tuner = AutoTuner()
    print(f"{len(prompts)} held-out prompts x {a.tokens} tokens; T > 0: {a.acceptance}, seed 0")
    print(f"{'drafter':<10}{'temp':>5}  {'config':<16}{'tau':>6}{'tau med':>9}{'speedup here':>14}"
          f"{'projected M3U':>15}{'tree rounds':>13}")
    for name in a.drafters.split(","):
        drafter = load_drafter(str(PAIR / name), model)
        for temp in [float(t) for t in a.temps.split(",")]:
            configs = []
            for n in [int(s) for s in a.sizes.split(",")]:
                configs += [(f"chain k={n}", n, dict(num_draft_tokens=n)),
                            (f"tree {n}", n, dict(num_draft_tokens=n, tree_nodes=n))]
            if not a.no_auto:
                configs += [("auto chains", None, dict(num_draft_tokens="auto", tuner=tuner)),
                            ("auto trees", None, dict(num_draft_tokens="auto", tree_nodes="auto", tuner=tuner))]
            results = {label: ([], []) for label, _, _ in configs}
            for i, ids in enumerate(prompts):
                _, plain_tps = run(model, tok, ids, None, temp, a.acceptance, a.tokens, i)
                for label, _, drafting in configs:
                    stats, tps = run(model, tok, ids, drafter, temp, a.acceptance, a.tokens, i, **drafting)
                    results[label][0].append(stats)
                    results[label][1].append(tps / plain_tps)
            for label, k, _ in configs:
                runs, speedups = results[label]
                pooled = GenerationStats.total(runs)
                proj = f"{projected(pooled):.2f}x" if k and pooled.rounds else "-"
                trees = f"{pooled.tree_rounds / pooled.rounds:.0%}" if pooled.rounds else "-"
                print(f"{name:<10}{temp:>5}  {label:<16}{pooled.tau:>6.2f}{statistics.median(s.tau for s in runs):>9.2f}"
                      f"{statistics.median(speedups):>13.2f}x{proj:>15}{trees:>13}", flush=True)


if __name__ == "__main__":
    main()
