"""forge's objectives for the block drafters (DFlash, DSpark) and EAGLE-3 compute exactly what their proposers
compute at inference.

The invariant, as tests/test_forge_objective.py states it for MTP: for a round after position p of a sequence,
what the training pass computes for that round (every block of a batch in one pass; every EAGLE-3 step from
every position at once) is the proposer's: the same block hidden states and the same greedy drafts as
DFlashProposer / DSparkProposer / Eagle3Proposer on a base that ran the first p tokens, before, at and past
the sliding window, for full and cut blocks; an anchor one position off, or a context window one shorter,
shows up as a difference. The held-out estimate counts greedy rounds as the engine does.
"""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import S, F, _redraw, make_base

from mlx_spec.forge import objective
from mlx_spec.forge.objectives import blocks, dflash, dspark, eagle3
from mlx_spec.proposers.base import RoundContext
from mlx_spec.proposers.dflash import DFlashProposer
from mlx_spec.proposers.dspark import DSparkProposer
from mlx_spec.proposers.eagle3 import Eagle3Proposer
from mlx_spec.sampling import Sampler, SamplingParams

TOKENIZER = SimpleNamespace(unk_token_id=3, get_vocab=lambda: {})
T = 44  # past twice the base's window (16) and the drafter's (6)
STARTS = (1, 4, 5, 6, 15, 16, 17, 30, T - 4)


def shapes(**kw):
    base = dict(num_layers=2, num_attention_heads=None, intermediate_size=None, block_size=6, markov_rank=4,
                target_layers=(0, 2), draft_vocab_size=None, num_draft_tokens=3)
    return SimpleNamespace(**{**base, **kw})


def sequence(base, seed: int = 1) -> mx.array:
    return mx.random.randint(0, base.args.vocab_size, (2, T), key=mx.random.key(seed))


def make_dflash(base, layers=(F, F), causal=False, seed=3):
    config = dflash.scratch_config(base, TOKENIZER, shapes(), "float32")
    config.update(layer_types=list(layers), sliding_window=6 if S in layers else None)
    config["dflash_config"]["causal"] = causal
    drafter = dflash.build(base, config, 0)
    _redraw(drafter, seed)
    return drafter


def make_dspark(base, markov_rank=4, seed=3):
    drafter = dspark.build(base, dspark.scratch_config(base, TOKENIZER, shapes(markov_rank=markov_rank), "float32"), 0)
    _redraw(drafter, seed)
    return drafter


def make_eagle3(base, draft_vocab=None, seed=5):
    config = eagle3.scratch_config(base, TOKENIZER, shapes(num_layers=None, target_layers=None,
                                                           draft_vocab_size=draft_vocab), "float32")
    windows = [SimpleNamespace(tokens=sequence(base, 9)[0].tolist())]
    drafter = eagle3.build(base, config, 0, windows)
    keep = {"d2t": drafter.d2t, "t2d": drafter.t2d} if drafter.reduced_vocab else {}
    _redraw(drafter, seed)
    drafter.update(keep)
    return drafter


def proposer_drafts(proposer_class, base, drafter, tokens, p: int, k: int, layers) -> list:
    """The proposer's greedy drafts for a round after position p of tokens[1] (the base ran tokens[:p])."""
    prefix = tokens[1, : p + 1].tolist()
    proposer = proposer_class(drafter, base)
    proposer.start(prefix)
    cache = base.make_cache()
    _, _, features = base.forward_layers(mx.array([prefix[:-1]]), cache, tuple(layers))
    proposer.extend(features)
    ctx = RoundContext(prefix, p, None, cache, Sampler(SamplingParams(), 0))
    return proposer.propose(ctx, k).tokens.tolist()


def block_at(t: blocks.BlockTeacher, p: int) -> int:
    """The index of the estimate's block (stride 1) whose anchor is p."""
    return p - 1


