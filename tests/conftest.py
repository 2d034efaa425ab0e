import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY_CODE = FIXTURES / "gemma4-tiny-code"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (tiny_models, checkpoints)


@pytest.fixture(scope="session")
def trained_pair():
    """The trained tiny Gemma 4 base + MTP assistant (real acceptance rates)."""
    from mlx_spec import load, load_drafter

    model, tokenizer = load(str(TINY_CODE / "base"))
    return model, tokenizer, load_drafter(str(TINY_CODE / "assistant"), model)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep tests out of the user's ~/.cache/mlx_spec (tuning costs, converted hub models)."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
