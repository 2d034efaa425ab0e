"""Side by side: mlx-vlm's Gemma 4 MTP speculative decoding vs mlx_spec, on the same converted model files.

Runs in one process (needs mlx-vlm and mlx_spec in the same venv). Both sides get the same prompt token
ids (tokenized once by mlx_spec's tokenizer for --base). Greedy. For each implementation: plain greedy and
speculative greedy; outputs are compared token for token (speculative vs that implementation's own plain,
and the two plain decodes against each other); timing is interleaved over --repeats after one warm-up.

  python examples/mlx_vlm/compare.py --base DIR --drafter DIR [--vlm-base DIR --vlm-drafter DIR] --prompt P ...

`run.sh` next to it converts the trained tiny pair and runs this. mlx-vlm's `generate_step` (the function
behind its CLI) is driven directly because its CLI always applies the chat template.

--vlm-base/--vlm-drafter default to --base/--drafter (the same files for both implementations).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

import mlx_spec
from mlx_vlm.generate.ar import generate_step
from mlx_vlm.speculative.drafters import load_drafter as vlm_load_drafter
from mlx_vlm.utils import load_model as vlm_load_model

LONG_PROMPT = '''"""Text wrapping and filling.
"""

import re

__all__ = ['TextWrapper', 'wrap', 'fill', 'dedent', 'indent', 'shorten']

class TextWrapper:
    def __init__(self, width=70, initial_indent="", subsequent_indent="",
                 expand_tabs=True, replace_whitespace=True):
        self.width = width
'''


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--drafter", required=True)
    p.add_argument("--vlm-base")
    p.add_argument("--vlm-drafter")
    p.add_argument("--prompt", action="append", help="repeatable; 'LONG' = a ~100-token code prompt")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--k", type=int, nargs="+", default=[3], help="draft tokens per round (mlx-vlm block size k+1)")
    p.add_argument("--ours-auto", action="store_true", help="also time mlx_spec --num-draft-tokens auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    return p.parse_args()


def main():
    a = parse()
    prompts = [LONG_PROMPT if p == "LONG" else p for p in (a.prompt or ["def fibonacci(n):"])]
    vb, vd = a.vlm_base or a.base, a.vlm_drafter or a.drafter

    ours_model, tok = mlx_spec.load(a.base)
    ours_drafter = mlx_spec.load_drafter(a.drafter, ours_model)
    vlm_model = vlm_load_model(Path(vb))
    vlm_drafter, kind = vlm_load_drafter(vd, kind="mtp")
    eos = set(tok.eos_token_ids)
    print(f"mlx_spec: base={a.base} drafter={a.drafter}\nmlx-vlm:  base={vb} drafter={vd} (kind={kind}, "
          f"configured block_size={getattr(vlm_drafter.config, 'block_size', None)})")
    print(f"max_tokens={a.max_tokens} repeats={a.repeats} k={a.k}; EOS ids {sorted(eos)} (mlx-vlm's "
          "generate_step does not stop at EOS; mlx_spec does: outputs are compared up to the first EOS)")

    def vlm_run(ids, k=None):
        kw = dict(draft_model=vlm_drafter, draft_kind="mtp", draft_block_size=k + 1) if k else {}
        if k:
            vlm_drafter.accept_lens, vlm_drafter.draft_lens = [], []
        out = []
        for t, _ in generate_step(mx.array([ids]), vlm_model, None, None, max_tokens=a.max_tokens,
                                  temperature=0.0, **kw):
            out.append(int(t))
            if len(out) >= a.max_tokens:
                break
        info = ""
        if k and vlm_drafter.accept_lens:
            acc, rounds = sum(vlm_drafter.accept_lens), len(vlm_drafter.accept_lens)
            info = f"tau {(acc + rounds) / rounds:.2f}, accepted {acc}/{sum(vlm_drafter.draft_lens)}"
        return out, info

    tuner = mlx_spec.AutoTuner()  # kept across runs, as the CLI keeps one across requests

    def ours_run(ids, k=None):
        kw = dict(drafter=ours_drafter, num_draft_tokens=k, tuner=tuner) if k else {}
        out, stats = [], None
        for r in mlx_spec.stream_generate(ours_model, tok, ids, max_tokens=a.max_tokens, **kw):
            out.append(r.token)
            stats = r.stats
        info = f"tau {stats.tau:.2f}, accepted {stats.accepted}/{stats.drafted}" if k and stats.rounds else ""
        return out, info

    def cut(ts):
        for i, t in enumerate(ts):
            if t in eos:
                return ts[: i + 1]
        return ts

    configs = [("mlx-vlm", "plain", vlm_run, None), ("mlx_spec", "plain", ours_run, None)]
    for k in a.k:
        configs += [("mlx-vlm", f"mtp k={k}", vlm_run, k), ("mlx_spec", f"mtp k={k}", ours_run, k)]
    if a.ours_auto:
        configs.append(("mlx_spec", "mtp auto", ours_run, "auto"))

    report = []
    for prompt in prompts:
        ids = mlx_spec.api.encode_prompt(tok, prompt)
        print(f"\n=== prompt: {len(ids)} tokens {prompt[:40]!r}...")
        outs, infos, times = {}, {}, {c[:2]: [] for c in configs}
        for impl, name, fn, k in configs:  # warm-up (and auto's one-time tuning probe) + outputs
            outs[impl, name], infos[impl, name] = fn(ids, k)
        for r in range(a.repeats):
            for impl, name, fn, k in configs[r % 2:] + configs[: r % 2]:  # interleaved, alternating who leads
                t0 = time.perf_counter()
                o, _ = fn(ids, k)
                times[impl, name].append((len(o), time.perf_counter() - t0))
        ref = {impl: cut(outs[impl, "plain"]) for impl in ("mlx-vlm", "mlx_spec")}
        print(f"plain greedy, mlx-vlm vs mlx_spec: {'IDENTICAL' if ref['mlx-vlm'] == ref['mlx_spec'] else 'DIFFER'}"
              f" ({len(ref['mlx-vlm'])} / {len(ref['mlx_spec'])} tokens up to EOS)")
        print(f"{'impl':9} {'config':10} {'tok/s':>8} {'vs plain':>8}  {'== own plain?':14} stats")
        for impl, name, fn, k in configs:
            o = cut(outs[impl, name])
            n = [x[0] for x in times[impl, name]]
            tps = statistics.median(x[0] / x[1] for x in times[impl, name])
            # speedup paired within a repeat (runs a second apart): a machine whose speed drifts between
            # repeats moves both sides of each ratio alike
            speedup = statistics.median((x[0] / x[1]) / (p[0] / p[1])
                                        for x, p in zip(times[impl, name], times[impl, "plain"]))
            same = o == ref[impl]
            first = next((i for i, (x, y) in enumerate(zip(o, ref[impl])) if x != y), None)
            if same:
                verdict = "yes"
            elif first is None:
                verdict = f"len {len(o)}!={len(ref[impl])}"
            else:
                verdict = f"NO @{first} (pos {len(ids) + first})"
            print(f"{impl:9} {name:10} {tps:8.1f} {speedup:7.2f}x  {verdict:14} {infos[impl, name]}"
                  f"{'' if len(set(n)) == 1 else f' tokens/run {n}'}")
            report.append(dict(prompt=prompt, impl=impl, config=name, tok_s=tps, speedup=speedup,
                               equals_plain=same, first_divergence=first, info=infos[impl, name],
                               tokens=o))
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
