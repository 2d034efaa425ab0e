"""mlx_spec: exact speculative decoding for Gemma 4 on MLX.

    from mlx_spec import load, load_drafter, generate, stream_generate
    model, tokenizer = load("path/or/repo")
    drafter = load_drafter("path/to/assistant", model)
    text = generate(model, tokenizer, "Hello", drafter=drafter, max_tokens=64)
    texts = batch_generate(model, tokenizer, ["Hello", "Bonjour"], drafter=drafter, max_tokens=64).texts
"""

import warnings

# `python -m mlx_spec.generate` runs a module this package also imports (for the API names, as mlx-lm
# does); runpy warns about that, harmlessly.
warnings.filterwarnings("ignore", message=r".*'mlx_spec\.\w+' found in sys.modules", category=RuntimeWarning)

from .api import GenerationResponse, load, load_drafter  # noqa: E402
# via the command's module, so that importing `mlx_spec.generate` (the module) cannot shadow the function
from .generate import generate, stream_generate  # noqa: E402
from .batch_api import BatchResponse, batch_generate  # noqa: E402
from .errors import MlxSpecError  # noqa: E402
from .request import Request  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .stats import GenerationStats  # noqa: E402
from .draft_policy import FixedK  # noqa: E402
from .tuning import AutoTuner  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["load", "load_drafter", "generate", "stream_generate", "batch_generate", "BatchResponse", "Request",
           "GenerationResponse", "GenerationStats", "SamplingParams", "AutoTuner", "FixedK", "MlxSpecError",
           "__version__"]
