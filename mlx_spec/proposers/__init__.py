"""Ways of proposing drafts, one module each, all behind the `Proposer` contract in base.py:

    mtp.py          Gemma 4 MTP assistant drafters (gemma4_assistant, gemma4_unified_assistant)
    dflash.py       z-lab DFlash block drafters (gemma4_dflash); dspark.py: DeepSeek DSpark (gemma4_dspark);
                    block.py: what the two share (a context of the base's layer outputs)
    draft_model.py  any smaller model that shares the base's tokenizer
    ngram.py        prompt lookup, no weights
    oracle.py       benchmark only: the known continuation, corrupted at a set rate

`make_proposer` turns the API's shorthands (drafter=, draft_model=, ngram=) into one Proposer, once, at the
top of a request; a drafter module finds its proposer by its `model_type`.
"""

from typing import Optional

from .base import Draft, FeatureReader, Proposer, RoundContext, RoundResult
from .ngram import NgramProposer


def _mtp(drafter, model):
    from .mtp import MTPProposer

    return MTPProposer(drafter, model)


def _dflash(drafter, model):
    from .dflash import DFlashProposer

    return DFlashProposer(drafter, model)


def _dspark(drafter, model):
    from .dspark import DSparkProposer

    return DSparkProposer(drafter, model)


# drafter model_type (models.checkpoint_type) -> proposer factory(drafter, base)
DRAFTER_PROPOSERS = {"gemma4_assistant": _mtp, "gemma4_unified_assistant": _mtp, "gemma4_dflash": _dflash,
                     "gemma4_dspark": _dspark}


def _eagle3(drafter, model):  # eagle3
    from .eagle3 import Eagle3Proposer  # eagle3

    return Eagle3Proposer(drafter, model)  # eagle3


DRAFTER_PROPOSERS["gemma4_eagle3"] = _eagle3  # eagle3


def drafter_proposer(drafter, model) -> Proposer:
    """The proposer for a drafter module loaded by `load_drafter`."""
    kind = getattr(drafter, "model_type", None)
    if kind not in DRAFTER_PROPOSERS:
        raise ValueError(f"drafter= takes a drafter from load_drafter ({', '.join(DRAFTER_PROPOSERS)}); got "
                         f"{kind or type(drafter).__name__}. Pass a Proposer as proposer=, a language model as "
                         "draft_model=")
    return DRAFTER_PROPOSERS[kind](drafter, model)


def make_proposer(model, *, proposer: Optional[Proposer] = None, drafter=None, draft_model=None,
                  ngram: Optional[int] = None) -> Optional[Proposer]:
    """The proposer for what the caller passed; None (plain decoding) when nothing was passed."""
    chosen = [x for x in (proposer, drafter, draft_model, ngram) if x is not None]
    if len(chosen) > 1:
        raise ValueError("choose one of proposer, drafter, draft_model and ngram")
    if proposer is not None:
        return proposer
    if ngram is not None:
        return NgramProposer(ngram)
    if draft_model is not None:
        from .draft_model import DraftModelProposer

        return DraftModelProposer(draft_model, model)
    if drafter is not None:
        return drafter_proposer(drafter, model)
    return None


__all__ = ["Draft", "FeatureReader", "Proposer", "RoundContext", "RoundResult", "NgramProposer", "make_proposer", "drafter_proposer"]
