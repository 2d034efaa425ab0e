"""Where a forge job starts: a drafter of any family forge trains, loaded to be fine-tuned (and kept as the
report's starting point), one built from scratch by its family's objective, or the newest checkpoint with
--resume. Each is a float32 copy, checked against the base, and the dtype the result is written in.

Knows nothing of training or the engine.
"""

import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import families
from ..errors import MlxSpecError
from ..models.base import offers
from . import objective, resume, trainer


def scratch_dtype(options, base) -> str:
    """--dtype, else the base's float dtype (float32 next to a float32 base, else Google's bfloat16)."""
    return options.dtype or ("float32" if base.layers[0].input_layernorm.weight.dtype == mx.float32 else "bfloat16")


def load_drafter(flag: str, path: str, base):
    """A drafter of a family forge trains (what it fine-tunes and compares), validated against the base."""
    from ..api import load_drafter

    drafter = load_drafter(path, base)
    if families.of_drafter(drafter).forge is None:
        trained = ", ".join(f.name for f in objective.forged())
        raise MlxSpecError(f"{flag} {path} is a {drafter.describe()}; forge trains drafters of the families "
                           f"{trained}")
    return drafter


def float_dtype(drafter) -> str:
    """The stored float dtype of a drafter's weights."""
    floats = [w.dtype for _, w in tree_flatten(drafter.parameters()) if mx.issubdtype(w.dtype, mx.floating)]
    return str(floats[0]).split(".")[-1] if floats else "float32"


def load_start(options, base):
    """The --drafter to fine-tune, as stored (it is also the report's starting point); (drafter, dtype)."""
    start = load_drafter("--drafter", options.drafter, base)
    if any(type(m).__name__.startswith("Quantized") for _, m in start.named_modules()):
        raise MlxSpecError(f"{options.drafter} is quantized; forge trains float drafters: convert the drafter "
                           "without -q (mlx_spec.convert --hf-path ... --mlx-path ...) and pass that")
    return start, options.dtype or float_dtype(start)


def resumed_start(options, base, config: dict):
    """(starting drafter or None, output dtype) when resuming."""
    if options.from_scratch:
        return None, options.dtype or config.get("dtype") or scratch_dtype(options, base)
    return load_start(options, base)


def scratch_family(options, base) -> families.Family:
    """--family, if the base offers what it reads."""
    family = objective.family_named(options.family_name)
    if not offers(base, family.reads):
        raise MlxSpecError(f"a {family.name} drafter reads the base's {family.reads}, which this base does not offer")
    return family


def start_drafter(options, base, tokenizer, windows):
    """(drafter float32, its config.json dict, starting drafter for the report or None, output dtype)."""
    from ..checkpoint import CONFIG_FILE, read_json

    if options.from_scratch:
        family = scratch_family(options, base)
        dtype = scratch_dtype(options, base)
        module = objective.for_family(family)
        try:
            config = module.scratch_config(base, tokenizer, options, dtype)
            drafter = module.build(base, config, options.seed, windows)
        except ValueError as e:
            raise MlxSpecError(f"cannot build a {family.name} drafter of these shapes: {e}") from e
        return drafter, config, None, dtype
    start, dtype = load_start(options, base)
    config = read_json(Path(start.source_path) / CONFIG_FILE)  # as published: it is written back so
    return clone(start, config), config, start, dtype


def clone(drafter, config: dict):
    """A float32 copy of a drafter (the original stays as it was, for the before/after report)."""
    copy = resume.model_from_config(config)
    copy.update(drafter.parameters())
    trainer.to_float32(copy)
    mx.eval(copy.parameters())
    return copy


def check_k(options, drafter) -> None:
    """--num-draft-tokens within what one round can ask of the drafter (a block drafter's rows)."""
    most = objective.of_drafter(drafter).max_drafts(drafter)
    if most is not None and options.num_draft_tokens > most:
        raise MlxSpecError(f"--num-draft-tokens {options.num_draft_tokens} exceeds what this drafter drafts in one "
                           f"round ({most}: {drafter.describe()}); pass at most {most}")


def starting_point(options, base, tokenizer, ckpt: Path, identity: dict, windows):
    """(drafter to train, its config, report's starting drafter or None, output dtype, Checkpoint or None):
    from the newest checkpoint with --resume, else from --drafter / scratch."""
    if not options.resume:
        drafter, config, start, dtype = start_drafter(options, base, tokenizer, windows)
        return drafter, config, start, dtype, None
    path = trainer.checkpoints(ckpt)[-1]
    drafter, saved = resume.load(path, base, identity)
    config = saved.config
    start, dtype = resumed_start(options, base, config)  # a --drafter is still the report's starting point
    print(f"resuming from {path} (step {saved.state.step}, {trainer.format_seconds(saved.state.seconds)} trained)",
          file=sys.stderr, flush=True)
    return drafter, config, start, dtype, saved
