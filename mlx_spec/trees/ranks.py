"""How often a node's r-th child is the one the base keeps: Sequoia's acceptance vector, learnt per request.

Where drafts are sampled, the drafter's own probabilities are the wrong measure of what a tree should
spend its nodes on: under rejection sampling (or the coupled draw) a first child is kept with probability
about 1 - TV(p, q), high for a drafter close to the base however flat its distribution, so ranking by the
drafter's probabilities buys siblings at the price of depth where depth was worth more. So a sampled tree
ranks its nodes by these measured rates instead (trees/grow.py; greedy trees keep EAGLE-2's ranking by the
drafter's probabilities, which is what greedy acceptance follows).

    beta_0(d) = P(a depth-d node's first child is kept)             by depth, as the chain's acceptance
    beta_r    = P(the r-th child is kept | the ones before it were not), r >= 1, over all depths
    P(rank r is the kept one at depth d) = beta_r * prod_{j<r} (1 - beta_j), beta_0 taken at depth d

A later sibling starts from a pessimistic prior worth several rounds, so a tree widens only on evidence
(where first children are kept often, depth is worth more than width, and a tree stays a chain). Every tree
round tells: along the kept branch, at each depth the children before the kept one were tried and rejected;
at its last node, every child was. Knows counts only.
"""

import math
from dataclasses import dataclass, field
from typing import List, Sequence

FORGET = 0.97  # per round, as the chain's acceptance estimate (about 30 rounds of memory)
FIRST_PRIOR, FIRST_WEIGHT = 0.7, 2.0  # a first child, before evidence
LATER_PRIOR, LATER_WEIGHT = 0.2, 6.0  # a later sibling: width is bought on evidence


@dataclass
class RankAcceptance:
    first: List[List[float]] = field(default_factory=list)  # by depth: [tried, kept] of first children
    later: List[List[float]] = field(default_factory=list)  # by rank - 1: [tried, kept] of later siblings

    def observe(self, ranks: Sequence[int], rejected_at_end: int) -> None:
        """ranks: the kept branch's nodes' ranks among their siblings, by depth; rejected_at_end: the
        children of its last node (all tried, none kept)."""
        for counts in self.first + self.later:
            counts[0] *= FORGET
            counts[1] *= FORGET
        for d, r in enumerate(list(ranks) + [None]):
            tried = rejected_at_end if r is None else r + 1
            for j in range(tried):
                self._count(d, j, kept=j == r)

    def _count(self, depth: int, rank: int, kept: bool) -> None:
        table, i = (self.first, depth) if rank == 0 else (self.later, rank - 1)
        while len(table) <= i:
            table.append([0.0, 0.0])
        table[i][0] += 1
        table[i][1] += kept

    def beta(self, depth: int, rank: int) -> float:
        table, i, prior, weight = (self.first, depth, FIRST_PRIOR, FIRST_WEIGHT) if rank == 0 \
            else (self.later, rank - 1, LATER_PRIOR, LATER_WEIGHT)
        tried, kept = table[i] if i < len(table) else (0.0, 0.0)
        return min(max((kept + weight * prior) / (tried + weight), 1e-6), 1 - 1e-6)

    def log_probs(self, depths: int, k: int) -> List[List[float]]:
        """[depth][rank]: log P(a depth-d node's child of rank r is the one kept), d = 0..depths-1."""
        out = []
        for d in range(depths):
            row, missed = [], 0.0
            for r in range(k):
                b = self.beta(d, r)
                row.append(missed + math.log(b))
                missed += math.log(1 - b)
            out.append(row)
        return out
