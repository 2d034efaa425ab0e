"""One generation request: what a surface builds and checks once, and every layer below passes on.

The API (`stream_generate`, `batch_generate`), a conversation turn (chat, server), the batch scheduler and
the engine all take a `Request`, so a setting is spelled once, here. `Request.build` folds mlx-lm's
keyword spellings (temp, top_p, ..., kv_bits, kv_group_size, quantized_kv_start) into it, for callers
used to mlx-lm's `generate`.

Knows settings and their ranges; nothing of models, tokenizers or text.
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Tuple, Union

from .cache import DEFAULT_KV_GROUP_SIZE, MAX_DRAFT_TOKENS, KVQuant
from .errors import MlxSpecError
from .sampling import DEFAULT_ACCEPTANCE, SamplingParams, check_seed

DEFAULT_MAX_TOKENS = 256
DEFAULT_NUM_DRAFT_TOKENS = 3  # a library call's k: fixed, so it is stateless and silent (commands use auto)


class RequestSettingError(MlxSpecError, ValueError):
    """A request setting out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name} {message}")
        self.field, self.message = field_name, message


@dataclass(frozen=True)
class Request:
    """prompt: token ids (at least one). max_tokens: tokens to generate at most. sampling, seed: how the base's
    tokens are chosen (sampling.py; seed None: a fresh one). draft: speculate when a proposer is loaded;
    num_draft_tokens: drafts per round, or "auto" (chosen from this machine's measured costs). logprobs: N
    log-probabilities per token (0: none). stop: strings that end the text (cut before them). strict: every
    decode pass padded to one row count where the device needs it (api.strict_rows). kv: quantized K/V, or
    None for full precision. logits_processors: mlx-lm's (tokens, logits) -> logits callables. tree_nodes: a
    draft tree of that many nodes each round (docs/TREES.md), "auto" to choose chain or tree, 0: chains."""

    prompt: Tuple[int, ...]
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    draft: bool = True
    num_draft_tokens: Union[int, str] = DEFAULT_NUM_DRAFT_TOKENS
    logprobs: int = 0
    stop: Tuple[str, ...] = ()
    strict: bool = False
    kv: Optional[KVQuant] = None
    logits_processors: Tuple[Callable, ...] = field(default=(), compare=False)
    tree_nodes: Union[int, str] = 0

    def __post_init__(self):
        # lists in, tuples kept: a frozen request must not change under its holder
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors))

    def validate(self) -> "Request":
        """Return self, or raise RequestSettingError (a SamplingError for sampling) naming the setting."""
        if not self.prompt:
            raise RequestSettingError("prompt", "is empty: give at least one token")
        _integer("max_tokens", self.max_tokens, 0)
        self.sampling.validate()
        if self.seed is not None:
            check_seed(self.seed)
        if not isinstance(self.draft, bool):
            raise RequestSettingError("draft", f"must be true or false, got {self.draft!r}")
        if self.num_draft_tokens != "auto":
            _integer("num_draft_tokens", self.num_draft_tokens, 0, MAX_DRAFT_TOKENS, "or 'auto'")
        _integer("logprobs", self.logprobs, 0)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestSettingError("stop", "must be non-empty strings")
        if not isinstance(self.strict, bool):
            raise RequestSettingError("strict", f"must be true or false, got {self.strict!r}")
        if self.kv is not None:
            self.kv.validate()
        if not all(callable(p) for p in self.logits_processors):
            raise RequestSettingError("logits_processors", "must be callables (tokens, logits) -> logits")
        self._validate_trees()
        return self

    def _validate_trees(self) -> None:
        if self.tree_nodes == "auto":
            if self.num_draft_tokens != "auto":
                raise RequestSettingError("tree_nodes", "'auto' chooses between chains and trees each round: it "
                                          f"needs num_draft_tokens 'auto', got {self.num_draft_tokens!r}")
        else:
            _integer("tree_nodes", self.tree_nodes, 0, MAX_DRAFT_TOKENS, "or 'auto'")
        if self.tree_nodes and (self.strict or self.logits_processors):
            raise RequestSettingError("tree_nodes", "trees are verified without strict mode's padding and without "
                                      "logits processors (they see one history per row); use chains with them")

    def replace(self, **changes) -> "Request":
        return replace(self, **changes).validate()

    @property
    def speculative(self) -> bool:
        """Whether this request asks for drafts at all (a proposer must still be loaded)."""
        return self.draft and self.num_draft_tokens != 0

    @classmethod
    def build(cls, prompt: Sequence[int], *, sampling: Optional[SamplingParams] = None, temp: float = 0.0,
              top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, acceptance: str = DEFAULT_ACCEPTANCE,
              kv_bits: Optional[int] = None, kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
              quantized_kv_start: int = 0, **fields) -> "Request":
        """A validated Request from mlx-lm's spellings: `sampling` or temp/top_p/top_k/min_p/acceptance,
        kv_bits/kv_group_size/quantized_kv_start for `kv`, and the Request's own field names."""
        if sampling is None:
            sampling = SamplingParams(temp, top_p, top_k, min_p, acceptance)
        kv = fields.pop("kv", None) or KVQuant.from_flags(kv_bits, kv_group_size, quantized_kv_start)
        return cls(tuple(prompt), sampling=sampling, kv=kv, **fields).validate()


def _integer(name: str, value, low: int, high: Optional[float] = None, alternative: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        also = f" {alternative}" if alternative else ""
        raise RequestSettingError(name, f"must be an integer {span}{also}, got {value!r}")


__all__ = ["Request", "RequestSettingError", "DEFAULT_MAX_TOKENS", "DEFAULT_NUM_DRAFT_TOKENS"]
