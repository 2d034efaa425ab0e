"""forge end to end: a drafter built from scratch pairs with its base, the written directory is Google's
layout (transformers' tensor names, token_ordering int32) and loads back, training lowers the loss,
resume continues exactly where a run stopped, LoRA adapters change the base, and every bad input is one
clear error line with nothing half-written.
"""

import errno
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, TINY_CODE
from mlx.utils import tree_flatten

from mlx_spec.forge import build, data, output, trainer
from mlx_spec.forge.objectives import mtp
from mlx_spec.forge.__main__ import main

CODE = [f"def f{i}(x, y):\n    z = x * {i} + y\n    return z - {i * 3}\n\n" * 3 for i in range(24)]


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


# -- building from scratch

def test_balanced_kmeans_gives_equal_clusters_of_similar_rows():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16))
    X = np.concatenate([c + 0.05 * rng.normal(size=(32, 16)) for c in centers])  # 8 tight groups of 32
    labels = build.balanced_kmeans(X, 8, seed=1)
    assert np.bincount(labels, minlength=8).tolist() == [32] * 8, "exactly V/C tokens per cluster"
    for g in range(8):
        assert len(set(labels[g * 32:(g + 1) * 32])) == 1, "a tight group stays together"


def test_scratch_drafter_pairs_with_its_base_and_has_a_permutation_ordering(pair):
    base, _, shipped = pair
    config = build.scratch_config(base)
    text = config["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], config["num_centroids"],
            config["centroid_intermediate_top_k"]) == (64, 2, 32, 8), "the shipped tiny assistant's shapes"
    drafter = build.build_from_scratch(base, config)
    ordering = np.array(drafter.masked_embedding.token_ordering)
    assert ordering.dtype == np.int32 and sorted(ordering.tolist()) == list(range(2048))
    assert {n for n, _ in tree_flatten(drafter.parameters())} == {n for n, _ in tree_flatten(shipped.parameters())}
    dense = build.build_from_scratch(base, build.scratch_config(base, head="dense", num_layers=3))
    assert not dense.args.use_ordered_embeddings and dense.text_args.layer_types[-1] == "full_attention"


# -- the output directory

def test_written_drafter_is_googles_layout_and_loads_back(tmp_path):
    from mlx_spec.api import load_drafter
    from mlx_spec.loading import load_model

    base, _, _ = load_model(str(FIXTURES / "hf" / "e2b_like"))
    hf = FIXTURES / "hf" / "assistant_centroid"
    drafter = load_drafter(str(hf), base)
    config = json.loads((hf / "config.json").read_text())
    out = output.write_drafter(tmp_path / "out", drafter, config, "bfloat16", tokenizer_dir=hf)
    written = mx.load(str(out / "model.safetensors"))
    reference = mx.load(str(hf / "model.safetensors"))  # written by transformers 5.24
    assert set(written) == set(reference), "transformers' tensor names, no more, no fewer"
    assert written["masked_embedding.token_ordering"].dtype == mx.int32
    assert written["model.embed_tokens.weight"].dtype == mx.bfloat16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_assistant" and cfg["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()
    again = load_drafter(str(out), base)
    np.testing.assert_array_equal(np.array(again.masked_embedding.token_ordering),
                                  np.array(drafter.masked_embedding.token_ordering))


def test_output_config_keeps_an_mtp_model_type():
    """A forged unified assistant stays one (the 12B's drafter); anything else is written as Google's
    gemma4_assistant."""
    unified = mtp.output_config({"model_type": "gemma4_unified_assistant", "text_config": {}}, "bfloat16")
    assert unified["model_type"] == "gemma4_unified_assistant"
    assert unified["architectures"] == ["Gemma4UnifiedAssistantForCausalLM"] and unified["dtype"] == "bfloat16"
    plain = mtp.output_config({"model_type": "gemma4_text", "text_config": {}}, None)
    assert plain["model_type"] == "gemma4_assistant" and plain["architectures"] == ["Gemma4AssistantForCausalLM"]


def test_report_shows_an_undrafted_position_as_a_dash():
    from mlx_spec.forge import evaluate

    assert evaluate.by_position([0.9, 0.5, None]) == "0.90, 0.50, -"


