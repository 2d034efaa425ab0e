"""The round loop: prefill -> propose -> verify (one base pass) -> accept -> roll back -> emit.

Knows the base-model interface (models/base.py), its rewindable caches, the Proposer and DraftPolicy
contracts and the request's Sampler. Knows nothing of text: it takes token ids and yields token ids (user
surfaces detokenize), and nothing of which proposer or policy it has.

Exactness: the base verifies [bonus, d1..dk] in one forward pass; greedy keeps the longest agreeing prefix,
the coupled and match modes keep drafts while they equal the base's own sample, rejection sampling keeps
the base's distribution; then the caches give back exactly the k - n rejected positions (checked, see
cache.py). One host synchronisation per round: the `.tolist()` of the round result.

Log-probabilities (`logprobs=N`): per emitted token, its log-probability and the top N under the base's
distribution (logprobs.py), computed in the round's graph and read with the round's one `.tolist()`.

Base features: for a proposer that reads decoder-layer outputs (proposers/base.py, FeatureReader), every
base pass captures them and hands them to the proposer, and every rollback of the base's cache rolls its
context cache back too, so the two always cover the same positions.
"""

import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import DEFAULT_MAX_ROLLBACK, MAX_DRAFT_TOKENS, rollback_all
from .draft_policy import DraftPolicy, FixedK, tree_budget
from .errors import CacheRollbackError
from .logprobs import logprob_rows, unpack_logprobs
from .families import TREE_PASS
from .models.base import as_base, offers
from .parity.strict import padded_forward
from .prefill import PREFILL_STEP, prefill_chunks
from .proposers.base import Draft, Proposer, RoundContext, RoundResult, feature_layers, grows_trees
from .request import DEFAULT_NUM_DRAFT_TOKENS, Request
from .sampling import Sampler
from .stats import GenerationStats
from .trees.grow import MAX_BRANCHING
from .trees.ranks import RankAcceptance
from .trees.round import TreeRound, depth_before_switch

__all__ = ["Engine", "TokenEvent", "DEFAULT_NUM_DRAFT_TOKENS", "MAX_DRAFT_TOKENS"]

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # mlx-lm's (tokens, logits) -> logits


@dataclass
class TokenEvent:
    token: int
    from_draft: bool
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" (max_tokens) on the last token
    logprob: Optional[float] = None  # with Engine(logprobs=N): log p(token) under the base
    top_logprobs: Optional[List[Tuple[int, float]]] = None  # ... and the N most likely (id, log p), best first


def _process(logits: mx.array, history: Optional[mx.array], processors: Sequence[LogitsProcessor]) -> mx.array:
    """Apply mlx-lm style processors to one row of logits (V,); they take and return (1, V)."""
    if not processors:
        return logits
    logits = logits[None]
    for p in processors:
        logits = p(history, logits)
    return logits[0]


def _pad_rows(rows: mx.array, n: int) -> mx.array:
    """(R, V) -> (n, V) with copies of the last row."""
    return rows if rows.shape[0] >= n else mx.concatenate([rows, mx.repeat(rows[-1:], n - rows.shape[0], axis=0)])


class _Stopped(Exception):
    """`should_stop` said so during the prefill."""


