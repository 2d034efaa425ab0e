"""`--tree-nodes auto`: each round, a chain or a tree, whichever the cost model expects to be faster.

A tree of n nodes verifies n + 1 rows to keep one branch; whether that beats the best chain depends on the
machine, not on acceptance alone. Where a verify of 17 rows costs little more than one of 5 (decode is
bandwidth-bound: Apple silicon), a tree's extra candidates come almost free; where rows cost compute (a
CPU), they do not. So, as `auto` does for k: expected tokens per round / measured round cost, per option.

    chain k:    tau(k) from the per-position acceptance estimate, R(k) = verify[k] + draft(k) (costs.py)
    tree of n:  tau_n, the tokens its rounds emitted (forgotten as the chain's estimate is), and the measured
                cost of a whole tree round, costs.tree[n] (drafting, verify pass, acceptance, host read)

An untried tree is assumed to keep TREE_PRIOR_GAIN times what the chain of as many rows would (optimistic,
worth one round of evidence), so a tree is tried once wherever its measured cost leaves it a chance, and
again after its evidence has faded; where its cost leaves it none (a CPU) it is never tried. Plain steps,
auto-off, probes and re-timing are AutoDraftPolicy's, over both kinds of option.
"""

from dataclasses import dataclass
from typing import Tuple

from ..proposers.base import RoundResult
from .costs import Costs, expected_tokens
from .policy import FORGET, FORGET_UNTRIED, PRIOR_WEIGHT, AutoDraftPolicy, PairState

TREE_BUDGETS = (4, 8, 16)  # node budgets `auto` considers (and the probe measures)
TREE_PRIOR_GAIN = 1.15


@dataclass
class TreeEstimate:
    """Tokens emitted per round by trees of one budget, with forgetting."""

    tokens: float = 0.0
    rounds: float = 0.0

    def observe(self, accepted: int) -> None:
        self.tokens, self.rounds = self.tokens * FORGET + accepted + 1, self.rounds * FORGET + 1

    def fade(self) -> None:
        """A round that did not use this budget: its evidence fades slowly, back toward the prior."""
        self.tokens, self.rounds = self.tokens * FORGET_UNTRIED, self.rounds * FORGET_UNTRIED

    def tau(self, prior: float) -> float:
        return (self.tokens + PRIOR_WEIGHT * prior) / (self.rounds + PRIOR_WEIGHT)


class AutoTreePolicy(AutoDraftPolicy):
    """AutoDraftPolicy whose options are chains of k and trees of each measured budget."""

    def __init__(self, costs: Costs, state: PairState = None, *, budgets=TREE_BUDGETS, **kwargs):
        super().__init__(costs, state, **kwargs)
        self.budgets = [n for n in budgets if n in costs.tree]
        for n in self.budgets:
            self.state.trees.setdefault(n, TreeEstimate())
        # a tree can pay even where no chain can (a machine with cheap rows): plain-only only if neither can
        self.never = self.never and not any((n + 1) / costs.tree[n] >= self.min_speedup for n in self.budgets)
        self.nodes = 0  # this round's tree (0: a chain, or a plain step)
        self.tree_counts = {}
        self._tree_round = False  # the last observed round was a tree (its modelled cost is costs.tree)

    def _tree_speedups(self):
        st = self.state
        alphas, overhead = st.estimate.alphas(), st.round_overhead / st.plain_overhead
        for n in self.budgets:
            prior = TREE_PRIOR_GAIN * expected_tokens(alphas, min(n, len(alphas)))
            yield st.trees[n].tau(prior) / (self.costs.tree[n] * overhead), n

    def _choose(self, min_k: int = 0) -> Tuple[int, float]:
        k, chain = super()._choose(min_k)
        speed, n = max(self._tree_speedups(), default=(0.0, 0))
        if n and speed > chain and (min_k or speed >= self.min_speedup):
            self.nodes = n
            return n, speed  # the tree's depth bound: its nodes (a sure drafter may make it a chain)
        self.nodes = 0
        return k, chain

    def next_k(self) -> int:
        k = super().next_k()
        if k == 0:
            self.nodes = 0
        elif self.nodes:
            self.tree_counts[self.nodes] = self.tree_counts.get(self.nodes, 0) + 1
        return k

    def next_nodes(self) -> int:
        return self.nodes

    def assign(self, k: int) -> None:
        """A batch policy chose this round's chain of k (batch_policy.py weighs chains only)."""
        self.nodes = 0
        super().assign(k)

    def observe(self, result: RoundResult) -> None:
        if self._asked <= 0:
            return
        self._tree_round = result.tree
        if not result.tree:
            return super().observe(result)
        self._drafted = result.drafted
        for n, est in self.state.trees.items():
            if n == self.nodes:
                est.observe(result.accepted)
            else:
                est.fade()

    def _modelled_round(self) -> float:
        return self.costs.tree[self.nodes] if self._tree_round and self.nodes in self.costs.tree \
            else super()._modelled_round()

    def summary(self) -> dict:
        st = self.state
        taus = {n: round(st.trees[n].tau(0.0), 3) if st.trees[n].rounds else None for n in self.budgets}
        return dict(super().summary(), tree_counts=dict(sorted(self.tree_counts.items())), tree_tau=taus)