def test_output_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch, pair):
    base, _, drafter = pair
    config = json.loads((TINY_CODE / "assistant" / "config.json").read_text())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(output.OutputError, match="already exists; pass --force"):
        output.write_drafter(tmp_path / "taken", drafter, config)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(output.OutputError, match="not a model directory"):
        output.write_drafter(tmp_path / "notes", drafter, config, force=True)

    def full(path, weights):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "save_safetensors", full)
    with pytest.raises(output.OutputError, match="disk full while writing --out .*nothing was written"):
        output.write_drafter(tmp_path / "new" / "out", drafter, config)
    assert not (tmp_path / "new").exists(), "no partial directory, no parent left behind"


# -- training

def tiny_setup(pair, n=12, length=32):
    base, tokenizer, drafter = pair
    wins = data.windows([(tokenizer.encode(t), None) for t in CODE[:n]], length, tokenizer.bos_token_id, 8)
    from mlx_spec.forge.start import clone

    config = json.loads((TINY_CODE / "assistant" / "config.json").read_text())
    return base, clone(drafter, config), config, wins


def test_training_lowers_the_loss(pair, tmp_path):
    base, drafter, config, wins = tiny_setup(pair)
    cfg = trainer.TrainConfig(k=2, lr=1e-3, batch_size=2, steps=8, seconds=None, warmup=1, report_every=4,
                              eval_every=0, save_every=0)
    valid = trainer.held_out_teachers(base, drafter, wins[:2], 2, 2)
    before = trainer.estimate(drafter, valid, 2, 0)
    t0 = mtp.teacher_for(base, drafter, *data.pad([w.tokens for w in wins[:2]]))
    loss0 = mtp.distill(drafter, t0, 2, drafter.text_args.sliding_window)[0].item()
    lines = []
    progress = trainer.Progress()
    progress.update = progress.line = lines.append
    job = trainer.Trainer(base, drafter, config, data.Batches(wins, 2, 0), valid, cfg, tmp_path / "ck", {},
                          progress=progress)
    state = job.run()
    loss1 = mtp.distill(drafter, t0, 2, drafter.text_args.sliding_window)[0].item()
    assert state.step == 8 and loss1 < loss0, f"loss {loss0:.3f} -> {loss1:.3f}"
    assert any(line.startswith("step 8/8 | loss") and "left" in line for line in lines), lines
    assert sum("held-out estimate" in line for line in lines) == 2, "at the start and at the end"
    assert len(state.estimates) == 2 and state.estimates[0]["acceptance_by_position"] == before.acceptance_by_position
    assert [p.name for p in trainer.checkpoints(tmp_path / "ck")] == ["step-000008"]


def test_a_run_that_makes_the_drafter_worse_keeps_the_starting_one(pair, tmp_path):
    """Training with an absurd learning rate ruins the drafter; the held-out estimate says so, and the
    trainer hands back the starting weights (the checkpoint keeps both, for --resume)."""
    base, drafter, config, wins = tiny_setup(pair)
    original = {n: np.array(w) for n, w in tree_flatten(drafter.parameters())}
    valid = trainer.held_out_teachers(base, drafter, wins[:4], 2, 2)
    cfg = trainer.TrainConfig(k=2, lr=3.0, batch_size=2, steps=3, seconds=None, warmup=1, report_every=10,
                              eval_every=0, save_every=0)
    job = trainer.Trainer(base, drafter, config, data.Batches(wins[4:], 2, 0), valid, cfg, tmp_path / "ck", {},
                          progress=trainer.Progress(open("/dev/null", "w")))
    state = job.run()
    first, last = (1 + sum(e["acceptance_by_position"]) for e in (state.estimates[0], state.estimates[-1]))
    assert last < first, "the ruined drafter is estimated worse"
    assert (trainer.checkpoints(tmp_path / "ck")[-1] / trainer.BEST_FILE).is_file()
    assert job.restore_best() == {"step": 0, "tau": first}
    for name, w in tree_flatten(drafter.parameters()):
        np.testing.assert_array_equal(np.array(w), original[name], err_msg=f"{name}: the starting weights are back")


