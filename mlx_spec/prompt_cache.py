"""A base model's KV cache kept between requests, with the token ids it holds.

A chat's next turn, or a client's next request to the server, repeats the conversation so far. `prepare`
rolls the cache back to the longest prefix of the new prompt it holds, so the engine prefills only the
rest; a rollback the sliding-window cache cannot make (the window already dropped what it needs) gives a
fresh cache instead. Either way the tokens are exactly those of a full re-prefill (tested in test_chat.py
and test_server.py). `settle` records what the cache holds after a request, finished, stopped or torn.

Knows caches and token ids; nothing of chat templates, threads or HTTP.
"""

import copy
from typing import List, Optional

import mlx.core as mx

from .cache import rollback_all
from .engine import MAX_DRAFT_TOKENS, make_base_cache
from .errors import CacheRollbackError


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _clone(caches: list) -> list:
    """Independent copies of rewindable caches: new handles on the same K/V (MLX writes through a handle
    create new data; the original's handles keep theirs), so neither copy's updates reach the other."""
    out = []
    for c in caches:
        d = copy.copy(c)
        for name in ("keys", "values"):
            if getattr(c, name, None) is not None:
                setattr(d, name, mx.array(getattr(c, name)))
        out.append(d)
    return out


class PromptCache:
    """`slots` caches, least recently used evicted first: a request continues the one holding the longest
    prefix of its prompt, or takes a fresh one (a second conversation need not evict the first)."""

    def __init__(self, model, enabled: bool = True, slots: int = 1):
        """enabled=False: every request gets a fresh cache (prepare always returns 0)."""
        self.model, self.enabled, self.slots = model, enabled, max(1, slots)
        self.drop()

    def drop(self) -> None:
        """Forget every cache."""
        self._entries: List[list] = []  # [cache, token ids, attached dict], most recently used last
        self._current: Optional[list] = None

    @property
    def cache(self) -> Optional[list]:
        """The cache of the current request (after `prepare`), to hand the engine."""
        return self._current[0] if self._current else None

    @property
    def tokens(self) -> List[int]:
        """The ids whose K/V the current cache holds, in order."""
        return self._current[1] if self._current else []

    @property
    def attached(self) -> dict:
        """State that belongs with the current cache's conversation (the server keeps a draft model's
        proposer, with its own cache, here); a fresh or copied cache starts with none."""
        return self._current[2] if self._current else {}

    def prepare(self, tokens: List[int]) -> int:
        """Roll the cache holding the longest prefix of `tokens` back to that prefix; return how many tokens
        it keeps (0: a fresh cache). Afterwards `self.cache` is the cache to hand the engine."""
        best, keep = None, 0
        if self.enabled:
            for entry in self._entries:
                n = min(common_prefix(entry[1], tokens), len(tokens) - 1)  # the last token must run
                if n > keep:
                    best, keep = entry, n
        if best is not None:
            # Rolling back would cut another conversation short (a shared system prompt, then diverging): with
            # a slot free, continue from a copy and keep that one whole.
            share = len(best[1]) > keep and len(self._entries) < self.slots
            entry = [_clone(best[0]), list(best[1]), {}] if share else best
            if not share:
                self._entries.remove(best)
            try:
                rollback_all(entry[0], len(entry[1]) - keep)
                entry[1] = entry[1][:keep]
                self._entries.append(entry)
                self._current = entry
                return keep
            except CacheRollbackError:
                pass  # the sliding window already dropped what this rollback needs: start over
        if not self.enabled:
            self._entries = []
        while len(self._entries) >= self.slots:
            self._entries.pop(0)
        self._current = [make_base_cache(self.model, MAX_DRAFT_TOKENS + 1), [], {}]  # as the Engine makes its own
        self._entries.append(self._current)
        return 0

    def settle(self, known: List[int], torn: bool) -> None:
        """Record which tokens the current cache holds after a request, finished or not.

        The engine's cache holds a prefix of its history; `known` (prompt + the tokens the caller received) is
        a prefix of that history too, so anything past `known` (drafts of a round nobody read) is rolled
        back. torn: an exception escaped the engine mid-step, so the cache may be half-updated: dropped.
        """
        if self._current is None:
            return
        offsets = {c.offset for c in self._current[0]}
        if not torn and len(offsets) == 1:
            offset = offsets.pop()
            try:
                if offset > len(known):
                    rollback_all(self._current[0], offset - len(known))
                    offset = len(known)
                self._current[1] = known[:offset]
                return
            except CacheRollbackError:
                pass
        self._entries.remove(self._current)
        self._current = None