@pytest.mark.parametrize("layers, causal", [((F, F), False), ((S, F), False), ((S, F), True)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_dflash_training_blocks_are_the_proposers(layers, causal, k):
    base = make_base("e2b")
    drafter = make_dflash(base, layers, causal)
    tokens = sequence(base)
    t = blocks.teacher(base, drafter.target_layer_ids, tokens, mx.ones(tokens.shape, mx.bool_), 2, k + 1, k - 1,
                       None, True, stride=1)
    hidden = dflash.hidden(drafter, t)  # (B, N, k+1, H)
    drafts = dflash.drafts(drafter, t)
    for p in STARTS:
        cache = drafter.make_context_cache()
        _, _, features = base.forward_layers(tokens[1:2, :p], base.make_cache(), tuple(drafter.target_layer_ids))
        drafter.extend_context(features, cache)
        block = mx.array([[tokens[1, p].item()] + [drafter.args.mask_token_id] * k])
        want = drafter.block_hidden(base.embed_scaled(block), cache)[0]
        np.testing.assert_allclose(np.array(hidden[1, block_at(t, p)]), np.array(want), rtol=2e-5, atol=2e-5,
                                   err_msg=f"p={p}: block hidden states, training vs inference")
        got = proposer_drafts(DFlashProposer, base, drafter, tokens, p, k, drafter.target_layer_ids)
        assert got == drafts[1, block_at(t, p)].tolist(), f"p={p}: DFlashProposer's drafts == training's"


def patched(name, replacement):
    """Run with blocks.<name> replaced (the objectives call it through the module)."""
    class Patch:
        def __enter__(self):
            self.real = getattr(blocks, name)
            setattr(blocks, name, replacement(self.real))

        def __exit__(self, *exc):
            setattr(blocks, name, self.real)
    return Patch()


def test_dflash_a_slip_would_show():
    """The comparison above is sharp: the block's rows one position later, or a sliding context one shorter,
    differ."""
    base = make_base("e2b")
    drafter = make_dflash(base, (S, F))
    tokens = sequence(base)
    t = blocks.teacher(base, drafter.target_layer_ids, tokens, mx.ones(tokens.shape, mx.bool_), 2, 4, 2, None, True,
                       stride=1)
    exact = np.array(dflash.hidden(drafter, t)[1, 29])
    with patched("rope_blocks", lambda real: lambda rope, x, anchors: real(rope, x, anchors + 1)):
        later = np.array(dflash.hidden(drafter, t)[1, 29])
    assert not np.allclose(later, exact, atol=1e-3), "the block at positions p+1.. differs"
    with patched("attention_masks", lambda real: lambda t, S, cw, w, c: real(t, S, cw - 1 if cw else cw, w, c)):
        short = np.array(dflash.hidden(drafter, t)[1, 29])
    assert not np.allclose(short, exact, atol=1e-3), "a context of W-2 positions differs"


@pytest.mark.parametrize("variant, markov", [("dense_keqv", 4), ("e2b", 4), ("e2b", 0)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_dspark_training_blocks_are_the_proposers(variant, markov, k):
    """k_eq_v or not, Markov head or not; the Markov head chained on the drafts as the proposer does."""
    base = make_base(variant)
    drafter = make_dspark(base, markov)
    tokens = sequence(base)
    t = blocks.teacher(base, drafter.target_layer_ids, tokens, mx.ones(tokens.shape, mx.bool_), 1, k, k - 1,
                       None, True, stride=1)
    hidden = dspark.hidden(drafter, t)
    drafts = dspark.drafts(drafter, t)
    for p in STARTS:
        cache = drafter.make_context_cache()
        _, _, features = base.forward_layers(tokens[1:2, :p], base.make_cache(), tuple(drafter.target_layer_ids))
        drafter.extend_context(features, cache)
        block = mx.array([[tokens[1, p].item()] + [drafter.args.mask_token_id] * (k - 1)])
        want = drafter.block_hidden(drafter.embed(block), cache)[0]
        np.testing.assert_allclose(np.array(hidden[1, block_at(t, p)]), np.array(want), rtol=2e-5, atol=2e-5,
                                   err_msg=f"p={p}: block hidden states, training vs inference")
        got = proposer_drafts(DSparkProposer, base, drafter, tokens, p, k, drafter.target_layer_ids)
        assert got == drafts[1, block_at(t, p)].tolist(), f"p={p}: DSparkProposer's drafts == training's"


@pytest.mark.parametrize("variant, draft_vocab", [("dense_keqv", None), ("e2b", 100)])
def test_eagle3_training_steps_are_the_proposers(variant, draft_vocab):
    """The unrolled training-time test fed its own drafts drafts what Eagle3Proposer drafts, full or reduced
    draft vocabulary."""
    base = make_base(variant)
    drafter = make_eagle3(base, draft_vocab)
    assert drafter.reduced_vocab == (draft_vocab is not None)
    tokens = sequence(base)
    k = 3
    t = eagle3.teacher(base, drafter, tokens, mx.ones(tokens.shape, mx.bool_), k, light=True)
    drafts = eagle3.drafts(drafter, t, k)  # (k, B, T-1): row j is the round whose bonus token is at j + 1
    layers = Eagle3Proposer(drafter, base).base_layers
    for p in STARTS:
        got = proposer_drafts(Eagle3Proposer, base, drafter, tokens, p, k, layers)
        assert got == drafts[:, 1, p - 1].tolist(), f"p={p}: Eagle3Proposer's drafts == training's"


def brute_force(drafts: np.ndarray, best: np.ndarray, k: int, first_scored: int):
    """Per draft position, (accepted, counted) over rounds whose k scored positions lie inside the sequence:
    drafts (B, R, k) of round r, scored against best[r + first_scored + j]."""
    B, R, _ = drafts.shape
    accepted, counted = np.zeros(k, int), np.zeros(k, int)
    for b in range(B):
        for r in range(R):
            if r + first_scored + k - 1 > best.shape[1] - 1:
                continue
            run = True
            for j in range(k):
                run = run and drafts[b, r, j] == best[b, r + first_scored + j]
                accepted[j] += run
                counted[j] += 1
    return accepted.tolist(), counted.tolist()


def agreeing(best: np.ndarray, drafts: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """best with every (k+1)-th round's first n drafts (n random in 0..k) written in, so the estimate has
    rounds that win 0..k drafts to count (a random drafter agrees with a random base almost never)."""
    best = best.copy()
    rng = np.random.default_rng(seed)
    for b in range(drafts.shape[0]):
        for r in range(0, drafts.shape[1], k + 1):
            for j in range(int(rng.integers(0, k + 1))):
                if r + 1 + j < best.shape[1]:
                    best[b, r + 1 + j] = drafts[b, r, j]
    return best


@pytest.mark.parametrize("family", ["dflash", "dspark", "eagle3"])
def test_acceptance_estimate_counts_like_the_engine(family):
    """The held-out estimate is the count of greedy rounds the drafts win (brute force over the proposer's
    drafts, as the tests above pin them): draft j counts where drafts 1..j all equal the base's argmax."""
    base = make_base("e2b")
    tokens = sequence(base)
    mask = mx.ones(tokens.shape, mx.bool_)
    k = 3
    module = module_of(family)
    if family == "eagle3":
        drafter = make_eagle3(base)
        t = eagle3.teacher(base, drafter, tokens, mask, k, light=True)
        drafts = np.array(eagle3.drafts(drafter, t, k)).transpose(1, 2, 0)  # (B, T-1, k): bonus at row + 1
    else:
        drafter = make_dflash(base) if family == "dflash" else make_dspark(base)
        shortest, rows = (2, k + 1) if family == "dflash" else (1, k)
        t = blocks.teacher(base, drafter.target_layer_ids, tokens, mask, shortest, rows, k - 1, None, True, stride=1)
        drafts = np.array(module.drafts(drafter, t))[..., :k]  # (B, T-1, k): anchor at row + 1
    best = agreeing(np.array(t.best), drafts, k)
    t.best = mx.array(best)
    accepted, counted = (x.tolist() for x in module.acceptance_estimate(drafter, t, k))
    want = brute_force(drafts, best, k, 1)
    assert all(a > 0 for a in want[0]), f"rounds that win 1..k drafts exist: {want}"
    assert (accepted, counted) == want, f"{family}: the estimate counts greedy rounds as the engine does"


def module_of(family):
    return {"dflash": dflash, "dspark": dspark, "eagle3": eagle3}[family]


@pytest.mark.parametrize("family", ["dflash", "dspark", "eagle3"])
def test_loss_is_the_kl_and_padding_counts_for_nothing(family):
    """The reported loss of draft position 1 is KL(base || drafter) averaged over the scored rows (checked
    against a direct computation); right padding changes nothing."""
    base = make_base("e4b")
    tokens = sequence(base)
    mask = mx.ones(tokens.shape, mx.bool_)
    module = module_of(family)
    drafter = {"dflash": make_dflash, "dspark": make_dspark, "eagle3": make_eagle3}[family](base)
    settings = objective.Settings(k=2, step_decay=1.0)
    t = module.teacher(base, drafter, tokens, mask, 2, rng=np.random.default_rng(0))
    total, per_step = module.loss(drafter, t, settings)
    logits, _ = base.forward(tokens, base.make_cache())
    logp = np.array(mx.log(mx.softmax(logits.astype(mx.float32), axis=-1)))
    if family == "eagle3":
        logq = np.array(mx.log(mx.softmax(drafter.unroll(t.features[1:2, :-1], tokens[1:2, 1:], 1)[0], axis=-1)))
        kl = (np.exp(logp[1, 1:]) * (logp[1, 1:] - logq)).sum(-1)
        row = eagle3.loss(drafter, eagle3.teacher(base, drafter, tokens[1:2], mask[1:2], 2), settings)[1][0]
        assert abs(kl.mean() - row.item()) < 1e-3, "step 1's reported loss is the KL"
    else:
        first = 1 if family == "dflash" else 0
        h = module.hidden(drafter, t)[:, :, first]  # (B, N, H): the rows of draft position 1
        if family == "dflash":
            q = drafter.softcap(base.head(h))
        else:
            q = drafter.block_logits(h) + drafter.markov_bias(mx.take_along_axis(t.tokens, t.anchors, axis=1))
        logq = np.array(mx.log(mx.softmax(q.astype(mx.float32), axis=-1)))
        a = np.array(t.anchors)
        used = np.array(t.used)
        target = logp[np.arange(2)[:, None], a]  # the base at p (the token at p + 1)
        kl = (np.exp(target) * (target - logq)).sum(-1)
        assert abs(kl[used].mean() - per_step[0].item()) < 1e-3, "position 1's reported loss is the KL"
    padded = mx.concatenate([tokens, mx.zeros((2, 3), tokens.dtype)], axis=1)  # as many blocks drawn (T // 4)
    pmask = mx.concatenate([mask, mx.zeros((2, 3), mx.bool_)], axis=1)
    t2 = module.teacher(base, drafter, padded, pmask, 2, rng=np.random.default_rng(0))
    if family != "eagle3":  # the same blocks: anchors are drawn among the real tokens
        np.testing.assert_array_equal(np.array(t2.anchors), np.array(t.anchors))
    assert abs(module.loss(drafter, t2, settings)[0].item() - total.item()) < 1e-4, "right padding changes nothing"


# -- end to end: the command writes each family's published layout, fine-tunes it, resumes it

CODE = [f"def h{i}(u, v):\n    w = u + {i} * v\n    return w * {i % 5 + 2}\n\n" * 3 for i in range(24)]
TINY = ["--steps", 2, "--batch-size", 2, "--max-seq-length", 48, "--eval-prompts", 1, "--eval-tokens", 6,
        "--eval-every", 0]


@pytest.fixture
def code_jsonl(tmp_path):
    import json

    p = tmp_path / "code.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    return p


def run_cli(args, capsys):
    from mlx_spec.forge.__main__ import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def published_names(family: str, tmp_path, config: dict) -> set:
    """The tensor names of a checkpoint in the family's published layout (tests/checkpoints.py and
    tests/eagle3_checkpoints.py build those as the authors publish them), for the same shapes of drafter."""
    from checkpoints import make_dflash_checkpoint, make_dspark_checkpoint
    from conftest import TINY_CODE
    from eagle3_checkpoints import eagle3_config, eagle3_weights

    base_dir = TINY_CODE / "base"
    if family == "dflash":
        path = make_dflash_checkpoint(tmp_path, base_dir, layers=(F,) * config["num_hidden_layers"],
                                      target_layer_ids=config["dflash_config"]["target_layer_ids"], name="ref")
    elif family == "dspark":
        path = make_dspark_checkpoint(tmp_path, base_dir, layers=config["num_hidden_layers"],
                                      markov_rank=config["markov_rank"], k_eq_v=False, confidence_head=False,
                                      target_layer_ids=config["target_layer_ids"], name="ref")
    else:
        import json

        text = json.loads((base_dir / "config.json").read_text())
        ref = eagle3_config(text, layers=config["transformer_layer_config"]["num_hidden_layers"],
                            aux=config["eagle_aux_hidden_state_layer_ids"])
        return set(eagle3_weights(ref, mx.zeros((text["vocab_size"], text["hidden_size"]))))
    return set(mx.load(str(path / "model.safetensors")))


PUBLISHED = {  # what each family's loaders recognise it by (families.py, mlx-vlm's get_model_type)
    "dflash": lambda c: c["architectures"] == ["DFlashDraftModel"] and c["model_type"] == "qwen3"
    and set(c["dflash_config"]) == {"target_layer_ids", "mask_token_id"} and c["block_size"] == 4,
    "dspark": lambda c: c["architectures"] == ["Gemma4DSparkModel"] and c["model_type"] == "gemma4_text"
    and c["block_size"] == 3 and c["markov_head_type"] == "vanilla" and "dflash_config" not in c,
    "eagle3": lambda c: c["speculators_model_type"] == "eagle3" and c["transformer_layer_config"]["model_type"]
    == "llama" and c["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3,
}


@pytest.mark.parametrize("family", ["dflash", "dspark", "eagle3"])
def test_from_scratch_then_fine_tuned_in_the_published_layout(tmp_path, code_jsonl, capsys, family):
    """--from-scratch --family F writes F's published layout (config form, tensor names, no tensor of another
    layout), which load_drafter takes as F; --drafter on it fine-tunes it and keeps its config."""
    import json

    from conftest import TINY_CODE

    from mlx_spec import load, load_drafter
    from mlx_spec.families import of_drafter

    first, second = tmp_path / "scratch", tmp_path / "tuned"
    block = ["--block-size", 4] if family == "dflash" else ["--block-size", 3] if family == "dspark" else []
    code, stdout, stderr = run_cli(["--model", TINY_CODE / "base", "--from-scratch", "--family", family, *block,
                                    "--data", code_jsonl, "--out", first, "--num-draft-tokens", 3, *TINY], capsys)
    assert code == 0, stderr
    config = json.loads((first / "config.json").read_text())
    assert PUBLISHED[family](config), f"{family}: the published config form: {config}"
    names = set(mx.load(str(first / "model.safetensors")))
    assert names == published_names(family, tmp_path, config), f"{family}: the published tensor names"
    base, _ = load(str(TINY_CODE / "base"))
    assert of_drafter(load_drafter(str(first), base)).name == family
    assert "forged" in stdout and "output = plain decoding on 1/1" in stdout, stdout
    code, stdout, stderr = run_cli(["--model", TINY_CODE / "base", "--drafter", first, "--data", code_jsonl,
                                    "--out", second, "--num-draft-tokens", 3, *TINY], capsys)
    assert code == 0, stderr
    assert json.loads((second / "config.json").read_text()) == config, "a fine-tuned drafter keeps its config"
    assert set(mx.load(str(second / "model.safetensors"))) == names
    assert [line.split()[0] for line in stdout.splitlines()[2:]] == ["start", "forged"], stdout


def test_a_shape_flag_the_family_does_not_take_is_refused(tmp_path, code_jsonl, capsys):
    from conftest import TINY_CODE

    code, _, stderr = run_cli(["--model", TINY_CODE / "base", "--from-scratch", "--family", "dflash", "--markov-rank",
                               4, "--data", code_jsonl, "--out", tmp_path / "out", *TINY], capsys)
    assert code == 2 and stderr.strip() == "error: --markov-rank does not shape a dflash drafter", stderr


@pytest.mark.parametrize("family", ["dflash", "eagle3"])
def test_resume_continues_exactly(tmp_path, family):
    """Blocks are drawn from (seed, step): stopped after step 3 (checkpoint at 2), resumed to step 5 == five
    steps in one go."""
    from mlx.utils import tree_flatten

    from mlx_spec.forge import data, trainer
    from mlx_spec.forge.resume import drafter_from_checkpoint

    base = make_base("e2b")
    wins = data.windows([(sequence(base, s)[0].tolist(), None) for s in range(8)], 32, None, 8)
    config = (dflash.scratch_config(base, TOKENIZER, shapes(), "float32") if family == "dflash" else
              eagle3.scratch_config(base, TOKENIZER, shapes(num_layers=None, target_layers=None), "float32"))
    fresh = lambda: module_of(family).build(base, config, 0, wins)  # noqa: E731
    cfg = trainer.TrainConfig(k=3, lr=1e-3, batch_size=2, steps=5, seconds=None, warmup=2, report_every=100,
                              eval_every=0, save_every=2, seed=7)
    quiet = trainer.Progress(open("/dev/null", "w"))
    drafter = fresh()
    trainer.Trainer(base, drafter, config, data.Batches(wins, 2, 0), [], cfg, tmp_path / "a", {}, progress=quiet).run()
    straight = dict(tree_flatten(drafter.parameters()))
    job = trainer.Trainer(base, fresh(), config, data.Batches(wins, 2, 0), [], cfg, tmp_path / "b", {},
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
    saved = trainer.read_checkpoint(trainer.checkpoints(tmp_path / "b")[-1])
    assert saved.state.step == 2
    resumed = drafter_from_checkpoint(saved, base)
    trainer.Trainer(base, resumed, saved.config, data.Batches(wins, 2, 0), [], cfg, tmp_path / "b", {},
                    state=saved.state, optimizer_state=saved.optimizer_state, progress=quiet).run()
    for name, w in tree_flatten(resumed.parameters()):
        np.testing.assert_allclose(np.array(w), np.array(straight[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{family} {name}: resumed == uninterrupted")


@pytest.mark.parametrize("family", ["dflash", "dspark", "eagle3"])
def test_training_lowers_the_loss(tmp_path, family):
    """A few Adam steps on the base's windows lower the family's loss on a held-out batch of them."""
    from mlx_spec.forge import data, trainer

    base = make_base("e2b")
    wins = data.windows([(sequence(base, s)[0].tolist(), None) for s in range(10)], 40, None, 8)
    module = module_of(family)
    opts = shapes(markov_rank=4) if family != "eagle3" else shapes(num_layers=None, target_layers=None)
    config = module.scratch_config(base, TOKENIZER, opts, "float32")
    drafter = module.build(base, config, 0, wins)
    held = module.teacher(base, drafter, *data.pad([w.tokens for w in wins[:2]]), 3, rng=np.random.default_rng(1))
    settings = objective.Settings(k=3)
    before = module.loss(drafter, held, settings)[0].item()
    cfg = trainer.TrainConfig(k=3, lr=3e-3, batch_size=2, steps=12, seconds=None, warmup=1, report_every=100,
                              eval_every=0, save_every=0)
    trainer.Trainer(base, drafter, config, data.Batches(wins[2:], 2, 0), [], cfg, tmp_path / "ck", {},
                    progress=trainer.Progress(open("/dev/null", "w"))).run()
    after = module.loss(drafter, held, settings)[0].item()
    assert after < before - 0.1, f"{family}: held-out loss {before:.3f} -> {after:.3f}"
