"""A request against kept K/V: the one conversation turn that both the chat and the server run.

`Conversations` holds the prompt cache (its slots) and the loaded proposer; `turn(ids, ...)` returns a
`Turn`, an iterator of GenerationResponses. When iteration starts, the turn takes the slot holding the
longest prefix of `ids` (rolling the rest back), gives the slot its own proposer on first use (a draft
model's cache then follows its conversation), and streams; when it ends, however it ends (finished,
closed early, stopped during the prefill, or an exception), the slot is settled: it holds exactly the
prompt plus what the caller received, or is dropped when an exception left its caches half-updated.

Knows the API's make_engine/respond and the prompt cache; nothing of chat templates, terminals or HTTP.
"""

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

from .api import GenerationResponse, make_engine, respond
from .cache import KVQuant
from .engine import Engine
from .prompt_cache import PromptCache, Slot
from .proposers.base import Proposer
from .request import Request
from .stats import GenerationStats
from .tuning.tuner import AutoTuner


class Conversations:
    def __init__(self, model, tokenizer, proposer: Optional[Proposer] = None, *, tuner: Optional[AutoTuner] = None,
                 reuse_cache: bool = True, slots: int = 1, kv: Optional[KVQuant] = None):
        """`proposer`: what drafting uses (each slot gets its own `fork()`); `tuner`: kept across turns for
        num_draft_tokens="auto"; reuse_cache=False prefills every turn from scratch (same output); `kv`:
        quantized K/V (--kv-bits ...) for every slot's cache, and so for every turn."""
        self.model, self.tokenizer, self.proposer, self.tuner, self.kv = model, tokenizer, proposer, tuner, kv
        self.prompt_cache = PromptCache(model, enabled=reuse_cache, slots=slots, kv=kv)

    def turn(self, request: Request, *, should_stop: Optional[Callable[[], bool]] = None,
             on_prefill: Optional[Callable[[int, int], None]] = None) -> "Turn":
        """A turn for `request` (its prompt: the whole conversation so far). Its K/V settings are the
        conversations' (the slots' caches have them); request.draft False decodes plainly."""
        return Turn(self, request.replace(kv=self.kv), dict(should_stop=should_stop, on_prefill=on_prefill))

    def start(self, request: Request, *, should_stop: Optional[Callable[[], bool]] = None,
              on_prefill: Optional[Callable[[int, int], None]] = None) -> "Started":
        """The slot and the Engine for `request`, for a caller that drives the engine itself (a turn, the
        batch scheduler). `finish` must follow, however the request ends."""
        request = request.replace(kv=self.kv)
        slot, reused = self.prompt_cache.prepare(list(request.prompt))
        proposer = None
        if request.draft and self.proposer is not None:
            if slot.proposer is None:
                slot.proposer = self.proposer.fork()
            proposer = slot.proposer
        try:
            engine = make_engine(self.model, request, eos_ids=self.tokenizer.eos_token_ids, proposer=proposer,
                                 tuner=self.tuner, prompt_cache=slot.cache, should_stop=should_stop,
                                 on_prefill=on_prefill)
        except BaseException:
            self.prompt_cache.settle(slot, list(request.prompt), torn=True)  # what it holds is unknown
            raise
        return Started(engine, slot, reused)

    def finish(self, started: "Started", received: List[int], torn: bool) -> None:
        """Record what the slot holds after the request: its prompt plus the tokens the caller received
        (anything the engine computed past them is rolled back); torn (an exception escaped the engine
        mid-step, its caches may be half-updated): the slot is dropped."""
        self.prompt_cache.settle(started.slot, list(started.engine.request.prompt) + list(received), torn)


@dataclass
class Started:
    """A request that has its slot and Engine (Conversations.start): `reused` prompt tokens came from the
    slot's K/V."""

    engine: Engine
    slot: Slot
    reused: int


class Turn:
    """One request; iterate it once. After iteration: `reused` (prompt tokens whose K/V came from the
    slot), `received` (token ids handed out), `stats`, `finish_reason` (None when stopped early)."""

    def __init__(self, owner: Conversations, request: Request, hooks: dict):
        self.owner, self.request, self.hooks = owner, request, hooks
        self.reused = 0
        self.received: List[int] = []
        self.stats: Optional[GenerationStats] = None
        self.finish_reason: Optional[str] = None
        self._iter = self._run()

    def __iter__(self) -> Iterator[GenerationResponse]:
        return self._iter

    def __next__(self) -> GenerationResponse:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()

    def _run(self) -> Iterator[GenerationResponse]:
        owner = self.owner
        started = owner.start(self.request, **self.hooks)
        self.reused = started.reused
        torn, gen = False, respond(started.engine, owner.model, owner.tokenizer)
        try:
            while True:
                try:
                    r = next(gen)
                except StopIteration:
                    break
                except BaseException:
                    torn = True  # it escaped the engine mid-step: the caches may be half-updated
                    raise
                self.received.append(r.token)
                self.stats, self.finish_reason = r.stats, r.finish_reason
                yield r
        finally:
            gen.close()  # stops the engine at once (a closed turn, a stop string, a cancel)
            owner.finish(started, self.received, torn)
