"""Generation: one worker thread owns the model and runs queued requests one at a time, in arrival order.

Each request is a conversation turn (conversation.py) against the kept prompt cache, so a follow-up (the
same conversation, resent) prefills only what is new. The worker puts events on the job's queue for the
HTTP handler: ("start", prompt tokens), ("text", s)..., then ("done", JobResult) or ("error", RequestError).
When the request asked for log-probabilities, ("logprobs", [TokenLogprob]) comes right before the ("text",
s) event (possibly "") that releases those tokens' text.

A prompt is rendered (chat template) and counted here, before anything is generated; a text that cannot
fit the context whatever its tokens (longer than context x the longest token) is refused without
tokenizing it, so a huge prompt costs other clients milliseconds, not the tokenizer's seconds.
"""

import functools
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..api import encode_prompt
from ..cache import KVQuant
from ..conversation import Conversations
from ..loading import materialize
from ..models.base import vocab_size
from ..proposers.base import Proposer
from ..tuning.tuner import AutoTuner
from .requests import GenerationRequest, RequestError


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that may still become one."""

    def __init__(self, stops: List[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> Tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


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


LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for log 0 (JSON has no -Infinity)
NORMALIZATION_SLACK = 4  # input characters per token character at most (a tokenizer may compose characters)


@dataclass
class JobResult:
    finish_reason: str  # "stop", "length", or "cancelled" (the client went away)
    prompt_tokens: int
    completion_tokens: int
    speculative: dict
    cached_tokens: int = 0  # prompt tokens whose K/V came from the previous request (not prefilled again)


class Worker(threading.Thread):
    """Runs queued jobs one after another on the one model; never dies on a failing job."""

    def __init__(self, model, tokenizer, proposer: Optional[Proposer] = None, *, max_context: Optional[int],
                 max_tokens: int, log=None, prompt_cache: bool = True, prompt_cache_slots: int = 1,
                 tuner: Optional[AutoTuner] = None, strict: bool = False, kv: Optional[KVQuant] = None,
                 session: Optional[tuple] = None):
        super().__init__(name="mlx_spec-generation", daemon=True)
        self.model, self.tokenizer = model, tokenizer
        self.max_context, self.max_tokens = max_context, max_tokens
        self.strict = strict
        self.log = log
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.current: Optional[Job] = None
        self.finished: deque = deque(maxlen=256)  # recent JobResults, newest last (tests and logs read it)
        self.vocab_size = vocab_size(model)
        self.longest_token = _longest_token(tokenizer)
        self._token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text_uncached)
        materialize(model, proposer.weights if proposer is not None else None)
        # A client resends the whole conversation with each request: keep the last ones' K/V (the base's,
        # and a draft model's, per slot) and prefill only what is new. Exact: see PromptCache.
        self.conversations = Conversations(model, tokenizer, proposer, tuner=tuner or AutoTuner(log=log and
                                           (lambda line: _log(log, line))), reuse_cache=prompt_cache,
                                           slots=prompt_cache_slots, kv=kv)
        if session is not None:  # a saved prompt (--prompt-cache-file): requests that start with it continue it
            self.conversations.prompt_cache.pin(*session)

    @property
    def proposer(self) -> Optional[str]:
        """The proposer's name, None without one."""
        p = self.conversations.proposer
        return p.name if p is not None else None

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """Cancel the running and queued jobs and end the thread (join it: see Server.close)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
        if self.current is not None:
            self.current.cancelled.set()
        self.jobs.put(None)

    def run(self) -> None:
        while True:
            job = self.current = self.jobs.get()
            if job is None:
                _release_thread_streams()
                return
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except RequestError as e:
                job.events.put(("error", e))
            except Exception as e:  # a bug: report it to this client (without internals), keep serving the others
                if self.log:
                    import traceback

                    traceback.print_exc(file=self.log)
                job.events.put(("error", RequestError(f"generation failed ({type(e).__name__}); the server's log has "
                                                      "the details", status=500)))
            finally:
                _synchronize()

    def _tokens(self, req: GenerationRequest) -> List[int]:
        tok = self.tokenizer
        if req.kind == "chat":
            if not getattr(tok, "has_chat_template", False):
                raise RequestError("this model has no chat template; use /v1/completions with a raw prompt")
            try:  # the model's own template; the kwargs are the allowed switches only (requests.TEMPLATE_KWARGS)
                text = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False,
                                               **req.chat_template_kwargs)
            except Exception as e:  # jinja raises TemplateError (and anything a template raises itself)
                raise RequestError(f"the chat template cannot render these messages: {e}", param="messages") from e
            return self._encode(text, "messages")
        if isinstance(req.prompt, str):
            return self._encode(req.prompt, "prompt")
        if self.vocab_size and not all(0 <= t < self.vocab_size for t in req.prompt):
            raise RequestError(f"'prompt' token ids must be in [0, {self.vocab_size})", param="prompt")
        return list(req.prompt)

    def _encode(self, text: str, param: str) -> List[int]:
        """Token ids of `text`; refused at once, untokenized, when no tokenization of it fits the context."""
        if self.max_context and self.longest_token:
            least = len(text) // (self.longest_token * NORMALIZATION_SLACK)  # no tokenization has fewer tokens
            if least >= self.max_context:
                raise RequestError(f"the prompt is {len(text)} characters, at least {least} tokens: more than this "
                                   f"server's context of {self.max_context} tokens (--max-context); shorten it",
                                   code="context_length_exceeded", param=param)
        return encode_prompt(self.tokenizer, text)

    def _token_text_uncached(self, token: int) -> Tuple[str, List[int]]:
        """A token's text and its bytes (a byte-fallback token "<0xE2>" is the one byte, not U+FFFD)."""
        text = self.tokenizer.decode([token])
        piece = self.tokenizer.convert_ids_to_tokens(token) if hasattr(self.tokenizer, "convert_ids_to_tokens") \
            else None
        if isinstance(piece, str) and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return text, [int(piece[3:5], 16)]
        return text, list(text.encode("utf-8", "replace"))

    def _logprob(self, token: int, logprob: float, top, n: int) -> TokenLogprob:
        def floor(x):
            return x if x >= LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf (a masked token) and NaN alike

        text, raw = self._token_text(token)
        return TokenLogprob(text, raw, floor(logprob), [(*self._token_text(t), floor(v)) for t, v in top[:n]])

    def _max_tokens(self, req: GenerationRequest, n_prompt: int) -> int:
        if not self.max_context:
            return req.max_tokens or self.max_tokens
        room = self.max_context - n_prompt
        if room <= 0 or req.max_tokens is not None and req.max_tokens > room:
            asked = f" + {req.max_tokens} max_tokens" if req.max_tokens else ""
            raise RequestError(f"the prompt is {n_prompt} tokens{asked}, more than this server's context of "
                               f"{self.max_context} tokens (--max-context); shorten the prompt or lower max_tokens",
                               code="context_length_exceeded", param="messages" if req.kind == "chat" else "prompt")
        return min(req.max_tokens or self.max_tokens, room)

    def _run(self, job: Job) -> None:
        req = job.request
        start = time.perf_counter()
        prompt = self._tokens(req)
        max_tokens = self._max_tokens(req, len(prompt))
        drafting = req.draft and self.conversations.proposer is not None  # else plain, reported as proposer None
        job.events.put(("start", len(prompt)))
        stops = StopMatcher(req.stop)
        want = req.logprobs  # None, or how many alternatives per token
        turn = self.conversations.turn(prompt, sampling=req.sampling, max_tokens=max_tokens, seed=req.seed,
                                       num_draft_tokens=req.num_draft_tokens, tree_nodes=req.tree_nodes,
                                       drafting=drafting,
                                       should_stop=job.cancelled.is_set, strict=self.strict,
                                       logprobs=0 if want is None else max(want, 1))
        finish, n, stats, logprobs = "length", 0, None, []
        try:
            for r in turn:
                n, stats = n + 1, r.stats
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if want is not None and r.finish_reason != "stop":  # EOS is not text
                    logprobs.append(self._logprob(r.token, r.logprob, r.top_logprobs, want))
                text, hit = stops.feed(r.text)
                if hit:
                    finish = "stop"
                elif r.finish_reason:
                    finish = r.finish_reason
                    text += stops.flush()
                if logprobs and (text or hit or r.finish_reason):
                    job.events.put(("logprobs", logprobs))
                    logprobs = []
                    job.events.put(("text", text))
                elif text:
                    job.events.put(("text", text))
                if hit or r.finish_reason:
                    break
        finally:
            turn.close()  # stops the engine at once (cancel, stop string) and settles the slot
        if n == 0 and job.cancelled.is_set():  # the client went away during the prefill, which stopped there
            finish = "cancelled"
        spec = {"proposer": self.proposer if drafting else None,
                "num_draft_tokens": req.num_draft_tokens if drafting else 0,
                "tree_nodes": req.tree_nodes if drafting else 0}
        if stats is not None:
            d = stats.as_dict()
            spec.update({k: d[k] for k in ("rounds", "tree_rounds", "drafted", "accepted", "tau", "acceptance_rate",
                                           "acceptance_by_position", "plain_steps")})
        result = JobResult(finish, len(prompt), n, spec, turn.reused)
        self.finished.append(result)
        job.events.put(("done", result))
        if self.log and stats is not None:
            tau = f", τ {stats.tau:.2f}, acceptance {stats.acceptance_rate:.0%}" if stats.rounds else ""
            _log(self.log, f"{req.kind}: {len(prompt)} prompt ({turn.reused} cached) + {n} tokens, "
                 f"{stats.generation_tps:.1f} tok/s{tau}, {finish}, {time.perf_counter() - start:.2f} s")


def _longest_token(tokenizer) -> Optional[int]:
    """Characters in the tokenizer's longest token (a token covers at most that much text, up to
    NORMALIZATION_SLACK), or None when the vocabulary cannot be read."""
    try:
        return max(map(len, tokenizer.get_vocab()), default=None) or None
    except Exception:  # not every tokenizer has get_vocab; then prompts are only counted
        return None


def _log(stream, line: str) -> None:
    stream.write(line + "\n")  # one write per line, so lines from different threads do not interleave
    stream.flush()


def _synchronize() -> None:
    """Finish this thread's queued MLX work (an interrupted generation leaves a step in flight)."""
    import mlx.core as mx

    mx.synchronize()


def _release_thread_streams() -> None:
    """Destroy this thread's MLX streams before it ends; left to thread exit, they can abort the process
    at interpreter shutdown (seen with mlx 0.32 on CPU, about one exit in four)."""
    import mlx.core as mx

    mx.synchronize()
    if hasattr(mx, "clear_streams"):
        mx.clear_streams()