def test_resume_continues_exactly(pair, tmp_path, monkeypatch):
    """Stopped after step 3 (checkpoint at 2), resumed to step 6 == six steps in one go."""
    base, _, _ = pair

    def fresh():
        _, drafter, config, wins = tiny_setup(pair)
        return drafter, config, wins

    cfg = trainer.TrainConfig(k=2, lr=1e-3, batch_size=2, steps=6, seconds=None, warmup=2, report_every=100,
                              eval_every=0, save_every=2)
    quiet = trainer.Progress(open("/dev/null", "w"))
    drafter, config, wins = fresh()
    trainer.Trainer(base, drafter, config, data.Batches(wins, 2, 0), [], cfg, tmp_path / "a", {"b": 1},
                    progress=quiet).run()
    straight = dict(tree_flatten(drafter.parameters()))

    drafter, config, wins = fresh()
    job = trainer.Trainer(base, drafter, config, data.Batches(wins, 2, 0), [], cfg, tmp_path / "b", {"b": 1},
                          progress=quiet)
    real_step, calls = job.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step()

    job.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        job.run()
    latest = trainer.checkpoints(tmp_path / "b")[-1]
    assert latest.name == "step-000002"
    saved = trainer.read_checkpoint(latest)
    assert saved.identity == {"b": 1} and saved.state.step == 2
    from mlx_spec.forge.resume import drafter_from_checkpoint

    resumed = drafter_from_checkpoint(saved, base)
    _, _, wins = fresh()
    trainer.Trainer(base, resumed, saved.config, data.Batches(wins, 2, 0), [], cfg, tmp_path / "b", saved.identity,
                    state=saved.state, optimizer_state=saved.optimizer_state, progress=quiet).run()
    for name, w in tree_flatten(resumed.parameters()):
        np.testing.assert_allclose(np.array(w), np.array(straight[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name}: resumed == uninterrupted")


# -- adapters

def test_lora_adapters_apply_to_our_gemma4_model(tmp_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_spec import load
    from mlx_spec.errors import ModelLoadError
    from mlx_spec.forge.run import apply_adapters

    adapted, _ = load(str(TINY_CODE / "base"))
    params = {"rank": 4, "scale": 4.0, "dropout": 0.0}
    adapted.freeze()
    linear_to_lora_layers(adapted, 2, params)
    lora = {n: (0.05 * mx.random.normal(w.shape, key=mx.random.key(i)) if n.endswith("lora_b") else w)
            for i, (n, w) in enumerate(tree_flatten(adapted.trainable_parameters()))}
    adapted.update(tree_flatten_to_tree(lora))
    d = tmp_path / "adapters"
    d.mkdir()
    mx.save_safetensors(str(d / "adapters.safetensors"), lora)
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                       "lora_parameters": params}))
    plain, _ = load(str(TINY_CODE / "base"))
    with_adapters, _ = load(str(TINY_CODE / "base"))
    apply_adapters(with_adapters, str(d))
    ids = mx.array([[2, 319, 290, 11, 91, 304]])
    ref = adapted(ids)
    out = with_adapters(ids)
    assert not np.allclose(np.array(out), np.array(plain(ids)), atol=1e-3), "the adapters change the base"
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)

    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                       "lora_parameters": {**params, "rank": 8}}))
    with pytest.raises(ModelLoadError, match="do not fit this base"):
        apply_adapters(load(str(TINY_CODE / "base"))[0], str(d))
    with pytest.raises(ModelLoadError, match="holds no mlx-lm adapters"):
        apply_adapters(plain, str(tmp_path))


def tree_flatten_to_tree(flat: dict):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


# -- the command line

def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_fine_tunes_writes_and_reports(tmp_path, code_jsonl, capsys):
    out = tmp_path / "forged"
    code, stdout, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant",
                                    "--data", code_jsonl, "--out", out, "--steps", 3, "--batch-size", 2,
                                    "--max-seq-length", 48, "--eval-every", 2, "--save-every", 2,
                                    "--eval-prompts", 1, "--eval-tokens", 8, "--report-every", 1], capsys)
    assert code == 0, stderr
    assert "memory estimate: base" in stderr and "step 3/3 | loss" in stderr
    assert "held-out estimate at step 2" in stderr
    assert "start" in stdout and "forged" in stdout and "output = plain decoding on 1/1" in stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    ck = tmp_path / "forged.checkpoints"
    assert [p.name for p in trainer.checkpoints(ck)] == ["step-000002", "step-000003"]

    code, _, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data",
                               code_jsonl, "--out", tmp_path / "other", "--steps", 1, "--checkpoint-dir", ck], capsys)
    assert code == 2 and stderr.strip().count("\n") == 0 and "pass --resume to continue it" in stderr

    code, stdout, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data",
                                    code_jsonl, "--out", tmp_path / "more", "--steps", 5, "--checkpoint-dir", ck,
                                    "--resume", "--batch-size", 2, "--max-seq-length", 48, "--eval-prompts", 0],
                                   capsys)
    assert code == 0, stderr
    assert "resuming from" in stderr and "step-000003" in stderr and "step 5/5" in stderr


