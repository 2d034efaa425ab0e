"""Typed errors for user-facing mistakes.

Every message says what is wrong (which file, flag or tensor) and what to do about it. The CLIs print
`error: <message>` and exit non-zero for these; anything else is a bug and keeps its traceback.
"""


class MlxSpecError(Exception):
    """Base class for errors caused by user input (bad file, bad flag, bad pairing)."""


class ModelLoadError(MlxSpecError):
    """A model directory, config, tokenizer or weight file cannot be used."""


class HubUnreachableError(ModelLoadError):
    """The Hugging Face hub could not be asked (a timeout, a proxy, no network), as opposed to answering no."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's model_type (or a feature of its config) is not supported."""


class WeightMismatchError(ModelLoadError):
    """A tensor is missing, unexpected, or has the wrong shape."""


class ConversionError(MlxSpecError):
    """Conversion could not finish; nothing was written to the output path."""


class PairingError(MlxSpecError):
    """A drafter does not fit the base model it was paired with."""


class CacheRollbackError(RuntimeError):
    """A KV cache was asked to give back more tokens than it still holds.

    Not a user error: it means the engine would silently diverge from plain decoding, so it stops instead.
    """


class DistributedError(MlxSpecError):
    """Ranks of an mx.distributed group cannot work together: they did not connect, cannot split the model
    (heads, layers, quantization groups), or one of them met an error the others are told about."""

    reported_by_root = False  # True on the ranks whose copy of an agreed error rank 0 prints for all


class RankDivergenceError(RuntimeError):
    """Two ranks hold different tokens. Not a user error: every rank must compute the same thing, so a
    divergence is a bug, and decoding stops where it was found."""
