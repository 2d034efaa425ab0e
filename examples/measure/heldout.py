"""Held-out code prompts for the trained tiny pair, chosen by rule, not by hand.

The tiny base was trained on CPython's standard library, so its held-out prompts come from other Python
source installed with mlx_spec itself (mlx-lm, numpy, huggingface_hub): every `step`-th file, in sorted
order, whose text tokenizes to at least `length` tokens, cut to its first `length` tokens. The same
package versions give the same prompts on any machine.

    python examples/measure/heldout.py N > prompts.jsonl        (a prompt file for mlx_spec.bench --prompts)
"""

import importlib
import json
import sys
from pathlib import Path

PACKAGES = ("mlx_lm", "numpy", "huggingface_hub")


def source_files():
    files = []
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).parent
        files += sorted(p for p in root.rglob("*.py") if "test" not in p.parts and p.name != "__init__.py")
    return files


def heldout_prompts(tokenizer, n: int, length: int = 64):
    """n prompts of `length` token ids each (BOS first, as the tokenizer adds it)."""
    files = source_files()
    step = max(1, len(files) // (3 * n))
    out = []
    for path in files[::step]:
        ids = tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


if __name__ == "__main__":
    from mlx_spec import load

    here = Path(__file__).resolve().parents[2]
    _, tok = load(str(here / "tests/fixtures/gemma4-tiny-code/base"))
    for ids in heldout_prompts(tok, int(sys.argv[1]) if len(sys.argv) > 1 else 24):
        print(json.dumps({"prompt": tok.decode(ids[1:]), "kind": "code"}))
