"""What the forge goldens are made from (tests/fixtures/make_forge_goldens.py writes them with mlx-vlm,
tests/test_forge_goldens.py checks mlx_spec against them): the block goldens' `unified` base, a little text
in its vocabulary, and the `mlx_spec.forge` command lines that build a drafter of each family for it from
scratch. numpy only, no mlx_spec: the mlx-vlm venv imports this too and runs forge through the project's.

`--steps 0` writes forge's initialization, the same bytes on any machine (MLX's seeded initialization and the
base's own tables), so a test can rebuild the files the goldens were made from and compare checksums.
"""

import json
from pathlib import Path
from typing import List

import numpy as np
from checkpoints import VOCAB

FAMILIES = ("dflash", "dspark", "eagle3")
BLOCK_SIZE = 5  # DFlash: 4 drafts a round; DSpark: 5
SMALL = ["--batch-size", "2", "--max-seq-length", "48", "--prompt-tokens", "8", "--eval-prompts", "1",
         "--eval-tokens", "4", "--eval-every", "0", "--num-draft-tokens", "3", "--seed", "0"]


def write_text(path: Path) -> Path:
    """24 documents of 60 words of the base's vocabulary (w8 .. w255), as forge's .jsonl text records."""
    rng = np.random.default_rng(21)
    docs = [" ".join(f"w{t}" for t in rng.integers(8, VOCAB, 60)) for _ in range(24)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def forge_args(family: str, base: Path, data: Path, out: Path, steps: int = 0) -> List[str]:
    """`mlx_spec.forge` arguments that build a `family` drafter for `base` from scratch and train it `steps`."""
    block = ["--block-size", str(BLOCK_SIZE)] if family in ("dflash", "dspark") else []
    return ["--model", str(base), "--from-scratch", "--family", family, *block, "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--force", *SMALL]
