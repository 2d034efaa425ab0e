"""Aggregating `mlx_spec.bench --concurrency`: per configuration and C, aggregate tok/s, time to first token
and inter-token latency per request (median, p90), tau and acceptance, exactness against each prompt's
plain output alone, and ratios to plain batching and to the one-at-a-time server taken within each pass.

Spread: every number is the median over the passes with its range (min-max) over them: a shared machine
drifts between passes, and the ratios, paired within a pass, drift less than the rates.
"""

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from ..stats import GenerationStats
from .clients import Load, median, percentile
from .concurrency import LoadConfig
from .report import k_usage

PEER_NOTE = ("mlx-lm: its BatchGenerator (what its batch_generate and server run), plain: mlx-lm 0.32's server "
             "batches only without a draft model (is_batchable = draft_model is None), so with drafts it serves "
             "one request at a time")


def _spread(xs: List[Optional[float]]) -> Optional[dict]:
    """{"median", "min", "max"} over the passes (None values left out); None for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": median(xs), "min": min(xs), "max": max(xs)}


def _latency(loads: List[Load], of) -> dict:
    """Per pass, the median and p90 of `of(answer)` over its requests; then their spread over passes."""
    per_pass = [[v for v in (of(a) for a in load.answers) if v is not None] for load in loads]
    return {"median": _spread([median(v) for v in per_pass]), "p90": _spread([percentile(v, 90) for v in per_pass])}


def _rate(load: Load, clock: str) -> Optional[float]:
    return load.cpu_tps if clock == "cpu" else load.tps


def _ratios(loads: List[Load], other: Optional[List[Load]], clock: str) -> Optional[dict]:
    """This configuration's aggregate tok/s over another's, pass by pass, by `clock`."""
    if not other:
        return None
    pairs = [(_rate(a, clock), _rate(b, clock)) for a, b in zip(loads, other)]
    return _spread([a / b if a and b else None for a, b in pairs])


def _matches(cfg: LoadConfig, loads: List[Load], references: Dict[int, List[int]],
             texts: Dict[int, str]) -> float:
    """The fraction of answers equal to their prompt's plain output alone (over HTTP: its text)."""
    answers = [a for load in loads for a in load.answers]
    if cfg.backend == "http":
        same = [a.text == texts[a.prompt] for a in answers]
    else:
        same = [a.tokens == references[a.prompt] for a in answers]
    return sum(same) / len(same) if same else 0.0


def summarize_load(cfg: LoadConfig, concurrency: int, loads: List[Load], against: Dict[str, Optional[List[Load]]],
                   references: Dict[int, List[int]], texts: Dict[int, str], greedy: bool, environment: dict) -> dict:
    """One (configuration, C)'s JSON object; `against`: ratio name -> the runs this one's are divided by,
    pass by pass (see summarize_all)."""
    clock = environment.get("clock", "wall")
    answers = [a for load in loads for a in load.answers]
    stats = [a.stats for a in answers if a.stats is not None]
    total = GenerationStats.total(stats)
    k_counts: Dict[str, int] = {}
    for a in answers:
        for k, n in (a.k_counts or {}).items():
            k_counts[str(k)] = k_counts.get(str(k), 0) + n
    return {
        "mode": "concurrency", "config": cfg.label, "backend": cfg.backend, "proposer": cfg.proposer, "k": cfg.k,
        "concurrency": concurrency, "decode_concurrency": 1 if cfg.serial else concurrency,
        "aggregate_tps": _spread([x.tps for x in loads]),
        "aggregate_tps_samples": [x.tps for x in loads],
        "aggregate_tps_cpu": _spread([x.cpu_tps for x in loads]),
        "ttft_s": _latency(loads, lambda a: a.ttft if a.times else None),
        "itl_s": _latency(loads, lambda a: a.itl if a.times else None),
        **{name: _ratios(loads, other, clock) for name, other in against.items()},
        "mean_rows": _spread([x.mean_rows for x in loads]),
        "tau": total.tau if stats else None, "acceptance_rate": total.acceptance_rate if stats else None,
        "acceptance_by_position": total.acceptance_by_position if stats else None,
        "rounds": total.rounds, "drafted": total.drafted, "accepted": total.accepted,
        "k_counts": k_counts or None,
        "matches_plain": _matches(cfg, loads, references, texts) if greedy else None,
        "requests": len(answers), "tokens": sum(a.count for a in answers), "repeats": len(loads),
        "environment": environment,
    }


