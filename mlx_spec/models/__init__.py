"""Model registry: checkpoint -> (Model, ModelArgs), by `model_type`.

Gemma 4 types are ours (they return the hidden state and build rewindable caches); any other
architecture mlx-lm knows (llama, qwen, ...) is taken from mlx-lm, for n-gram or draft-model speculation.
Block drafters do not say what they are in `model_type` (a z-lab DFlash drafter says "gemma4" or "qwen3",
a DSpark drafter copies its target's "gemma4_text"): `checkpoint_type` recognises them by their config,
as mlx-vlm routes them, and names them after mlx-vlm's modules (gemma4_dflash, gemma4_dspark).
"""

import importlib

from ..errors import UnsupportedModelError

DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant", "gemma4_dflash", "gemma4_dspark")
DRAFTER_TYPES += ("gemma4_eagle3",)  # eagle3
GEMMA4_TYPES = ("gemma4_text", "gemma4", "gemma4_unified") + DRAFTER_TYPES
_MODULES = {"gemma4_text": "gemma4_text", "gemma4": "gemma4", "gemma4_unified": "gemma4",
            "gemma4_assistant": "gemma4_assistant", "gemma4_unified_assistant": "gemma4_assistant",
            "gemma4_dflash": "gemma4_dflash", "gemma4_dspark": "gemma4_dspark"}
_MODULES["gemma4_eagle3"] = "gemma4_eagle3"  # eagle3
DSPARK_ARCHITECTURE = "Gemma4DSparkModel"


def checkpoint_type(config: dict) -> str:
    """The registry key for a config: its model_type, or the block-drafter family its config describes.

    DeepSpec's DSpark drafters carry `architectures: [Gemma4DSparkModel]`; a z-lab DFlash drafter carries a
    `dflash_config` and no Markov head (a `dflash_config` with `markov_rank` > 0 or projector "dspark" is a
    DSpark drafter of another model family, which no Gemma 4 base pairs with)."""
    model_type = config.get("model_type")
    family = config.get("speculators_model_type")  # eagle3: Speculators drafters name their family here
    if family is not None:  # eagle3
        return "gemma4_eagle3" if family == "eagle3" else f"speculators_{family}"  # eagle3
    if DSPARK_ARCHITECTURE in (config.get("architectures") or []):
        return "gemma4_dspark"
    dflash = config.get("dflash_config")
    if isinstance(dflash, dict):
        if dflash.get("projector_type") == "dspark" or (dflash.get("markov_rank") or config.get("markov_rank") or 0) > 0:
            raise UnsupportedModelError(f"a DSpark drafter for model_type {model_type!r} (dflash_config with a Markov "
                                        "head or projector 'dspark'): only Gemma 4 DSpark drafters "
                                        f"({DSPARK_ARCHITECTURE}) are supported")
        return "gemma4_dflash"
    return model_type


def get_model_classes(config: dict):
    model_type = checkpoint_type(config)
    if model_type in _MODULES:
        module = importlib.import_module(f"{__name__}.{_MODULES[model_type]}")
        return module.Model, module.ModelArgs
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: use one of {', '.join(GEMMA4_TYPES)} "
            "or an architecture mlx-lm supports"
        ) from e
