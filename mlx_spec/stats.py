"""Per-request counters in the project's words (DESIGN.md): rounds, drafted, accepted, τ, by position."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class GenerationStats:
    """Per-request counters, in the project's words (DESIGN.md): rounds, drafted, accepted, tau."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    rounds: int = 0
    tree_rounds: int = 0  # ... of which verified a draft tree (trees/)
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: List[int] = field(default_factory=list)
    accepted_by_position: List[int] = field(default_factory=list)
    peak_memory_bytes: int = 0
    strict: bool = False  # strict mode was asked for
    strict_rows: int = 0  # ... and every decode pass ran padded to this many rows (0: none needed here)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0

    @property
    def tau(self) -> float:
        """Tokens emitted per verify round (accepted + 1), over rounds that verified drafts."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def plain_steps(self) -> int:
        """Tokens decoded without drafts after the first (auto-off, its re-timing, rounds the proposer left
        empty): each emits one token at plain decoding's cost."""
        return max(0, self.generation_tokens - 1 - self.accepted - self.rounds)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> List[Optional[float]]:
        """Accepted / drafted at each draft position; None where nothing was drafted (undefined, not 0)."""
        return [a / d if d else None for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    def record_round(self, draft_k: int, n_accepted: int, positions: Optional[int] = None, tree: bool = False) -> None:
        """A round that verified draft_k drafts and kept n_accepted; a tree's drafts are its nodes, and its
        `positions` (depth bound) are what `by position` counts."""
        positions = draft_k if positions is None else positions
        self.rounds += 1
        self.tree_rounds += int(tree)
        self.drafted += draft_k
        self.accepted += n_accepted
        grow = positions - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(positions):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < n_accepted)

    def merge(self, other: "GenerationStats") -> None:
        """Add another request's counters to these (totals over several prompts: tokens, times, rounds)."""
        self.prompt_tokens += other.prompt_tokens
        self.prompt_time += other.prompt_time
        self.generation_tokens += other.generation_tokens
        self.generation_time += other.generation_time
        self.peak_memory_bytes = max(self.peak_memory_bytes, other.peak_memory_bytes)
        self.rounds += other.rounds
        self.tree_rounds += other.tree_rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        grow = len(other.drafted_by_position) - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i, (d, a) in enumerate(zip(other.drafted_by_position, other.accepted_by_position)):
            self.drafted_by_position[i] += d
            self.accepted_by_position[i] += a

    @classmethod
    def total(cls, many) -> "GenerationStats":
        out = cls()
        for s in many:
            out.merge(s)
        return out

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "prompt_tps": self.prompt_tps,
            "generation_tokens": self.generation_tokens, "generation_tps": self.generation_tps,
            "rounds": self.rounds, "tree_rounds": self.tree_rounds, "drafted": self.drafted,
            "accepted": self.accepted, "tau": self.tau,
            "acceptance_rate": self.acceptance_rate, "acceptance_by_position": self.acceptance_by_position,
            "plain_steps": self.plain_steps, "peak_memory_bytes": self.peak_memory_bytes,
            "strict": self.strict, "strict_rows": self.strict_rows,
        }
