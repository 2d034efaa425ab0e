"""Aggregating the benchmark's runs: paired medians, efficiency against the cost model, the table and plot."""

import statistics
from typing import Dict, List, Optional, Tuple

from ..errors import MlxSpecError
from ..stats import GenerationStats
from ..tuning import Costs
from .runner import Config, RunResult

MB = 1024 * 1024


def _passes(s: GenerationStats) -> int:
    """Base passes after prefill: every pass emits its accepted drafts plus one token."""
    return max(0, s.generation_tokens - 1 - s.accepted)


def _sum_stats(runs: List[RunResult]) -> GenerationStats:
    return GenerationStats.total(r.stats for r in runs)


def _ideal_seconds(stats: GenerationStats, costs: Optional[Costs], plain_step_s: float) -> Optional[float]:
    """Decode time the cost model accounts for: Σ rounds (verify[j] + draft(j)) plus one plain step per pass
    without drafts, in plain steps from the probe's ratios, times `plain_step_s`, the plain step measured in
    the interleaved plain runs. (The probe's own seconds are not used: this machine's speed drifts between
    the probe and the runs; a ratio measured within one probe and a step measured next to the runs hold.)"""
    if costs is None or not stats.rounds or not plain_step_s or stats.tree_rounds:
        return None  # (tree rounds: the chain cost model does not account for them)
    dbp = stats.drafted_by_position + [0]
    if len(dbp) - 1 > costs.k_max:
        return None
    cost = sum((dbp[j - 1] - dbp[j]) * (costs.verify[j] + costs.draft(j)) for j in range(1, len(dbp)))
    return (cost + _passes(stats) - stats.rounds) * plain_step_s


