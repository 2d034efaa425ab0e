"""The drafter-family registry (families.py): every family is whole, checkpoints are recognised by their
config, bases declare what drafters may read, and a new family (shaped like EAGLE-3: recognised by its
config, reads decoder-layer outputs) is one registration that every consumer picks up."""

import json

import pytest
from conftest import TINY_CODE
from tiny_models import dflash_config, dspark_config, make_base

from mlx_spec import families, load_drafter
from mlx_spec.errors import MlxSpecError, PairingError, UnsupportedModelError
from mlx_spec.families import LAYER_OUTPUTS, PRODUCER_KV
from mlx_spec.models import checkpoint_type, get_model_classes, gemma4, gemma4_text
from mlx_spec.models.base import offers
from mlx_spec.proposers import make_proposer


def test_every_family_is_whole():
    for f in families.FAMILIES:
        assert f.proposer_class().name == f.name, f"{f.name}: a family's name is its proposer's (stats, costs file)"
        assert f.reads in (None, PRODUCER_KV, LAYER_OUTPUTS), f"{f.name} reads an undeclared base feature"
    for f in families.drafter_families():
        module = f.model_module()
        assert module.ModelArgs.model_type == f.model_types[0], f"{f.name}: a loaded drafter finds its family again"
        assert callable(module.Model.describe), f"{f.name}: errors name a drafter by describe()"
        assert f.pairing and f.reads, f"{f.name}: a drafter reads its base, so its pairing is checked"


def _config(name: str) -> dict:
    return json.loads((TINY_CODE / name / "config.json").read_text())


def test_checkpoints_are_recognised_by_their_config():
    base = make_base("e2b")
    assert families.for_type(checkpoint_type(_config("base"))) is None, "a base is no drafter"
    assert families.for_type(checkpoint_type(_config("assistant"))) is families.MTP
    assert families.for_type(checkpoint_type(_config("dflash"))) is families.DFLASH
    assert families.for_type(checkpoint_type(dflash_config(base))) is families.DFLASH, "z-lab: model_type gemma4"
    assert families.for_type(checkpoint_type(dspark_config(base))) is families.DSPARK, "DeepSpec: gemma4_text"
    markov = dflash_config(base)
    markov["dflash_config"]["markov_rank"] = 8
    with pytest.raises(UnsupportedModelError, match="only Gemma 4 DSpark drafters"):
        checkpoint_type(markov)


def test_bases_declare_what_drafters_may_read():
    from mlx_lm.models import llama

    base = make_base("e2b")
    assert offers(base, PRODUCER_KV) and offers(base, LAYER_OUTPUTS), "our Gemma 4 bases offer both"
    assert gemma4.Model.features == gemma4_text.Model.features, "the multimodal wrapper offers its language model's"
    other = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=256,
                                        num_key_value_heads=2))
    assert not offers(other, PRODUCER_KV) and not offers(other, LAYER_OUTPUTS), "an mlx-lm model offers neither"
    assert offers(other, None), "a family that reads nothing of its base fits any base"


# -- a family added by one registration (a Speculators family we do not ship, say Medusa): this module is its model and proposer file

class ModelArgs:
    model_type = "medusa"

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        return cls()


class Model:
    model_type = "medusa"

    def describe(self) -> str:
        return "Medusa drafter (test)"


class MedusaProposer:
    name = "medusa"

    def __init__(self, drafter, base):
        self.drafter, self.base = drafter, base


PAIRED = []


def check_pairing(drafter, base) -> None:
    PAIRED.append(drafter)


MEDUSA = families.Family("medusa", f"{__name__}:MedusaProposer", model_types=("medusa",),
                         recognise=lambda config: config.get("speculators_model_type") == "medusa", model=__name__,
                         reads=LAYER_OUTPUTS, pairing=f"{__name__}:check_pairing", published_config=True)


def test_a_new_family_is_one_registration(monkeypatch):
    from convert.pipeline import _default_dtype, output_config
    from mlx_spec.forge.start import load_drafter as forge_drafter

    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + (MEDUSA,))
    config = {"model_type": "llama", "speculators_model_type": "medusa", "hidden_size": 64}
    base = make_base("e2b")
    assert checkpoint_type(config) == "medusa", "recognised on disk by its registration"
    assert get_model_classes(config) == (Model, ModelArgs), "loaded through its model module"
    proposer = make_proposer(base, drafter=Model())
    assert isinstance(proposer, MedusaProposer) and proposer.base is base, "its proposer, built from the registry"
    assert _default_dtype(config) == "bfloat16" and output_config(config, Model(), None) == config, \
        "convert treats it as a drafter whose config is its published layout"
    with pytest.raises(PairingError, match="not a drafter .*medusa"):
        load_drafter(str(TINY_CODE / "base"), base)  # the drafters load_drafter takes include it
    drafter = Model()
    monkeypatch.setattr("mlx_spec.api.load_drafter", lambda path, base: drafter)
    refused = r"is a Medusa drafter \(test\); forge trains drafters of the families mtp, dflash, dspark, eagle3"
    with pytest.raises(MlxSpecError, match=refused):
        forge_drafter("--drafter", "medusa-dir", base)  # no forge objective: refused by name
    families.of_drafter(drafter).check_pairing(drafter, base)
    assert PAIRED == [drafter], "its pairing is checked by the function it declared"
