"""The round loop: prefill -> propose -> verify (one base pass) -> accept -> roll back -> emit.

Knows the base model's forward, its rewindable caches, a proposer and the acceptance rules. Knows
nothing of text: it takes token ids and yields token ids (user surfaces detokenize).

Exactness: the base verifies [bonus, d1..dk] in one forward pass; greedy keeps the longest agreeing prefix
and rejection sampling keeps the base's distribution; then the caches give back exactly the k - n rejected
positions (checked, see cache.py). One host synchronisation per round: the `.tolist()` of the round result.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx

from . import acceptance
from .cache import make_rewindable, rollback_all
from .proposers.base import Draft, Proposer, RoundContext

DEFAULT_NUM_DRAFT_TOKENS = "auto"  # chosen each round from this machine's measured costs (tuning.py)
FIXED_K_START = 3  # where `auto` starts before it has measured anything
MAX_DRAFT_TOKENS = 16

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # mlx-lm's (tokens, logits) -> logits


@dataclass
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # "rejection": Leviathan/Chen ratio test (exact, best acceptance); "match": accept while the base's
    # own sample equals the draft (exact for any proposer, lower acceptance; kept for comparison).
    acceptance: str = "rejection"

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def probs(self, logits: mx.array) -> mx.array:
        return acceptance.probs_from_logits(logits, self.temp, self.top_p, self.top_k, self.min_p)


@dataclass
class GenerationStats:
    """Per-request counters, in the project's words (DESIGN.md): rounds, drafted, accepted, tau."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: List[int] = field(default_factory=list)
    accepted_by_position: List[int] = field(default_factory=list)
    peak_memory_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0

    @property
    def tau(self) -> float:
        """Tokens emitted per verify round (accepted + 1), over rounds that verified drafts."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def plain_steps(self) -> int:
        """Tokens decoded without drafts after the first (auto-off, its re-timing, rounds the proposer left
        empty): each emits one token at plain decoding's cost."""
        return max(0, self.generation_tokens - 1 - self.accepted - self.rounds)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> List[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    def record_round(self, draft_k: int, n_accepted: int) -> None:
        self.rounds += 1
        self.drafted += draft_k
        self.accepted += n_accepted
        grow = draft_k - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(draft_k):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < n_accepted)

    def merge(self, other: "GenerationStats") -> None:
        """Add another request's speculation counters to these (for totals over several prompts)."""
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        grow = len(other.drafted_by_position) - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i, (d, a) in enumerate(zip(other.drafted_by_position, other.accepted_by_position)):
            self.drafted_by_position[i] += d
            self.accepted_by_position[i] += a

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "prompt_tps": self.prompt_tps,
            "generation_tokens": self.generation_tokens, "generation_tps": self.generation_tps,
            "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "tau": self.tau,
            "acceptance_rate": self.acceptance_rate, "acceptance_by_position": self.acceptance_by_position,
            "plain_steps": self.plain_steps, "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class TokenEvent:
    token: int
    from_draft: bool
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length" (max_tokens) on the last token


def base_forward(model, tokens: mx.array, cache):
    """(logits, hidden or None) for (1, L) tokens; models without `forward` give no hidden state."""
    if hasattr(model, "forward"):
        return model.forward(tokens, cache)
    return model(tokens, cache=cache), None


def make_base_cache(model, max_rollback: int) -> list:
    if hasattr(model, "producer_layers"):  # our Gemma 4 models build rewindable caches themselves
        return model.make_cache(max_rollback=max_rollback)
    from mlx_lm.models.cache import make_prompt_cache

    return make_rewindable(make_prompt_cache(model), max_rollback)


def _process(logits: mx.array, history: mx.array, processors: Sequence[LogitsProcessor]) -> mx.array:
    """Apply mlx-lm style processors to one row of logits (V,); they take and return (1, V)."""
    if not processors:
        return logits
    logits = logits[None]
    for p in processors:
        logits = p(history, logits)
    return logits[0]


class _Stopped(Exception):
    """`should_stop` said so during the prefill."""


