"""Whether this device computes a row the same whatever the row count: strict mode's one question.

Answered by the op check (ops.py: each kind of op the model uses, at its shapes, 1 row vs up to `rows`),
once per model object and row count: the answer is kept on the model, since it holds for as long as the
model and the device do.
"""

from .ops import ops_row_invariant

_ATTRIBUTE = "_mlx_spec_row_invariance"  # on the model object: {rows: bool}


def row_invariant(model, rows: int) -> bool:
    memo = vars(model).setdefault(_ATTRIBUTE, {})
    if rows not in memo:
        memo[rows] = ops_row_invariant(model, rows)
    return memo[rows]
