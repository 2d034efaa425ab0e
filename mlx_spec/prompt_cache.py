"""A base model's KV cache kept between requests, with the token ids it holds.

A chat's next turn, or a client's next request to the server, repeats the conversation so far. `prepare`
rolls the cache back to the longest prefix of the new prompt it holds, so the engine prefills only the
rest; a rollback the sliding-window cache cannot make (the window already dropped what it needs) gives a
fresh cache instead. Either way the tokens are exactly those of a full re-prefill (tested in test_chat.py
and test_server.py). `settle` records what the cache holds after a request, finished, stopped or torn.

Knows caches and token ids; nothing of chat templates, threads or HTTP.
"""

from typing import List, Optional

from .cache import rollback_all
from .engine import MAX_DRAFT_TOKENS, make_base_cache
from .errors import CacheRollbackError


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    def __init__(self, model, enabled: bool = True):
        """enabled=False: every request gets a fresh cache (prepare always returns 0)."""
        self.model, self.enabled = model, enabled
        self.drop()

    def drop(self) -> None:
        self.cache: Optional[list] = None
        self.tokens: List[int] = []  # the ids whose K/V the cache holds, in order

    def prepare(self, tokens: List[int]) -> int:
        """Roll the cache back to the longest prefix of `tokens` it holds; return how many tokens it keeps.
        Afterwards `self.cache` is the cache to hand the engine."""
        if self.enabled and self.cache is not None:
            keep = min(common_prefix(self.tokens, tokens), len(tokens) - 1)  # the last token must run
            try:
                rollback_all(self.cache, len(self.tokens) - keep)
                self.tokens = self.tokens[:keep]
                return keep
            except CacheRollbackError:
                pass  # start over
        self.cache = make_base_cache(self.model, MAX_DRAFT_TOKENS + 1)  # as the Engine makes its own
        self.tokens = []
        return 0

    def settle(self, known: List[int], torn: bool) -> None:
        """Record which tokens the cache holds after a request, finished or not.

        The engine's cache holds a prefix of its history; `known` (prompt + the tokens the caller received) is
        a prefix of that history too, so anything past `known` (drafts of a round nobody read) is rolled
        back. torn: an exception escaped the engine mid-step, so the cache may be half-updated: dropped.
        """
        offsets = {c.offset for c in self.cache} if self.cache else set()
        if torn or len(offsets) != 1:
            self.drop()
            return
        offset = offsets.pop()
        try:
            if offset > len(known):
                rollback_all(self.cache, offset - len(known))
                offset = len(known)
        except CacheRollbackError:
            self.drop()
            return
        self.tokens = known[:offset]