class Engine:
    """One request's decoding state; `run()` yields TokenEvents. Create one per request."""

    def __init__(self, model, prompt: List[int], *, proposer: Optional[Proposer] = None,
                 sampling: SamplingParams = SamplingParams(), max_tokens: int = 256,
                 num_draft_tokens: int = FIXED_K_START, eos_ids: Sequence[int] = (),
                 logits_processors: Sequence[LogitsProcessor] = (), seed: Optional[int] = None,
                 cache: Optional[list] = None, draft_policy=None, prefill_step: int = 2048,
                 should_stop: Optional[Callable[[], bool]] = None):
        """`cache`, when given, must hold the K/V of a prefix of `prompt` (a chat's earlier turns); only the
        rest is prefilled. After `run()` it holds exactly the history minus its last token.
        `should_stop` is asked before each prefill chunk: True ends the request with no tokens (a client
        that went away, a Ctrl-C); the cache then holds the prompt's prefix prefilled so far."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be between 0 and {MAX_DRAFT_TOKENS}, got {num_draft_tokens}")
        self.model, self.proposer, self.sampling = model, proposer, sampling
        self.max_tokens, self.eos_ids = max_tokens, set(eos_ids)
        self.processors = list(logits_processors)
        self.k = num_draft_tokens
        self.draft_policy = draft_policy
        self.prefill_step = prefill_step
        self.should_stop = should_stop
        self.key = mx.random.key(seed if seed is not None else int(time.time_ns() % (2**31)))
        self.cache = cache if cache is not None else make_base_cache(model, MAX_DRAFT_TOKENS + 1)
        self.history = list(prompt)
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.emitted = 0

    # -- randomness: every draw comes from an explicit key, so a seed reproduces a run exactly
    def _uniforms(self, n: int) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return mx.random.uniform(shape=(n,), key=sub)

    def _next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def _sample(self, logits: mx.array, history: mx.array) -> mx.array:
        """One token from the processed base distribution (the plain path, also the first token)."""
        logits = _process(logits, history, self.processors)
        if self.sampling.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        return acceptance.sample_from_probs(self.sampling.probs(logits), self._uniforms(1)[0])

    def _prefill(self):
        """Run the prompt through the base; return (first token, hidden at the last prompt position)."""
        tokens = mx.array(self.history)[None]  # (1, T)
        start = time.perf_counter()
        T = tokens.shape[1]
        cached = self.cache[0].offset if self.cache else 0  # a reused prompt cache holds history[:cached]
        if cached >= T:
            rollback_all(self.cache, cached - T + 1)  # the last prompt token must run to give logits
            cached = T - 1
        for s in range(cached, T - 1, self.prefill_step):  # chunks bound the attention matrix size
            if self.should_stop is not None and self.should_stop():
                raise _Stopped
            e = min(s + self.prefill_step, T - 1)
            base_forward(self.model, tokens[:, s:e], self.cache)
            mx.eval([(c.keys, c.values) for c in self.cache])
        logits, hidden = base_forward(self.model, tokens[:, T - 1 :], self.cache)
        first = self._sample(logits[0, -1], tokens[0])
        mx.eval(first, hidden if hidden is not None else first)
        self.stats.prompt_time = time.perf_counter() - start
        return first, (hidden[:, -1:] if hidden is not None else None)

    def _trim_cache_to_history(self) -> None:
        """After a stop inside accepted drafts, forget the positions past the last emitted token, so the
        cache holds exactly history[:-1] (a chat can then continue from it)."""
        rollback_all(self.cache, self.cache[0].offset - (len(self.history) - 1))

    def _finish(self, token: int) -> Optional[str]:
        if token in self.eos_ids:
            return "stop"
        if self.emitted >= self.max_tokens:
            return "length"
        return None

    def _emit(self, token: int, from_draft: bool) -> TokenEvent:
        self.emitted += 1
        self.history.append(token)
        self.stats.generation_tokens = self.emitted
        return TokenEvent(token, from_draft, self._finish(token))

    def run(self) -> Iterator[TokenEvent]:
        if self.max_tokens <= 0:
            return
        try:
            first, hidden = self._prefill()
        except _Stopped:
            return
        if self.proposer is not None and self.k > 0:
            start = time.perf_counter()
            self.proposer.start(self.history[: self.stats.prompt_tokens])  # a draft model prefills here
            self.stats.prompt_time += time.perf_counter() - start
        gen_start = time.perf_counter()
        event = self._emit(int(first.item()), False)
        self._time(gen_start)
        yield event
        if event.finish_reason:
            return
        try:
            if self.proposer is None or self.k == 0:
                yield from self._plain_loop(gen_start)
            else:
                yield from self._speculative_loop(hidden, gen_start)
        finally:  # also when the caller stops early: a queued round or step must not stay in the cache
            self._trim_cache_to_history()

    def _speculative_loop(self, hidden, gen_start: float) -> Iterator[TokenEvent]:
        """Rounds, pipelined: the next round is built and queued on the device before this round's tokens
        are handed to the caller, so detokenizing/streaming overlaps the device's work."""
        k, pending = self._choose_k(), None
        while True:
            if pending is None:
                if k == 0 and self.draft_policy is not None:  # auto-off: pipelined plain steps until it drafts
                    resume = yield from self._plain_loop(gen_start, self.draft_policy)
                    if resume is None:
                        return
                    hidden, k = resume
                pending = self._queue_round(hidden, k)
            events, hidden = self._settle_round(pending)
            pending = None
            self._time(gen_start)
            if events[-1].finish_reason is None:
                k = self._choose_k()
                if k > 0 or self.draft_policy is None:
                    pending = self._queue_round(hidden, k)
            for ev in events:
                yield ev
                if ev.finish_reason:
                    return

    def _time(self, gen_start: float) -> None:
        self.stats.generation_time = time.perf_counter() - gen_start
        self.stats.peak_memory_bytes = max(self.stats.peak_memory_bytes, mx.get_peak_memory())

    def _plain_loop(self, gen_start: float, policy=None) -> Iterator[TokenEvent]:
        """Plain decoding, one token per base pass. The next step is queued on the lazy current token before
        the host reads it (mlx-lm's generate_step), so building one step's graph overlaps the last's compute.

        With a draft policy (auto-off), each step asks it for k first; on k > 0 nothing is queued and the
        loop returns (hidden state at the last position, k) for a round. Returns None when decoding ends."""
        y = mx.array([self.history[-1]], mx.int32)

        def step(y, pending: bool):
            """The step after y; pending: y is still being computed, so it is not in self.history yet."""
            logits, hidden = base_forward(self.model, y[None], self.cache)
            history = None
            if self.processors:
                history = mx.array(self.history, mx.int32)
                history = mx.concatenate([history, y]) if pending else history
            return self._sample(logits[0, -1], history).reshape(1), hidden

        nxt, h = step(y, pending=False)
        mx.async_eval(nxt)
        while True:
            y, hidden = nxt, h
            k = policy.next_k() if policy is not None else 0
            if k == 0:
                nxt, h = step(y, pending=True)
                mx.async_eval(nxt)
            event = self._emit(int(y.item()), False)
            self._time(gen_start)
            if event.finish_reason:
                if k == 0:
                    rollback_all(self.cache, 1)  # the step queued past the end: the cache holds history[:-1]
                yield event
                return None
            yield event
            if k:
                return hidden, k

    def _choose_k(self) -> int:
        return self.draft_policy.next_k() if self.draft_policy is not None else self.k

    def _queue_round(self, hidden, k: int):
        """Build one propose + verify graph and start it on the device; nothing waits for it here."""
        asked = min(k, self.max_tokens - self.emitted - 1)  # never draft past max_tokens
        position = len(self.history) - 1
        ctx = RoundContext(self.history, position, hidden, self.cache, self.sampling, self._next_key())
        draft = self.proposer.propose(ctx, asked) if asked > 0 else Draft(mx.zeros((0,), mx.int32))
        mx.async_eval(draft.tokens)  # the device drafts while Python builds the verify graph
        verify_in = mx.concatenate([mx.array(self.history[-1:], mx.int32), draft.tokens.astype(mx.int32)])
        logits, vhidden = base_forward(self.model, verify_in[None], self.cache)  # (1, k+1, V)
        n, nxt = self._accept(draft, logits[0], verify_in)
        result = mx.concatenate([mx.stack([n, nxt]).astype(mx.int32), draft.tokens.astype(mx.int32)])
        mx.async_eval(result)
        return asked, draft.k, result, vhidden

    def _settle_round(self, pending):
        """Wait for a queued round (the round's one host synchronisation), roll back what the base rejected,
        and emit. Returns (the round's TokenEvents, the hidden state for the next round)."""
        asked, k, result, vhidden = pending
        n, nxt, *drafts = result.tolist()
        rollback_all(self.cache, k - n)
        self.proposer.observe(n, k)
        if asked and self.draft_policy is not None:  # it learns from what the proposer gave, even 0 drafts
            self.draft_policy.observe(k, n)
        if k:
            self.stats.record_round(k, n)
        events = []
        for i, tok in enumerate(drafts[:n] + [nxt]):
            events.append(self._emit(tok, i < n))
            if events[-1].finish_reason:
                self._trim_cache_to_history()
                break
        return events, (vhidden[:, n : n + 1] if vhidden is not None else None)

    def _accept(self, draft: Draft, logits: mx.array, verify_in: mx.array):
        """(n_accepted, next token) from the base's k+1 rows of logits (k+1, V)."""
        k = draft.k
        if self.processors:  # row i continues history + d1..di, so processors see that prefix
            prefix = mx.array(self.history[:-1], mx.int32)
            rows = [_process(logits[i], mx.concatenate([prefix, verify_in[: i + 1]]), self.processors)
                    for i in range(k + 1)]
            logits = mx.stack(rows)
        if self.sampling.greedy:
            target = mx.argmax(logits, axis=-1).astype(mx.int32)
            return acceptance.greedy_accept(draft.tokens, target)
        p = self.sampling.probs(logits)  # (k+1, V)
        if self.sampling.acceptance == "match":
            target = mx.stack([acceptance.sample_from_probs(p[i], u) for i, u in enumerate(self._uniforms(k + 1))])
            return acceptance.token_match_accept(draft.tokens, target)
        q = draft.probs
        if q is None:  # deterministic drafts: q is one-hot on the draft
            q = (mx.arange(p.shape[-1]) == draft.tokens[:, None]).astype(mx.float32)
        u = self._uniforms(k + 1)
        return acceptance.rejection_accept(draft.tokens, q, p, u[:k], u[k])


def resolve_num_draft_tokens(value, model, proposer):
    """(fixed k, draft-length policy or None) for --num-draft-tokens K|auto."""
    if proposer is None:
        return 0, None
    if value == "auto":
        from .tuning import make_auto_policy

        return FIXED_K_START, make_auto_policy(model, proposer)
    return int(value), None
