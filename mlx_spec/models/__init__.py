"""Model registry: checkpoint `model_type` -> (Model, ModelArgs).

Gemma 4 types are ours (they return the hidden state and build rewindable caches); any other
architecture mlx-lm knows (llama, qwen, ...) is taken from mlx-lm, for n-gram or draft-model speculation.
"""

import importlib

from ..errors import UnsupportedModelError

GEMMA4_TYPES = ("gemma4_text", "gemma4", "gemma4_unified", "gemma4_assistant")
_MODULES = {"gemma4_text": "gemma4_text", "gemma4": "gemma4", "gemma4_unified": "gemma4", "gemma4_assistant": "gemma4_assistant"}


def get_model_classes(config: dict):
    model_type = config.get("model_type")
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
