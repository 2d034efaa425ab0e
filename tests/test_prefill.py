"""The one chunked-prefill loop (prefill.py): the chunks it runs, its hooks, and where it stops."""

import mlx.core as mx

from mlx_spec.prefill import common_prefix, prefill


class Cache:
    """Stands in for a rewindable cache: the loop only evaluates keys and values."""

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0


def run(tokens, **kw):
    cache, chunks, progress = Cache(), [], []

    def forward(x):
        chunks.append(x.tolist()[0])
        cache.keys = cache.values = mx.zeros((1, 1, cache.offset + x.shape[1], 2))
        cache.offset += x.shape[1]

    done = prefill(forward, tokens, lambda: [cache], on_progress=lambda d, t: progress.append((d, t)), **kw)
    return done, chunks, progress, cache


def test_chunks_cover_the_tokens_from_start_in_order():
    done, chunks, progress, cache = run(list(range(10)), start=3, step=4, total=11)
    assert done and chunks == [[3, 4, 5, 6], [7, 8, 9]], "chunks of `step` from `start`, the last one shorter"
    assert progress == [(7, 11), (10, 11)], "progress after each chunk: the end run so far, of `total`"
    assert cache.offset == 7, "the caches grow by exactly the tokens run"


def test_should_stop_ends_before_a_chunk_and_says_so():
    asked = []

    def stop():
        asked.append(1)
        return len(asked) == 2  # let the first chunk run, stop before the second

    done, chunks, progress, _ = run(list(range(10)), step=4, should_stop=stop)
    assert not done and chunks == [[0, 1, 2, 3]] and progress == [(4, 10)], "a stop leaves what ran, nothing more"


def test_nothing_to_run_runs_nothing():
    done, chunks, progress, _ = run([1, 2], start=2)
    assert done and chunks == [] and progress == [], "a cache that holds the prompt already runs no chunk"


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
