"""`mlx_spec.bench`: plain and speculative decoding on the same model and prompts, in one process.

    mlx_spec.bench --model M [--drafter D [--random-drafter]] [--draft-model M2] [--ngram [N]]
                   [--oracle RATE[,RATE...]] [--num-draft-tokens 1,2,3,auto] [--max-tokens N]
                   [--repeats R] [--prompts all|chat|code|summarize|structured|FILE] [--temp T]
                   [--json PATH] [--plot PATH]

Method: the costs of this machine are probed first (tuning.measure_costs: plain step, (k+1)-token
verify passes, drafting), then every configuration decodes every prompt once to warm up, then `--repeats`
interleaved passes run every configuration on every prompt, in an order that rotates between passes, each
configuration's run next to a plain run of the same prompt on either side: those two plain runs are its
baseline. (A machine's speed drifts: this project's shared VM flips by ~2.5x within seconds, a laptop
throttles. A baseline taken seconds from the run it is compared with holds; medians of runs minutes apart
do not.) A pass's tok/s is its generated tokens over its decode time summed over the prompts; the
reported plain_tps and spec_tps are those of the pass whose spec/baseline ratio is the median, and
speedup = spec_tps / plain_tps. Per kind of work likewise. One more, instrumented pass
times drafting on its own (a host sync after each `propose`) for draft_share; it is not in the tok/s.

Statistics (DESIGN.md's words): tau = tokens per round with drafts; round_cost = decode time per base pass
/ plain step time (so speedup ~ tau / round_cost); verify_cost[k] = a (k+1)-token base pass / a pipelined
plain step, from the probe; draft_share = drafting time / round time; efficiency = the decode time the
cost model accounts for (Σ over rounds of verify + drafting, plus one plain step per token decoded without
drafts: the probe's ratios, in plain steps, times the plain step of the interleaved plain runs) / the
measured decode time: 1.0 means the engine adds nothing to the base passes and the drafting. With the
oracle proposer (drafting about free) it is speedup / (tau / verify_cost[k]), the issue's definition.

Knows the engine's public surface (Engine, its stats, the draft-policy contract) and the tuning module;
it decodes nothing itself.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx

from . import prompts as prompt_sets
from . import tuning
from .cli import ArgumentParser, add_sampling_args, check_sampling_args, num_draft_tokens, run
from .engine import Engine, GenerationStats, SamplingParams, resolve_num_draft_tokens
from .errors import MlxSpecError

DEFAULT_NUM_DRAFT_TOKENS = "1,2,3,4,5,auto"
DEFAULT_MAX_TOKENS = 128
DEFAULT_REPEATS = 3
DEFAULT_PROMPTS = "all"
WARMUP_TOKENS = 32
MB = 1024 * 1024


# --- configurations ---------------------------------------------------------------------------------

@dataclass
class Config:
    """One way of decoding: a proposer kind and a k (an int or "auto"); proposer=None is plain."""

    proposer: Optional[str]
    k: Union[int, str]
    make: Callable[[int], object] = field(repr=False, default=lambda i: None)  # prompt index -> Proposer
    oracle_rate: Optional[float] = None
    weights: object = field(repr=False, default=None)  # the drafter / draft model module, if any

    @property
    def family(self) -> str:
        """The proposer without k (costs are measured once per family)."""
        if self.proposer is None:
            return "plain"
        return self.proposer if self.oracle_rate is None else f"oracle({self.oracle_rate:g})"

    @property
    def label(self) -> str:
        return "plain" if self.proposer is None else f"{self.family} k={self.k}"


@dataclass
class RunResult:
    tokens: List[int]
    stats: GenerationStats
    peak_memory_bytes: int
    policy: Optional[dict] = None
    round_time: float = 0.0  # instrumented pass only
    draft_time: float = 0.0


class _RoundTimer:
    """A draft policy around the real one (or a fixed k) that times rounds from next_k() to observe()."""

    def __init__(self, policy, k: int):
        self.policy, self.k = policy, k
        self.round_time, self._t = 0.0, None

    def next_k(self) -> int:
        k = self.policy.next_k() if self.policy is not None else self.k
        self._t = tuning.clock() if k > 0 else None
        return k

    def observe(self, k: int, n_accepted: int) -> None:
        if self._t is not None:
            self.round_time += tuning.clock() - self._t
        if self.policy is not None:
            self.policy.observe(k, n_accepted)


class _TimedProposer:
    """A proposer whose drafts are evaluated (one extra host sync) and timed as they are proposed."""

    def __init__(self, inner):
        self.inner, self.name, self.draft_time = inner, inner.name, 0.0

    def start(self, prompt) -> None:
        self.inner.start(prompt)

    def propose(self, ctx, k: int):
        start = tuning.clock()
        draft = self.inner.propose(ctx, k)
        mx.eval(draft.tokens, *([draft.probs] if draft.probs is not None else []))
        self.draft_time += tuning.clock() - start
        return draft

    def observe(self, n_accepted: int, draft_k: int) -> None:
        self.inner.observe(n_accepted, draft_k)


def decode(model, ids: List[int], proposer, k_value, sampling: SamplingParams, max_tokens: int, eos_ids,
           seed: int, instrument: bool = False) -> RunResult:
    """One request through the engine, as stream_generate runs it but without detokenizing."""
    k, policy = resolve_num_draft_tokens(k_value, model, proposer) if proposer is not None else (0, None)
    timer = None
    if instrument and proposer is not None:
        proposer = _TimedProposer(proposer)
        timer = _RoundTimer(policy, k)
    eng = Engine(model, ids, proposer=proposer, sampling=sampling, max_tokens=max_tokens, num_draft_tokens=k,
                 eos_ids=eos_ids, seed=seed, draft_policy=timer or policy)
    mx.clear_cache()
    mx.reset_peak_memory()
    tokens, first = [], None
    for ev in eng.run():
        tokens.append(ev.token)
        if first is None:
            first = tuning.clock()  # the engine's decode clock also starts at the first token
    if first is not None and tuning.clock_name() != "wall":
        eng.stats.generation_time = tuning.clock() - first
    return RunResult(tokens, eng.stats, max(eng.stats.peak_memory_bytes, mx.get_peak_memory()),
                     policy.summary() if policy is not None else None,
                     timer.round_time if timer else 0.0, proposer.draft_time if instrument and timer else 0.0)


# --- aggregation ------------------------------------------------------------------------------------

def _passes(s: GenerationStats) -> int:
    """Base passes after prefill: every pass emits its accepted drafts plus one token."""
    return max(0, s.generation_tokens - 1 - s.accepted)


def _add(a: List[int], b: List[int]) -> List[int]:
    n = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]


def _sum_stats(runs: List[RunResult]) -> GenerationStats:
    total = GenerationStats()
    for r in runs:
        s = r.stats
        total.generation_tokens += s.generation_tokens
        total.generation_time += s.generation_time
        total.rounds += s.rounds
        total.drafted += s.drafted
        total.accepted += s.accepted
        total.drafted_by_position = _add(total.drafted_by_position, s.drafted_by_position)
        total.accepted_by_position = _add(total.accepted_by_position, s.accepted_by_position)
    return total


def _ideal_seconds(stats: GenerationStats, costs: Optional[tuning.Costs], plain_step_s: float) -> Optional[float]:
    """Decode time the cost model accounts for: Σ rounds (verify[j] + draft(j)) plus one plain step per pass
    without drafts, in plain steps from the probe's ratios, times `plain_step_s`, the plain step measured in
    the interleaved plain runs. (The probe's own seconds are not used: this machine's speed drifts between
    the probe and the runs; a ratio measured within one probe and a step measured next to the runs hold.)"""
    if costs is None or not stats.rounds or not plain_step_s:
        return None
    dbp = stats.drafted_by_position + [0]
    if len(dbp) - 1 > costs.k_max:
        return None
    cost = sum((dbp[j - 1] - dbp[j]) * (costs.verify[j] + costs.draft(j)) for j in range(1, len(dbp)))
    return (cost + _passes(stats) - stats.rounds) * plain_step_s


def median_costs(samples: List[tuning.Costs]) -> tuning.Costs:
    """Element-wise median of several probes."""
    return tuning.Costs([_median([c.verify[k] for c in samples]) for k in range(len(samples[0].verify))],
                        _median([c.draft_fixed for c in samples]), _median([c.draft_step for c in samples]),
                        _median([c.plain_step_s for c in samples]))


def _median(xs: List[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _paired_median(spec: Dict[int, List[RunResult]], plain: Dict[int, List[RunResult]], prompts) -> Tuple[float, float]:
    """(spec tok/s, plain tok/s) of the pass whose spec/plain ratio is the median (lower median for an even
    count), over the given prompt indices."""
    pairs = []
    for r in sorted(spec):
        s_tps = _sum_stats([spec[r][i] for i in prompts]).generation_tps
        p_tps = _sum_stats([plain[r][i] for i in prompts]).generation_tps
        pairs.append((s_tps / p_tps if p_tps else 0.0, s_tps, p_tps))
    pairs.sort()
    _, s_tps, p_tps = pairs[(len(pairs) - 1) // 2]
    return s_tps, p_tps


def summarize(config: Config, spec: Dict[int, List[RunResult]], plain: Dict[int, List[RunResult]],
              kinds: List[str], costs: Optional[tuning.Costs], instrumented: List[RunResult], temp: float,
              environment: dict, drafter_bytes: int) -> dict:
    """One configuration's JSON object. spec/plain: repeat -> runs (one per prompt, in prompt order)."""
    reps = sorted(spec)
    spec_tps, plain_tps = _paired_median(spec, plain, range(len(kinds)))
    total = _sum_stats([x for r in reps for x in spec[r]])
    plain_step = _median([_sum_stats(plain[r]).generation_time
                          / max(1, sum(x.stats.generation_tokens - 1 for x in plain[r])) for r in reps])
    pass_time = _median([_sum_stats(spec[r]).generation_time / max(1, sum(_passes(x.stats) for x in spec[r]))
                         for r in reps])
    speedup = spec_tps / plain_tps if plain_tps else 0.0
    ideal = _ideal_seconds(total, costs, plain_step)
    efficiency = ideal / total.generation_time if ideal is not None and total.generation_time else None

    by_kind = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        ks = _sum_stats([spec[r][i] for r in reps for i in idx])
        k_spec, k_plain = _paired_median(spec, plain, idx)
        by_kind[kind] = {"tau": ks.tau, "acceptance_rate": ks.acceptance_rate,
                         "speedup": k_spec / k_plain if k_plain else 0.0}

    matches = None
    if temp == 0:
        pairs = [(spec[r][i].tokens, plain[r][i].tokens) for r in reps for i in range(len(kinds))]
        matches = sum(a == b for a, b in pairs) / len(pairs)
    draft_share = None
    round_time = sum(x.round_time for x in instrumented)
    if round_time:
        draft_share = sum(x.draft_time for x in instrumented) / round_time
    k_counts: Dict[str, int] = {}
    for x in (x for r in reps for x in spec[r]):
        for k, c in ((x.policy or {}).get("k_counts") or {}).items():
            k_counts[str(k)] = k_counts.get(str(k), 0) + c
    plain_peak = max(x.peak_memory_bytes for r in reps for x in plain[r])
    peak = max(x.peak_memory_bytes for r in reps for x in spec[r])
    return {
        "proposer": config.proposer, "k": config.k, "temp": temp, "oracle_rate": config.oracle_rate,
        "plain_tps": plain_tps, "spec_tps": spec_tps, "speedup": speedup,
        "tau": total.tau, "acceptance_rate": total.acceptance_rate,
        "acceptance_by_position": total.acceptance_by_position,
        "round_cost": pass_time / plain_step if plain_step else None,
        "draft_share": draft_share,
        "verify_cost": {str(k): v for k, v in enumerate(costs.verify)} if costs else None,
        "draft_step_cost": costs.draft_step if costs else None,
        "draft_fixed_cost": costs.draft_fixed if costs else None,
        "efficiency": efficiency,
        "peak_memory_bytes": peak, "plain_peak_memory_bytes": plain_peak,
        "memory_overhead_bytes": peak - plain_peak, "drafter_weight_bytes": drafter_bytes,
        "by_kind": by_kind, "matches_plain": matches,
        "k_counts": k_counts or None,
        "rounds": total.rounds, "drafted": total.drafted, "accepted": total.accepted,
        "tokens": total.generation_tokens, "repeats": len(reps),
        "spec_tps_samples": [_sum_stats(spec[r]).generation_tps for r in reps],
        "plain_tps_samples": [_sum_stats(plain[r]).generation_tps for r in reps],
        "environment": environment,
    }


