"""One rank of a test under `mlx.launch --backend ring -n N` (tests/test_distributed.py starts it).

    python distributed_worker.py SCENARIO OUT_DIR [ARGS...]

Each rank writes what it saw to OUT_DIR/rank<r>.json; the test compares the ranks with each other and with
one process (which every rank also runs here, unsharded: no collective).
"""

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_spec import generate, load, load_drafter
from mlx_spec.api import stream_generate
from mlx_spec.distributed import load as load_sharded
from mlx_spec.errors import MlxSpecError

TINY = Path(__file__).resolve().parent / "fixtures" / "gemma4-tiny-code"
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "  # 16 tokens; with 40 more, past the 32-token window
MAX_TOKENS = 40
SHAPE_TOKENS = 6  # a 33-token prompt is already past the shapes' 16-token window


def tokens(model, tokenizer, prompt, **kwargs) -> list:
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, **kwargs)]


def greedy_with_margins(model, ids: list, n: int):
    """Plain greedy from one forward per step (no cache reuse subtleties): (tokens, top-2 margins)."""
    from mlx_spec.models.base import as_base

    base = as_base(model)
    cache = base.make_cache()
    logits, _ = base.forward(mx.array(ids)[None], cache)
    out, margins = [], []
    for _ in range(n):
        row = logits[0, -1].astype(mx.float32)
        top2 = mx.sort(row)[-2:].tolist()
        out.append(int(mx.argmax(row).item()))
        margins.append(top2[1] - top2[0])
        logits, _ = base.forward(mx.array([[out[-1]]]), cache)
    return out, margins


def exact(mode: str, dspark: str, sweep: str = "") -> dict:
    """Greedy speculative == plain under the same sharding for every proposer family; sharded plain against one
    process, with the margins of any flip. `sweep` ("sweep"): more draft lengths, and seeded sampling."""
    model, tokenizer = load_sharded(str(TINY / "base"), mode, check=True)
    res = {"plain": tokens(model, tokenizer, PROMPT)}
    mtp = load_drafter(str(TINY / "assistant"), model)
    for k in (1, 3, 5) if sweep else (3,):
        res[f"mtp k={k}"] = tokens(model, tokenizer, PROMPT, drafter=mtp, num_draft_tokens=k)
    res["dflash"] = tokens(model, tokenizer, PROMPT, drafter=load_drafter(str(TINY / "dflash"), model),
                           num_draft_tokens=4)
    res["dspark"] = tokens(model, tokenizer, PROMPT, drafter=load_drafter(dspark, model), num_draft_tokens=4)
    res["ngram"] = tokens(model, tokenizer, PROMPT, ngram=2, num_draft_tokens=3)
    one, _ = load(str(TINY / "base"))  # replicated: a draft model is every rank's own
    res["draft model"] = tokens(model, tokenizer, PROMPT, draft_model=one, num_draft_tokens=3)
    if sweep:
        sampled = dict(temp=0.8, seed=11)
        res["sampled plain"] = tokens(model, tokenizer, PROMPT, **sampled)
        res["sampled mtp"] = tokens(model, tokenizer, PROMPT, drafter=mtp, num_draft_tokens=3, **sampled)
        res["kv8 plain"] = tokens(model, tokenizer, PROMPT, kv_bits=8, kv_group_size=32)
        res["kv8 mtp"] = tokens(model, tokenizer, PROMPT, drafter=mtp, num_draft_tokens=3, kv_bits=8, kv_group_size=32)
    ids = tokenizer.encode(PROMPT)
    res["one process"], res["one process margins"] = greedy_with_margins(one, ids, MAX_TOKENS)
    return res


def shapes(mode: str, *dirs: str) -> dict:
    """Every variant shape loads and shards: its logits against one process's, greedy speculative (MTP) ==
    plain under the sharding, and each rank's weight bytes."""
    from mlx_spec.distributed.slicing import parameter_bytes

    out = {}
    for d in dirs:
        name, start = Path(d).name, time.perf_counter()
        model, tokenizer = load_sharded(d, mode, check=True, log=lambda line: None)
        one, _ = load(d)
        ids = [2] + list(range(8, 40))
        res = {"bytes": parameter_bytes(model), "whole": parameter_bytes(one)}
        sharded, _ = greedy_with_margins(model, ids, SHAPE_TOKENS)
        plain, margins = greedy_with_margins(one, ids, SHAPE_TOKENS)
        res.update(sharded=sharded, one=plain, margins=margins)
        drafter = load_drafter(str(Path(d).parent / (name + "-drafter")), model)
        res["spec"] = tokens(model, tokenizer, ids, drafter=drafter, num_draft_tokens=3)[:SHAPE_TOKENS]
        out[name] = res
        print(f"[worker] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return out


def missing(mode: str) -> dict:
    """Rank 1 has no model files: every rank gets the same error, none waits."""
    rank = mx.distributed.init().rank()
    path = str(TINY / "base") if rank == 0 else "/nonexistent/gemma"
    try:
        load_sharded(path, mode)
    except MlxSpecError as e:
        return {"error": str(e), "type": type(e).__name__}
    return {"error": None}


def main():
    scenario, out_dir, *args = sys.argv[1:]
    result = {"exact": exact, "shapes": shapes, "missing": missing}[scenario](*args)
    rank = mx.distributed.init().rank()
    result = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
