"""Model registry: checkpoint -> (Model, ModelArgs), by `model_type`.

Gemma 4 types are ours (they return the hidden state and build rewindable caches); any other
architecture mlx-lm knows (llama, qwen, ...) is taken from mlx-lm, for n-gram or draft-model speculation.
Drafters are found through their family (families.py): block drafters do not say what they are in
`model_type` (a z-lab DFlash drafter says "gemma4" or "qwen3", a DSpark drafter copies its target's
"gemma4_text"), so `checkpoint_type` recognises them by their config, as mlx-vlm routes them.
"""

import importlib

from .. import families
from ..errors import UnsupportedModelError
from ..families import checkpoint_type  # noqa: F401  (re-exported: convert and the API ask models for it)

BASE_MODULES = {"gemma4_text": "gemma4_text", "gemma4": "gemma4", "gemma4_unified": "gemma4"}
BASE_TYPES = tuple(BASE_MODULES)


def own_types() -> tuple:
    """The checkpoint types this package's model files load (Gemma 4 bases and every drafter family's)."""
    return BASE_TYPES + families.drafter_types()


def get_model_classes(config: dict):
    model_type = checkpoint_type(config)
    family = families.for_type(model_type)
    if family is not None:
        module = family.model_module()
        return module.Model, module.ModelArgs
    if model_type in BASE_MODULES:
        module = importlib.import_module(f"{__name__}.{BASE_MODULES[model_type]}")
        return module.Model, module.ModelArgs
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: use one of {', '.join(own_types())} "
            "or an architecture mlx-lm supports"
        ) from e
