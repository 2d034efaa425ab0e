"""Running the benchmark: configurations, one decode through the engine, warm-up and interleaved passes."""

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import mlx.core as mx

from ..cache import KVQuant
from ..engine import Engine
from ..proposers.base import RoundResult, feature_layers
from ..sampling import SamplingParams
from ..stats import GenerationStats
from ..tuning import AutoTuner, Costs, measure_costs
from ..draft_policy import tree_budget
from ..tuning.trees import TREE_BUDGETS
from ..tuning.tuner import draft_policy
from ..request import Request

WARMUP_TOKENS = 32


@dataclass
class Config:
    """One way of decoding: a proposer kind and a k (an int or "auto"), and a tree budget (0: chains, N, or
    "auto"); proposer=None is plain."""

    proposer: Optional[str]
    k: Union[int, str]
    make: Callable[[int], object] = field(repr=False, default=lambda i: None)  # prompt index -> Proposer
    oracle_rate: Optional[float] = None
    weights: object = field(repr=False, default=None)  # the drafter / draft model module, if any
    tree: Union[int, str] = 0

    @property
    def family(self) -> str:
        """The proposer without k (costs are measured once per family)."""
        if self.proposer is None:
            return "plain"
        return self.proposer if self.oracle_rate is None else f"oracle({self.oracle_rate:g})"

    @property
    def label(self) -> str:
        if self.proposer is None:
            return "plain"
        return f"{self.family} k={self.k}" + (f" tree={self.tree}" if self.tree else "")


@dataclass
class RunResult:
    tokens: List[int]
    stats: GenerationStats
    peak_memory_bytes: int
    policy: Optional[dict] = None
    round_time: float = 0.0  # instrumented pass only
    draft_time: float = 0.0


class _RoundTimer:
    """A draft policy around the real one that times rounds from next_k() to observe()."""

    def __init__(self, policy, clock):
        self.policy, self.clock = policy, clock
        self.round_time, self._t = 0.0, None

    def next_k(self) -> int:
        k = self.policy.next_k()
        self._t = self.clock() if k > 0 else None
        return k

    def next_nodes(self) -> int:
        return tree_budget(self.policy)

    def observe(self, result: RoundResult) -> None:
        if self._t is not None:
            self.round_time += self.clock() - self._t
        self.policy.observe(result)


class _TimedProposer:
    """A proposer whose drafts are evaluated (one extra host sync) and timed as they are proposed."""

    def __init__(self, inner, clock):
        self.inner, self.clock, self.draft_time = inner, clock, 0.0
        self.name, self.identity, self.weights = inner.name, inner.identity, inner.weights
        self.base_layers = feature_layers(inner)

    # a FeatureReader's context (block drafters) is the inner proposer's
    @property
    def context_cache(self):
        return self.inner.context_cache

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    def extend(self, features) -> None:
        self.inner.extend(features)

    def reset(self) -> None:
        self.inner.reset()

    def start(self, prompt) -> None:
        self.inner.start(prompt)

    def propose(self, ctx, k: int):
        return self._timed(lambda: self.inner.propose(ctx, k))

    def propose_tree(self, ctx, nodes: int, depth: int):
        return self._timed(lambda: self.inner.propose_tree(ctx, nodes, depth))

    def _timed(self, make):
        start = self.clock()
        draft = make()
        mx.eval(draft.tokens, *([draft.probs] if draft.probs is not None else []),
                *([draft.parents] if draft.parents is not None else []))
        self.draft_time += self.clock() - start
        return draft

    def observe(self, result: RoundResult) -> None:
        self.inner.observe(result)

    def fork(self):
        return self