class Engine:
    """One request's decoding state; `run()` yields TokenEvents. Create one per request."""

    def __init__(self, model, request: Request, *, proposer: Optional[Proposer] = None,
                 policy: Optional[DraftPolicy] = None, eos_ids: Sequence[int] = (), cache: Optional[list] = None,
                 prefill_step: int = PREFILL_STEP, should_stop: Optional[Callable[[], bool]] = None,
                 strict_rows: Optional[int] = None, on_prefill: Optional[Callable[[int, int], None]] = None):
        """`request` (request.py): the prompt, limits, sampling, seed, log-probabilities and K/V settings.
        `proposer` None decodes plainly; `policy` (default FixedK(request.num_draft_tokens), or
        DEFAULT_NUM_DRAFT_TOKENS for "auto") says how many drafts each round asks for.
        `cache`, when given, must hold the K/V of a prefix of the prompt (a chat's earlier turns); only the
        rest is prefilled. After `run()` it holds exactly the history minus its last token.
        `should_stop` is asked before each prefill chunk: True ends the request with no tokens (a client
        that went away, a Ctrl-C); the cache then holds the prompt's prefix prefilled so far.
        `strict_rows` (strict mode on a device whose kernels depend on the row count; api.py decides): every
        decode pass, plain steps and verifies alike, and the sampling over its rows, runs at this many rows,
        so a row's arithmetic never depends on how many drafts were verified (parity/strict.py).
        `on_prefill(done, total)`: called after each prefill chunk (progress for long prompts)."""
        request = request.validate()
        if strict_rows is not None and strict_rows < 1:
            raise ValueError(f"strict_rows must be >= 1, got {strict_rows}")
        self.request = request
        self.base = as_base(model)
        self.proposer = proposer
        k = request.num_draft_tokens
        self.policy = policy if policy is not None else FixedK(k if isinstance(k, int) else DEFAULT_NUM_DRAFT_TOKENS)
        self.sampler = Sampler(request.sampling, request.seed)
        self.max_tokens, self.eos_ids = request.max_tokens, set(eos_ids)
        self.processors = list(request.logits_processors)
        self.prefill_step = prefill_step
        self.should_stop = should_stop
        self.strict_rows = strict_rows
        self.logprobs = request.logprobs
        self.on_prefill = on_prefill
        self.kv = request.kv
        self.kv_flags = self.kv.as_dict() if self.kv is not None else {}
        self.cache = cache if cache is not None else self.base.make_cache(DEFAULT_MAX_ROLLBACK, **self.kv_flags)
        self.reads = feature_layers(proposer) if proposer is not None else ()  # base layers the proposer reads
        # whether a round may verify a tree when the policy asks for one (else it drafts a chain)
        self.trees = grows_trees(proposer) and offers(self.base, TREE_PASS) and not self.processors \
            and not strict_rows
        self.tree_ranks = RankAcceptance()  # how often a node's r-th child is kept, from this request's trees
        self.history = list(request.prompt)
        self.stats = GenerationStats(prompt_tokens=len(self.history))
        self.emitted = 0

    def _sample(self, logits: mx.array, history: Optional[mx.array], position: int) -> mx.array:
        """The base's token at `position` from its logits (V,) (the plain path, also the first token): (1,)
        int32, followed by its packed log-probabilities when asked (one array: one host read)."""
        logits = _process(logits, history, self.processors)
        if self.strict_rows:  # the same row count as a verify's sampling
            token = self.sampler.sample(_pad_rows(logits[None], self.strict_rows), [position] * self.strict_rows)[:1]
        else:
            token = self.sampler.sample(logits[None], [position])
        if self.logprobs:
            token = mx.concatenate([token, logprob_rows(logits[None], token, self.logprobs)[0]])
        return token

    def _decode_forward(self, tokens: mx.array):
        """A decode-phase base pass (a plain step or a verify): (logits (1, L, V), hidden or None)."""
        if self.strict_rows and tokens.shape[1] > self.strict_rows:
            raise ValueError(f"strict mode pads to {self.strict_rows} rows; a round of {tokens.shape[1] - 1} "
                             f"drafts does not fit (at most {self.strict_rows - 1})")
        return self._forward(tokens, padded=bool(self.strict_rows))

    def _forward(self, tokens: mx.array, padded: bool = False):
        """A base pass over tokens (1, L): (logits, hidden or None). A proposer that reads base features
        gets this pass's rows of them, so its context grows with the base's cache."""
        if self.reads:
            forward = lambda t, c: self.base.forward_layers(t, c, self.reads)  # noqa: E731
        else:
            forward = self.base.forward
        out = padded_forward(forward, tokens, self.cache, self.strict_rows) if padded else forward(tokens, self.cache)
        if self.reads:
            self.proposer.extend(out[2])
        return out[0], out[1]

    def _rollback(self, n: int) -> None:
        """Give back the newest n positions of the base's cache, and of the proposer's context with it."""
        rollback_all(self.cache, n)
        if self.reads:
            rollback_all(self.proposer.context_cache, n)

    def _caches(self) -> list:
        """What a prefill chunk evaluates: the base's caches, and the proposer's context with them."""
        return self.cache + (self.proposer.context_cache if self.reads else [])

    def _prefill(self):
        """Run the prompt through the base; return (first token, hidden at the last prompt position)."""
        chunks = self._prefill_chunks()
        while True:
            try:
                next(chunks)
            except StopIteration as done:
                return done.value

    def _prefill_chunks(self):
        """The prefill as a generator: it yields between chunks (a scheduler interleaves other requests'
        rounds there) and returns (first token, hidden at the last prompt position)."""
        tokens = mx.array(self.history)[None]  # (1, T)
        T = tokens.shape[1]
        cached = self.cache[0].offset if self.cache else 0  # a reused prompt cache holds history[:cached]
        if cached >= T:
            rollback_all(self.cache, cached - T + 1)  # the last prompt token must run to give logits
            cached = T - 1
        if self.reads:
            cached = self._align_context(cached)
        finished = yield from prefill_chunks(self._forward, self.history[: T - 1], self._caches, start=cached,
                                             step=self.prefill_step, should_stop=self.should_stop,
                                             on_progress=self.on_prefill, total=T)
        if not finished:
            raise _Stopped
        logits, hidden = self._forward(tokens[:, T - 1 :])
        first = self._sample(logits[0, -1], tokens[0], T)
        mx.eval(first, hidden if hidden is not None else first)
        return first, (hidden[:, -1:] if hidden is not None else None)

    def _align_context(self, cached: int) -> int:
        """Bring the base's reused cache (history[:cached]) and the proposer's context (after its start(),
        a prefix of the prompt too) to the same length, the shorter one's; where a sliding window cannot
        roll back that far, both start over. Returns the positions both hold."""
        have = self.proposer.context_length
        keep = min(have, cached)
        try:
            rollback_all(self.cache, cached - keep)
            rollback_all(self.proposer.context_cache, have - keep)
        except CacheRollbackError:
            # in place: a prompt-cache slot holds this list
            self.cache[:] = self.base.make_cache(DEFAULT_MAX_ROLLBACK, **self.kv_flags)
            self.proposer.reset()
            keep = 0
        return keep

    def _trim_cache_to_history(self) -> None:
        """After a stop inside accepted drafts, forget the positions past the last emitted token, so the
        cache holds exactly history[:-1] (a chat can then continue from it)."""
        self._rollback(self.cache[0].offset - (len(self.history) - 1))

    def _finish(self, token: int) -> Optional[str]:
        if token in self.eos_ids:
            return "stop"
        if self.emitted >= self.max_tokens:
            return "length"
        return None

    def _emit(self, token: int, from_draft: bool, logprobs: Optional[List[int]] = None) -> TokenEvent:
        """`logprobs`: the token's packed row of `logprob_rows`, when asked for."""
        self.emitted += 1
        self.history.append(token)
        self.stats.generation_tokens = self.emitted
        event = TokenEvent(token, from_draft, self._finish(token))
        if logprobs is not None:
            event.logprob, event.top_logprobs = unpack_logprobs(logprobs)
        return event

    def _emit_sampled(self, values: List[int]) -> TokenEvent:
        """Emit a `_sample` result read back: [token] + its packed log-probabilities when asked."""
        return self._emit(values[0], False, values[1:] if self.logprobs else None)

    def run(self) -> Iterator[TokenEvent]:
        if self.max_tokens <= 0:
            return
        begin = self.begin()
        while True:
            try:
                next(begin)
            except StopIteration as done:
                started = done.value
                break
        if started is None:
            return
        event, hidden, gen_start = started
        yield event
        if event.finish_reason:
            return
        try:
            if self.proposer is None:
                yield from self._plain_loop(gen_start)
            else:
                yield from self._speculative_loop(hidden, gen_start)
        finally:  # also when the caller stops early: a queued round or step must not stay in the cache
            self._trim_cache_to_history()

    def begin(self):
        """The request up to its first token, as a generator that yields between prefill chunks (a batch
        scheduler runs other requests' rounds there). Returns (the first TokenEvent, the base's hidden at
        the last prompt position (1, 1, H) or None, when generation started), or None when `should_stop`
        ended it during the prefill."""
        start = time.perf_counter()
        if self.proposer is not None:  # before the prefill: a feature reader's context must know the prompt
            self.proposer.start(self.history[: self.stats.prompt_tokens])  # a draft model prefills here
        try:
            first, hidden = yield from self._prefill_chunks()
        except _Stopped:
            return None
        self.stats.prompt_time = time.perf_counter() - start
        gen_start = time.perf_counter()
        event = self._emit_sampled(first.tolist())
        self._time(gen_start)
        return event, hidden, gen_start

    def _speculative_loop(self, hidden, gen_start: float) -> Iterator[TokenEvent]:
        """Rounds, pipelined: the next round is built and queued on the device before this round's tokens
        are handed to the caller, so detokenizing/streaming overlaps the device's work."""
        k, pending = self.policy.next_k(), None
        while True:
            if pending is None:
                if k == 0:  # the policy says plain steps (auto-off): pipelined, until it asks for drafts
                    resume = yield from self._plain_loop(gen_start, self.policy)
                    if resume is None:
                        return
                    hidden, k = resume
                pending = self._queue_round(hidden, k)
            events, hidden = self._settle_round(pending)
            pending = None
            self._time(gen_start)
            if events[-1].finish_reason is None:
                k = self.policy.next_k()
                if k > 0:
                    pending = self._queue_round(hidden, k)
            for ev in events:
                yield ev
                if ev.finish_reason:
                    return

    def _time(self, gen_start: float) -> None:
        self.stats.generation_time = time.perf_counter() - gen_start
        self.stats.peak_memory_bytes = max(self.stats.peak_memory_bytes, mx.get_peak_memory())

    def _plain_loop(self, gen_start: float, policy: Optional[DraftPolicy] = None) -> Iterator[TokenEvent]:
        """Plain decoding, one token per base pass. The next step is queued on the lazy current token before
        the host reads it (mlx-lm's generate_step), so building one step's graph overlaps the last's compute.

        With a policy, each step asks it for k first; on k > 0 nothing is queued and the loop returns (hidden
        state at the last position, k) for a round. Returns None when decoding ends."""
        y = mx.array([self.history[-1]], mx.int32)

        def step(y, pending: bool):
            """The step after y (its token first: y[:1]); pending: y is still being computed, so it is not
            in self.history yet."""
            y = y[:1]
            logits, hidden = self._decode_forward(y[None])
            history = None
            if self.processors:
                history = mx.array(self.history, mx.int32)
                history = mx.concatenate([history, y]) if pending else history
            position = len(self.history) + int(pending)  # of the token this step produces
            return self._sample(logits[0, -1], history, position), hidden

        nxt, h = step(y, pending=False)
        mx.async_eval(nxt)
        while True:
            y, hidden = nxt, h
            k = policy.next_k() if policy is not None else 0
            if k == 0:
                nxt, h = step(y, pending=True)
                mx.async_eval(nxt)
            event = self._emit_sampled(y.tolist())
            self._time(gen_start)
            if event.finish_reason:
                if k == 0:
                    self._rollback(1)  # the step queued past the end: the cache holds history[:-1]
                yield event
                return None
            yield event
            if k:
                return hidden, k

    def _queue_round(self, hidden, k: int):
        """Build one propose + verify graph and start it on the device; nothing waits for it here."""
        asked = self.draft_budget(k)
        position = len(self.history) - 1
        draft = self.propose(self.round_context(position, hidden, self.cache), asked)
        mx.async_eval(draft.tokens)  # the device drafts while Python builds the verify graph
        if draft.parents is not None:
            return TreeRound(self, draft, position, asked)
        verify_in = mx.concatenate([mx.array(self.history[-1:], mx.int32), draft.tokens.astype(mx.int32)])
        logits, vhidden = self._decode_forward(verify_in[None])  # (1, k+1, V)
        result = self.verify(draft, logits[0], verify_in, position)
        mx.async_eval(result)
        return asked, draft.k, result, vhidden

    def round_context(self, position: int, hidden, caches, tree: bool = False) -> RoundContext:
        """What the proposer reads this round; for a tree of sampled drafts also this request's measured rank
        acceptance."""
        ranks = self.tree_ranks.log_probs(MAX_DRAFT_TOKENS, MAX_BRANCHING) if tree and not self.sampler.greedy \
            else None
        return RoundContext(self.history, position, hidden, caches, self.sampler, ranks)

    def propose(self, ctx: RoundContext, asked: int) -> Draft:
        """This round's drafts: a tree when the policy gives it nodes and this request can verify one (trees/:
        a Gemma 4 base, a proposer that grows trees, no logits processors or strict padding), else a chain."""
        nodes = tree_budget(self.policy) if asked > 0 else 0
        depth = depth_before_switch(self.cache, asked) if nodes else 0
        if nodes and depth > 0 and self.trees:
            tree_ctx = self.round_context(ctx.position, ctx.hidden, ctx.base_cache, tree=True)
            return self.proposer.propose_tree(tree_ctx, nodes, depth)
        return self.proposer.propose(ctx, asked) if asked > 0 else Draft.empty()

    def draft_budget(self, k: int) -> int:
        """At most k drafts, never past max_tokens."""
        return min(k, self.max_tokens - self.emitted - 1)

    def verify(self, draft: Draft, logits: mx.array, verify_in: mx.array, position: int) -> mx.array:
        """The round's result from the base's k+1 rows of logits (k+1, V) for verify_in [bonus, d1..dk]:
        int32 [n accepted, next token, k drafts, packed log-probability rows when asked] (lazy)."""
        n, nxt, rows = self._accept(draft, logits, verify_in, position)
        result = mx.concatenate([mx.stack([n, nxt]).astype(mx.int32), draft.tokens.astype(mx.int32)])
        if self.logprobs:  # row i predicts the i-th token emitted: draft i while accepted, then the bonus
            drafts = draft.tokens.astype(mx.int32)
            chosen = mx.where(mx.arange(draft.k + 1) < n, mx.concatenate([drafts, nxt.astype(mx.int32)[None]]), nxt)
            result = mx.concatenate([result, logprob_rows(rows, chosen, self.logprobs).reshape(-1)])
        return result

    def _settle_round(self, pending):
        """Wait for a queued round (the round's one host synchronisation), roll back what the base rejected,
        and emit. Returns (the round's TokenEvents, the hidden state for the next round)."""
        if isinstance(pending, TreeRound):
            return pending.settle(self)
        asked, k, result, vhidden = pending
        values = result.tolist()
        n = values[0]
        self._rollback(k - n)
        events = self.settle(values, asked, k)
        return events, (vhidden[:, n : n + 1] if vhidden is not None else None)

    def settle(self, values: List[int], asked: int, k: int, nodes: int = 0) -> List[TokenEvent]:
        """A round's result read back ([n, next, k drafts, packed log-probability rows]): tell the proposer
        and the policy, count, and emit (the caller rolled the caches back by k - n). Ends at the first
        finished token, trimming the caches to the history there. A tree round (`nodes` > 0) gives its kept
        branch as the k drafts (k its depth bound)."""
        n, nxt, drafts = values[0], values[1], values[2 : 2 + k]
        rows = values[2 + k :]  # (k+1) packed log-probability rows when asked, else empty
        width = len(rows) // (k + 1)
        outcome = RoundResult(drafted=nodes or k, accepted=n, tree=bool(nodes))
        if self.proposer is not None:
            self.proposer.observe(outcome)
        if asked:  # the policy learns from what the proposer gave, even 0 drafts
            self.policy.observe(outcome)
        if k:
            self.stats.record_round(nodes or k, n, positions=k, tree=bool(nodes))
        events = []
        for i, tok in enumerate(drafts[:n] + [nxt]):
            events.append(self._emit(tok, i < n, rows[i * width : (i + 1) * width] if width else None))
            if events[-1].finish_reason:
                if self.cache:  # a row of a batch has no caches of its own until it leaves
                    self._trim_cache_to_history()
                break
        return events

    def _accept(self, draft: Draft, logits: mx.array, verify_in: mx.array, position: int):
        """(n_accepted, next token, the processed rows (k+1, V)) from the base's k+1 rows of logits (k+1, V)."""
        if self.processors:  # row i continues history + d1..di, so processors see that prefix
            prefix = mx.array(self.history[:-1], mx.int32)
            rows = [_process(logits[i], mx.concatenate([prefix, verify_in[: i + 1]]), self.processors)
                    for i in range(draft.k + 1)]
            logits = mx.stack(rows)
        processed = logits
        if self.strict_rows:  # sample over the same row count as a plain step does; the padding is never read
            logits = _pad_rows(logits, self.strict_rows)
        n, nxt = self.sampler.accept(draft.tokens.astype(mx.int32), draft.probs, logits, position)
        return n, nxt, processed
