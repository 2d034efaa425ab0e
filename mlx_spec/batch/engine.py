"""Rounds for several requests at once: every row drafts its own k, one base pass verifies every row.

A `Batch` holds B rows. A row is a request whose prefill ran in its own `Engine` (engine.py): the engine
keeps what is the request's own (history, sampler, policy, proposer, limits, stats, log-probabilities)
and the batch moves its K/V into rows-caches (cache.py here) for as long as it decodes with others.

One round:
    each row asks its policy for k (0: a plain step), or the batch's `RoundPolicy` chooses every row's k
    (tuning/batch_policy.py: for aggregate tokens/s at this width, timing the rounds it plans); its proposer drafts (an MTP drafter
    runs once for all its rows; other proposers per row);
    the base runs (B, L) tokens, row b's `[bonus, d1..dk_b]` padded to L = 1 + max k with copies of its
    last token;
    each row accepts its own prefix with its own sampler (engine.verify), all rows' results read back
    in one host synchronisation;
    the caches give back each row's own rejected tail and padding (L - 1 - n_b positions), no clamp to
    the batch's shortest acceptance.
A row may verify a draft tree (trees/): its nodes are its drafts, each at its own position and seeing its
own ancestors, and its kept branch is compacted into place (chain rows' compaction moves nothing).
A row's output equals its output alone: its attention reads its own slots in the same order (see
cache.py), its sampler draws by (seed, position), and padding is never attended by a real position.

Rows join after their prefill (`add`) and leave when they finish or are dropped (`remove`), between
rounds; a row that leaves gets its K/V back as one-row caches, exactly its history minus the last token,
so a prompt-cache slot keeps working.

Knows the Engine's per-request pieces and rows-caches; nothing of text, HTTP or scheduling.
"""

import time
from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Tuple

import mlx.core as mx

from ..cache import rollback_all
from ..draft_policy import tree_budget
from ..engine import Engine, TokenEvent
from ..proposers.base import Draft, RoundContext, RoundResult
from ..trees.round import shape_of, unpack, verify_tree
from ..trees.views import rows_layout, rows_views
from .cache import join_rows, rollback_rows, select_rows


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One request decoding in a batch."""

    engine: Engine
    cache: list  # the request's own list of one-row caches (a prompt-cache slot's): filled again on leaving
    hidden: Optional[mx.array]  # (1, H) the base's hidden at the row's last position (an MTP drafter reads it)
    gen_start: float = field(default_factory=time.perf_counter)
    finished: bool = False

    @property
    def position(self) -> int:
        return len(self.engine.history) - 1


class RoundPolicy(Protocol):
    """What chooses every row's k for a round, seeing the whole batch (tuning/ implements it; a scheduler
    owns one). Without one, each row asks its own policy."""

    def plan(self, batch: "Batch") -> List[int]:
        """Each row's k this round, in row order (the batch caps each at `budget(row, k)`)."""

    def observe(self, batch: "Batch", asked: List[int], results: List[RoundResult]) -> None:
        """What the round did per row: what it asked, then drafted and accepted (the round ends here: a
        policy that times rounds times from `plan` to `observe`)."""


