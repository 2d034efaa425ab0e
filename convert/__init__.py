"""Convert Hugging Face Gemma 4 checkpoints (bases and MTP drafters) into mlx-lm's MLX layout.

    from convert import convert
    convert("google/gemma-4-E2B-it", "gemma-4-e2b-it-4bit", quantize=True, q_bits=4)

Command line: `python -m convert` or `mlx_spec.convert` (see convert/__main__.py).
"""

from .pipeline import convert
from .recipes import RECIPES

__all__ = ["convert", "RECIPES"]
