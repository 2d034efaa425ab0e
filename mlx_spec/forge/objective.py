"""What forge asks of a drafter family's objective, and the parts every objective shares.

Each family that forge trains names its objective module in its registration (families.Family.forge:
objectives/mtp.py, dflash.py, dspark.py, eagle3.py). The trainer, the job and --resume know only this
contract; a module provides:

    teacher(base, drafter, tokens, mask, k, rng=None, light=False) -> a teacher (`.arrays()` to evaluate):
        one frozen base forward over a batch and what the family reads of it; `rng` draws the training
        blocks (None: every round start, as the held-out estimate wants); light: no distribution
    loss(drafter, teacher, settings) -> (scalar, per-draft-position losses): the family's inference
        conditioning, distilled from the base's distribution, weighted toward early draft positions
    acceptance_estimate(drafter, teacher, k) -> (accepted (k,), counted (k,)): greedy rounds as the engine
        counts them (draft j accepted where drafts 1..j all equal the base's argmax)
    prepare(drafter): freeze what the family never trains (an index table, a frozen embedding)
    max_drafts(drafter) -> int or None: the most drafts a round can ask of it (a block's rows)
    scratch_config(base, tokenizer, options, dtype) -> config.json dict in the family's published layout;
    build(base, config, seed, windows) -> a new drafter (float32) for that config, paired with the base
    output_config(config, dtype) -> the config.json forge writes (the published layout, dtype updated)
    activation_bytes(base, drafter, batch, seq_len, k) -> one training step's activations, roughly
    SCRATCH_FLAGS: the --from-scratch shape flags (ForgeOptions field names) the family takes

Knows nothing of files, optimizers or the engine.
"""

import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .. import families
from ..errors import MlxSpecError

DEFAULT_STEP_DECAY = 0.8  # weight of draft position j: decay**(j-1); a draft counts only after its predecessors
DEFAULT_CENTROID_WEIGHT = 1.0
LOSSES = ("kl", "ce")
RECOMPUTE_VOCAB = 65536  # from this vocabulary size on, head logits are recomputed in the backward pass


@dataclass(frozen=True)
class Settings:
    """What a loss is asked for: k draft positions (a block drafter: the longest block), the loss kind,
    the decay of the positions' weights and the centroid head's cluster-loss weight (MTP)."""

    k: int
    kind: str = "kl"
    step_decay: float = DEFAULT_STEP_DECAY
    centroid_weight: float = DEFAULT_CENTROID_WEIGHT


def forged() -> Tuple[families.Family, ...]:
    """The families forge trains (those that name an objective)."""
    return tuple(f for f in families.FAMILIES if f.forge)


def family_named(name: str) -> families.Family:
    """--family NAME: one of the families forge trains."""
    found = next((f for f in forged() if f.name == name), None)
    if found is None:
        raise MlxSpecError(f"--family must be one of {', '.join(f.name for f in forged())}, got {name!r}")
    return found


def for_family(family: families.Family):
    """The objective module of a family that forge trains."""
    return importlib.import_module(family.forge)


def of_drafter(drafter):
    """The objective module of a loaded drafter's family."""
    return for_family(families.of_drafter(drafter))


def per_position(logits: mx.array, target: mx.array, entropy: Optional[mx.array], kind: str) -> mx.array:
    """(...,) the distillation loss of logits (..., V) against the base: kl: KL(base || drafter) with target
    the base's probabilities (..., V) and entropy (...,) their entropy (so the value is the KL; the gradient
    is the cross-entropy's); ce: cross-entropy to target, the base's argmax ids (...,)."""
    logq = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    if kind == "kl":
        return -(target * logq).sum(-1) - entropy
    return -mx.take_along_axis(logq, mx.stop_gradient(target)[..., None], axis=-1)[..., 0]


def head_loss_fn(head: Callable[..., mx.array], kind: str, recompute: bool):
    """fn(h, target, entropy, *params) -> per-position loss for drafter states h, whose vocabulary-wide logits
    are `head(h, *params)`; with `recompute`, the logits are recomputed in the backward pass instead of kept
    (one more head matmul for no (…, V) activation: ~1 GB per 512 rows at Gemma 4's 262k vocabulary). A
    trained head's weights must come in as params: mx.checkpoint differentiates its arguments only."""

    def fn(h, target, entropy, *params):
        return per_position(head(h, *params), target, entropy, kind)

    return mx.checkpoint(fn) if recompute else fn


def weighted(per_pos: mx.array, valid: mx.array, position: mx.array, k: int, decay: float):
    """(scalar, per-position means (k,)) of per_pos over the valid entries, an entry of draft position
    j = 1..k weighted decay**(j-1). per_pos, valid (float), position (int): the same shape."""
    w = valid * mx.power(decay, (position - 1).astype(mx.float32))
    total = (per_pos * w).sum() / mx.maximum(w.sum(), 1e-9)
    per_step = []
    for j in range(1, k + 1):
        v = valid * (position == j)
        per_step.append((per_pos * v).sum() / mx.maximum(v.sum(), 1.0))
    return total, mx.stack(per_step)


def probabilities(logits: mx.array):
    """(probs, entropy, argmax) of the base's logits (..., V), as float32 constants for the drafter."""
    logits = mx.stop_gradient(logits.astype(mx.float32))
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = mx.exp(logp)
    return probs, -(probs * logp).sum(-1), mx.argmax(logits, axis=-1)