class Batch:
    """Rows of requests decoding together; `round()` runs one propose + verify for all of them."""

    def __init__(self, model, policy: Optional[RoundPolicy] = None):
        from ..models.base import as_base

        self.base = as_base(model)
        self.policy = policy
        self.rows: List[Row] = []
        self.caches: Optional[list] = None  # per layer, a rows-cache (B rows)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, engine: Engine, hidden: Optional[mx.array]) -> Row:
        """A request whose prefill ran (its first token emitted) joins; its caches move into the batch."""
        row = Row(engine, engine.cache, hidden.reshape(1, -1) if hidden is not None else None)
        self.caches = join_rows(self.caches, engine.cache)
        engine.cache = []  # the batch holds its K/V until it leaves
        self.rows.append(row)
        return row

    def remove(self, row: Row) -> None:
        """The row leaves: its caches hold exactly its history minus the last token again."""
        b = self.rows.index(row)
        row.cache[:] = [c.row(b) for c in self.caches]
        keep = [i for i in range(len(self.rows)) if i != b]
        self.caches = select_rows(self.caches, keep) if keep else None
        self.rows.pop(b)
        engine = row.engine
        engine.cache = row.cache
        engine._trim_cache_to_history()

    def round(self) -> List[Tuple[Row, List[TokenEvent]]]:
        """One round for every row: (row, the TokenEvents it emitted), in row order. Finished rows stay until
        `remove`d (their caches still hold them)."""
        rows = self.rows
        asked = self._asked()
        budgets = [(k, self._nodes(row, k)) for row, k in zip(rows, asked)]  # (k, tree nodes) per row
        drafts = self._propose(budgets)
        # strict rows (a device whose kernels change with the row count) run every pass at their row count
        L = max([1 + max(d.k for d in drafts)] + [row.engine.strict_rows or 0 for row in rows])
        verify = mx.stack([self._verify_row(row, d, L) for row, d in zip(rows, drafts)])  # (B, L)
        logits, hidden, features = self._forward(verify, drafts)  # (B, L, V), (B, L, H) or None
        results = self._verify(logits, verify, drafts)
        sizes = [r.shape[0] for r in results]
        values = mx.concatenate(results).tolist()  # the round's one host synchronisation
        out, keeps, results, at = [], [], [], 0
        for b, (row, d, size) in enumerate(zip(rows, drafts, sizes)):
            mine = values[at : at + size]
            at += size
            if d.parents is None:
                n, keep = mine[0], list(range(mine[0] + 1))
                if row.engine.reads:  # its context gave back what the base's cache gives back
                    rollback_all(row.engine.proposer.context_cache, d.k - n)
                events = row.engine.settle(mine, asked[b], d.k)
                results.append(RoundResult(d.k, n))
            else:  # a tree: its context takes the kept branch's features again (trees/round.py)
                n, keep, mine, ranks = unpack(mine, d.depth)
                row.engine.tree_ranks.observe(*ranks)
                if row.engine.reads:
                    rollback_all(row.engine.proposer.context_cache, d.k + 1)
                    row.engine.proposer.extend(features[b : b + 1, mx.array(keep)])
                events = row.engine.settle(mine, asked[b], d.depth, nodes=d.k)
                results.append(RoundResult(d.k, n, tree=True))
            keeps.append(keep)  # the rest (rejected drafts, other nodes, padding) is given back
            row.engine._time(row.gen_start)
            if hidden is not None:
                row.hidden = hidden[b, keep[-1]][None]
            row.finished = bool(events) and events[-1].finish_reason is not None
            out.append((row, events))
        if any(d.parents is not None for d in drafts):
            for c in self.caches:
                c.compact(keeps)
        else:
            rollback_rows(self.caches, [L - len(keep) for keep in keeps])
        if self.policy is not None:
            self.policy.observe(self, asked, results)
        return out

    def _verify(self, logits: mx.array, verify: mx.array, drafts: List[Draft]) -> List[mx.array]:
        """Each row's round result (engine.verify's packing). Greedy rows without processors or
        log-probabilities are verified together (one argmax for all of them); the others by their engine."""
        results: List[Optional[mx.array]] = [None] * len(self.rows)
        plain = [b for b, row in enumerate(self.rows) if _greedy_only(row.engine) and drafts[b].parents is None]
        if plain:
            index = mx.array(plain, mx.int32)
            ks = mx.array([drafts[b].k for b in plain], mx.int32)[:, None]
            target = mx.argmax(logits[index], axis=-1).astype(mx.int32)  # (G, L): the base's own tokens
            offered = verify[index, 1:]  # (G, L-1): drafts, then padding
            agree = (target[:, :-1] == offered) & (mx.arange(offered.shape[1])[None] < ks)
            n = mx.cumprod(agree.astype(mx.int32), axis=1).sum(axis=1)  # (G,) the agreeing prefix
            nxt = mx.take_along_axis(target, n[:, None], axis=1)[:, 0]
            packed = mx.concatenate([n[:, None], nxt[:, None], offered], axis=1)
            for g, b in enumerate(plain):
                results[b] = packed[g, : 2 + drafts[b].k]
        for b, (row, d) in enumerate(zip(self.rows, drafts)):
            if results[b] is None and d.parents is not None:
                e = row.engine
                results[b] = verify_tree(e.sampler, shape_of(d), d, logits[b, : d.k + 1], verify[b, : d.k + 1],
                                         row.position, e.logprobs)
            elif results[b] is None:
                results[b] = row.engine.verify(d, logits[b, : d.k + 1], verify[b, : d.k + 1], row.position)
        return results

    def _forward(self, verify: mx.array, drafts: List[Draft]):
        """The base pass over every row: (logits, hidden, features or None). Rows whose proposer reads
        decoder-layer outputs (block drafters) get their rows of them, so each context grows with its row of
        the base's cache. When a row verifies a tree, every row's queries sit at their own positions and see
        their own ancestors (a chain row's: the causal mask; trees/views.py)."""
        caches = self.caches
        if any(d.parents is not None for d in drafts):
            shapes = [shape_of(d) if d.parents is not None else None for d in drafts]
            caches = rows_views(caches, *rows_layout(shapes, [d.k for d in drafts], verify.shape[1]))
        reads = {row.engine.reads for row in self.rows if row.engine.reads}
        if not reads:
            return (*self.base.forward(verify, caches), None)
        if len(reads) > 1:
            raise ValueError(f"rows read different base layers {sorted(reads)}: one proposer family per batch")
        logits, hidden, features = self.base.forward_layers(verify, caches, next(iter(reads)))
        for b, (row, d) in enumerate(zip(self.rows, drafts)):
            if row.engine.reads:
                row.engine.proposer.extend(features[b : b + 1, : d.k + 1])
        return logits, hidden, features

    def _asked(self) -> List[int]:
        if self.policy is not None:
            return [self.budget(row, k) for row, k in zip(self.rows, self.policy.plan(self))]
        return [self.budget(row, row.engine.policy.next_k()) if row.engine.proposer is not None else 0
                for row in self.rows]

    def _nodes(self, row: Row, k: int) -> int:
        """The nodes of the row's tree this round (k its depth bound), 0 for a chain: its own policy says, where
        its engine may verify trees (engine.py); never wider than a strict row's pass."""
        nodes = tree_budget(row.engine.policy) if row.engine.trees and k > 0 else 0
        width = self._strict_width()
        return min(nodes, width - 1) if width else nodes

    def _strict_width(self) -> Optional[int]:
        """The row count every pass runs at while a strict row decodes here (its narrowest), else None: no row
        may verify more than fits it, or the strict row's pass would be wider than alone."""
        return min((r.engine.strict_rows for r in self.rows if r.engine.strict_rows), default=None)

    def budget(self, row: Row, k: int) -> int:
        """At most k drafts (or a tree's depth) for the row this round: none without a proposer, never past its
        max tokens, its K/V switch or a strict row's width."""
        engine = row.engine
        if engine.proposer is None:
            return 0
        k = engine.draft_budget(k)
        kv = engine.kv
        if kv is not None and not self.quantized and row.position < kv.start:
            k = min(k, kv.start - row.position - 1)  # the round ends at the switch (scheduler.py)
        width = self._strict_width()
        if width:
            k = min(k, width - 1)
        return max(0, k)

    @property
    def quantized(self) -> bool:
        return bool(self.caches) and self.caches[0].quantized

    def _propose(self, budgets: List[Tuple[int, int]]) -> List[Draft]:
        """Each row's drafts: one batched call per proposer that drafts rows together, else per row; a tree
        per row (its proposer reads its row of the base's caches as a one-row cache)."""
        drafts: List[Optional[Draft]] = [None] * len(self.rows)
        groups = {}
        for b, (row, (k, nodes)) in enumerate(zip(self.rows, budgets)):
            p = row.engine.proposer
            if k <= 0:
                drafts[b] = Draft.empty()
            elif nodes:
                ctx = row.engine.round_context(row.position, row.hidden, [_RowView(c, b) for c in self.caches], True)
                drafts[b] = p.propose_tree(ctx, nodes, k)
            elif hasattr(p, "propose_rows"):
                groups.setdefault(id(p), (p, []))[1].append(b)
            else:
                drafts[b] = p.propose(self._context(row), k)
        for p, members in groups.values():
            ctxs = [self._context(self.rows[b]) for b in members]
            for b, d in zip(members, p.propose_rows(ctxs, [budgets[b][0] for b in members], self.caches, members)):
                drafts[b] = d
        return drafts

    def _context(self, row: Row) -> RoundContext:
        return row.engine.round_context(row.position, row.hidden, None)

    @staticmethod
    def _verify_row(row: Row, draft: Draft, L: int) -> mx.array:
        """(L,) int32: [bonus, drafts], padded with copies of the last token (never attended by a real
        position: causal, and rolled back)."""
        last = row.engine.history[-1]
        pad = mx.full((L - 1 - draft.k,), last, mx.int32)
        return mx.concatenate([mx.array([last], mx.int32), draft.tokens.astype(mx.int32), pad])


class _RowView:
    """Row b of a rows-cache as a proposer reads a one-row cache (an MTP drafter's tree reads its K/V)."""

    def __init__(self, cache, b: int):
        self.cache, self.b = cache, b

    def drafter_view(self):
        return self.cache.row_drafter_view(self.b)


def _greedy_only(engine: Engine) -> bool:
    """A row whose verify is a plain argmax match (no processors, log-probabilities or strict padding)."""
    return engine.sampler.greedy and not engine.processors and not engine.logprobs and not engine.strict_rows