def summarize_all(runs: Dict[Tuple[LoadConfig, int], List[Load]], references, texts, greedy: bool,
                  environment: dict) -> List[dict]:
    """Every (configuration, C), with its ratios: vs_plain_batch to plain batching at this C (over HTTP: to
    plain over HTTP; the peer: to ours), vs_one_at_a_time to its own one-at-a-time runs, and over HTTP
    vs_scheduler to the same configuration through the scheduler (what the server adds or loses)."""
    out = []
    for (cfg, c), loads in runs.items():
        http = cfg.backend == "http"
        plain = LoadConfig(backend="http") if http else LoadConfig()
        against = {"vs_plain_batch": runs.get((plain, c)) if cfg.proposer or cfg.backend == "mlx-lm" else None,
                   "vs_one_at_a_time": runs.get((replace(cfg, serial=True), c))
                   if cfg.proposer and not cfg.serial and not http else None,
                   "vs_scheduler": runs.get((replace(cfg, backend="scheduler"), c)) if http else None}
        out.append(summarize_load(cfg, c, loads, against, references, texts, greedy, environment))
    return sorted(out, key=lambda r: r["concurrency"])


# --- the table ------------------------------------------------------------------------------------------

def _x(s: Optional[dict]) -> str:
    return "-" if s is None else f"{s['median']:.2f}x"


def _ms(s: Optional[dict]) -> str:
    return "-" if s is None else f"{s['median'] * 1000:.0f}"


def _rows(s: Optional[dict]) -> str:
    return "-" if s is None else f"{s['median']:.1f}"


def _tps(s: Optional[dict]) -> str:
    return "-" if s is None else f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def format_load_table(results: List[dict]) -> str:
    if not results:
        return ""
    env = results[0]["environment"]
    m = env["model"]
    rate = "aggregate_tps_cpu" if env.get("clock") == "cpu" else "aggregate_tps"
    lines = [
        f"model {env['model_path'] or m['model_type']} ({m['dtype']}) | mlx {env['machine']['mlx']} "
        f"{env['machine']['device']} ({env['machine']['chip']}) | {env['prompts']} prompts x {env['max_tokens']} "
        f"tokens, every client sends them all | {env['repeats']} passes | temp {env['temp']:g}",
        ("tok/s: every client's tokens per second of this process's CPU time (--clock cpu)" if rate != "aggregate_tps"
         else "tok/s: every client's tokens over the run's wall time") + ", median (min-max) over passes; vs: the "
        "same ratio taken within each pass, median; TTFT, ITL (ms, wall): median and p90 over the requests, median "
        "over passes; rows: requests decoding between the scheduler's steps, mean",
        "",
        f"{'C':>2}  {'config':<32}{'tok/s (range)':>17}{'vs plain':>9}{'vs 1-at-':>9}{'TTFT':>7}{'p90':>6}"
        f"{'ITL':>6}{'p90':>6}{'rows':>6}{'tau':>6}{'accept':>7}{'exact':>6}",
        f"{'':>2}  {'':<32}{'':>17}{'batch':>9}{'a-time':>9}",
    ]
    for r in results:
        tau = "-" if not r["rounds"] else f"{r['tau']:.2f}"
        acc = "-" if not r["rounds"] else f"{r['acceptance_rate']:.2f}"
        exact = "-" if r["matches_plain"] is None else f"{r['matches_plain']:.0%}"
        lines.append(f"{r['concurrency']:>2}  {r['config']:<32}{_tps(r[rate]):>17}"
                     f"{_x(r['vs_plain_batch']):>9}{_x(r['vs_one_at_a_time']):>9}"
                     f"{_ms(r['ttft_s']['median']):>7}{_ms(r['ttft_s']['p90']):>6}"
                     f"{_ms(r['itl_s']['median']):>6}{_ms(r['itl_s']['p90']):>6}{_rows(r['mean_rows']):>6}{tau:>6}"
                     f"{acc:>7}{exact:>6}")
    autos = [r for r in results if r["k_counts"]]
    if autos:
        lines.append("")
        for r in autos:
            lines.append(f"{r['concurrency']} clients, {r['config']} chose {k_usage(r['k_counts'])}")
    if any(r["backend"] == "mlx-lm" for r in results):
        lines += ["", PEER_NOTE]
    http = [r for r in results if r["backend"] == "http"]
    if http:
        lines += ["", "over HTTP: vs plain batch is against plain over HTTP; through the server / through the "
                  "scheduler in the same pass: " + ", ".join(f"{r['config']} {_x(r['vs_scheduler'])}" for r in http)]
    for r in results:
        if r["matches_plain"] is not None and r["matches_plain"] < 1:
            lines.append(f"WARNING: {r['config']} at {r['concurrency']} clients differs from the plain output "
                         f"alone in {1 - r['matches_plain']:.0%} of its answers")
    return "\n".join(lines)
