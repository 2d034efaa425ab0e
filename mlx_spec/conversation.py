"""A request against kept K/V: the one conversation turn that both the chat and the server run.

`Conversations` holds the prompt cache (its slots) and the loaded proposer; `turn(ids, ...)` returns a
`Turn`, an iterator of GenerationResponses. When iteration starts, the turn takes the slot holding the
longest prefix of `ids` (rolling the rest back), gives the slot its own proposer on first use (a draft
model's cache then follows its conversation), and streams; when it ends, however it ends (finished,
closed early, stopped during the prefill, or an exception), the slot is settled: it holds exactly the
prompt plus what the caller received, or is dropped when an exception left its caches half-updated.

Knows the API's stream_generate and the prompt cache; nothing of chat templates, terminals or HTTP.
"""

from typing import Callable, Iterator, List, Optional, Union

from .api import GenerationResponse, stream_generate
from .prompt_cache import PromptCache
from .proposers.base import Proposer
from .sampling import SamplingParams
from .stats import GenerationStats
from .tuning.tuner import AutoTuner


class Conversations:
    def __init__(self, model, tokenizer, proposer: Optional[Proposer] = None, *, tuner: Optional[AutoTuner] = None,
                 reuse_cache: bool = True, slots: int = 1):
        """`proposer`: what drafting uses (each slot gets its own `fork()`); `tuner`: kept across turns for
        num_draft_tokens="auto"; reuse_cache=False prefills every turn from scratch (same output)."""
        self.model, self.tokenizer, self.proposer, self.tuner = model, tokenizer, proposer, tuner
        self.prompt_cache = PromptCache(model, enabled=reuse_cache, slots=slots)

    def turn(self, ids: List[int], *, sampling: SamplingParams, max_tokens: int, seed: Optional[int] = None,
             num_draft_tokens: Union[int, str] = 3, drafting: bool = True,
             should_stop: Optional[Callable[[], bool]] = None, strict: bool = False, logprobs: int = 0) -> "Turn":
        return Turn(self, ids, sampling=sampling, max_tokens=max_tokens, seed=seed, num_draft_tokens=num_draft_tokens,
                    drafting=drafting and self.proposer is not None, should_stop=should_stop, strict=strict,
                    logprobs=logprobs)


class Turn:
    """One request; iterate it once. After iteration: `reused` (prompt tokens whose K/V came from the
    slot), `received` (token ids handed out), `stats`, `finish_reason` (None when stopped early)."""

    def __init__(self, owner: Conversations, ids: List[int], *, sampling, max_tokens, seed, num_draft_tokens,
                 drafting, should_stop, strict, logprobs=0):
        self.owner, self.ids = owner, list(ids)
        self.settings = dict(sampling=sampling, max_tokens=max_tokens, seed=seed, num_draft_tokens=num_draft_tokens,
                             should_stop=should_stop, strict=strict, logprobs=logprobs)
        self.drafting = drafting
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
            gen = stream_generate(owner.model, owner.tokenizer, self.ids, proposer=proposer, prompt_cache=slot.cache,
                                  tuner=owner.tuner, **self.settings)
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
