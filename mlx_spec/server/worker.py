"""Generation: one worker thread owns the model and decodes every running request together, in continuous
batches (batch/scheduler.py): requests join between rounds, prefill in chunks interleaved with the others'
rounds, and leave when they finish, hit a stop string, or their client goes away.

Each request is a conversation turn against the kept prompt cache (conversation.py: `start`/`finish`), so a
follow-up (the same conversation, resent) prefills only what is new; concurrent requests never share a
slot. A request's output is what it would be alone (the batch is exact: batch/engine.py). The job's events
for its HTTP handler come from its JobStream (stream.py).

Up to `decode_concurrency` requests decode at once (`--decode-concurrency`, mlx-lm's flag; 1 runs them one
at a time), `prompt_concurrency` prefill at once, and no request starts while the K/V of those started, with
it, would not fit the memory left beside the weights (it waits in the queue instead).
"""

import queue
import threading
from collections import deque
from typing import Dict, Optional

from ..batch.scheduler import DEFAULT_DECODE_CONCURRENCY, DEFAULT_PROMPT_CONCURRENCY, Scheduler
from ..cache import KVQuant
from ..conversation import Conversations
from ..distributed.serving import Lockstep, Plan, agreed, decode_start, encode_start
from ..loading import materialize
from ..memory import resident
from ..proposers.base import Proposer
from ..errors import MlxSpecError
from ..request import Request, RequestSettingError
from ..tuning.batch_policy import BatchDraftPolicy
from ..tuning.tuner import AutoTuner
from .budget import memory_budget
from .prompts import PromptReader
from .requests import GenerationRequest, RequestError
from .stream import Job, JobResult, JobStream, TokenLogprob, TokenTexts  # noqa: F401 (the server's names)


