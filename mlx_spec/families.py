"""Drafter families, each declared once: how it is recognised on disk, its model file, what it reads of the
base, how its pairing with a base is checked, its proposer and its forge objective.

A new family is one model file (models/), one proposer file (proposers/) and one `Family` in FAMILIES;
models/__init__ (loading), proposers/__init__ (make_proposer), api.load_drafter, convert and forge ask
here instead of keeping tables of their own. Modules are named by path and imported
on use, so this module imports nothing of MLX and no other part of mlx_spec but its errors (no cycle).

A drafter's model module sets `model_type` to one of its family's `model_types` (the first, unless its
checkpoint says another of them), so a loaded drafter finds its family again (`of_drafter`).
"""

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from .errors import UnsupportedModelError

# What a family reads of its base; a base declares what it offers (models/base.py, SpeculativeBase.features).
PRODUCER_KV = "producer K/V"  # the producer layers' K/V and the final-normed hidden state (MTP assistants)
LAYER_OUTPUTS = "decoder-layer outputs"  # the outputs of chosen decoder layers (block drafters, EAGLE-3)
TREE_PASS = "tree verify"  # a verify pass over a draft tree: per-node positions and a tree mask (trees/)

DSPARK_ARCHITECTURE = "Gemma4DSparkModel"


@dataclass(frozen=True)
class Family:
    name: str  # the proposer's name: stats, logs, the costs file
    proposer: str  # "module:Class", built as Class(drafter, base) (NgramProposer(n) for n-gram)
    # on disk: the checkpoint types that are this family (checkpoint_type's keys); () for no drafter file
    model_types: Tuple[str, ...] = ()
    # on disk, when model_type does not say: config -> True for this family (may raise UnsupportedModelError)
    recognise: Optional[Callable[[dict], bool]] = None
    model: Optional[str] = None  # the drafter's model module (Model, ModelArgs), named after model_types[0]
    reads: Optional[str] = None  # PRODUCER_KV, LAYER_OUTPUTS, or None (nothing of the base)
    pairing: Optional[str] = None  # "module:function(drafter, base)" raising PairingError on a mismatch
    forge: Optional[str] = None  # the forge objective's module; None: forge refuses the family by name
    published_config: bool = False  # convert writes its config.json as published (its loaders read it so)

    def model_module(self):
        return importlib.import_module(self.model)

    def proposer_class(self):
        return _attribute(self.proposer)

    def make_proposer(self, *args: Any):
        return self.proposer_class()(*args)

    def check_pairing(self, drafter, base) -> None:
        if self.pairing is not None:
            _attribute(self.pairing)(drafter, base)


def _attribute(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _is_dspark(config: dict) -> bool:
    """DeepSpec's DSpark drafters copy their target's text config (model_type gemma4_text) and name their
    architecture."""
    return DSPARK_ARCHITECTURE in (config.get("architectures") or [])


def _is_dflash(config: dict) -> bool:
    """A z-lab DFlash drafter says model_type "gemma4" or "qwen3" and carries a `dflash_config`; one with a
    Markov head or projector "dspark" is a DSpark drafter of another model family, which no Gemma 4 base
    pairs with."""
    dflash = config.get("dflash_config")
    if not isinstance(dflash, dict) or _is_dspark(config):
        return False
    if dflash.get("projector_type") == "dspark" or (dflash.get("markov_rank") or config.get("markov_rank") or 0) > 0:
        raise UnsupportedModelError(f"a DSpark drafter for model_type {config.get('model_type')!r} (dflash_config "
                                    "with a Markov head or projector 'dspark'): only Gemma 4 DSpark drafters "
                                    f"({DSPARK_ARCHITECTURE}) are supported")
    return True


MTP = Family("mtp", "mlx_spec.proposers.mtp:MTPProposer",
             model_types=("gemma4_assistant", "gemma4_unified_assistant"), model="mlx_spec.models.gemma4_assistant",
             reads=PRODUCER_KV, pairing="mlx_spec.drafting:validate_pairing", forge="mlx_spec.forge.objectives.mtp")
# block drafters: named after mlx-vlm's modules, which route them by config as checkpoint_type does
DFLASH = Family("dflash", "mlx_spec.proposers.dflash:DFlashProposer", model_types=("gemma4_dflash",),
                recognise=_is_dflash, model="mlx_spec.models.gemma4_dflash", reads=LAYER_OUTPUTS,
                pairing="mlx_spec.drafting:validate_block_pairing", forge="mlx_spec.forge.objectives.dflash",
                published_config=True)
DSPARK = Family("dspark", "mlx_spec.proposers.dspark:DSparkProposer", model_types=("gemma4_dspark",),
                recognise=_is_dspark, model="mlx_spec.models.gemma4_dspark", reads=LAYER_OUTPUTS,
                pairing="mlx_spec.drafting:validate_block_pairing", forge="mlx_spec.forge.objectives.dspark",
                published_config=True)
# EAGLE-3 in the vllm-project/speculators layout: the config names its family in speculators_model_type
EAGLE3 = Family("eagle3", "mlx_spec.proposers.eagle3:Eagle3Proposer", model_types=("gemma4_eagle3",),
                recognise=lambda config: config.get("speculators_model_type") == "eagle3",
                model="mlx_spec.models.gemma4_eagle3", reads=LAYER_OUTPUTS,
                pairing="mlx_spec.proposers.eagle3:validate_pairing", forge="mlx_spec.forge.objectives.eagle3",
                published_config=True)
# no drafter file: any language model sharing the base's tokenizer; prompt lookup
DRAFT_MODEL = Family("draft_model", "mlx_spec.proposers.draft_model:DraftModelProposer")
NGRAM = Family("ngram", "mlx_spec.proposers.ngram:NgramProposer")

FAMILIES: Tuple[Family, ...] = (MTP, DFLASH, DSPARK, EAGLE3, DRAFT_MODEL, NGRAM)


def drafter_families() -> Tuple[Family, ...]:
    """The families whose drafter is a checkpoint of their own (load_drafter loads them)."""
    return tuple(f for f in FAMILIES if f.model_types)


def drafter_types() -> Tuple[str, ...]:
    return tuple(t for f in drafter_families() for t in f.model_types)


def for_type(model_type: Optional[str]) -> Optional[Family]:
    """The family of a checkpoint type (`checkpoint_type`'s answer), or None for a model that is no drafter."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def of_drafter(drafter) -> Optional[Family]:
    """The family of a loaded drafter module, or None for anything else."""
    return for_type(getattr(drafter, "model_type", None))


def checkpoint_type(config: dict) -> Optional[str]:
    """The registry key for a config: the family its config describes when model_type does not say (block
    drafters), else its model_type."""
    for f in FAMILIES:
        if f.recognise is not None and f.recognise(config):
            return f.model_types[0]
    if config.get("model_type") is None and config.get("speculators_model_type") is not None:
        return f"speculators_{config['speculators_model_type']}"  # a Speculators family we do not run, named
    return config.get("model_type")