def median_costs(samples: List[Costs]) -> Costs:
    """Element-wise median of several probes."""
    return Costs([_median([c.verify[k] for c in samples]) for k in range(len(samples[0].verify))],
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


def _efficiencies(spec, plain, probes: List[Costs]) -> List[float]:
    """Efficiency of each pass, against the probe taken right after it (the same minutes of the machine)."""
    out = []
    for r in sorted(spec):
        if r >= len(probes):
            break
        step = _sum_stats(plain[r]).generation_time / max(1, sum(x.stats.generation_tokens - 1 for x in plain[r]))
        total = _sum_stats(spec[r])
        ideal = _ideal_seconds(total, probes[r], step)
        if ideal is not None and total.generation_time:
            out.append(ideal / total.generation_time)
    return out


def speedup_by_prompt(spec, plain) -> List[float]:
    """Per prompt, the median over passes of its speedup against its own adjacent plain runs."""
    out = []
    for i in range(len(next(iter(spec.values())))):
        ratios = [spec[r][i].stats.generation_tps / plain[r][i].stats.generation_tps for r in sorted(spec)
                  if plain[r][i].stats.generation_tps]
        if ratios:
            out.append(statistics.median(ratios))
    return out


def spread(xs: List[float]) -> Optional[Tuple[float, float, float]]:
    """(median, lower quartile, upper quartile), or None for no values."""
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q2, q1, q3


def summarize(config: Config, spec: Dict[int, List[RunResult]], plain: Dict[int, List[RunResult]],
              kinds: List[str], probes: List[Costs], instrumented: List[RunResult], temp: float,
              environment: dict, drafter_bytes: int) -> dict:
    """One configuration's JSON object. spec/plain: repeat -> runs (one per prompt, in prompt order);
    probes: the short cost probes taken after each pass."""
    reps = sorted(spec)
    costs = median_costs(probes) if probes else None
    spec_tps, plain_tps = _paired_median(spec, plain, range(len(kinds)))
    total = _sum_stats([x for r in reps for x in spec[r]])
    plain_step = _median([_sum_stats(plain[r]).generation_time
                          / max(1, sum(x.stats.generation_tokens - 1 for x in plain[r])) for r in reps])
    pass_time = _median([_sum_stats(spec[r]).generation_time / max(1, sum(_passes(x.stats) for x in spec[r]))
                         for r in reps])
    speedup = spec_tps / plain_tps if plain_tps else 0.0
    ideal = _ideal_seconds(total, costs, plain_step)
    efficiency = ideal / total.generation_time if ideal is not None and total.generation_time else None
    per_pass = _efficiencies(spec, plain, probes)
    per_prompt = speedup_by_prompt(spec, plain)

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
        "proposer": config.proposer, "k": config.k, "tree_nodes": config.tree, "temp": temp,
        "oracle_rate": config.oracle_rate, "tree_rounds": total.tree_rounds,
        "plain_tps": plain_tps, "spec_tps": spec_tps, "speedup": speedup,
        "speedup_by_prompt": per_prompt, "speedup_spread": spread(per_prompt),
        "tau": total.tau, "acceptance_rate": total.acceptance_rate,
        "acceptance_by_position": total.acceptance_by_position,
        "round_cost": pass_time / plain_step if plain_step else None,
        "draft_share": draft_share,
        "verify_cost": {str(k): v for k, v in enumerate(costs.verify)} if costs else None,
        "draft_step_cost": costs.draft_step if costs else None,
        "draft_fixed_cost": costs.draft_fixed if costs else None,
        "efficiency": efficiency,
        "efficiency_by_pass": per_pass,
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


def _label(r: dict) -> str:
    tree = f" t={r['tree_nodes']}" if r.get("tree_nodes") else ""
    return (r["proposer"] if r["oracle_rate"] is None else f"oracle({r['oracle_rate']:g})") + f" k={r['k']}{tree}"


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
        "parity: " + ("not checked (the model is split over ranks)" if env.get("row_invariant") is None else
                      "a verify row equals the one-token step here (row-invariant; strict costs nothing)"
                      if env.get("row_invariant") else "verify rows round differently from one-token steps here "
                      "(mlx_spec.doctor; --strict pads)") + (", strict mode on" if env.get("strict") else ""),
        "",
        f"{'config':<18}{'tok/s':>8}{'speedup':>9}{'tau':>6}{'accept':>8}{'round':>7}{'draft':>7}{'eff':>6}"
        f"{'+mem MB':>9}  acceptance by position",
        f"{'':<18}{'':>8}{'':>9}{'':>6}{'':>8}{'cost':>7}{'share':>7}{'':>6}{'':>9}",
    ]
    for r in results:
        label = _label(r)
        pos = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_position"])
        lines.append(f"{label:<18}{r['spec_tps']:>8.1f}{r['speedup']:>8.2f}x{r['tau']:>6.2f}"
                     f"{r['acceptance_rate']:>8.2f}{_fmt(r['round_cost']):>7}{_fmt(r['draft_share']):>7}"
                     f"{_fmt(r['efficiency']):>6}{r['memory_overhead_bytes'] / MB:>9.2f}  {pos}")
    kinds = list(results[0]["by_kind"])
    lines += ["", "tau (speedup) by kind of work", f"{'config':<18}" + "".join(f"{k:>16}" for k in kinds)]
    for r in results:
        label = _label(r)
        cells = "".join(f"{r['by_kind'][k]['tau']:>8.2f} ({r['by_kind'][k]['speedup']:.2f}x)" for k in kinds)
        lines.append(f"{label:<18}{cells}")
    autos = [r for r in results if r["k_counts"]]
    if autos:
        lines.append("")
        for r in autos:
            lines.append(f"{r['proposer']} k=auto chose {k_usage(r['k_counts'])}")
    by_prompt = [r for r in results if len(r.get("speedup_by_prompt") or []) > 1]
    if by_prompt:
        lines += ["", "speedup over the prompts (each against its own plain runs): median (interquartile range)"]
        lines += [f"{_label(r):<18}{r['speedup_spread'][0]:>6.2f}x ({r['speedup_spread'][1]:.2f}-"
                  f"{r['speedup_spread'][2]:.2f})" for r in by_prompt]
    varied = [r for r in results if len(r.get("efficiency_by_pass") or []) > 1]
    if varied:
        lines += ["", "efficiency by pass (median, range): " + "; ".join(
            f"{_label(r)} {statistics.median(r['efficiency_by_pass']):.2f} ({min(r['efficiency_by_pass']):.2f}-"
            f"{max(r['efficiency_by_pass']):.2f})" for r in varied)]
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
        points = [(i + 1, a) for i, a in enumerate(r["acceptance_by_position"]) if a is not None]  # never drafted: no point
        if points:
            ax2.plot(*zip(*points), marker="o", label=label.replace("\n", " "))
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("acceptance rate")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("acceptance by position")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def k_usage(k_counts: dict) -> str:
    """"k=0: 75%, k=3: 25%": how often auto chose each k (k_counts: {k: rounds})."""
    total = sum(k_counts.values())
    return ", ".join(f"k={k}: {c / total:.0%}" for k, c in sorted(k_counts.items(), key=lambda kv: int(kv[0])))
