"""A request against kept K/V: the one conversation turn that both the chat and the server run.

`Conversations` holds the prompt cache (its slots) and the loaded proposer; `turn(ids, ...)` returns a
`Turn`, an iterator of GenerationResponses. When iteration starts, the turn takes the slot holding the
longest prefix of `ids` (rolling the rest back), gives the slot its own proposer on first use (a draft
model's cache then follows its conversation), and streams; when it ends, however it ends (finished,
closed early, stopped during the prefill, or an exception), the slot is settled: it holds exactly the
prompt plus what the caller received, or is dropped when an exception left its caches half-updated.

Knows the API's stream_generate and the prompt cache; nothing of chat templates, terminals or HTTP.
"""

from typing import Callable, Iterator, List, Optional

from .api import GenerationResponse, stream_generate
from .cache import KVQuant
from .prompt_cache import PromptCache
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


class Turn:
    """One request; iterate it once. After iteration: `reused` (prompt tokens whose K/V came from the
    slot), `received` (token ids handed out), `stats`, `finish_reason` (None when stopped early)."""

    def __init__(self, owner: Conversations, request: Request, hooks: dict):
        self.owner, self.request, self.hooks = owner, request, hooks
        self.ids = list(request.prompt)
        self.drafting = request.draft and owner.proposer is not None
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
        slot, self.reused = owner.prompt_cache.prepare(self.ids)
        proposer = None
        if self.drafting:
            if slot.proposer is None:
                slot.proposer = owner.proposer.fork()
            proposer = slot.proposer
        torn, gen = True, None  # until the engine is running, an exception leaves the slot unknown
        try:
            gen = stream_generate(owner.model, owner.tokenizer, self.request, proposer=proposer,
                                  prompt_cache=slot.cache, tuner=owner.tuner, **self.hooks)
            torn = False
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
            if gen is not None:
                gen.close()  # stops the engine at once (a closed turn, a stop string, a cancel)
            owner.prompt_cache.settle(slot, self.ids + self.received, torn)
