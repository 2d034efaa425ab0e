"""One job's tokens on their way to its HTTP handler: text by mlx-lm's streaming detokenizer, cut at the
request's stop strings with the log-probabilities that survive the cut (stops.StopCut), then a JobResult.

The batch scheduler calls `deliver(events, done)` as the job's tokens come. Events for the handler's queue:
("text", s)..., then ("done", JobResult) or ("error", RequestError). When the request asked for
log-probabilities, ("logprobs", [TokenLogprob]) comes right before the ("text", s) event (possibly "")
that releases the first character of those tokens' text; tokens a stop string cuts out never come. A stop
string ends generation: the job cancels its row, and tokens the round computed past the stop are dropped.
"""

import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from ..api import Detokenized
from ..batch.scheduler import Done, Ticket
from ..conversation import Started
from ..engine import TokenEvent
from ..stops import StopCut
from .requests import GenerationRequest

LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for log 0 (JSON has no -Infinity)


@dataclass
class Job:
    request: GenerationRequest
    events: "queue.Queue" = field(default_factory=queue.Queue)  # ("start", n) ("text", s) ("done", r) ("error", e)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its top alternatives, as text (OpenAI's logprobs)."""

    token: str
    bytes: List[int]
    logprob: float
    top: List[Tuple[str, List[int], float]]  # (token, bytes, logprob), best first
    offset: int = 0  # where its text starts in the generated text (text_offset)


@dataclass
class JobResult:
    finish_reason: str  # "stop", "length", or "cancelled" (the client went away)
    prompt_tokens: int
    completion_tokens: int
    speculative: dict
    cached_tokens: int = 0  # prompt tokens whose K/V came from the previous request (not prefilled again)


class TokenTexts:
    """A token's text and bytes for log-probabilities, memoized (a byte-fallback token "<0xE2>" is the one
    byte, not U+FFFD)."""

    def __init__(self, tokenizer, size: int = 1 << 16):
        import functools

        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=size)(self._text)

    def _text(self, token: int) -> Tuple[str, List[int]]:
        text = self.tokenizer.decode([token])
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        piece = convert(token) if convert is not None else None
        if isinstance(piece, str) and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return text, [int(piece[3:5], 16)]
        return text, list(text.encode("utf-8", "replace"))

    def logprob(self, token: int, logprob: float, top, n: int, offset: int) -> TokenLogprob:
        def floor(x):
            return x if x >= LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf (a masked token) and NaN alike

        text, raw = self.text(token)
        return TokenLogprob(text, raw, floor(logprob), [(*self.text(t), floor(v)) for t, v in top[:n]], offset)


class JobStream:
    """One job from its first token to its result (see the module docstring)."""

    def __init__(self, job: Job, started: Started, tokenizer, texts: TokenTexts, *, proposer: Optional[str],
                 on_end: Callable[["JobStream", JobResult, Optional[BaseException]], None]):
        self.job, self.started, self.texts, self.on_end = job, started, texts, on_end
        self.engine = started.engine
        self.detok = Detokenized(tokenizer, self.engine.stats)
        self.cut = StopCut(job.request.stop)
        self.want = job.request.logprobs  # None, or how many alternatives per token
        self.proposer = proposer if self.engine.proposer is not None else None
        self.received: List[int] = []
        self.hit = False
        self.ticket: Optional[Ticket] = None
        self.number = 0  # which request the worker started, counting from 0 (the same on every rank)
        self.start = time.perf_counter()

    def deliver(self, events: List[TokenEvent], done: Optional[Done]) -> None:
        for ev in events:
            if self.hit:
                break  # computed in the round that reached the stop string: never the client's
            self._token(ev)
        if done is not None:
            self._end(done)

    def _token(self, ev: TokenEvent) -> None:
        self.received.append(ev.token)
        r = self.detok.response(ev)
        item = None
        if self.want is not None and ev.finish_reason != "stop":  # EOS is not text
            item = self.texts.logprob(ev.token, ev.logprob, ev.top_logprobs, self.want, self.cut.offset)
        text, logprobs, hit = self.cut.feed(r.text, item, last=bool(ev.finish_reason))
        if logprobs:
            self.job.events.put(("logprobs", logprobs))
            self.job.events.put(("text", text))
        elif text:
            self.job.events.put(("text", text))
        if hit:
            self.hit = True
            if self.ticket is not None:
                self.ticket.cancel()  # the row leaves at the scheduler's next step

    def _end(self, done: Done) -> None:
        finish = "stop" if self.hit else done.reason
        if finish == "error":
            self.on_end(self, None, done.error)
            return
        stats = self.engine.stats
        request = self.engine.request
        spec = {"proposer": self.proposer, "num_draft_tokens": request.num_draft_tokens if self.proposer else 0,
                "tree_nodes": request.tree_nodes if self.proposer else 0}
        if stats.generation_tokens:
            d = stats.as_dict()
            spec.update({k: d[k] for k in ("rounds", "tree_rounds", "drafted", "accepted", "tau", "acceptance_rate",
                                           "acceptance_by_position", "plain_steps")})
        result = JobResult(finish, len(self.engine.request.prompt), len(self.received), spec, self.started.reused)
        self.on_end(self, result, None)
