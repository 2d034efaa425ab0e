"""Log-probabilities of emitted tokens, computed in a round's graph and read back with its one host read.

Per row of processed logits: log p(chosen token) and the top n (ids, log p; best first) under the base's
distribution at temperature 1 (log-softmax, as mlx-lm's server reports them), packed into int32 with the
floats bit-cast, so they travel inside the round's int32 result.
"""

from typing import List, Tuple

import mlx.core as mx
import numpy as np


def logprob_rows(rows: mx.array, chosen: mx.array, n: int) -> mx.array:
    """Per row of processed logits (R, V): log p(chosen token) and the top n (ids, log p; best first) under
    softmax at temperature 1, packed as int32 (R, 1 + 2n) with the floats bit-cast, so they travel in the
    round's one host read."""
    n = min(n, rows.shape[-1])
    lp = rows.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)  # (R, V)
    token_lp = mx.take_along_axis(lp, chosen.astype(mx.int32)[:, None], axis=-1)  # (R, 1)
    top = mx.argpartition(-lp, kth=n - 1, axis=-1)[:, :n]  # (R, n), unordered
    top_lp = mx.take_along_axis(lp, top, axis=-1)
    order = mx.argsort(-top_lp, axis=-1)
    top, top_lp = mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(top_lp, order, axis=-1)
    return mx.concatenate([mx.view(token_lp, mx.int32), top.astype(mx.int32), mx.view(top_lp, mx.int32)], axis=1)


def unpack_logprobs(values: List[int]) -> Tuple[float, List[Tuple[int, float]]]:
    """One row of `logprob_rows`, read back: (log p(token), [(id, log p)] * n)."""
    n = (len(values) - 1) // 2
    floats = np.array(values, np.int32).view(np.float32).tolist()
    return floats[0], list(zip(values[1 : 1 + n], floats[1 + n :]))
