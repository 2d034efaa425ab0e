"""Self-tuning: how many drafts per round pay off on this machine, for this model and this proposer.

    costs.py    the cost model (pure): τ(k), R(k), the expected speedup, the best k
    policy.py   AutoDraftPolicy (auto, auto-off), behind the engine's DraftPolicy contract (draft_policy.py)
    probe.py    timing a plain step, verify passes and drafting on this machine
    store.py    the costs file (~/.cache/mlx_spec/tuning.json), keyed by machine + MLX + model + proposer
    tuner.py    AutoTuner: what a caller keeps across requests (the store, what each pair learnt)
    batch_costs.py      the cost model of a batched round by width (pure): which rows draft how many
    width_probe.py      timing a batch's plain, verify and drafted rounds at a width on this machine
    batch_policy.py     BatchDraftPolicy: every auto row's k per round of a batch, for aggregate tokens/s
"""

from ..draft_policy import DraftPolicy, FixedK
from .costs import K_MAX, MIN_SPEEDUP, Costs, best_k, expected_speedup, expected_tokens
from .policy import AutoDraftPolicy
from .probe import measure_costs
from .batch_costs import WidthCosts
from .batch_policy import BatchDraftPolicy
from .store import CostsStore
from .tuner import AutoTuner

__all__ = ["K_MAX", "MIN_SPEEDUP", "Costs", "best_k", "expected_speedup", "expected_tokens", "AutoDraftPolicy",
           "DraftPolicy", "FixedK", "measure_costs", "CostsStore", "AutoTuner", "WidthCosts", "BatchDraftPolicy"]
