"""`--num-draft-tokens auto` across requests: the costs store and what each (model, proposer) pair learnt.

An `AutoTuner` belongs to whoever serves the requests (the generate command, a chat, a server): it hands
each request an `AutoDraftPolicy` that starts from what earlier requests of the same pair learnt,
down-weighted, so a new prompt moves the estimate quickly. A library call that passes none gets the
stateless default (a fixed k) or, for "auto", a tuner of its own that lives for that call.
"""

import threading
import time
from typing import Callable, Dict, Optional, Tuple, Union

from ..cache import MAX_DRAFT_TOKENS, KVQuant
from ..draft_policy import DraftPolicy, FixedK, FixedTree
from ..errors import MlxSpecError
from ..families import TREE_PASS
from ..models.base import offers
from ..proposers.base import grows_trees, most_drafts
from .policy import FIRST_PROBE_AFTER, K_MAX, AcceptanceEstimate, AutoDraftPolicy, PairState
from .store import CostsStore
from .trees import TREE_BUDGETS, AutoTreePolicy

CARRY_WEIGHT = 16.0  # a new request trusts at most this many rounds of an earlier request's evidence


class AutoTuner:
    def __init__(self, store: Optional[CostsStore] = None, *, clock: Optional[Callable[[], float]] = None,
                 log: Optional[Callable[[str], None]] = None):
        """`clock` (default: the store's, else wall time) times rounds; `log` is the store's when it makes
        one (first-use measurement notice)."""
        self.store = store if store is not None else CostsStore(clock=clock or time.perf_counter, log=log)
        self.clock = clock or self.store.clock
        self._lock = threading.Lock()
        self._states: Dict[Tuple[str, str, Optional[KVQuant]], PairState] = {}

    def pair_state(self, model, proposer, kv: Optional[KVQuant] = None) -> PairState:
        """The learnt state of this pair (with this K/V quantization: it moves acceptance), down-weighted for
        a new request: it keeps its verdict, but a new prompt re-probes within FIRST_PROBE_AFTER tokens and
        moves the estimate quickly."""
        key = (self.store.model_identity(model)["weights_hash"], proposer.identity, kv)
        with self._lock:
            st = self._states.get(key)
            if st is None:
                st = self._states[key] = PairState(AcceptanceEstimate())
            else:
                st.estimate.shrink(CARRY_WEIGHT)
                st.plain_left = min(st.plain_left, FIRST_PROBE_AFTER)
            return st

    def policy(self, model, proposer, kv: Optional[KVQuant] = None) -> AutoDraftPolicy:
        """A policy for one request: measured (first use) or stored costs, and the pair's learnt state."""
        return AutoDraftPolicy(self.store.get(model, proposer, kv=kv), self.pair_state(model, proposer, kv),
                               clock=self.clock, k_max=most_drafts(proposer, K_MAX))

    def tree_policy(self, model, proposer, kv: Optional[KVQuant] = None, budgets=TREE_BUDGETS) -> AutoTreePolicy:
        """`--tree-nodes auto`: chains or trees of `budgets` nodes each round, from costs that include tree
        rounds (measured on first use of trees with this pair)."""
        costs = self.store.get(model, proposer, kv=kv, tree_budgets=budgets)
        return AutoTreePolicy(costs, self.pair_state(model, proposer, kv), budgets=budgets, clock=self.clock,
                              k_max=most_drafts(proposer, K_MAX))


def draft_policy(value: Union[int, str, DraftPolicy], model, proposer, tuner: Optional[AutoTuner] = None,
                 kv: Optional[KVQuant] = None, tree_nodes: Union[int, str, None] = None) -> Optional[DraftPolicy]:
    """The policy for `num_draft_tokens` (--num-draft-tokens): FixedK(k) for an int (None for 0: plain
    decoding), `tuner`'s AutoDraftPolicy for "auto" (a tuner of its own when none is given), or the
    DraftPolicy passed. `tree_nodes` (--tree-nodes; 0 or None: chains): N gives every round a tree of N nodes,
    no deeper than an int k; "auto" (with num_draft_tokens "auto") chooses chain or tree each round."""
    nodes = check_tree_nodes(tree_nodes, value)
    if nodes and value != 0:
        check_trees_possible(model, proposer)
    if nodes and value == 0:
        return None  # no drafts at all: plain decoding
    if nodes == "auto":
        return (tuner or AutoTuner()).tree_policy(model, proposer, kv)
    if nodes:
        if value == "auto":
            return (tuner or AutoTuner()).tree_policy(model, proposer, kv, budgets=(nodes,))
        return FixedTree(nodes, depth=value if isinstance(value, int) and value > 0 else None)
    if isinstance(value, str):
        if value != "auto":
            raise MlxSpecError(f"num_draft_tokens must be an integer or 'auto', got {value!r}")
        return (tuner or AutoTuner()).policy(model, proposer, kv)
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if not 0 <= value <= MAX_DRAFT_TOKENS:
        raise MlxSpecError(f"num_draft_tokens must be between 0 and {MAX_DRAFT_TOKENS}, got {value}")
    return FixedK(value) if value else None


def check_tree_nodes(tree_nodes, num_draft_tokens) -> Union[int, str]:
    """tree_nodes as the policy takes it: 0 (chains), 1..MAX_DRAFT_TOKENS, or "auto" (which needs
    num_draft_tokens "auto": it chooses between chains and trees); anything else raises MlxSpecError."""
    if tree_nodes is None or tree_nodes == 0:
        return 0
    if tree_nodes == "auto":
        if num_draft_tokens != "auto":
            raise MlxSpecError("tree_nodes 'auto' chooses between chains and trees each round: it needs "
                               f"num_draft_tokens 'auto', got {num_draft_tokens!r}")
        return "auto"
    if isinstance(tree_nodes, bool) or not isinstance(tree_nodes, int) or not 0 < tree_nodes <= MAX_DRAFT_TOKENS:
        raise MlxSpecError(f"tree_nodes must be an integer between 0 and {MAX_DRAFT_TOKENS} or 'auto', "
                           f"got {tree_nodes!r}")
    return tree_nodes


def check_trees_possible(model, proposer) -> None:
    """Trees need a base whose verify pass takes a tree (Gemma 4) and a proposer that grows them."""
    if not offers(model, TREE_PASS):
        raise MlxSpecError("--tree-nodes needs a Gemma 4 base (its verify pass places each node at its own "
                           "position); use chains (--tree-nodes 0) with this model")
    if not grows_trees(proposer):
        raise MlxSpecError(f"--tree-nodes: the {getattr(proposer, 'name', 'given')} proposer drafts chains only; "
                           "trees come from --drafter (MTP, DFlash, DSpark) or --ngram")
