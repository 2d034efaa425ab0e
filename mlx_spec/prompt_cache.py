"""Base-model K/V kept between requests, with the token ids it holds, in least-recently-used slots.

A chat's next turn, or a client's next request to the server, repeats the conversation so far. `prepare`
picks the slot holding the longest prefix of the new prompt and rolls it back to that prefix, so the engine
prefills only the rest; a rollback the sliding-window cache cannot make (the window already dropped what it
needs) gives a fresh cache instead. Either way the tokens are exactly those of a full re-prefill (tested in
test_chat.py and test_server.py). `settle` records what the slot holds after a request, finished, stopped
or torn. A slot also carries its conversation's own proposer (a draft model's cache follows it).

Knows caches and token ids; nothing of chat templates, threads or HTTP.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .cache import DEFAULT_MAX_ROLLBACK, KVQuant, rollback_all
from .errors import CacheRollbackError
from .models.base import as_base
from .prefill import common_prefix


def _clone(caches: list) -> list:
    """Independent copies of rewindable caches (new handles on the same K/V, quantized or not), so neither
    copy's updates reach the other."""
    return [c.copy() for c in caches]


@dataclass(eq=False)  # slots are compared by identity
class Slot:
    """One conversation: the base's caches, the token ids whose K/V they hold, and its own proposer (made
    on first use with drafting; None until then)."""

    cache: list
    tokens: List[int] = field(default_factory=list)
    proposer: Optional[object] = None
    busy: bool = False  # a request is decoding in it (prepared, not yet settled): no other request may take it


class PromptCache:
    """`slots` conversations, least recently used evicted first: a request continues the one holding the
    longest prefix of its prompt, or takes a fresh one (a second conversation need not evict the first).
    Requests may run at once (a batching server): a slot in use is never handed to another request, and while
    every slot is in use a new request gets a slot of its own beyond `slots`, evicted once it is settled."""

    def __init__(self, model, enabled: bool = True, slots: int = 1, kv: Optional[KVQuant] = None):
        """enabled=False: every request gets a fresh slot (prepare always reuses 0 tokens); `kv`: quantized
        K/V for the caches it makes."""
        self.base, self.enabled, self.slots, self.kv = as_base(model), enabled, max(1, slots), kv
        self._slots: List[Slot] = []  # most recently used last
        self._pinned: Optional[Slot] = None

    def drop(self) -> None:
        """Forget every conversation."""
        self._slots = []

    def __len__(self) -> int:
        return len(self._slots)

    def pin(self, caches: list, tokens: List[int]) -> None:
        """Keep a saved prompt (session_file.load_prompt_cache) whole for as long as this lives: a request that
        starts with its tokens continues from a copy of it (it is never rolled back, extended or evicted)."""
        self._pinned = Slot(caches, list(tokens))

    @property
    def latest(self) -> Optional[Slot]:
        """The most recently used slot (a chat's one conversation), or None."""
        return self._slots[-1] if self._slots else None

    def prepare(self, tokens: List[int]) -> Tuple[Slot, int]:
        """(the slot to hand the engine, how many leading tokens of `tokens` its cache holds; 0: fresh)."""
        best, keep = None, 0
        # a pinned prompt serves even with reuse off (it is what the user saved for every request)
        free = [s for s in self._slots if not s.busy]
        candidates = (free if self.enabled else []) + ([self._pinned] if self._pinned is not None else [])
        for slot in candidates:
            n = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)  # the last token must run
            if n > keep:
                best, keep = slot, n
        if best is not None:
            # Rolling back would cut another conversation short (a shared system prompt, then diverging): with
            # a slot free, continue from a copy and keep that one whole. A pinned prompt is always copied.
            share = best is self._pinned or len(best.tokens) > keep and len(self._slots) < self.slots
            if best is self._pinned:
                self._evict(room_for=1)
            slot = Slot(_clone(best.cache), list(best.tokens)) if share else best
            if not share:
                self._slots.remove(best)
            try:
                rollback_all(slot.cache, len(slot.tokens) - keep)
                slot.tokens = slot.tokens[:keep]
                return self._take(slot), keep
            except CacheRollbackError:
                pass  # the sliding window already dropped what this rollback needs: start over
        if not self.enabled:
            self._slots = [s for s in self._slots if s.busy]
        self._evict(room_for=1)
        flags = self.kv.as_dict() if self.kv is not None else {}
        slot = Slot(self.base.make_cache(DEFAULT_MAX_ROLLBACK, **flags))  # as the Engine makes its own
        return self._take(slot), 0

    def _take(self, slot: Slot) -> Slot:
        slot.busy = True
        self._slots.append(slot)
        return slot

    def _evict(self, room_for: int = 0) -> None:
        """Drop the least recently used slots not in use until `room_for` more fit within `slots`."""
        for slot in [s for s in self._slots if not s.busy]:
            if len(self._slots) + room_for <= self.slots:
                break
            self._slots.remove(slot)

    def settle(self, slot: Slot, known: List[int], torn: bool) -> None:
        """Record which tokens the slot's cache holds after a request, finished or not.

        The engine's cache holds a prefix of its history; `known` (prompt + the tokens the caller received) is
        a prefix of that history too, so anything past `known` (drafts of a round nobody read) is rolled
        back. torn: an exception escaped the engine mid-step, so the caches (the slot's proposer's too) may be
        half-updated: the slot is dropped."""
        slot.busy = False
        if slot not in self._slots:
            return
        self._slots.remove(slot)  # the most recently used now
        self._slots.append(slot)
        try:
            self._keep(slot, known, torn)
        finally:
            self._evict()

    def _keep(self, slot: Slot, known: List[int], torn: bool) -> None:
        offsets = {c.offset for c in slot.cache}
        if not torn and len(offsets) == 1:
            offset = offsets.pop()
            try:
                if offset > len(known):
                    rollback_all(slot.cache, offset - len(known))
                    offset = len(known)
                slot.tokens = known[:offset]
                return
            except CacheRollbackError:
                pass
        self._slots.remove(slot)
