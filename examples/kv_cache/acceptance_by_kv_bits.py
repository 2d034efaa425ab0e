"""τ and acceptance by draft position on the trained tiny pair with quantized K/V (kv_bits None / 8 / 4).

    python examples/kv_cache/acceptance_by_kv_bits.py [--prompts 16] [--max-tokens 128] [--k 3]

Prompts: 64 tokens from each of numpy's `lib/_*_impl.py` sources, from their first top-level `def` (the
base was trained on the standard library, so these are new to it). Greedy; every run is also checked
against plain decoding with the same kv_bits. Prints one JSON line per prompt and setting, then medians.
"""

import argparse
import glob
import json
import os
import statistics

import numpy

from mlx_spec import load, load_drafter
from mlx_spec.engine import Engine
from mlx_spec.tuning import FixedK
from mlx_spec.proposers.mtp import MTPProposer
from mlx_spec.request import Request

PAIR = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "gemma4-tiny-code")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=3)
    args = p.parse_args()
    model, tok = load(os.path.join(PAIR, "base"))
    drafter = load_drafter(os.path.join(PAIR, "assistant"), model)
    files = sorted(glob.glob(os.path.join(os.path.dirname(numpy.__file__), "lib", "_*_impl.py")))[: args.prompts]
    prompts = []
    for f in files:
        text = open(f).read()
        prompts.append((os.path.basename(f), tok.encode(text[text.find("\ndef ") + 1 :])[:64]))

    def run(prompt, bits, proposer):
        cache = model.make_cache(17, kv_bits=bits, kv_group_size=32)  # the pair's sliding head_dim is 32
        eng = Engine(model, Request(prompt, max_tokens=args.max_tokens), proposer=proposer, policy=FixedK(args.k),
                     cache=cache)
        return [e.token for e in eng.run()], eng.stats

    rows = []
    for name, prompt in prompts:
        reference = None
        for bits in (None, 8, 4):
            plain, _ = run(prompt, bits, None)
            spec, stats = run(prompt, bits, MTPProposer(drafter, model))
            reference = plain if bits is None else reference
            row = {"prompt": name, "kv_bits": bits, "tau": round(stats.tau, 3),
                   "acceptance_by_position": [round(a, 3) for a in stats.acceptance_by_position],
                   "spec_equals_plain": spec == plain,
                   "first_divergence_from_full_precision": next(
                       (i for i, (a, b) in enumerate(zip(plain, reference)) if a != b), None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    full = {r["prompt"]: r["tau"] for r in rows if r["kv_bits"] is None}
    for bits in (None, 8, 4):
        rs = [r for r in rows if r["kv_bits"] == bits]
        taus = [r["tau"] for r in rs]
        print(json.dumps({"kv_bits": bits, "tau_median": statistics.median(taus), "tau_min": min(taus),
                          "tau_max": max(taus), "tau_quartiles": statistics.quantiles(taus, n=4),
                          "acceptance_by_position_median": [
                              statistics.median(r["acceptance_by_position"][i] for r in rs) for i in range(args.k)],
                          "tau_change_median": statistics.median(r["tau"] - full[r["prompt"]] for r in rs),
                          "texts_changed": sum(r["first_divergence_from_full_precision"] is not None for r in rs),
                          "all_equal_plain": all(r["spec_equals_plain"] for r in rs)}))


if __name__ == "__main__":
    main()