def decode(model, ids: List[int], proposer, k_value, sampling: SamplingParams, max_tokens: int, eos_ids,
           seed: int, tuner: AutoTuner, instrument: bool = False, strict_rows: Optional[int] = None,
           kv: Optional[KVQuant] = None, tree_nodes=0) -> RunResult:
    """One request through the engine, as stream_generate runs it but without detokenizing. `tuner` (the
    bench's own) gives auto its policy and the clock every time is read from."""
    clock = tuner.clock
    policy = draft_policy(k_value, model, proposer, tuner, kv, tree_nodes) if proposer is not None else None
    if policy is None:
        proposer = None
    timer = None
    if instrument and proposer is not None:
        proposer = _TimedProposer(proposer, clock)
        timer = policy = _RoundTimer(policy, clock)
    eng = Engine(model, Request(ids, sampling=sampling, max_tokens=max_tokens, seed=seed, kv=kv), proposer=proposer,
                 policy=policy, eos_ids=eos_ids, strict_rows=strict_rows)
    mx.clear_cache()
    mx.reset_peak_memory()
    tokens, first = [], None
    for ev in eng.run():
        tokens.append(ev.token)
        if first is None:
            first = clock()  # the engine's decode clock also starts at the first token
    if first is not None and clock is not time.perf_counter:
        eng.stats.generation_time = clock() - first
    inner = timer.policy if timer else policy
    return RunResult(tokens, eng.stats, max(eng.stats.peak_memory_bytes, mx.get_peak_memory()),
                     inner.summary() if hasattr(inner, "summary") else None,
                     timer.round_time if timer else 0.0, proposer.draft_time if timer else 0.0)


class Bench:
    """Runs configurations on the prompt set: references, cost probes, warm-up, interleaved repeats."""

    PLAIN = Config(None, 0)

    def __init__(self, model, ids, sampling, eos_ids, seed: int, max_tokens: int, progress: bool = False,
                 tuner: Optional[AutoTuner] = None, strict_rows: Optional[int] = None, kv: Optional[KVQuant] = None,
                 probe: bool = True):
        """`tuner`: the bench's own (its costs store, the clock, what auto learns across the runs);
        `strict_rows`: strict mode's padding, for plain and speculative runs alike (None: off); `probe`
        False: no cost probes (efficiency is then not reported)."""
        self.probing = probe
        self.model, self.ids, self.sampling, self.eos_ids = model, ids, sampling, eos_ids
        self.strict_rows, self.kv = strict_rows, kv
        self.seed, self.max_tokens, self.progress = seed, max_tokens, progress
        self.tuner = tuner or AutoTuner()
        self.plain_s_per_token = 0.0  # measured by references()

    def log(self, msg: str) -> None:
        """Progress on stderr (stdout is the table): a bench on a large model runs for many minutes."""
        if self.progress:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    def run(self, cfg: Config, i: int, max_tokens: Optional[int] = None, instrument: bool = False) -> RunResult:
        return decode(self.model, self.ids[i], cfg.make(i), cfg.k if cfg.proposer else 0, self.sampling,
                      max_tokens or self.max_tokens, self.eos_ids, self.seed + i, self.tuner, instrument,
                      self.strict_rows, self.kv, cfg.tree)

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

    def probe(self, configs: List[Config]) -> Dict[str, Costs]:
        """Fresh costs per proposer family (saved to the costs file, so `auto` uses them too)."""
        costs: Dict[str, Costs] = {}
        if not self.probing:
            return costs
        self.log("measuring verify and drafting costs on this machine")
        for cfg in configs:
            if cfg.family not in costs:
                trees = TREE_BUDGETS if any(c.tree and c.family == cfg.family for c in configs) else ()
                costs[cfg.family] = self.tuner.store.get(self.model, cfg.make(0), refresh=True, kv=self.kv,
                                                         tree_budgets=trees)
        return costs

    def reprobe(self, configs: List[Config], samples: Dict[str, List[Costs]]) -> None:
        """One more short probe per family, taken between the measured passes, so the costs that
        efficiency compares with come from the same minutes as the runs (a shared machine drifts)."""
        if not self.probing:
            return
        for family, cfg in {c.family: c for c in configs}.items():
            samples.setdefault(family, []).append(measure_costs(self.model, cfg.make(0), reps=2, kv=self.kv,
                                                                clock=self.tuner.clock))

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
        probes: Dict[str, List[Costs]] = {}
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
        return results, instrumented, probes


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
    return RunResult(a.tokens, GenerationStats.total([a.stats, b.stats]), max(a.peak_memory_bytes, b.peak_memory_bytes))
