"""Chunked prefill, the one loop the engine, a draft model, cache_prompt and the parity probe run a prompt
through; and `common_prefix`, how much of a new prompt a cache's tokens already hold.

A chunk bounds the attention scores a pass builds (chunk x context per head), and each chunk's caches are
evaluated before the next is built, so the graph never holds more than one chunk.

Knows token ids, a forward and caches with keys/values; nothing of models, proposers or text.
"""

from typing import Callable, Generator, List, Optional, Sequence

import mlx.core as mx

PREFILL_STEP = 2048  # tokens per chunk (mlx-lm's prefill_step_size)


def prefill(forward: Callable[[mx.array], object], tokens: Sequence[int], caches: Callable[[], list], *,
            start: int = 0, step: int = PREFILL_STEP, should_stop: Optional[Callable[[], bool]] = None,
            on_progress: Optional[Callable[[int, int], None]] = None, total: Optional[int] = None) -> bool:
    """Run tokens[start:] through `forward` (ids (1, L) int32 -> anything; it extends the caches) in chunks
    of `step`, evaluating the K/V of `caches()` after each (a callable: a proposer's context is read after
    the pass that fed it). `should_stop()` is asked before each chunk: True stops there and returns False,
    the caches holding what ran. `on_progress(done, total)` follows each chunk: done is the end of the
    tokens run so far, total `total` (default len(tokens))."""
    chunks = prefill_chunks(forward, tokens, caches, start=start, step=step, should_stop=should_stop,
                            on_progress=on_progress, total=total)
    while True:
        try:
            next(chunks)
        except StopIteration as done:
            return done.value


def prefill_chunks(forward: Callable[[mx.array], object], tokens: Sequence[int], caches: Callable[[], list], *,
                   start: int = 0, step: int = PREFILL_STEP, should_stop: Optional[Callable[[], bool]] = None,
                   on_progress: Optional[Callable[[int, int], None]] = None,
                   total: Optional[int] = None) -> Generator[None, None, bool]:
    """`prefill` as a generator that yields between chunks (a batch scheduler runs other requests'
    rounds there); it returns what `prefill` returns."""
    total = len(tokens) if total is None else total
    for s in range(start, len(tokens), step):
        if s > start:
            yield  # between chunks: after the last one the caller goes on at once (a request joins sooner)
        if should_stop is not None and should_stop():
            return False
        e = min(s + step, len(tokens))
        forward(mx.array(tokens[s:e], mx.int32)[None])
        mx.eval([(c.keys, c.values) for c in caches()])
        if on_progress is not None:
            on_progress(e, total)
    return True


def common_prefix(a: List[int], b: List[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
