"""Timing probe: what a plain step, a (k+1)-token verify pass and drafting cost on this machine.

Times the base's forward on a synthetic context and the proposer's `propose` from outside the engine, as
the engine runs them (pipelined plain steps; a verify with its acceptance and host sync), interleaved over
a few passes; returns medians as ratios to a plain step (costs.Costs). Knows the base-model interface and
the Proposer protocol; nothing of text, files or policies.
"""

import time
from typing import Callable, Dict, Optional, Sequence

import mlx.core as mx
import numpy as np

from .. import acceptance
from ..cache import KVQuant, rollback_all
from ..models.base import as_base, vocab_size
from ..proposers.base import Draft, RoundContext, RoundResult, feature_layers
from ..sampling import Sampler, SamplingParams
from ..trees.round import shape_of, verify_tree
from ..trees.views import single_views
from .costs import K_MAX, Costs, fit_line, isotonic

DEFAULT_PROBE_CONTEXT = 64  # tokens in the probe's synthetic context (its prefill is most of a slow probe)
DEFAULT_PROBE_REPS = 5  # interleaved measurement passes (plus one warm-up pass); medians are kept
PROBE_BUDGET_S = 6.0  # ... but no more passes once this much time has gone and MIN_PROBE_REPS are in
MIN_PROBE_REPS = 2  # (a slow model on a CPU: a pass takes seconds; auto re-times rounds while decoding)
PROBE_PLAIN_STEPS = 8  # pipelined plain steps per pass
PROBE_DRAFT_KS = (1, 2, 4, 8)  # draft lengths timed; draft cost is fitted as fixed + per-step
PROBE_VERIFY_KS = (0, 1, 2, 3, 4, 6, 8)  # verify passes timed; k = 5, 7 are interpolated (cost grows smoothly)
PROBE_TREE_VERIFY_KS = (12, 16)  # ... and up to a tree's rows when trees are measured


def _time_plain(forward, cache, token: int, steps: int, clock) -> float:
    """Seconds per plain step, fully pipelined (mlx-lm's generate_step): step i+1 is queued on the lazy
    token i before the host reads token i, so graph building overlaps compute. The unit of every cost."""
    def step(y):
        logits = forward(y[None], cache)[0]
        return mx.argmax(logits[0, -1], axis=-1).astype(mx.int32).reshape(1)

    start = clock()
    nxt = step(mx.array([token], mx.int32))
    mx.async_eval(nxt)
    for _ in range(steps):
        y = nxt
        nxt = step(y)
        mx.async_eval(nxt)
        int(y.item())
    elapsed = clock() - start
    mx.eval(nxt)
    rollback_all(cache, steps + 1)
    return elapsed / steps


def _time_verify(forward, cache, token: int, drafts: mx.array, clock) -> float:
    """Seconds for one (k+1)-token verify pass with greedy acceptance and the round's one host sync."""
    k = drafts.shape[0]
    start = clock()
    verify_in = mx.concatenate([mx.array([token], mx.int32), drafts])
    logits = forward(verify_in[None], cache)[0]  # (1, k+1, V)
    n, nxt = acceptance.greedy_accept(drafts, mx.argmax(logits[0], axis=-1).astype(mx.int32))
    mx.concatenate([mx.stack([n, nxt]).astype(mx.int32), drafts]).tolist()
    elapsed = clock() - start
    rollback_all(cache, k + 1)
    return elapsed