class Worker(threading.Thread):
    """Runs the scheduler on the one model; never dies on a failing job."""

    def __init__(self, model, tokenizer, proposer: Optional[Proposer] = None, *, max_context: Optional[int],
                 max_tokens: int, log=None, prompt_cache: bool = True, prompt_cache_slots: int = 1,
                 tuner: Optional[AutoTuner] = None, strict: bool = False, kv: Optional[KVQuant] = None,
                 session: Optional[tuple] = None, decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY,
                 prompt_concurrency: int = DEFAULT_PROMPT_CONCURRENCY, lockstep: Optional[Lockstep] = None):
        """`lockstep` (distributed/serving.py): the model is split over ranks; rank 0's worker runs as a
        thread beside the HTTP server and tells the others each step what to run (`follow` on the others)."""
        super().__init__(name="mlx_spec-generation", daemon=True)
        self.lockstep = lockstep
        self.model, self.tokenizer = model, tokenizer
        self.strict = strict
        self.log = log
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.finished: deque = deque(maxlen=256)  # recent JobResults, newest last (tests and logs read it)
        self.prompts = PromptReader(model, tokenizer, max_context, max_tokens)
        self.texts = TokenTexts(tokenizer)
        materialize(model, proposer.weights if proposer is not None else None)
        self.weights = proposer.weights if proposer is not None else None
        # A client resends the whole conversation with each request: keep the last ones' K/V (the base's,
        # and a draft model's, per slot) and prefill only what is new. Exact: see PromptCache.
        self.conversations = Conversations(model, tokenizer, proposer, tuner=tuner or AutoTuner(log=log and
                                           (lambda line: _log(log, line))), reuse_cache=prompt_cache,
                                           slots=prompt_cache_slots, kv=kv)
        if session is not None:  # a saved prompt (--prompt-cache-file): requests that start with it continue it
            self.conversations.prompt_cache.pin(*session)
        # split over ranks, each rank holds its own share of the K/V: admission by memory would differ by rank
        budget, row_bytes = memory_budget(model, self.weights, kv) if lockstep is None else (None, None)
        # auto rows: each round's k chosen for the whole batch at its width (none across ranks: auto is a fixed k)
        policy = BatchDraftPolicy(model, self.conversations.tuner) if lockstep is None else None
        self.scheduler = Scheduler(model, decode_concurrency=decode_concurrency,
                                   prompt_concurrency=prompt_concurrency, memory_budget=budget,
                                   row_bytes=row_bytes, policy=policy)
        self.streams: Dict[int, JobStream] = {}  # id(job) -> its stream, while it runs
        self.numbered: Dict[int, JobStream] = {}  # the n-th request started -> its stream, while it runs
        self.started = 0
        self._plan = Plan()  # rank 0: what the other ranks must do before the next step

    @property
    def proposer(self) -> Optional[str]:
        """The proposer's name, None without one."""
        p = self.conversations.proposer
        return p.name if p is not None else None

    @property
    def running(self) -> int:
        """Requests decoding now (rows of the batch)."""
        return self.scheduler.running

    @property
    def waiting(self) -> int:
        """Requests queued or prefilling."""
        return len(self.scheduler.waiting) + self.jobs.qsize()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """Cancel the running and queued jobs and end the thread (join it: see Server.close)."""
        self.jobs.put(None)

    def run_now(self, job: Job) -> None:
        """Run one job to its end on the calling thread (a worker whose thread was not started: tests, tools)."""
        self._start(job)
        while not self.scheduler.idle:
            self._cancel_gone()
            self.scheduler.step()

    # -- the loop
    def run(self) -> None:
        with resident(self.model, self.weights):
            while True:
                alive = self._take_jobs()
                self._cancel_gone()
                if self.lockstep is not None:  # the other ranks do the same before this step
                    self.lockstep.exchange(self._take_plan(stop=not alive))
                if not alive:
                    break
                self.scheduler.step()
            self._cancel_all()
        _release_thread_streams()

    def follow(self) -> None:
        """A rank other than 0 (on the calling thread): start, cancel and step as rank 0's plans say, until
        rank 0 stops."""
        with resident(self.model, self.weights):
            while True:
                plan = self.lockstep.exchange()
                for entry in plan.starts:
                    self._start_following(entry)
                for number in plan.cancels:
                    if number in self.numbered:
                        self.numbered[number].ticket.cancel()
                if plan.stop:
                    break
                self.scheduler.step()
            self._cancel_all()

    def _take_plan(self, stop: bool) -> Plan:
        plan, self._plan = self._plan, Plan()
        plan.cancels = [n for n, stream in self.numbered.items() if stream.ticket.cancelled]
        plan.stop = stop
        return plan

    def _take_jobs(self) -> bool:
        """Start what is queued (waiting for a job when nothing runs); False once asked to stop."""
        block = self.scheduler.idle
        while True:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            block = False
            if not job.cancelled.is_set():
                self._start(job)

    def _start(self, job: Job) -> None:
        req = job.request
        try:
            prompt = self.prompts.tokens(req)
            max_tokens = self.prompts.max_new_tokens(req, len(prompt))
            drafting = req.draft and self.conversations.proposer is not None  # else plain, reported as None
            request = Request(prompt, max_tokens=max_tokens, sampling=req.sampling, seed=req.seed, draft=drafting,
                              num_draft_tokens=req.num_draft_tokens, tree_nodes=req.tree_nodes if drafting else 0,
                              strict=self.strict,
                              logprobs=0 if req.logprobs is None else max(req.logprobs, 1))
            if self.lockstep is not None:  # every rank runs it alike: a cancel comes through the plan only
                request = agreed(request)
            started = self.conversations.start(request, should_stop=None if self.lockstep else job.cancelled.is_set)
        except RequestError as e:
            job.events.put(("error", e))
            return
        except RequestSettingError as e:  # a combination only the whole Request refuses (trees with --strict)
            job.events.put(("error", RequestError(str(e), param=e.field)))
            return
        except MlxSpecError as e:  # what this request asks of the loaded models (a tree from a draft model)
            job.events.put(("error", RequestError(str(e))))
            return
        except Exception as e:  # noqa: BLE001 - a bug: this client gets a 500, the others keep being served
            self._failed(job, e)
            return
        job.events.put(("start", len(prompt)))
        if self.lockstep is not None:
            self._plan.starts.append(encode_start(self.started, request, req.kind, req.stop, req.logprobs))
        self._submit(job, started)

    def _submit(self, job: Job, started) -> None:
        stream = JobStream(job, started, self.tokenizer, self.texts, proposer=self.proposer, on_end=self._ended)
        stream.ticket = self.scheduler.submit(started.engine, stream.deliver)
        stream.number, self.started = self.started, self.started + 1
        self.streams[id(job)] = self.numbered[stream.number] = stream

    def _start_following(self, entry: dict) -> None:
        """A request rank 0 started, started here alike (its job's events go nowhere)."""
        job = Job(GenerationRequest(kind=entry["kind"], stop=entry["stop"], logprobs=entry["want"]))
        self._submit(job, self.conversations.start(decode_start(entry)))

    def _cancel_gone(self) -> None:
        for stream in self.streams.values():
            if stream.job.cancelled.is_set():
                stream.ticket.cancel()

    def _cancel_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.job.cancelled.set()
            stream.ticket.cancel()
        self.scheduler.step()  # the cancelled rows leave, their slots settled
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancelled.set()

    def _ended(self, stream: JobStream, result: Optional[JobResult], error: Optional[BaseException]) -> None:
        """A stream's request ended: settle its slot, then tell its client."""
        self.streams.pop(id(stream.job), None)
        self.numbered.pop(stream.number, None)
        self.conversations.finish(stream.started, stream.received, torn=error is not None)
        if error is not None:
            self._failed(stream.job, error)
            return
        if not stream.received and stream.job.cancelled.is_set():
            result.finish_reason = "cancelled"  # the client went away during the prefill, which stopped there
        self.finished.append(result)
        stream.job.events.put(("done", result))
        if self.log:
            self._log_result(stream, result)

    def _failed(self, job: Job, error: BaseException) -> None:
        if isinstance(error, RequestError):
            job.events.put(("error", error))
            return
        if self.log:
            import traceback

            traceback.print_exception(error, file=self.log)
        job.events.put(("error", RequestError(f"generation failed ({type(error).__name__}); the server's log has "
                                              "the details", status=500)))

    def _log_result(self, stream: JobStream, result: JobResult) -> None:
        import time

        stats = stream.engine.stats
        tau = f", τ {stats.tau:.2f}, acceptance {stats.acceptance_rate:.0%}" if stats.rounds else ""
        _log(self.log, f"{stream.job.request.kind}: {result.prompt_tokens} prompt ({result.cached_tokens} cached) "
             f"+ {result.completion_tokens} tokens, {stats.generation_tps:.1f} tok/s{tau}, {result.finish_reason}, "
             f"{time.perf_counter() - stream.start:.2f} s; {self.running} running, {self.waiting} waiting")


def _log(stream, line: str) -> None:
    stream.write(line + "\n")  # one write per line, so lines from different threads do not interleave
    stream.flush()


def _release_thread_streams() -> None:
    """Destroy this thread's MLX streams before it ends; left to thread exit, they can abort the process
    at interpreter shutdown (seen with mlx 0.32 on CPU, about one exit in four)."""
    import mlx.core as mx

    mx.synchronize()
    if hasattr(mx, "clear_streams"):
        mx.clear_streams()
