"""Google's multimodal Gemma 4 layouts (`model_type: gemma4`, and `gemma4_unified`, the 12B with its
encoder-free vision/audio embedders), text path only.

The checkpoint nests the text model under `model.language_model.` and carries vision/audio towers (the
12B: `vision_embedder`, `embed_vision`, `embed_audio`); they are dropped (mlx-lm's sanitize) and everything else is the text model of gemma4_text.py. Weight
names stay mlx-lm's (`language_model.model.*`), so mlx-community Gemma 4 repos load unchanged.
"""

from dataclasses import dataclass, field

import mlx.nn as nn
from mlx_lm.models import gemma4 as mlx_gemma4_mm

from . import gemma4_text
from .base import SpeculativeBase


@dataclass
class ModelArgs:
    model_type: str = "gemma4"
    text_config: dict = field(default_factory=dict)
    vocab_size: int = 262144

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        text = dict(params.get("text_config") or {})
        text.setdefault("vocab_size", params.get("vocab_size", text.get("vocab_size", 262144)))
        return cls(params.get("model_type", "gemma4"), text, text["vocab_size"])


class Model(nn.Module, SpeculativeBase):
    features = gemma4_text.Model.features  # its language model's

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.language_model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(args.text_config))

    def __call__(self, inputs, cache=None):
        return self.language_model(inputs, cache)

    def forward(self, inputs, cache=None):
        return self.language_model.forward(inputs, cache)

    def forward_layers(self, inputs, cache, layers):
        return self.language_model.forward_layers(inputs, cache, layers)

    def check_layers(self, layers):
        return self.language_model.check_layers(layers)

    def head(self, hidden):
        return self.language_model.head(hidden)

    def embed_scaled(self, tokens):
        return self.language_model.embed_scaled(tokens)

    @property
    def text_args(self) -> gemma4_text.ModelArgs:
        return self.language_model.args

    @property
    def producer_layers(self):
        return self.language_model.producer_layers

    def attention_geometry(self, layer_type):
        return self.language_model.attention_geometry(layer_type)

    def make_cache(self, *args, **kwargs):
        return self.language_model.make_cache(*args, **kwargs)

    def shard(self, group) -> str:
        return self.language_model.shard(group)

    def pipeline(self, group) -> str:
        return self.language_model.pipeline(group)

    def sanitize(self, weights):
        return mlx_gemma4_mm.Model.sanitize(self, weights)

    @property
    def quant_predicate(self):
        return self.language_model.quant_predicate

    @property
    def layers(self):
        return self.language_model.layers