def _time_tree(forward, cache, ctx: RoundContext, proposer, nodes: int, vocab: int, rng, clock) -> float:
    """Seconds for one round with a tree of `nodes` nodes: the proposer drafting it, the verify pass, the
    tree's acceptance and the round's host read. Where the proposer offers no such tree on this context (an
    n-gram lookup on random tokens), a binary tree of random tokens stands in for it (drafting still timed)."""
    start = clock()
    draft = proposer.propose_tree(ctx, nodes, nodes)
    if draft.parents is None or draft.k < nodes:
        tokens = mx.array(rng.integers(4, vocab, size=nodes).tolist(), mx.int32)
        draft = Draft(tokens, parents=mx.array([(i - 2) // 2 for i in range(nodes)], mx.int32),
                      depth=max(1, nodes.bit_length()), branching=2)
    shape = shape_of(draft)
    verify_in = mx.concatenate([mx.array(ctx.history[-1:], mx.int32), draft.tokens])
    logits = forward(verify_in[None], single_views(cache, shape))[0]
    verify_tree(ctx.sampler, shape, draft, logits[0], verify_in, ctx.position).tolist()
    elapsed = clock() - start
    rollback_all(cache, draft.k + 1)
    return elapsed


def _time_sync(clock) -> float:
    start = clock()
    (mx.array(1) + 1).item()
    return clock() - start


def _time_draft(proposer, ctx: RoundContext, k: int, clock) -> float:
    """Seconds to propose k drafts, evaluated on their own (less an empty host sync)."""
    proposer.start(ctx.history[:-1])  # the engine's order: start(prompt), then rounds (a draft model prefills)
    start = clock()
    draft = proposer.propose(ctx, k)
    mx.eval(draft.tokens, *([draft.probs] if draft.probs is not None else []))
    elapsed = clock() - start
    proposer.observe(RoundResult(draft.k, 0))
    return elapsed


def _synthetic_context(model, proposer, context: int, max_rollback: int, rng, seed: int,
                       kv: Optional[KVQuant] = None):
    """(the base's forward as the engine calls it, its cache over history[:-1], the round's RoundContext)
    for a random history of `context` tokens; a proposer that reads decoder-layer outputs has them for
    history[:-1] too (the timed passes capture them but do not extend its context)."""
    base = as_base(model)
    layers = feature_layers(proposer) if proposer is not None else ()
    forward = (lambda t, c: base.forward_layers(t, c, layers)) if layers else base.forward
    history = rng.integers(4, vocab_size(model) or 256, size=max(context, 2)).tolist()
    cache = base.make_cache(max_rollback, **(kv.as_dict() if kv is not None else {}))
    out = forward(mx.array(history[:-1], mx.int32)[None], cache)  # cache holds history[:-1]
    hidden = out[1][:, -1:] if out[1] is not None else None  # (1, 1, H) at the bonus token's predecessor
    if layers:
        proposer.start(history[:-1])
        proposer.extend(out[2])
        mx.eval([(c.keys, c.values) for c in proposer.context_cache])
    mx.eval([(c.keys, c.values) for c in cache], *([hidden] if hidden is not None else []))
    return forward, cache, RoundContext(history, len(history) - 1, hidden, cache, Sampler(SamplingParams(), seed))


def measure_drafting(model, proposer, ks, *, context: int = DEFAULT_PROBE_CONTEXT, reps: int = DEFAULT_PROBE_REPS,
                     seed: int = 0, clock: Callable[[], float] = time.perf_counter) -> Dict[int, float]:
    """Seconds to propose k drafts for each k in `ks` (median of `reps` after a warm-up, less an empty host
    sync): a drafter's cost by draft length (for a block drafter, by block size). A proposer that gives
    fewer than k is timed at what it gives."""
    forward, cache, ctx = _synthetic_context(model, proposer, context, 1, np.random.default_rng(seed), seed)
    times = {k: [] for k in ks}
    for rep in range(reps + 1):
        for k in ks:
            t = _time_draft(proposer, ctx, k, clock) - _time_sync(clock)
            if rep:
                times[k].append(max(0.0, t))
    return {k: float(np.median(v)) for k, v in times.items()}


def measure_costs(model, proposer=None, *, k_max: int = K_MAX, context: int = DEFAULT_PROBE_CONTEXT,
                  reps: Optional[int] = None, plain_steps: int = PROBE_PLAIN_STEPS, seed: int = 0,
                  budget_s: float = PROBE_BUDGET_S, clock: Callable[[], float] = time.perf_counter,
                  kv: Optional[KVQuant] = None, tree_budgets: Sequence[int] = ()) -> Costs:
    """Time plain steps, (k+1)-token verify passes (k = 0..k_max) and the proposer's drafting on a
    synthetic context, interleaved over `reps` passes (default DEFAULT_PROBE_REPS) after one warm-up pass,
    fewer (at least MIN_PROBE_REPS) once `budget_s` seconds have gone; return medians as ratios to the
    plain step. Without a proposer the draft cost is 0. `clock` is what the seconds are read from.
    `tree_budgets`: also whole rounds with trees of these many nodes (the proposer's `propose_tree`), and
    verify passes up to the largest budget's rows."""
    reps = DEFAULT_PROBE_REPS if reps is None else reps
    rng = np.random.default_rng(seed)
    rows_max = max([k_max, *tree_budgets])
    forward, cache, ctx = _synthetic_context(model, proposer, context, max(plain_steps, rows_max) + 1, rng, seed, kv)
    history, vocab = ctx.history, vocab_size(model) or 256
    drafts = mx.array(rng.integers(4, vocab, size=rows_max).tolist(), mx.int32)
    probe_ks = {k for k in PROBE_VERIFY_KS + PROBE_TREE_VERIFY_KS if k <= rows_max} | {k_max, rows_max}
    draft_ks = [k for k in PROBE_DRAFT_KS if k <= k_max]

    plain, verify, trees = [], [[] for _ in range(rows_max + 1)], {n: [] for n in tree_budgets}
    draft, sync = [[] for _ in draft_ks], []
    started = time.perf_counter()
    for rep in range(reps + 1):  # pass 0 warms up and is not timed
        if rep > min(MIN_PROBE_REPS, reps) and time.perf_counter() - started > budget_s:
            break
        for n, times in trees.items():  # a tree round of each budget (warm-up: compiled once, not kept)
            t = _time_tree(forward, cache, ctx, proposer, n, vocab, rng, clock)
            if rep:
                times.append(t)
        if rep == 0:  # warm-up (compilation, allocation): each kind of work once, at its largest
            _time_plain(forward, cache, history[-1], 2, clock)
            _time_verify(forward, cache, history[-1], drafts, clock)
            if proposer is not None and draft_ks:
                _time_draft(proposer, ctx, draft_ks[-1], clock)
            continue
        p = _time_plain(forward, cache, history[-1], plain_steps, clock)
        v = [_time_verify(forward, cache, history[-1], drafts[:k], clock) if k in probe_ks else None
             for k in range(rows_max + 1)]
        d = [_time_draft(proposer, ctx, k, clock) for k in draft_ks] if proposer is not None else []
        s = _time_sync(clock)
        plain.append(p)
        sync.append(s)
        for k, t in enumerate(v):
            if t is not None:
                verify[k].append(t)
        for i, t in enumerate(d):
            draft[i].append(t)
    step = float(np.median(plain))
    measured = [k for k in range(rows_max + 1) if verify[k]]
    verify_cost = isotonic(np.interp(range(rows_max + 1), measured,
                                     [float(np.median(verify[k])) / step for k in measured]).tolist())
    fixed, per_step = 0.0, 0.0
    if proposer is not None:
        overhead = float(np.median(sync))
        fixed, per_step = fit_line(draft_ks, [max(0.0, float(np.median(d)) - overhead) / step for d in draft])
    return Costs(verify_cost, fixed, per_step, step, {n: float(np.median(t)) / step for n, t in trees.items()})
