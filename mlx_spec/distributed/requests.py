"""One request, the same on every rank: what rank 0 was asked is what every rank decodes.

Every rank runs the same engine and must draft, verify, accept and roll back identically. Most of that
follows from identical inputs (greedy logits are the same on every rank after the collectives; sampling is
keyed by (seed, position)); what a rank could choose alone is taken from rank 0 here: the prompt's ids,
a fresh seed, and the draft length of a policy that is not a fixed k (`--num-draft-tokens auto` times rounds
on each rank's clock, so it is replaced by a fixed k). With `Ranks.check`, every emitted token is followed
by a comparison of the ranks' token digests.
"""

from dataclasses import replace
from typing import Iterator, List, Sequence, Tuple, Union

from ..draft_policy import DraftPolicy, FixedK
from ..proposers.base import RoundResult
from ..sampling import SamplingParams, check_seed, random_seed
from .group import Ranks

DISTRIBUTED_K = 3  # the draft length `auto` becomes across ranks (the engine's library default)


class RootPolicy:
    """A draft policy whose choice of k is rank 0's, sent to every rank each round."""

    def __init__(self, inner: DraftPolicy, ranks: Ranks):
        self.inner, self.ranks = inner, ranks

    def next_k(self) -> int:
        return self.ranks.from_root([self.inner.next_k()])[0]

    def observe(self, result: RoundResult) -> None:
        self.inner.observe(result)


def _seed(ranks: Ranks, seed) -> int:
    """Rank 0's seed (its fresh one when none was given), as two 32-bit halves (the collective is int64)."""
    value = check_seed(seed) if seed is not None else random_seed()
    hi, lo = ranks.from_root([value >> 32, value & 0xFFFFFFFF])
    return (hi << 32) | lo


def agree_request(ranks: Ranks, ids: Sequence[int], seed, sampling: SamplingParams,
                  num_draft_tokens: Union[int, str, DraftPolicy]) -> Tuple[List[int], int, SamplingParams, object]:
    """(prompt ids, seed, sampling, num_draft_tokens) as rank 0 has them, on every rank."""
    ids = ranks.root_ids(ids)
    if seed is None and sampling.acceptance == "auto":  # no seed means rejection sampling; a shared seed must not
        sampling = replace(sampling, acceptance="rejection")
    seed = _seed(ranks, seed)
    if num_draft_tokens == "auto":
        num_draft_tokens = DISTRIBUTED_K
    elif not isinstance(num_draft_tokens, (int, str, FixedK)):  # a caller's policy: rank 0's choices
        num_draft_tokens = RootPolicy(num_draft_tokens, ranks)
    return ids, seed, sampling, num_draft_tokens


def checked(ranks: Ranks, events: Iterator, prompt: Sequence[int]) -> Iterator:
    """`events` (the engine's TokenEvents), each followed by a check that every rank emitted the same tokens
    so far, drafted or not (so the same rounds accepted the same drafts)."""
    seen = list(prompt)
    for n, ev in enumerate(events, 1):
        seen += [ev.token, int(ev.from_draft)]
        ranks.check_same(seen, f"at generated token {n}")
        yield ev
