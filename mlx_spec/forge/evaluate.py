"""How a drafter does with the real engine: τ and acceptance by draft position, greedy, fixed k.

The only place forge runs the decoding engine (the public `stream_generate`), so the before/after report
measures exactly what `mlx_spec.generate --drafter D --num-draft-tokens K` would give on the same prompts.
"""

from dataclasses import dataclass, field
from statistics import median
from typing import List, Optional, Sequence


@dataclass
class Measurement:
    """Per-prompt τ, pooled acceptance by draft position (None where no round drafted that far, as in
    GenerationStats), and whether each output equalled plain decoding."""

    taus: List[float]
    acceptance_by_position: List[Optional[float]]
    same_as_plain: List[bool] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return median(self.taus) if self.taus else 0.0

    def spread(self) -> str:
        """Quartiles over prompts (min-max with fewer than 4)."""
        t = sorted(self.taus)
        if not t:
            return "-"
        if len(t) < 4:
            return f"{t[0]:.2f}-{t[-1]:.2f}"
        q = lambda f: t[min(len(t) - 1, int(round(f * (len(t) - 1))))]
        return f"{q(0.25):.2f}-{q(0.75):.2f}"


def decode(model, tokenizer, ids: List[int], drafter, k: int, max_tokens: int):
    """(tokens, GenerationStats) of greedy decoding, speculative at fixed k when drafter is not None (an int
    num_draft_tokens is the FixedK policy, not auto: every round drafts k, fewer only where max_tokens is
    near). The one call into the engine."""
    from ..api import stream_generate

    tokens, last = [], None
    for r in stream_generate(model, tokenizer, list(ids), drafter=drafter, num_draft_tokens=k,
                             max_tokens=max_tokens, temp=0.0):
        tokens.append(r.token)
        last = r
    return tokens, (last.stats if last is not None else None)


def measure(model, tokenizer, prompts: Sequence[List[int]], drafter, k: int, max_tokens: int,
            plain: Optional[List[List[int]]] = None) -> Measurement:
    """Greedy decoding of every prompt with the drafter at fixed k. `plain` (each prompt's plain greedy
    tokens, from `plain_outputs`) adds the check that drafting changed no token."""
    from ..stats import GenerationStats

    taus, same, total = [], [], GenerationStats()
    for i, ids in enumerate(prompts):
        tokens, stats = decode(model, tokenizer, ids, drafter, k, max_tokens)
        if stats is not None and stats.rounds:
            taus.append(stats.tau)
            total.merge(stats)
        if plain is not None:
            same.append(tokens == plain[i])
    return Measurement(taus, total.acceptance_by_position, same)


def by_position(acceptance: Sequence[Optional[float]]) -> str:
    """"0.91, 0.80, -": a position no round drafted is "-" (undefined, not 0)."""
    return ", ".join("-" if a is None else f"{a:.2f}" for a in acceptance)


def plain_outputs(model, tokenizer, prompts: Sequence[List[int]], max_tokens: int) -> List[List[int]]:
    return [decode(model, tokenizer, ids, None, 0, max_tokens)[0] for ids in prompts]
