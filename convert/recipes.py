"""Quantization recipes: which layer gets how many bits.

One predicate per conversion, `(path, module) -> False | True | {"group_size", "bits", "mode"}`, the shape
`mlx_lm.utils.quantize_model` takes. Three sources, in order of precedence:
1. the model's own `quant_predicate`: Gemma 4's `router.proj` at 8 bits (mlx-lm's rule) and the drafter's
   `masked_embedding.centroids` never (they pick the clusters the head scores; keep them exact);
2. the recipe: "uniform" (every layer at --q-bits), "embed_8" (token and per-layer embedding tables at 8
   bits, the rest at --q-bits; the token table is also the tied LM head), or mlx-lm's `mixed_L_H` recipes
   (`--quant-predicate` in mlx_lm.convert: L bits, H bits on v_proj/down_proj of every third layer and the
   first and last eighth; Gemma 4's tied embedding plays the LM head's part and gets H bits);
3. shapes: a layer whose input dimension its group size does not divide stays unquantized.
The integer `token_ordering` is a plain array, not a layer, so no predicate ever sees it.
"""

from typing import Callable, Optional, Union

import mlx.nn as nn

from mlx_spec.errors import ConversionError

Params = Union[bool, dict]
Predicate = Callable[[str, nn.Module], Params]

MODE = "affine"
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
MLX_LM_MIXED = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
RECIPES = ("uniform", "embed_8") + MLX_LM_MIXED
EMBEDDINGS = ("embed_tokens", "embed_tokens_per_layer")


def _params(bits: int, group_size: int) -> dict:
    return {"group_size": group_size, "bits": bits, "mode": MODE}


def _recipe_predicate(recipe: str, model: nn.Module, bits: int, group_size: int) -> Predicate:
    if recipe == "uniform":
        return lambda path, module: True
    if recipe == "embed_8":
        return lambda path, module: _params(8, group_size) if path.split(".")[-1] in EMBEDDINGS else True
    if recipe in MLX_LM_MIXED:
        from mlx_lm.convert import mixed_quant_predicate_builder

        mixed = mixed_quant_predicate_builder(recipe, model, group_size)
        high_bits = int(recipe.rsplit("_", 1)[1])

        def predicate(path, module):
            if path.endswith(".embed_tokens"):  # tied: the LM head mlx-lm gives high bits
                return _params(high_bits, group_size)
            return mixed(path, module)

        return predicate
    raise ConversionError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def make_predicate(model: nn.Module, recipe: Optional[str], bits: int, group_size: int) -> Predicate:
    """The predicate for quantize_model: model rules, then the recipe, then the group-size rule."""
    recipe_predicate = _recipe_predicate(recipe or "uniform", model, bits, group_size)
    model_predicate = getattr(model, "quant_predicate", None)
    default = _params(bits, group_size)

    def predicate(path: str, module: nn.Module) -> Params:
        decided = model_predicate(path, module) if model_predicate is not None else True
        if decided is False:
            return False
        params = decided if isinstance(decided, dict) else recipe_predicate(path, module)
        if params is False:
            return False
        params = {**default, **params} if isinstance(params, dict) else dict(default)
        in_dims = module.weight.shape[-1]
        if in_dims % params["group_size"]:
            # mlx-lm's router rule says group 64; fall back to the run's group size before giving up
            if in_dims % group_size:
                return False
            params["group_size"] = group_size
        return True if params == default else params  # only departures from the default go in the config

    return predicate