# --- output -----------------------------------------------------------------------------------------

def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def format_table(results: List[dict]) -> str:
    if not results:
        return ""
    env = results[0]["environment"]
    m = env["model"]
    quant = m["quantization"]
    qtxt = f"{quant['bits']}-bit g{quant['group_size']}" if quant else "not quantized"
    if quant and quant.get("mixed"):  # e.g. a Q4_1 GGUF whose embedding is Q8_0
        qtxt = "mixed " + ", ".join(f"{b}-bit g{g}" for b, g, _ in quant["mixed"])
    lines = [
        f"model {env['model_path'] or m['model_type']} ({m['dtype']}, {qtxt}) | mlx {env['machine']['mlx']} "
        f"{env['machine']['device']} ({env['machine']['chip']}) | {env['prompts']} prompts x {env['max_tokens']} "
        f"tokens, {env['repeats']} repeats, temp {results[0]['temp']:g}",
        f"plain: {results[0]['plain_tps']:.1f} tok/s, peak memory {results[0]['plain_peak_memory_bytes'] / MB:.1f} MB",
        "",
        f"{'config':<18}{'tok/s':>8}{'speedup':>9}{'tau':>6}{'accept':>8}{'round':>7}{'draft':>7}{'eff':>6}"
        f"{'+mem MB':>9}  acceptance by position",
        f"{'':<18}{'':>8}{'':>9}{'':>6}{'':>8}{'cost':>7}{'share':>7}{'':>6}{'':>9}",
    ]
    for r in results:
        label = (r["proposer"] if r["oracle_rate"] is None else f"oracle({r['oracle_rate']:g})") + f" k={r['k']}"
        pos = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"])
        lines.append(f"{label:<18}{r['spec_tps']:>8.1f}{r['speedup']:>8.2f}x{r['tau']:>6.2f}"
                     f"{r['acceptance_rate']:>8.2f}{_fmt(r['round_cost']):>7}{_fmt(r['draft_share']):>7}"
                     f"{_fmt(r['efficiency']):>6}{r['memory_overhead_bytes'] / MB:>9.2f}  {pos}")
    kinds = list(results[0]["by_kind"])
    lines += ["", "tau (speedup) by kind of work", f"{'config':<18}" + "".join(f"{k:>16}" for k in kinds)]
    for r in results:
        label = (r["proposer"] if r["oracle_rate"] is None else f"oracle({r['oracle_rate']:g})") + f" k={r['k']}"
        cells = "".join(f"{r['by_kind'][k]['tau']:>8.2f} ({r['by_kind'][k]['speedup']:.2f}x)" for k in kinds)
        lines.append(f"{label:<18}{cells}")
    autos = [r for r in results if r["k_counts"]]
    if autos:
        lines.append("")
        for r in autos:
            total = sum(r["k_counts"].values())
            counts = sorted(r["k_counts"].items(), key=lambda kv: int(kv[0]))
            used = ", ".join(f"k={k}: {c / total:.0%}" for k, c in counts)
            lines.append(f"{r['proposer']} k=auto chose {used}")
    v = next((r["verify_cost"] for r in results if r["verify_cost"]), None)
    if v:
        lines += ["", "verify cost (k+1-token pass / plain step): " + " ".join(f"k={k}:{c:.2f}" for k, c in v.items())]
    mismatched = [r for r in results if r["matches_plain"] is not None and r["matches_plain"] < 1]
    for r in mismatched:
        lines.append(f"WARNING: {r['proposer']} k={r['k']} differs from plain greedy output on "
                     f"{1 - r['matches_plain']:.0%} of runs")
    return "\n".join(lines)