def test_a_unified_assistant_is_forged_for_the_12b_layout(tmp_path, code_jsonl):
    """The 12B's layout (gemma4_unified base, gemma4_unified_assistant drafter, tiny and random): forge
    trains, writes a unified assistant back (as test_unified.py builds one: no PLE keys) and decodes exactly."""
    from checkpoints import make_drafter, make_unified_checkpoint

    from mlx_spec.forge import ForgeOptions, forge

    base = make_unified_checkpoint(tmp_path)
    start = make_drafter(tmp_path, base, head="dense", layers=("sliding_attention", "full_attention"), name="asst")
    config = json.loads((start / "config.json").read_text())
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        config["text_config"].pop(key)
    config["text_config"]["model_type"] = "gemma4_unified_text"
    config.update(model_type="gemma4_unified_assistant", architectures=["Gemma4UnifiedAssistantForCausalLM"])
    (start / "config.json").write_text(json.dumps(config))
    report = forge(ForgeOptions(model=str(base), drafter=str(start), data=str(code_jsonl), out=str(tmp_path / "out"),
                                steps=2, batch_size=2, max_seq_length=40, eval_prompts=1, eval_tokens=12),
                   progress=trainer.Progress(io.StringIO()))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "gemma4_unified_assistant"
    assert written["architectures"] == ["Gemma4UnifiedAssistantForCausalLM"]
    assert [n for n, _ in report.rows] == ["start", "forged"]
    assert all(m.same_as_plain == [True] for _, m in report.rows), "drafting changed no token"


def test_cli_from_scratch(tmp_path, code_jsonl, capsys):
    out = tmp_path / "scratch"
    code, stdout, stderr = run_cli(["--model", TINY_CODE / "base", "--from-scratch", "--data", code_jsonl,
                                    "--out", out, "--steps", 2, "--batch-size", 2, "--max-seq-length", 32,
                                    "--eval-prompts", 1, "--eval-tokens", 6, "--compare", TINY_CODE / "assistant",
                                    "--self-generate", 8], capsys)
    assert code == 0, stderr
    assert "self-generating" in stderr and "compare" in stdout and "forged" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_assistant" and cfg["use_ordered_embeddings"] is True
    assert mx.load(str(out / "model.safetensors"))["masked_embedding.token_ordering"].dtype == mx.int32


@pytest.mark.parametrize("case, message", [
    ("missing data", "data path .* does not exist"),
    ("malformed", r"bad\.jsonl:2: not valid JSON"),
    ("not paired", "drafter vocab_size is 512 but the base model's is 2048"),
    ("out exists", "--out .* already exists; pass --force"),
    ("both starts", "not allowed with argument"),
    ("bad adapter", "holds no mlx-lm adapters"),
    ("scratch flag with drafter", "--hidden-size shape a --from-scratch drafter"),
    ("block beyond its size", "--num-draft-tokens 6 exceeds what this drafter drafts in one round \\(5: DFlash"),
])
def test_cli_bad_inputs_are_one_line(tmp_path, code_jsonl, capsys, case, message):
    args = ["--model", TINY_CODE / "base", "--drafter", TINY_CODE / "assistant", "--data", code_jsonl,
            "--out", tmp_path / "out", "--steps", 1]
    if case == "missing data":
        args[5] = tmp_path / "nope.jsonl"
    elif case == "malformed":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "a"}\n{"text": oops}\n')
        args[5] = bad
    elif case == "not paired":
        args[3] = FIXTURES / "hf" / "assistant_centroid"
    elif case == "out exists":
        (tmp_path / "out").mkdir()
    elif case == "both starts":
        args.append("--from-scratch")
    elif case == "bad adapter":  # a directory of its own: --out inside an input is refused first
        (tmp_path / "adapters").mkdir()
        args += ["--adapter-path", tmp_path / "adapters"]
    elif case == "scratch flag with drafter":
        args += ["--hidden-size", 32]
    elif case == "block beyond its size":  # a block of 6 rows drafts at most 5
        from checkpoints import make_dflash_checkpoint

        args[3] = make_dflash_checkpoint(tmp_path, TINY_CODE / "base", target_layer_ids=(0, 2))
        args += ["--num-draft-tokens", 6]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out.checkpoints").exists() or not any((tmp_path / "out.checkpoints").iterdir())
