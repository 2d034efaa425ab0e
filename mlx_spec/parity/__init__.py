"""Verify-vs-step parity: does this device compute a verify row exactly as a one-token step?

- `strict`: `padded_forward`, the one piece a strict engine needs (every decode pass at one row count).
- `probe`: the parity probe behind `mlx_spec.doctor` (teacher-forced trace, op attribution, strict cost).
- `perturb`: a row-count-dependent linear layer, so tests on a row-invariant CPU can see what a GPU does.

Only `strict` is imported here: the engine imports it, and the probe imports the engine.
"""

from .strict import padded_forward

__all__ = ["padded_forward"]
