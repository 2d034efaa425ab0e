"""Drafts from an EAGLE-3 drafter (models/gemma4_eagle3.py): autoregressive, one drafter pass per draft.

The context (a FeatureReader's, proposers/base.py): entry j pairs the base's features at position j with the
token at j + 1, so an entry can only be computed once that token is known. `Eagle3Context` therefore holds
two parts, one base position each: the drafter's K/V for the entries whose next token was known when they
were taken in, then the features still waiting for theirs. The engine rolls it back as one cache (the
waiting features first); the ids come from the history the proposer follows (`start`'s prompt, then the
engine's own list, which grows as tokens are emitted). Features wait until their token is known and the
context is read, or MAX_PENDING of them wait (block.py's reason: one drafter pass, not one per token).

A round after position p (the bonus token, not yet run by the base): the waiting entries up to p - 1 are
taken in, in one pass; its last row's logits give draft 0 (position p + 1). Draft i (i >= 1) is one more
entry: the drafter's own output at the previous entry (not the base's features) with draft i - 1, appended to
the context's K/V and given back after the round, so the context again covers exactly the base's positions.
Each draft is drawn through the request's sampler at its own position from the draft-vocabulary logits
placed into the base's vocabulary (every other token -inf), so q is a distribution over the base's tokens
and rejection sampling and the coupled mode keep the base's distribution.
"""

from functools import cached_property
from typing import List, Optional, Tuple

import mlx.core as mx

from ..cache import MAX_DRAFT_TOKENS, rollback_all
from ..errors import CacheRollbackError, PairingError
from ..identity import weights_fingerprint
from ..families import LAYER_OUTPUTS
from ..models.base import offers
from ..models.gemma4_text import EMBEDDING_OUTPUT
from ..prefill import common_prefix
from .base import Draft, RoundContext, RoundResult

MAX_PENDING = 64  # waiting positions whose token is known, taken in at once (bounds their memory)


def validate_pairing(drafter, base) -> Tuple[int, ...]:
    """The base decoder layers the drafter reads (ascending), or PairingError: its feature width, vocabulary
    and aux layer ids must fit the base."""
    if not offers(base, LAYER_OUTPUTS):
        raise PairingError(f"an EAGLE-3 drafter reads a Gemma 4 base's decoder layers; this base is "
                           f"{getattr(base, 'model_type', type(base).__name__)}. Use --draft-model or --ngram with "
                           "other models")
    text, d = base.text_args, drafter.args
    made_for = f" (it was made for {d.verifier})" if d.verifier else ""

    def mismatch(what, drafter_value, base_value):
        raise PairingError(f"EAGLE-3 drafter {what} is {drafter_value} but the base model's is {base_value}; use the "
                           f"drafter made for this base{made_for}")

    if d.feature_width != text.hidden_size:
        mismatch("target hidden size", d.feature_width, f"hidden_size {text.hidden_size}")
    if d.vocab_size != text.vocab_size:
        mismatch("vocab_size", d.vocab_size, text.vocab_size)
    n = text.num_hidden_layers
    aux = drafter.aux_layer_ids(n)
    if len(set(aux)) != d.n_aux or min(aux) < 0 or max(aux) > n - 1:
        mismatch("eagle_aux_hidden_state_layer_ids", aux, f"range of {d.n_aux} distinct ids in [0, {n - 1}] ({n} "
                 "layers)")
    layers = tuple(EMBEDDING_OUTPUT if a == 0 else a - 1 for a in aux)  # id a: the input of layer a
    base.check_layers(layers)
    return layers


