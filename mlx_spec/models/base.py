"""What the engine needs of a base model, and an adapter that gives it to any mlx-lm model.

The engine calls `forward(tokens (1, L), cache) -> (logits (1, L, V), hidden (1, L, H) or None)` and
`make_cache(max_rollback, kv_bits=None, kv_group_size=64, quantized_kv_start=0) -> [rewindable caches]`
(cache.py; the K/V flags as mlx-lm spells them), and, for a proposer that reads decoder-layer outputs
(block drafters), `forward_layers(tokens, cache, layers) -> (logits, hidden, features (1, L, n*H))`: the
same pass, with those layers' outputs captured. Our Gemma 4 models implement all three
(`SpeculativeBase`; they also return the final-normed hidden state the MTP drafter reads). Any other
architecture mlx-lm loads (llama, qwen, gemma3, ...) is wrapped by `as_base`: no hidden state, and
mlx-lm's caches swapped for rewindable ones, which is all n-gram and draft-model speculation need.

What drafters may read of a base is declared, not probed: `features` names it (families.PRODUCER_KV,
LAYER_OUTPUTS), and `offers(model, feature)` asks.
"""

from typing import FrozenSet, Optional, Sequence, Tuple

import mlx.core as mx

from ..cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_MAX_ROLLBACK, forward_split_at_switch, make_rewindable
from ..errors import UnsupportedModelError

EMBEDDING_OUTPUT = -1  # a captured "layer" id: the scaled embedding that enters layer 0 (DeepSpec's -1)


class SpeculativeBase:
    """Mixin for models that implement the engine's interface themselves."""

    features: FrozenSet[str] = frozenset()  # what drafters may read of it (families.PRODUCER_KV, LAYER_OUTPUTS)
    ranks = None  # the mx.distributed ranks it is sharded over (distributed.group.Ranks), or None: one process

    def forward(self, inputs: mx.array, cache=None) -> Tuple[mx.array, Optional[mx.array]]:
        raise NotImplementedError

    def make_cache(self, max_rollback: int = DEFAULT_MAX_ROLLBACK, kv_bits: Optional[int] = None,
                   kv_group_size: int = DEFAULT_KV_GROUP_SIZE, quantized_kv_start: int = 0) -> list:
        raise NotImplementedError

    def forward_layers(self, inputs: mx.array, cache, layers: Sequence[int]):
        """forward() plus the outputs of decoder `layers` (B, L, len(layers) * H); bases that cannot say
        which layer is which raise."""
        raise UnsupportedModelError(f"{type(self).__name__} does not expose its decoder layers' outputs; "
                                    "block drafters need a Gemma 4 base")

    def shard(self, group) -> str:
        """Tensor parallel over an mx.distributed group, in place; returns what each rank holds, in words."""
        raise UnsupportedModelError(f"{_kind(self)} cannot be sharded over ranks: only Gemma 4 models can")

    def pipeline(self, group) -> str:
        """Pipeline parallel over an mx.distributed group, in place; returns what each rank runs, in words."""
        raise UnsupportedModelError(f"{_kind(self)} cannot be split over ranks: only Gemma 4 models can")


def _kind(base) -> str:
    model = getattr(base, "model", base) if isinstance(base, MlxLmBase) else base
    return getattr(model, "model_type", None) or type(model).__name__


class MlxLmBase(SpeculativeBase):
    """An mlx-lm model seen through the engine's interface."""

    def __init__(self, model):
        self.model = model

    def forward(self, inputs: mx.array, cache=None):
        # a switch to quantized K/V inside this pass runs as two passes, as gemma4_text's forward does
        return forward_split_at_switch(lambda x: self.model(x, cache=cache), inputs, cache or []), None

    def make_cache(self, max_rollback: int = DEFAULT_MAX_ROLLBACK, kv_bits: Optional[int] = None,
                   kv_group_size: int = DEFAULT_KV_GROUP_SIZE, quantized_kv_start: int = 0) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_rewindable(make_prompt_cache(self.model), max_rollback, kv_bits, kv_group_size,
                               quantized_kv_start)


def as_base(model) -> SpeculativeBase:
    return model if isinstance(model, SpeculativeBase) else MlxLmBase(model)


def offers(model, feature: Optional[str]) -> bool:
    """Whether the base declares `feature` (None, a family that reads nothing of its base: always)."""
    return feature is None or feature in as_base(model).features


def text_args(model):
    """The config dataclass of the text model (Gemma 4's text_args, else mlx-lm's args), or None."""
    return getattr(model, "text_args", None) or getattr(model, "args", None)


def vocab_size(model) -> Optional[int]:
    v = getattr(text_args(model), "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def context_length(model) -> Optional[int]:
    """The longest sequence the model was trained for (config max_position_embeddings), if it says."""
    n = getattr(text_args(model), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None