def plot(results: List[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxSpecError("--plot needs matplotlib: pip install 'mlx_spec[plot]'") from None
    labels = [(r["proposer"] if r["oracle_rate"] is None else f"oracle {r['oracle_rate']:g}") + f"\nk={r['k']}"
              for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(min(18, 0.7 * len(results) + 7), 5))
    ax1.bar(range(len(results)), [r["speedup"] for r in results], color="tab:blue")
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks(range(len(results)), labels, fontsize=7)
    ax1.set_ylabel("speedup over plain decoding (x)")
    ax1.set_title("speedup")
    for r, label in zip(results, labels):
        if r["acceptance_by_position"]:
            xs = range(1, len(r["acceptance_by_position"]) + 1)
            ax2.plot(xs, r["acceptance_by_position"], marker="o", label=label.replace("\n", " "))
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("acceptance rate")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("acceptance by position")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------------

def k_list(value: str) -> List[Union[int, str]]:
    out = []
    for part in value.split(","):
        if part.strip():
            out.append(num_draft_tokens(part.strip()))
    if not out:
        raise argparse.ArgumentTypeError("give at least one k, e.g. 1,2,3,auto")
    return out


def rate_list(value: str) -> List[float]:
    try:
        rates = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected corruption rates in [0, 1], e.g. 0,0.2; got {value!r}") from None
    if not rates or any(not 0 <= r <= 1 for r in rates):
        raise argparse.ArgumentTypeError(f"corruption rates must be in [0, 1], got {value!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="MLX or Hugging Face model directory, or hub repo id")
    p.add_argument("--drafter", help="Gemma 4 MTP assistant drafter (directory or hub repo id; 'auto' finds "
                   "<base>-assistant)")
    p.add_argument("--random-drafter", action="store_true",
                   help="also run the drafter with random weights (a drafter that never agrees)")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer, used as the proposer")
    p.add_argument("--ngram", nargs="?", const=3, type=int, metavar="N",
                   help="prompt-lookup drafts from the last N tokens (default N: 3)")
    p.add_argument("--oracle", type=rate_list, metavar="RATE[,RATE]",
                   help="benchmark-only proposer: the plain continuation with drafts corrupted at RATE "
                        "(measures engine efficiency; greedy only)")
    p.add_argument("--num-draft-tokens", type=k_list, default=k_list(DEFAULT_NUM_DRAFT_TOKENS), metavar="K,K,..",
                   help=f"draft lengths to compare, integers and/or 'auto' (default: {DEFAULT_NUM_DRAFT_TOKENS})")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per prompt")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="measured passes (medians reported)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help="built-in set: all, chat, code, summarize, structured; or a prompt file")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompts as raw text")
    p.add_argument("--json", metavar="PATH", help="write one object per configuration (a JSON list)")
    p.add_argument("--plot", metavar="PATH", help="draw speedup and acceptance by position (needs matplotlib)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or this process's CPU time: steadier on a busy shared machine "
                        "with MLX's CPU backend, but blind to overlap (async_eval) and to GPU time")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (by default each phase and pass says how long is left)")
    add_sampling_args(p)
    return p


def _random_weights(drafter, seed: int = 0):
    """A copy of the drafter's structure with random weights (token_ordering, an index table, is kept)."""
    import copy

    from mlx.utils import tree_flatten, tree_unflatten

    clone = copy.deepcopy(drafter)
    key = mx.random.key(seed)
    new = []
    for name, w in tree_flatten(clone.parameters()):
        if mx.issubdtype(w.dtype, mx.floating):
            key, sub = mx.random.split(key)
            w = (mx.random.normal(w.shape, key=sub) * 0.05).astype(w.dtype)
        new.append((name, w))
    clone.update(tree_unflatten(new))
    mx.eval(clone.parameters())
    return clone


def _param_bytes(module) -> int:
    from .memory import weight_bytes

    return int(weight_bytes(module))


def build_configs(args, model, references: Dict[int, List[int]], vocab: int) -> List[Config]:
    """Every (proposer, k) to compare; `references` (prompt index -> prompt + plain continuation) is filled
    in later, before the oracle proposes anything."""
    from .proposers import make_proposer
    from .proposers.oracle import OracleProposer

    families = []  # (name, factory(prompt index) -> Proposer, oracle rate, weights)
    if args.drafter:
        from .drafting import load_drafter

        drafter = load_drafter(args.drafter, model, base_path=args.model)
        families.append(("mtp", lambda i, d=drafter: make_proposer(model, drafter=d), None, drafter))
        if args.random_drafter:
            rnd = _random_weights(drafter)
            families.append(("mtp-random", lambda i, d=rnd: make_proposer(model, drafter=d), None, rnd))
    elif args.random_drafter:
        raise MlxSpecError("--random-drafter needs --drafter (it randomizes that drafter's weights)")
    if args.draft_model:
        from .api import load

        small = load(args.draft_model)[0]
        try:
            make_proposer(model, draft_model=small)
        except ImportError as e:
            raise MlxSpecError(f"--draft-model is not available in this version of mlx_spec ({e})") from None
        families.append(("draft_model", lambda i, m=small: make_proposer(model, draft_model=m), None, small))
    if args.ngram is not None:
        families.append(("ngram", lambda i, n=args.ngram: make_proposer(model, ngram=n), None, None))
    for rate in args.oracle or []:
        families.append(("oracle", lambda i, r=rate: OracleProposer(references[i], r, vocab, seed=i), rate, None))
    if not families:
        raise MlxSpecError("nothing to compare with plain decoding: pass --drafter, --draft-model, --ngram or --oracle")
    return [Config(name, k, make, rate, weights) for name, make, rate, weights in families
            for k in args.num_draft_tokens]


def environment(args, model, n_prompts: int) -> dict:
    import mlx_lm

    from . import __version__

    return {"machine": tuning.machine_identity(), "model": tuning.model_identity(model),
            "model_path": args.model, "drafter_path": args.drafter, "python": platform.python_version(),
            "mlx_lm": mlx_lm.__version__, "mlx_spec": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "prompts": n_prompts, "prompt_set": args.prompts, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "seed": args.seed, "clock": args.clock}


def main_args(args) -> int:
    check_sampling_args(args)
    if args.max_tokens < 1:
        raise MlxSpecError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.repeats < 1:
        raise MlxSpecError(f"--repeats must be >= 1, got {args.repeats}")
    if args.oracle and args.temp > 0:
        raise MlxSpecError("--oracle proposes the greedy continuation; use it with --temp 0")
    from .api import encode_prompt, load
    from .generate import format_prompt
    from .memory import resident

    model, tokenizer = load(args.model)
    prompt_list = prompt_sets.resolve(args.prompts)
    ids = [encode_prompt(tokenizer, format_prompt(tokenizer, p.text, None, not args.ignore_chat_template))
           for p in prompt_list]
    references: Dict[int, List[int]] = {}
    configs = build_configs(args, model, references, tuning._vocab_size(model))
    bench = Bench(model, ids, SamplingParams(args.temp, args.top_p, args.top_k, args.min_p, args.acceptance),
                  tokenizer.eos_token_ids, args.seed if args.seed is not None else 0, args.max_tokens,
                  progress=not args.quiet)
    weights = {id(c.weights): c.weights for c in configs if c.weights is not None}
    tuning.use_clock(time.process_time if args.clock == "cpu" else time.perf_counter)
    try:
        with resident(model, *weights.values()):  # as stream_generate keeps them, on Apple silicon
            references.update(bench.references())
            bench.estimate(configs, args.repeats)
            bench.probe(configs)
            results, instrumented, costs = bench.measure(configs, args.repeats)
    finally:
        tuning.use_clock(time.perf_counter)
    env = environment(args, model, len(ids))
    kinds = [p.kind for p in prompt_list]
    out = [summarize(c, results[c.label], results[baseline_label(c)], kinds, costs[c.family],
                     instrumented[c.label], args.temp, env, _param_bytes(c.weights) if c.weights is not None else 0)
           for c in configs]
    print(format_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)
    return 0


class Bench:
    """Runs configurations on the prompt set: references, cost probes, warm-up, interleaved repeats."""

    PLAIN = Config(None, 0)

    def __init__(self, model, ids, sampling, eos_ids, seed: int, max_tokens: int, progress: bool = False):
        self.model, self.ids, self.sampling, self.eos_ids = model, ids, sampling, eos_ids
        self.seed, self.max_tokens, self.progress = seed, max_tokens, progress
        self.plain_s_per_token = 0.0  # measured by references()

    def log(self, msg: str) -> None:
        """Progress on stderr (stdout is the table): a bench on a large model runs for many minutes."""
        if self.progress:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    def run(self, cfg: Config, i: int, max_tokens: Optional[int] = None, instrument: bool = False) -> RunResult:
        return decode(self.model, self.ids[i], cfg.make(i), cfg.k if cfg.proposer else 0, self.sampling,
                      max_tokens or self.max_tokens, self.eos_ids, self.seed + i, instrument)

    def references(self) -> Dict[int, List[int]]:
        """prompt + plain continuation per prompt (the oracle's knowledge; also warms up plain decoding)."""
        self.log(f"plain reference runs ({len(self.ids)} prompts x {self.max_tokens} tokens)")
        start = time.perf_counter()
        runs = {i: self.run(self.PLAIN, i) for i in range(len(self.ids))}
        self.plain_s_per_token = (time.perf_counter() - start) / max(1, sum(len(r.tokens) for r in runs.values()))
        return {i: list(ids) + runs[i].tokens for i, ids in enumerate(self.ids)}

    def estimate(self, configs: List[Config], repeats: int) -> None:
        """Say up front how long the measured passes will take, at plain decoding's speed (speculative runs
        are faster or, with auto, about as fast): a large model on a slow machine can take hours."""
        if self.plain_s_per_token <= 0:
            return
        runs_per_prompt = repeats * (len(configs) + (len(configs) + 1) // 2 + 1) + len(configs)
        tokens = runs_per_prompt * len(self.ids) * self.max_tokens
        seconds = tokens * self.plain_s_per_token
        self.log(f"plain decoding runs {1 / self.plain_s_per_token:.1f} tok/s; the passes decode about {tokens} "
                 f"tokens, up to {_duration(seconds)}" + (" (fewer --prompts, --max-tokens, --repeats or "
                                                         "--num-draft-tokens make it shorter)" if seconds > 1200 else ""))

    def probe(self, configs: List[Config]) -> Dict[str, tuning.Costs]:
        """Fresh costs per proposer family (saved to the tuning cache, so `auto` uses them too)."""
        self.log("measuring verify and drafting costs on this machine")
        costs: Dict[str, tuning.Costs] = {}
        for cfg in configs:
            if cfg.family not in costs:
                costs[cfg.family] = tuning.get_costs(self.model, cfg.make(0), refresh=True)
        return costs

    def reprobe(self, configs: List[Config], samples: Dict[str, List[tuning.Costs]]) -> None:
        """One more short probe per family, taken between the measured passes, so the costs that
        efficiency compares with come from the same minutes as the runs (a shared machine drifts)."""
        for family, cfg in {c.family: c for c in configs}.items():
            samples.setdefault(family, []).append(tuning.measure_costs(self.model, cfg.make(0), reps=2))

    def measure(self, configs: List[Config], repeats: int):
        """(label -> repeat -> runs in prompt order, label -> instrumented runs, family -> costs).

        Per prompt, a pass runs plain, two configurations, plain, two more, ..., plain: every configuration
        runs next to a plain run on each side, and those two are its baseline (`baseline_label`), seconds
        apart, not minutes. Configurations rotate between passes."""
        self.log(f"warm-up; then {repeats} pass{'es' if repeats > 1 else ''} of {len(configs)} "
                 f"configuration{'s' if len(configs) > 1 else ''}, each next to plain runs")
        for cfg in [self.PLAIN] + configs:
            self.run(cfg, 0, min(WARMUP_TOKENS, self.max_tokens))
        started = time.perf_counter()
        labels = [c.label for c in configs] + [baseline_label(c) for c in configs]
        results: Dict[str, Dict[int, List[RunResult]]] = {label: {} for label in labels}
        probes: Dict[str, List[tuning.Costs]] = {}
        for r in range(repeats):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            blocks = [order[j: j + 2] for j in range(0, len(order), 2)]
            for i in range(len(self.ids)):
                before = self.run(self.PLAIN, i)
                for block in blocks:
                    runs = [(cfg, self.run(cfg, i)) for cfg in block]
                    after = self.run(self.PLAIN, i)
                    for cfg, run in runs:
                        results[cfg.label].setdefault(r, []).append(run)
                        results[baseline_label(cfg)].setdefault(r, []).append(_merge_runs(before, after))
                    before = after
            self.reprobe(configs, probes)
            self.log(f"pass {r + 1}/{repeats} done{_time_left(time.perf_counter() - started, r + 1, repeats)}")
        instrumented = {c.label: [self.run(c, i, instrument=True) for i in range(len(self.ids))] for c in configs}
        return results, instrumented, {f: median_costs(c) for f, c in probes.items()}


def _time_left(elapsed: float, done: int, passes: int) -> str:
    """'; about 3 min left': the passes still to run, plus the instrumented runs (about half a pass: every
    configuration once, without the plain runs around it)."""
    return f"; about {_duration(elapsed / done * (passes - done + 0.5))} left"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 \
        else f"{seconds:.0f} s"


def baseline_label(cfg: Config) -> str:
    return f"plain next to {cfg.label}"


def _merge_runs(a: RunResult, b: RunResult) -> RunResult:
    """Two plain runs of one prompt as one: their tokens and decode times added (tok/s over both)."""
    stats = GenerationStats(generation_tokens=a.stats.generation_tokens + b.stats.generation_tokens,
                            generation_time=a.stats.generation_time + b.stats.generation_time)
    return RunResult(a.tokens, stats, max(a.peak_memory_bytes, b.peak_memory_bytes))


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
