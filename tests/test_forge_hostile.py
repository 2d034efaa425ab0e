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
from conftest import FIXTURES, TINY_CODE

from mlx_spec.errors import MlxSpecError
from mlx_spec.forge import ForgeOptions, data, evaluate, run, start, trainer
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


# -- defect 2: an output that is (or holds, or lies inside) an input is refused before anything is touched

@pytest.mark.parametrize("case", ["out is the model", "out is the drafter", "out inside the model",
                                  "out holds the drafter", "checkpoints in the drafter", "checkpoints hold the model",
                                  "out is the checkpoints", "report over the model's config"])
def test_outputs_never_overlap_an_input(tmp_path, code_jsonl, capsys, case):
    models = tmp_path / "models"
    shutil.copytree(TINY_CODE / "base", models / "base")
    shutil.copytree(TINY_CODE / "assistant", models / "asst")
    (models / "config.json").write_text("{}")  # a parent that looks like a model directory to check_out
    base, asst = models / "base", models / "asst"
    before = snapshot(tmp_path)
    out, extra = tmp_path / "forged", []
    if case == "out is the model":
        out = base
    elif case == "out is the drafter":
        out = asst
    elif case == "out inside the model":
        out = base / "forged"
    elif case == "out holds the drafter":
        out = models
    elif case == "checkpoints in the drafter":
        extra = ["--checkpoint-dir", asst]
    elif case == "checkpoints hold the model":
        extra = ["--checkpoint-dir", tmp_path]
    elif case == "out is the checkpoints":
        extra = ["--checkpoint-dir", out]
    elif case == "report over the model's config":
        extra = ["--report-json", base / "config.json"]
    code, _, stderr = run_cli(["--model", base, "--drafter", asst, "--data", code_jsonl, "--out", out, "--force",
                               *extra, *TINY], capsys)
    one_error(code, stderr, "overlap|inside --model")
    assert snapshot(tmp_path) == before, "nothing a user had is changed, with --force"


# -- defect 6: --force deletes earlier checkpoints only once everything is validated

@pytest.mark.parametrize("typo, message", [
    (["--data", "missing.jsonl"], "data path .* does not exist"),
    (["--compare", FIXTURES / "hf" / "assistant_centroid"], "drafter vocab_size is 512 but the base model's is 2048"),
    (["--max-seq-length", 4096], "--max-seq-length 4096 exceeds the base's context"),
])
def test_force_keeps_earlier_checkpoints_when_the_job_is_refused(tmp_path, code_jsonl, capsys, typo, message):
    ck = tmp_path / "out.checkpoints" / "step-000002"
    ck.mkdir(parents=True)
    (ck / trainer.STATE_FILE).write_text(json.dumps({"step": 2, "seconds": 1.0}))
    args = ["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data", code_jsonl,
            "--out", tmp_path / "out", "--force", *TINY]
    args += [str(tmp_path / v) if v == "missing.jsonl" else v for v in typo]
    code, _, stderr = run_cli(args, capsys)
    one_error(code, stderr, message)
    assert (ck / trainer.STATE_FILE).is_file(), "a refused job deletes no checkpoint"


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


# -- defect 5: a damaged checkpoint is one error naming its file

@pytest.fixture(scope="module")
def checkpoint(pair, tmp_path_factory):
    """A real checkpoint of the tiny assistant for the tiny base (no training: the files are what matter)."""
    base, _, stock = pair
    config = json.loads((TINY_CODE / "assistant" / "config.json").read_text())
    drafter = start.clone(stock, config)
    adam = optim.Adam(learning_rate=1e-3)
    adam.init(drafter.trainable_parameters())
    identity = run.base_identity(base, TINY_CODE / "base", None)
    state = trainer.TrainState(step=2, seconds=1.5, batches={"epoch": 0, "index": 2})
    directory = tmp_path_factory.mktemp("ck") / "checkpoints"
    trainer.save_checkpoint(directory, drafter, config, adam, state, identity)
    return directory, identity


def edit_json(path, change):
    body = json.loads(path.read_text())
    path.write_text(json.dumps(change(body)))


def nan_weights(path):
    weights = mx.load(str(path))
    name = sorted(n for n, w in weights.items() if mx.issubdtype(w.dtype, mx.floating))[0]
    weights[name] = weights[name] * float("nan")
    mx.save_safetensors(str(path), weights)


DAMAGE = {
    "state without step": ("state.json", lambda p: edit_json(p, lambda b: {k: v for k, v in b.items() if k != "step"})),
    "state a list": ("state.json", lambda p: p.write_text("[1, 2]")),
    "step a string": ("state.json", lambda p: edit_json(p, lambda b: {**b, "step": "3"})),
    "epoch a string": ("state.json", lambda p: edit_json(p, lambda b: {**b, "batches": {"epoch": "x", "index": 0}})),
    "seconds NaN": ("state.json", lambda p: edit_json(p, lambda b: {**b, "seconds": math.nan})),
    "identity a list": ("state.json", lambda p: edit_json(p, lambda b: {**b, "identity": []})),
    "state nested deeply": ("state.json", lambda p: p.write_text("[" * 100000 + "]" * 100000)),
    "drafter of another model": ("drafter.safetensors",
                                 lambda p: shutil.copy(TINY_CODE / "dflash" / "model.safetensors", p)),
    "optimizer of another model": ("optimizer.safetensors",
                                   lambda p: shutil.copy(TINY_CODE / "dflash" / "model.safetensors", p)),
    "config hidden_size changed": ("config.json", lambda p: edit_json(
        p, lambda c: {**c, "text_config": {**c["text_config"], "hidden_size": 96}})),
    "config not for this base": ("config.json", lambda p: edit_json(p, lambda c: {**c, "backbone_hidden_size": 7})),
    "config a string": ("config.json", lambda p: p.write_text('"gemma"')),
    "NaN weights": ("drafter.safetensors", nan_weights),
}


