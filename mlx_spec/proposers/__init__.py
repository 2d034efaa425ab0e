"""Ways of proposing drafts (mtp, ngram, draft_model), all behind the `Proposer` protocol in base.py."""

from typing import Optional

from .base import Draft, Proposer, RoundContext
from .ngram import NgramProposer


def make_proposer(model, *, drafter=None, draft_model=None, ngram: Optional[int] = None) -> Optional[Proposer]:
    """The proposer for what the caller passed; None (plain decoding) when nothing was passed."""
    chosen = [x for x in (drafter, draft_model, ngram) if x is not None]
    if len(chosen) > 1:
        raise ValueError("choose one of drafter, draft_model and ngram")
    if ngram is not None:
        return NgramProposer(ngram)
    if draft_model is not None:
        from .draft_model import DraftModelProposer

        return DraftModelProposer(draft_model, model)
    if drafter is not None:
        if hasattr(drafter, "propose"):
            return drafter
        from .mtp import MTPProposer

        return MTPProposer(drafter, model)
    return None


__all__ = ["Draft", "Proposer", "RoundContext", "NgramProposer", "make_proposer"]
