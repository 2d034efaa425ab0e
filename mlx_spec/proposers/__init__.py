"""Ways of proposing drafts, one module each, all behind the `Proposer` contract in base.py:

    mtp.py          Gemma 4 MTP assistant drafters (gemma4_assistant, gemma4_unified_assistant)
    dflash.py       z-lab DFlash block drafters (gemma4_dflash); dspark.py: DeepSeek DSpark (gemma4_dspark);
                    block.py: what the two share (a context of the base's layer outputs)
    draft_model.py  any smaller model that shares the base's tokenizer
    ngram.py        prompt lookup, no weights
    oracle.py       benchmark only: the known continuation, corrupted at a set rate

`make_proposer` turns the API's shorthands (drafter=, draft_model=, ngram=) into one Proposer, once, at the
top of a request; a drafter module finds its proposer through its family (families.py).
"""

from typing import Optional

from .. import families
from .base import Draft, FeatureReader, Proposer, RoundContext, RoundResult
from .ngram import NgramProposer


def drafter_proposer(drafter, model) -> Proposer:
    """The proposer for a drafter module loaded by `load_drafter` (its family's, families.py)."""
    family = families.of_drafter(drafter)
    if family is None:
        raise ValueError(f"drafter= takes a drafter from load_drafter ({', '.join(families.drafter_types())}); got "
                         f"{getattr(drafter, 'model_type', None) or type(drafter).__name__}. Pass a Proposer as "
                         "proposer=, a language model as draft_model=")
    return family.make_proposer(drafter, model)


def make_proposer(model, *, proposer: Optional[Proposer] = None, drafter=None, draft_model=None,
                  ngram: Optional[int] = None) -> Optional[Proposer]:
    """The proposer for what the caller passed; None (plain decoding) when nothing was passed."""
    chosen = [x for x in (proposer, drafter, draft_model, ngram) if x is not None]
    if len(chosen) > 1:
        raise ValueError("choose one of proposer, drafter, draft_model and ngram")
    if proposer is not None:
        return proposer
    if ngram is not None:
        return families.NGRAM.make_proposer(ngram)
    if draft_model is not None:
        if isinstance(draft_model, (str, bytes)) or hasattr(draft_model, "__fspath__"):
            raise ValueError(f"draft_model= takes a loaded model, got the path {draft_model!r}: pass "
                             "mlx_spec.load(path)[0]")
        return families.DRAFT_MODEL.make_proposer(draft_model, model)
    if drafter is not None:
        return drafter_proposer(drafter, model)
    return None


__all__ = ["Draft", "FeatureReader", "Proposer", "RoundContext", "RoundResult", "NgramProposer", "make_proposer", "drafter_proposer"]
