"""Drafts from a smaller language model that shares the base's tokenizer (classic speculative decoding).

The draft model keeps its own rewindable KV cache over the same history the base sees. Each round it runs
the history tokens it has not consumed yet (at least the bonus) in one forward pass, then k-1 single-token
steps, all lazily, so the engine evaluates drafting and verifying in one graph. `observe` rolls the draft
cache back to the prefix the base kept.

It knows a model's forward and its cache; it knows nothing about the base model beyond its vocabulary
size, and nothing about text.
"""

from functools import cached_property
from typing import List, Optional

import mlx.core as mx

from ..cache import DEFAULT_MAX_ROLLBACK, rollback_all
from ..errors import CacheRollbackError, PairingError
from ..identity import weights_fingerprint
from ..models.base import as_base
from ..prefill import PREFILL_STEP, common_prefix, prefill
from .base import Draft, RoundContext, RoundResult

# Families pad the output layer to a multiple of 64..1024 beyond the tokenizer's real size, and siblings of
# one family may pad differently; a larger gap means the two models do not share a tokenizer.
MAX_VOCAB_PADDING_GAP = 1024


def output_vocab_size(model) -> int:
    """The width of the model's logits, read from the shape of a lazy one-token forward (nothing runs)."""
    base = as_base(model)
    logits, _ = base.forward(mx.zeros((1, 1), mx.int32), base.make_cache(1))
    return logits.shape[-1]


def check_vocab_pairing(base_vocab: int, draft_vocab: int) -> None:
    """Raise PairingError when the two output layers cannot index the same token ids."""
    if abs(base_vocab - draft_vocab) > MAX_VOCAB_PADDING_GAP:
        raise PairingError(
            f"the draft model predicts {draft_vocab} token ids but the base model {base_vocab}: they do not share "
            "a tokenizer; pick a draft model from the base model's family (same tokenizer)"
        )


class DraftModelProposer:
    name = "draft_model"
    base_layers = ()  # reads no decoder-layer outputs of the base

    def __init__(self, draft_model, base_model=None, *, base_vocab: Optional[int] = None,
                 max_rollback: int = DEFAULT_MAX_ROLLBACK, prefill_step: int = PREFILL_STEP):
        """`base_model` (or `base_vocab`) gives the base's vocabulary size; ids that only one model has are
        never drafted. Without either, the two vocabularies are assumed equal."""
        self.model = self.weights = draft_model
        self.base = as_base(draft_model)
        self.max_rollback = max_rollback
        self.prefill_step = prefill_step
        self.draft_vocab = output_vocab_size(draft_model)
        if base_vocab is None and base_model is not None:
            base_vocab = output_vocab_size(base_model)
        self.base_vocab = base_vocab if base_vocab is not None else self.draft_vocab
        check_vocab_pairing(self.base_vocab, self.draft_vocab)
        self.cache: list = []
        self.consumed = 0  # history tokens whose K/V the draft cache holds (= its offset)
        self._round_start = 0  # len(history) when the last round was proposed
        self._history: List[int] = []  # the last request's history (the engine's list): the cache's ids

    @cached_property
    def identity(self) -> str:
        return f"{self.name}:{weights_fingerprint(self.model)}"

    def fork(self) -> "DraftModelProposer":
        """The same draft model with a cache of its own (for another conversation)."""
        return DraftModelProposer(self.model, base_vocab=self.base_vocab, max_rollback=self.max_rollback,
                                  prefill_step=self.prefill_step)

    def start(self, prompt: List[int]) -> None:
        """The cache holds the prompt afterwards (evaluated here: it is the draft's share of the prefill).

        What the previous request left is reused up to the longest common prefix with this prompt (a chat's
        next turn repeats the conversation so far), when the caches can roll back that far; otherwise the
        prompt is prefilled from scratch."""
        start = self._reusable_prefix(prompt)
        if start == 0:
            self.cache = self.base.make_cache(self.max_rollback)
            self.consumed = 0
        self._history = prompt
        prefill(lambda x: self.base.forward(x, self.cache), prompt, lambda: self.cache, start=start,
                step=self.prefill_step, on_progress=self._prefilled)

    def _prefilled(self, done: int, total: int) -> None:
        self.consumed = done  # after each chunk, so the count stays true if a later chunk fails

    def _reusable_prefix(self, prompt: List[int]) -> int:
        """Roll the cache back to the longest prefix of `prompt` it holds; return that length (0: start over).

        The cache holds history[:consumed], and past that the drafts of a round that was proposed but not
        observed, or accepted drafts the request stopped before emitting: those are not compared, only
        rolled back."""
        if not self.cache or not prompt:
            return 0
        keep = common_prefix(self._history[: min(self.consumed, len(self._history))], prompt)
        if keep <= 0:
            return 0
        try:  # from where the cache is: a round proposed but never observed (a reply stopped) ran drafts
            rollback_all(self.cache, self.cache[0].offset - keep)
        except CacheRollbackError:  # a sliding window already dropped what this rollback needs
            return 0
        self.consumed = keep
        return keep

    def _logits(self, tokens: mx.array) -> mx.array:
        """Last-position logits over the base's vocabulary, (V_base,) float32; tokens (1, L)."""
        logits, _ = self.base.forward(tokens, self.cache)
        logits = logits[0, -1].astype(mx.float32)  # (V_draft,)
        if self.draft_vocab > self.base_vocab:  # ids the base lacks are never drafted
            return logits[: self.base_vocab]
        if self.draft_vocab < self.base_vocab:  # ids the draft lacks get probability 0
            pad = mx.full((self.base_vocab - self.draft_vocab,), -mx.inf, mx.float32)
            return mx.concatenate([logits, pad])
        return logits

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        if k <= 0:
            return Draft.empty()
        if self.consumed >= len(ctx.history):
            raise RuntimeError(
                f"draft cache holds {self.consumed} tokens but the history has only {len(ctx.history)}: "
                "start() was not called for this request"
            )
        self._round_start = len(ctx.history)
        self._history = ctx.history  # the engine's list, appended in place: after the request, all it emitted
        x = mx.array(ctx.history[self.consumed :], mx.int32)[None]  # (1, L): at least the bonus
        self.consumed = len(ctx.history)
        tokens, probs = [], []
        for i in range(k):
            tok, q = ctx.sampler.draft(self._logits(x), ctx.position + 1 + i)  # (1,), (V,) or None
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            if i < k - 1:  # the last draft is not run: the base verifies it
                x = tok.reshape(1, 1)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None)  # (k,), (k, V) or None

    def observe(self, result: RoundResult) -> None:
        """The cache ran history + d1..d_{k-1}; keep history + d1..d_n (d_k, if accepted, runs next round)."""
        draft_k, n_accepted = result.drafted, result.accepted
        if draft_k == 0:
            return
        ran = self._round_start + draft_k - 1
        if self.cache[0].offset != ran:
            raise RuntimeError(f"draft cache is at {self.cache[0].offset}, expected {ran}: observe() without propose()")
        keep = min(ran, self._round_start + n_accepted)
        rollback_all(self.cache, ran - keep)
        self.consumed = keep