class Eagle3Context:
    """The drafter's context over the base's positions (see the module docstring): `caches` (one K/V cache per
    drafter layer) hold the entries taken in, `waiting` features follow. `rollback`, `offset`, `keys` and
    `values` are what the engine asks of a cache (cache.py's names)."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.caches = drafter.make_cache()
        self.pending: List[mx.array] = []  # (1, L, n_aux*W) features, in order, after the caches' entries
        self.seed: Optional[mx.array] = None  # (1, 1, H) drafter output at the newest cached entry, if known

    @property
    def taken(self) -> int:
        return self.caches[0].offset

    @property
    def waiting(self) -> int:
        return sum(f.shape[1] for f in self.pending)

    @property
    def offset(self) -> int:
        return self.taken + self.waiting

    def take(self, tokens: List[int]) -> None:
        """Take in every waiting position whose next token `tokens` (ids from position 0) holds."""
        m = self.taken
        n = min(self.waiting, len(tokens) - 1 - m)
        if n <= 0:
            return
        features = self.pending[0] if len(self.pending) == 1 else mx.concatenate(self.pending, axis=1)
        self.pending = [features[:, n:]] if features.shape[1] > n else []
        after = mx.array([tokens[m + 1 : m + 1 + n]], mx.int32)  # (1, n): the token after each position
        self.seed = self.drafter.context(features[:, :n], after, self.caches)[:, -1:]

    def rollback(self, n: int) -> int:
        if n < 0 or n > self.offset:
            raise CacheRollbackError(f"cannot roll back {n} positions from an EAGLE-3 context holding {self.offset}")
        drop = min(n, self.waiting)
        if drop:
            features = self.pending[0] if len(self.pending) == 1 else mx.concatenate(self.pending, axis=1)
            keep = features.shape[1] - drop
            self.pending = [features[:, :keep]] if keep else []
        if n > drop:
            rollback_all(self.caches, n - drop)
            self.seed = None
        return n

    @property
    def keys(self) -> list:
        return [c.keys for c in self.caches if c.keys is not None] + self.pending

    @property
    def values(self) -> list:
        return [c.values for c in self.caches if c.values is not None]


class Eagle3Proposer:
    name = "eagle3"

    def __init__(self, drafter, base):
        self.base_layers: Tuple[int, ...] = validate_pairing(drafter, base)
        self.drafter = self.weights = drafter
        self.base = base
        self.vocab_size = base.text_args.vocab_size
        self.targets = drafter.draft_to_target()  # (Vd,) int32: draft id -> base token id
        mx.eval(self.targets)
        self._context = Eagle3Context(drafter)
        self._history: List[int] = []  # ids from position 0: the context's entries were built from these

    @cached_property
    def identity(self) -> str:
        return f"{self.name}:{weights_fingerprint(self.drafter)}"

    @property
    def context_cache(self) -> list:
        """[the context], with every waiting position whose token is known taken in."""
        self._context.take(self._history)
        return [self._context]

    @property
    def context_length(self) -> int:
        return self._context.offset

    def fork(self) -> "Eagle3Proposer":
        return type(self)(self.drafter, self.base)

    def reset(self) -> None:
        self._context = Eagle3Context(self.drafter)
        self._history = []

    def start(self, prompt: List[int]) -> None:
        """Keep the part of the context `prompt` does not contradict: a waiting feature at j needs ids 0..j
        unchanged, an entry taken in also id j + 1, unless the prompt ends before it (the engine then runs
        the base from the prompt's last position, and the cost probe drafts after the same ids)."""
        c = self._context
        shared = common_prefix(self._history, prompt)
        agreed = shared + 1 if shared == len(prompt) else shared  # ids not contradicted
        keep = min(c.offset, shared) if c.taken < agreed else max(agreed - 1, 0)
        try:
            c.rollback(c.offset - keep)
        except CacheRollbackError:
            self.reset()
        self._history = list(prompt)

    def extend(self, features: mx.array) -> None:
        self._context.pending.append(features)
        if self._context.waiting >= MAX_PENDING:
            self._context.take(self._history)

    def observe(self, result: RoundResult) -> None:
        pass  # the engine rolls the context back with the base's cache

    def propose(self, ctx: RoundContext, k: int) -> Draft:
        c = self._context
        if c.offset != ctx.position:
            raise RuntimeError(f"the drafter's context holds {c.offset} positions but the base's cache "
                               f"{ctx.position}: the engine must hand every base pass's features to extend()")
        self._history = ctx.history  # the engine's list, appended in place
        k = min(k, MAX_DRAFT_TOKENS)
        if k <= 0:
            return Draft.empty()
        c.take(ctx.history)
        if c.seed is None or c.pending:
            raise RuntimeError("the EAGLE-3 context has no output at its newest position: a round needs the base to "
                               "have run at least one position since the context was last rolled back")
        h, tokens, probs = c.seed, [], []
        for i in range(k):
            token, q = self._draw(ctx, self.drafter.logits(h)[0, -1], ctx.position + 1 + i)
            tokens.append(token)
            if q is not None:
                probs.append(q)
            if i + 1 < k:  # one more entry: the drafter's own output with the token just drafted
                h = self.drafter.run(token[None], self.drafter.feedback(h), c.caches)
        rollback_all(c.caches, k - 1)
        return Draft(mx.concatenate(tokens), mx.stack(probs) if probs else None)

    def _draw(self, ctx: RoundContext, logits: mx.array, position: int):
        """(token (1,) int32 in the base's vocabulary, q (V,) or None) from draft-vocabulary logits (Vd,)."""
        if ctx.sampler.greedy:
            return self.targets[mx.argmax(logits)].reshape(1), None
        if self.drafter.reduced_vocab:
            full = mx.full((self.vocab_size,), -mx.inf, logits.dtype)
            full[self.targets] = logits
            logits = full
        return ctx.sampler.draft(logits, position)
