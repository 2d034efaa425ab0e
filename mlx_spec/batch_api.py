"""`batch_generate`: several prompts decoded together, each speculating with its own drafts (mlx-lm's
`batch_generate`, with speculation on).

Every prompt becomes a Request and an Engine (api.make_engine), the batch scheduler decodes them in
continuous batches (`decode_concurrency` at a time; the rest join as others finish), and each text is its
own detokenized stream, cut at its stop strings. Each text is what `generate` gives for that prompt alone:
greedy token for token, seeded sampling in text.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from .api import Detokenized, Prompt, make_engine, make_request
from .batch.scheduler import DEFAULT_DECODE_CONCURRENCY, DEFAULT_PROMPT_CONCURRENCY, Scheduler
from .memory import resident
from .proposers import make_proposer
from .proposers.base import Proposer
from .request import Request
from .stats import GenerationStats
from .stops import StopMatcher
from .tuning.batch_policy import BatchDraftPolicy
from .tuning.tuner import AutoTuner


@dataclass
class BatchResponse:
    """Per prompt, in the order given: its text, token ids, finish reason ("stop", "length"; "error" with
    the exception in `errors`) and statistics (tau, acceptance, tok/s as that request saw them)."""

    texts: List[str]
    token_ids: List[List[int]]
    finish_reasons: List[Optional[str]]
    stats: List[GenerationStats]
    errors: List[Optional[BaseException]] = field(default_factory=list)


class _Output:
    """One prompt's text as its tokens arrive: detokenized, cut at its stop strings (then its row stops)."""

    def __init__(self, tokenizer, engine, ticket=None):
        self.engine, self.ticket = engine, ticket
        self.text = Detokenized(tokenizer, engine.stats)
        self.stops = StopMatcher(list(engine.request.stop))
        self.parts: List[str] = []
        self.tokens: List[int] = []
        self.finish: Optional[str] = None
        self.error: Optional[BaseException] = None

    def deliver(self, events, done) -> None:
        for ev in events:
            if self.finish == "stop" and self.stops.stops:
                break  # past a stop string: the row is leaving
            self.tokens.append(ev.token)
            out, hit = self.stops.feed(self.text.response(ev).text)
            self.parts.append(out)
            if hit:
                self.finish = "stop"
                self.ticket.cancel()
        if done is not None:
            self.parts.append(self.stops.flush() if self.finish != "stop" else "")
            if self.finish is None:
                self.finish = done.reason
            self.error = done.error


def batch_generate(model, tokenizer, prompts: Sequence[Union[Prompt, Request]], *,
                   proposer: Optional[Proposer] = None, drafter=None, draft_model=None, ngram: Optional[int] = None,
                   tuner: Optional[AutoTuner] = None, decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY,
                   prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY,
                   max_tokens: Union[int, Sequence[int]] = 256, **settings) -> BatchResponse:
    """Generate for every prompt (text, token ids, or a Request each) at once; returns a BatchResponse.

    The proposer (`drafter`, `draft_model`, `ngram` or `proposer`, as in `stream_generate`) is shared: every
    request gets its own fork of it. `max_tokens` may be one number or one per prompt (mlx-lm's form);
    `settings` are stream_generate's keywords (sampling, seed, num_draft_tokens, stop, logprobs, kv_bits, ...)
    for every prompt given as text or ids. `num_draft_tokens="auto"` chooses each round's k for the whole
    batch from this machine's costs at the batch's width (tuning/batch_policy.py), with one `tuner`."""
    if isinstance(prompts, (str, Request)) or (isinstance(prompts, list) and prompts and
                                                isinstance(prompts[0], int)):
        raise TypeError("batch_generate takes a list of prompts (texts, token-id lists or Requests); for one "
                        "prompt, pass [prompt] or use generate")
    proposer = make_proposer(model, proposer=proposer, drafter=drafter, draft_model=draft_model, ngram=ngram)
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"max_tokens has {len(limits)} entries for {len(prompts)} prompts")
    if settings.get("num_draft_tokens") == "auto" and tuner is None:
        tuner = AutoTuner()  # one for the batch: what a request learns, the next one starts from
    requests = [p if isinstance(p, Request) else make_request(tokenizer, p, max_tokens=n, **settings)
                for p, n in zip(prompts, limits)]
    auto = any(r.num_draft_tokens == "auto" for r in requests) and proposer is not None
    scheduler = Scheduler(model, decode_concurrency=decode_concurrency, prompt_concurrency=prompt_concurrency,
                          policy=BatchDraftPolicy(model, tuner) if auto else None)
    outputs = []
    for request in requests:
        engine = make_engine(model, request, eos_ids=tokenizer.eos_token_ids, tuner=tuner,
                             proposer=proposer.fork() if proposer is not None else None)
        out = _Output(tokenizer, engine)
        out.ticket = scheduler.submit(engine, out.deliver)
        outputs.append(out)
    with resident(model, proposer.weights if proposer is not None else None):
        scheduler.drain()
    return BatchResponse(["".join(o.parts) for o in outputs], [o.tokens for o in outputs],
                         [o.finish for o in outputs], [o.engine.stats for o in outputs], [o.error for o in outputs])
