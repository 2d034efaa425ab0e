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
from ..draft_policy import DraftPolicy, FixedK
from ..errors import MlxSpecError
from .policy import FIRST_PROBE_AFTER, AcceptanceEstimate, AutoDraftPolicy, PairState
from .store import CostsStore

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
                               clock=self.clock)


def draft_policy(value: Union[int, str, DraftPolicy], model, proposer, tuner: Optional[AutoTuner] = None,
                 kv: Optional[KVQuant] = None) -> Optional[DraftPolicy]:
    """The policy for `num_draft_tokens` (--num-draft-tokens): FixedK(k) for an int (None for 0: plain
    decoding), `tuner`'s AutoDraftPolicy for "auto" (a tuner of its own when none is given), or the
    DraftPolicy passed."""
    if isinstance(value, str):
        if value != "auto":
            raise MlxSpecError(f"num_draft_tokens must be an integer or 'auto', got {value!r}")
        return (tuner or AutoTuner()).policy(model, proposer, kv)
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if not 0 <= value <= MAX_DRAFT_TOKENS:
        raise MlxSpecError(f"num_draft_tokens must be between 0 and {MAX_DRAFT_TOKENS}, got {value}")
    return FixedK(value) if value else None