def resume_from(pair, directory, identity, tmp_path):
    base, _, _ = pair
    options = ForgeOptions(model=str(TINY_CODE / "base"), drafter=str(TINY_CODE / "assistant"), data="unused",
                           out=str(tmp_path / "out"), resume=True, checkpoint_dir=str(directory))
    return start.starting_point(options, base, None, directory, identity, [])


def test_an_intact_checkpoint_resumes(pair, checkpoint, tmp_path):
    directory, identity = checkpoint
    drafter, config, start, dtype, saved = resume_from(pair, directory, identity, tmp_path)
    assert saved.state.step == 2 and saved.state.batches == {"epoch": 0, "index": 2}, "the undamaged one resumes"


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_one_error_naming_its_file(pair, checkpoint, tmp_path, case):
    directory, identity = checkpoint
    copy = tmp_path / "checkpoints"
    shutil.copytree(directory, copy)
    name, damage = DAMAGE[case]
    damage(copy / "step-000002" / name)
    with pytest.raises(trainer.CheckpointError) as e:
        resume_from(pair, copy, identity, tmp_path)
    message = str(e.value)
    assert f"step-000002/{name}" in message, f"the message names the damaged file: {message}"
    assert message.count("step-000002/") <= 2, message
    assert "without --resume" in message and "\n" not in message, f"one line that says what to do: {message}"


def test_resuming_a_damaged_checkpoint_from_the_command_line(pair, checkpoint, tmp_path, code_jsonl, capsys):
    directory, _ = checkpoint
    copy = tmp_path / "checkpoints"
    shutil.copytree(directory, copy)
    DAMAGE["state without step"][1](copy / "step-000002" / "state.json")
    code, _, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data",
                               code_jsonl, "--out", tmp_path / "out", "--checkpoint-dir", copy, "--resume", *TINY],
                              capsys)
    one_error(code, stderr, r"step-000002/state\.json has no 'step'")


# -- defect 8: what the report and self-generation decode stays within the base's context

def test_eval_tokens_are_cut_to_the_context_and_force_replaces_only_checkpoints(tmp_path, code_jsonl, capsys,
                                                                               monkeypatch):
    """A run with --eval-tokens far past the 2,048 positions decodes at most what fits (with a note);
    --force over an earlier out and checkpoints removes only the checkpoints, and --report-json may go
    into --out."""
    asked = []
    real_decode = evaluate.decode

    def decode(model, tokenizer, ids, drafter, k, max_tokens):
        asked.append(len(ids) + max_tokens)
        return real_decode(model, tokenizer, ids, drafter, k, min(max_tokens, 8))

    monkeypatch.setattr(evaluate, "decode", decode)
    out, ck = tmp_path / "out", tmp_path / "out.checkpoints"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (ck / "step-000007").mkdir(parents=True)
    (ck / "step-000007" / trainer.STATE_FILE).write_text("{}")
    (ck / "notes.txt").write_text("mine")
    args = ["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data", code_jsonl,
            "--out", out, "--force", "--report-json", out / "report.json", *TINY]
    args[args.index("--eval-tokens") + 1] = 10 ** 6
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert asked and max(asked) <= 2048, f"prompt + decoded tokens within the context: {max(asked)}"
    assert re.search(r"note: .* at most \d+ of --eval-tokens 1000000", stderr), stderr
    report = json.loads((out / "report.json").read_text())
    assert report["max_tokens"] + max(map(len, report["prompt_ids"])) <= 2048, "the report says what it decoded"
    assert [p.name for p in trainer.checkpoints(ck)] == ["step-000001"], "--force replaced the earlier checkpoints"
    assert (ck / "notes.txt").read_text() == "mine", "and only them"


def test_self_generation_decodes_no_token_a_window_drops(pair):
    """--self-generate N past --max-seq-length (and so past the context): the base decodes only what the
    window keeps."""
    base, tokenizer, _ = pair
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(base, name)

        def forward(self, *a, **k):
            calls.append(1)
            assert len(calls) <= 64, "decoding past what the window keeps"
            return base.forward(*a, **k)

    wins = data.windows([(tokenizer.encode(t), None) for t in CODE[:4]], 24, tokenizer.bos_token_id, 8)
    wins = [w for w in wins if w.prompt_len == 8][:2]  # one prompt length: one batched decode
    out = data.self_generate(Counting(), wins, 10 ** 6, tokenizer.eos_token_ids, 24)
    assert all(len(w.tokens) <= 24 for w in out)
    assert len(calls) <= 24 - 8, f"{len(calls)} decode passes for 8-token prompts in 24-token windows"


# -- defect 11: --report-json checked before training

def test_report_json_in_a_missing_directory_is_refused_up_front(tmp_path, code_jsonl, capsys):
    code, _, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data",
                               code_jsonl, "--out", tmp_path / "out", "--report-json", tmp_path / "nodir" / "r.json",
                               *TINY], capsys)
    one_error(code, stderr, "--report-json .*nodir/r.json: its directory does not exist")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists(), "nothing trained"


def test_out_under_a_file_is_refused_up_front(tmp_path, code_jsonl, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data",
                               code_jsonl, "--out", tmp_path / "afile" / "out", *TINY], capsys)
    one_error(code, stderr, "cannot write --out .*afile is not a directory")


# -- defect 13: deeply nested JSON in a data line

def test_deeply_nested_json_names_its_line(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"text": "fine"}\n{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(data.DataError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        data.read_jsonl(p)
