"""Resuming a forge job from a checkpoint, checked before anything trains on it.

A checkpoint can be damaged: edited by hand, files copied in from another run, or written by a run that
diverged. Each such problem is one CheckpointError naming the file and the ways on (`trainer.damaged`),
never a traceback at the first step or a silent resume of NaN weights. Checked here: the base it was made
for, config.json against the base, drafter.safetensors (and best.safetensors) against that config and for
finite values, optimizer.safetensors against the drafter. state.json's keys are `trainer.read_checkpoint`'s.

Knows nothing of data or of the engine.
"""

from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from .. import families
from ..errors import MlxSpecError
from . import objective, trainer

# what building a model from a config someone edited raises (a missing key, a string for a number, 0 heads)
BUILD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError)


def load(path: Path, base, identity: dict) -> Tuple[object, trainer.Checkpoint]:
    """(drafter float32, checkpoint) from the checkpoint at path, for a base of this identity."""
    saved = trainer.read_checkpoint(path)
    if saved.identity != identity:
        raise trainer.CheckpointError(f"{path} was made for another base ({saved.identity.get('model')}, "
                                      f"adapters {saved.identity.get('adapter_path')}); resume with the same "
                                      "--model and --adapter-path, or start over with --force")
    drafter = drafter_from_checkpoint(saved, base)
    check_optimizer(saved, drafter)
    return drafter, saved


def _reason(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut (MLX lists every unexpected parameter)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def model_from_config(config: dict):
    """An unloaded drafter of the family its config describes (a family forge trains), or ValueError."""
    family = families.for_type(families.checkpoint_type(config))
    if family is None or not family.forge:
        trained = ", ".join(f.name for f in objective.forged())
        raise ValueError(f"it is no drafter forge trains ({trained})")
    module = family.model_module()
    drafter = module.Model(module.ModelArgs.from_dict(config))
    objective.for_family(family).prepare(drafter)
    return drafter


def drafter_from_checkpoint(saved: trainer.Checkpoint, base=None):
    """The checkpoint's drafter (float32), its config and weights checked (against `base` when given)."""
    path = Path(saved.path)
    try:
        drafter = model_from_config(saved.config)
    except (MlxSpecError, *BUILD_ERRORS) as e:
        raise trainer.damaged(path / "config.json", f"does not describe a drafter ({_reason(e)})") from e
    if base is not None:
        try:
            families.of_drafter(drafter).check_pairing(drafter, base)
        except MlxSpecError as e:
            raise trainer.damaged(path / "config.json", f"describes a drafter this base cannot use ({e})") from e
    try:
        drafter.load_weights(list(saved.weights.items()))
    except ValueError as e:
        raise trainer.damaged(path / "drafter.safetensors",
                              f"does not fit {path / 'config.json'} ({_reason(e)})") from e
    check_finite(path / "drafter.safetensors", saved.weights)
    if saved.best_weights is not None:
        check_shapes(path / trainer.BEST_FILE, saved.best_weights, dict(tree_flatten(drafter.parameters())))
        check_finite(path / trainer.BEST_FILE, saved.best_weights)
    trainer.to_float32(drafter)
    mx.eval(drafter.parameters())
    return drafter


def check_finite(where: Path, weights: Dict[str, mx.array]) -> None:
    """A run that diverged saves NaN weights; training on from them (or writing them) helps nobody."""
    bad = [n for n, w in weights.items() if mx.issubdtype(w.dtype, mx.floating) and not mx.isfinite(w).all().item()]
    if bad:
        raise trainer.damaged(where, f"holds NaN or infinite weights ({len(bad)} of {len(weights)} tensors, e.g. "
                              f"{bad[0]}): the run that wrote it diverged (a lower --lr may help)")


def check_shapes(where: Path, got: Dict[str, mx.array], expected: Dict[str, mx.array]) -> None:
    """The same tensor names with the same shapes, or a damaged-checkpoint error saying what differs."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(got) & set(expected) if tuple(got[n].shape) != tuple(expected[n].shape))
    if missing or extra or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in ((missing, "missing"), (extra, "unexpected"),
                                                                   (wrong, "of another shape")) if v]
        raise trainer.damaged(where, f"does not fit the drafter: tensors {', '.join(parts)}")


def check_optimizer(saved: trainer.Checkpoint, drafter) -> None:
    """Adam's state must be the one a fresh Adam gives this drafter (its moments have the parameters'
    shapes); another model's would fail only at the first update."""
    fresh = optim.Adam(learning_rate=0.0)
    fresh.init(drafter.trainable_parameters())
    check_shapes(Path(saved.path) / "optimizer.safetensors", saved.optimizer_state, dict(tree_flatten(fresh.state)))
