"""forge under hostile input (issue 23, the audit of 2026-12-06): nothing a user had is lost to a typo,
every number is finite and in range, a damaged checkpoint is one error naming its file, every decoded
length stays within the base's context, output paths are checked before training, and deeply nested JSON
is an error naming its line. Each case is one `error:` line and exit 2, or a run that stays in bounds.
"""

import hashlib
import json
import math
import re
import shutil

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from conftest import TINY_CODE

from mlx_spec.errors import MlxSpecError
from mlx_spec.forge import ForgeOptions, data, evaluate, run, trainer
from mlx_spec.forge.__main__ import main

CODE = [f"def g{i}(a, b):\n    c = a * {i} - b\n    return c + {i * 7}\n\n" * 3 for i in range(24)]
TINY = ["--steps", 1, "--batch-size", 2, "--max-seq-length", 64, "--eval-prompts", 1, "--eval-tokens", 8,
        "--eval-every", 0]


@pytest.fixture(scope="module")
def pair():
    from mlx_spec import load, load_drafter

    base, tokenizer = load(str(TINY_CODE / "base"))
    return base, tokenizer, load_drafter(str(TINY_CODE / "assistant"), base)


@pytest.fixture
def code_jsonl(tmp_path):
    p = tmp_path / "code.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    return p


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code, stderr, pattern):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"one error line, exit 2: {stderr}"
    assert re.search(pattern, lines[0]), lines[0]


def snapshot(directory):
    """Every file under directory with its bytes' digest: what a user had."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- defects 4 and 10: every float option finite and in range

@pytest.mark.parametrize("flag, value", [
    ("minutes", math.nan), ("minutes", math.inf), ("minutes", -1.0), ("minutes", 1e307),
    ("lr", math.nan), ("lr", math.inf), ("lr", 0.0), ("lr", -1e-3),
    ("centroid_weight", math.nan), ("centroid_weight", -0.5), ("centroid_weight", math.inf),
    ("step_decay", math.nan), ("step_decay", math.inf), ("steps", -1),
])
def test_float_options_must_be_finite_and_in_range(flag, value):
    options = ForgeOptions(model="m", drafter="d", data="x", out="o", **{flag: value})
    with pytest.raises(MlxSpecError, match=f"--{flag.replace('_', '-')} must be"):
        options.validate()


def test_a_nan_centroid_weight_is_one_error_line(tmp_path, code_jsonl, capsys):
    code, _, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data",
                               code_jsonl, "--out", tmp_path / "out", "--centroid-weight", "nan", *TINY], capsys)
    one_error(code, stderr, "--centroid-weight must be a finite number >= 0, got nan")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


# -- defect 13: deeply nested JSON in a data line

def test_deeply_nested_json_names_its_line(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"text": "fine"}\n{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(data.DataError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        data.read_jsonl(p)
