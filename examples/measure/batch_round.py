"""Where a batched round's time goes: `Batch.round` (mlx_spec/batch/engine.py) at B rows, plain (k=0) and
with an MTP drafter at a fixed k, split into its phases.

    python examples/measure/batch_round.py [--widths 1,2,4,8] [--k 3] [--rounds 40] [--model M --drafter D]

B rows of held-out-style code prompts are prefilled and joined into one Batch (no end-of-sequence, so no row
leaves), then `--rounds` rounds run twice: as the scheduler runs them (the "as run" time per round), then
with a host synchronisation after each phase, so each phase's time is its own:
    budget    each row's policy asks for k (Python)
    propose   the drafts: one MTP drafter pass per draft step for all rows (propose_rows), evaluated
    inputs    each row's [bonus, drafts, padding] built and stacked (Python + small arrays)
    forward   the base's pass over (B, 1 + max k) tokens: scatter into the rows-caches, masked attention
    verify    acceptance for every row, evaluated, and read back (the round's one .tolist())
    settle    per row: the engine counts, tells the policy and proposer, emits TokenEvents (Python)
    rollback  the rows-caches give back each row's rejected tail and padding
The last line per width: a one-request plain step through the engine's own pipelined loop, the unit of
DESIGN.md's round cost, for comparison. "as run": the median round; phases: their mean over the rounds, in
ms. `--clock cpu` times with this process's CPU time (all its threads): on a machine shared with other jobs
a wall-clock phase also holds the time the process waited for a core.
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_spec import load, load_drafter
from mlx_spec.api import make_engine
from mlx_spec.batch import engine as batch_engine
from mlx_spec.batch.engine import Batch
from mlx_spec.engine import Engine
from mlx_spec.proposers import make_proposer
from mlx_spec.request import Request

TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gemma4-tiny-code"
PROMPTS = ["import os\nimport sys\n\n\ndef main(argv):\n    ", "class Stack:\n    def __init__(self):\n        ",
           "def parse(line):\n    fields = line.split(','", "for i, row in enumerate(rows):\n    if row",
           "import json\n\n\ndef load(path):\n    with open(path", "def fibonacci(n):\n    if n < 2:\n",
           "x = [i * i for i in range(10)]\nfor v in x:\n", "with open(path) as f:\n    for line in f:\n"]
PHASES = ("budget", "propose", "inputs", "forward", "verify", "settle", "rollback")
clock = time.perf_counter


def build_batch(model, tokenizer, proposer, k: int, width: int) -> Batch:
    batch = Batch(model)
    for b in range(width):
        ids = tokenizer.encode(PROMPTS[b % len(PROMPTS)])
        request = Request(ids, max_tokens=100_000, draft=k > 0, num_draft_tokens=k)
        engine = make_engine(model, request, eos_ids=(), proposer=proposer if k > 0 else None)
        begin = engine.begin()
        while True:
            try:
                next(begin)
            except StopIteration as done:
                _, hidden, _ = done.value
                break
        batch.add(engine, hidden)
    return batch


class Phases:
    """Wraps the batch's phases with a host synchronisation and a clock; `times[phase]` per round."""

    def __init__(self, batch: Batch):
        self.batch, self.times = batch, {p: 0.0 for p in PHASES}
        self.saved = []

    def _timed(self, name, fn, sync):
        def wrapper(*args, **kw):
            start = clock()
            out = fn(*args, **kw)
            sync(out)
            self.times[name] += clock() - start
            return out
        return wrapper

    def __enter__(self):
        b = self.batch
        sync_drafts = lambda ds: mx.eval([d.tokens for d in ds])  # noqa: E731
        b._asked = self._timed("budget", b._asked, lambda out: None)
        b._propose = self._timed("propose", b._propose, sync_drafts)
        b._verify_row = self._timed("inputs", b._verify_row, mx.eval)
        b._forward = self._timed("forward", b._forward, lambda out: mx.eval([x for x in out if x is not None]))
        b._verify = self._timed("verify", b._verify, mx.eval)
        self.saved = [(Engine, "settle", Engine.settle), (batch_engine, "rollback_rows", batch_engine.rollback_rows)]
        Engine.settle = self._timed("settle", Engine.settle, lambda out: None)
        batch_engine.rollback_rows = self._timed("rollback", batch_engine.rollback_rows,
                                                 lambda out: mx.eval([c.keys for c in b.caches]))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)
        for name in ("_asked", "_propose", "_verify_row", "_forward", "_verify"):
            self.batch.__dict__.pop(name, None)


def rounds(batch: Batch, n: int):
    """(ms per round for n rounds, tokens emitted)."""
    times, tokens = [], 0
    for _ in range(n):
        start = clock()
        out = batch.round()
        times.append((clock() - start) * 1000)
        tokens += sum(len(events) for _, events in out)
    return times, tokens


def plain_step_ms(model, tokenizer, n: int) -> float:
    """One request, plain, the engine's own pipelined loop: ms per token after the first."""
    engine = make_engine(model, Request(tokenizer.encode(PROMPTS[0]), max_tokens=n + 1, draft=False), eos_ids=())
    events = engine.run()
    next(events)
    start = clock()
    for _ in events:
        pass
    return (clock() - start) * 1000 / n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TINY / "base"))
    p.add_argument("--drafter", default=str(TINY / "assistant"))
    p.add_argument("--widths", default="1,2,4,8")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, tokenizer = load(args.model)
    mtp = make_proposer(model, drafter=load_drafter(args.drafter, model))
    print(f"{'B':>2} {'k':>2} {'as run':>7} {'tok/rnd':>8} {'ms/tok':>7} | " + " ".join(f"{p:>8}" for p in PHASES)
          + f" {'rest':>7}")
    for width in [int(w) for w in args.widths.split(",")]:
        for k in (0, args.k):
            batch = build_batch(model, tokenizer, mtp, k, width)
            rounds(batch, 3)  # warm-up: compiles this width
            as_run, tokens = rounds(batch, args.rounds)
            with Phases(batch) as ph:
                synced, _ = rounds(batch, args.rounds)
            phases = {name: t * 1000 / args.rounds for name, t in ph.times.items()}
            rest = statistics.mean(synced) - sum(phases.values())
            ms = statistics.median(as_run)
            per_round = tokens / args.rounds
            print(f"{width:>2} {k:>2} {ms:>7.2f} {per_round:>8.2f} {ms / per_round:>7.3f} | "
                  + " ".join(f"{phases[p]:>8.2f}" for p in PHASES) + f" {rest:>7.2f}")
        print(f"   one request, plain, the engine's pipelined loop: {plain_step_ms(model, tokenizer, 64):.2f} ms/token")


if __name__ == "__main__":
    main()
