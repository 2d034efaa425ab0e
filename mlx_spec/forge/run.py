"""One forge job from options to a drafter directory: load the base (and its LoRA adapters), read the
data, start from a drafter of any family forge trains (MTP assistant, DFlash, DSpark, EAGLE-3) or build
one from scratch, say what memory it will take, train with the family's objective, write the result in
its published layout atomically, and report τ before and after on held-out prompts with the real engine.

    from mlx_spec.forge import ForgeOptions, forge
    report = forge(ForgeOptions(model="my-base-4bit", drafter="my-base-assistant", data="train.jsonl",
                                out="my-assistant", minutes=20))
"""

import hashlib
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import families
from ..errors import MlxSpecError, ModelLoadError
from ..loading import DTYPES
from ..memory import weight_bytes
from ..models.base import context_length
from . import build, data, evaluate, objective, output, start, trainer

DEFAULT_MINUTES = 20.0
DEFAULT_BATCH_SIZE = 4
DEFAULT_NUM_DRAFT_TOKENS = 3
DEFAULT_MAX_SEQ_LENGTH = 256
DEFAULT_LR_FINE_TUNE = 1e-3
DEFAULT_LR_SCRATCH = 2e-3
DEFAULT_PROMPT_TOKENS = 64
DEFAULT_EVAL_PROMPTS = 8
DEFAULT_EVAL_TOKENS = 128


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ForgeOptions:
    """Everything a forge job needs (the CLI's flags, same names); `validate()` says what is wrong."""

    model: str
    data: str
    out: str
    drafter: Optional[str] = None
    from_scratch: bool = False
    adapter_path: Optional[str] = None
    valid_data: Optional[str] = None
    self_generate: int = 0
    minutes: Optional[float] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    loss: str = trainer.TrainConfig.loss  # the trainer's defaults, one home
    step_decay: float = trainer.TrainConfig.step_decay
    centroid_weight: float = trainer.TrainConfig.centroid_weight
    warmup: int = trainer.TrainConfig.warmup
    report_every: int = trainer.TrainConfig.report_every
    eval_every: int = trainer.TrainConfig.eval_every
    save_every: int = trainer.TrainConfig.save_every
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    force: bool = False
    seed: int = 0
    dtype: Optional[str] = None
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    eval_prompts: int = DEFAULT_EVAL_PROMPTS
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    compare: Optional[str] = None
    report_json: Optional[str] = None
    # --from-scratch: the family, and shapes (None: from the base, see each family's objective)
    family: Optional[str] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    head: str = "auto"
    num_centroids: Optional[int] = None
    centroid_top_k: Optional[int] = None
    block_size: Optional[int] = None
    markov_rank: Optional[int] = None
    target_layers: Optional[Tuple[int, ...]] = None
    draft_vocab_size: Optional[int] = None

    def validate(self) -> None:
        if bool(self.drafter) == bool(self.from_scratch):
            raise MlxSpecError("pass either --drafter DRAFTER (fine-tune it) or --from-scratch [--family F]")
        positive = {"--batch-size": self.batch_size, "--num-draft-tokens": self.num_draft_tokens,
                    "--max-seq-length": self.max_seq_length, "--prompt-tokens": self.prompt_tokens,
                    "--eval-tokens": self.eval_tokens}
        for flag, v in positive.items():
            if v < 1:
                raise MlxSpecError(f"{flag} must be >= 1, got {v}")
        if self.max_seq_length <= self.num_draft_tokens + 1:
            raise MlxSpecError(f"--max-seq-length ({self.max_seq_length}) must exceed --num-draft-tokens + 1")
        self._validate_numbers()
        for flag, v in (("--self-generate", self.self_generate), ("--eval-prompts", self.eval_prompts),
                        ("--warmup", self.warmup), ("--eval-every", self.eval_every),
                        ("--save-every", self.save_every)):
            if v < 0:
                raise MlxSpecError(f"{flag} must be >= 0, got {v}")
        if self.report_every < 1:
            raise MlxSpecError(f"--report-every must be >= 1, got {self.report_every}")
        if self.loss not in objective.LOSSES:
            raise MlxSpecError(f"--loss must be one of {', '.join(objective.LOSSES)}, got {self.loss!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MlxSpecError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.head not in build.HEADS:
            raise MlxSpecError(f"--head must be one of {', '.join(build.HEADS)}, got {self.head!r}")
        self._validate_scratch()

    def _validate_scratch(self) -> None:
        """--family and the shape flags shape a --from-scratch drafter, each only the families it fits."""
        given = [name for name in SCRATCH_FLAGS if getattr(self, name) not in (None, "auto")]
        if self.family is not None:
            given.insert(0, "family")
        if given and not self.from_scratch:
            raise MlxSpecError(f"{', '.join(flag(n) for n in given)} shape a --from-scratch drafter; a --drafter keeps "
                               "its own family and shapes")
        if not self.from_scratch:
            return
        family = objective.family_named(self.family_name)
        wrong = [n for n in given if n != "family" and n not in objective.for_family(family).SCRATCH_FLAGS]
        if wrong:
            verb = "does" if len(wrong) == 1 else "do"
            raise MlxSpecError(f"{', '.join(flag(n) for n in wrong)} {verb} not shape a {family.name} drafter")
        for name in ("hidden_size", "num_layers", "num_attention_heads", "intermediate_size", "num_centroids",
                     "centroid_top_k", "block_size", "draft_vocab_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise MlxSpecError(f"{flag(name)} must be >= 1, got {v}")
        if self.markov_rank is not None and self.markov_rank < 0:
            raise MlxSpecError(f"--markov-rank must be >= 0, got {self.markov_rank}")
        if self.target_layers is not None and (not self.target_layers or min(self.target_layers) < 0):
            raise MlxSpecError(f"--target-layers must name base layers (0-based), got {list(self.target_layers)}")

    def _validate_numbers(self) -> None:
        """The budget and the float options: finite (NaN passes every comparison; inf never ends) and in range."""
        if self.steps is not None and self.steps < 0:
            raise MlxSpecError(f"--steps must be >= 0, got {self.steps}")
        checks = (("--minutes", self.minutes, lambda v: v >= 0 and math.isfinite(v * 60), ">= 0"),
                  ("--lr", self.lr, lambda v: v > 0, "> 0"),
                  ("--step-decay", self.step_decay, lambda v: 0 < v <= 1, "in (0, 1]"),
                  ("--centroid-weight", self.centroid_weight, lambda v: v >= 0, ">= 0"))
        for flag, v, ok, want in checks:
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise MlxSpecError(f"{flag} must be a finite number {want}, got {v}")

    @property
    def seconds(self) -> Optional[float]:
        if self.minutes is None and self.steps is None:
            return DEFAULT_MINUTES * 60
        return None if self.minutes is None else self.minutes * 60

    @property
    def family_name(self) -> str:
        return self.family or families.MTP.name

    @property
    def learning_rate(self) -> float:
        return self.lr or (DEFAULT_LR_SCRATCH if self.from_scratch else DEFAULT_LR_FINE_TUNE)

    @property
    def checkpoint_path(self) -> Path:
        out = Path(self.out).expanduser().absolute()
        return Path(self.checkpoint_dir).expanduser().absolute() if self.checkpoint_dir else \
            out.parent / f"{out.name}.checkpoints"


SCRATCH_FLAGS = ("hidden_size", "num_layers", "num_attention_heads", "intermediate_size", "head", "num_centroids",
                 "centroid_top_k", "block_size", "markov_rank", "target_layers", "draft_vocab_size")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Report:
    """The final comparison on held-out prompts (greedy, fixed k), and where the drafter went."""

    out: Path
    k: int
    prompts: int
    rows: List[tuple] = field(default_factory=list)  # (name, evaluate.Measurement)
    state: Optional[trainer.TrainState] = None
    prompt_ids: List[List[int]] = field(default_factory=list)
    max_tokens: int = 0

    def text(self) -> str:
        lines = [f"forged drafter: {self.out}",
                 f"held-out: {self.prompts} prompts, greedy, k={self.k} (median tau over prompts, quartiles)"]
        for name, m in self.rows:
            by = evaluate.by_position(m.acceptance_by_position)
            same = f"; output = plain decoding on {sum(m.same_as_plain)}/{len(m.same_as_plain)}" \
                if m.same_as_plain else ""
            lines.append(f"  {name:<10} tau {m.tau:.2f} ({m.spread()})  acceptance by position {by}{same}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"out": str(self.out), "k": self.k, "prompts": self.prompts, "prompt_ids": self.prompt_ids,
                "max_tokens": self.max_tokens,
                "rows": [{"name": n, "tau_median": m.tau, "taus": m.taus,
                          "acceptance_by_position": m.acceptance_by_position,
                          "same_as_plain": m.same_as_plain} for n, m in self.rows],
                "steps": self.state.step if self.state else None,
                "training_seconds": self.state.seconds if self.state else None}


# -- the base

def load_base(path: str, adapter_path: Optional[str] = None):
    """(model, tokenizer, model directory) of a frozen base, with mlx-lm LoRA/DoRA/full adapters applied."""
    from ..api import load
    from ..loading import resolve_model_path
    from ..models.base import offers

    model, tokenizer = load(path)
    if not (offers(model, families.PRODUCER_KV) or offers(model, families.LAYER_OUTPUTS)):
        raise ModelLoadError(f"{path} is a {getattr(model, 'model_type', '?')} model; forge trains Gemma 4 "
                             "drafters, which need a Gemma 4 base")
    if adapter_path:
        apply_adapters(model, adapter_path)
    model.freeze()
    return model, tokenizer, resolve_model_path(path)


def apply_adapters(model, adapter_path: str) -> None:
    """mlx-lm's `load_adapters` onto our Gemma 4 model (its parameter names are mlx-lm's)."""
    from mlx_lm.tuner.utils import load_adapters

    p = Path(adapter_path).expanduser()
    if not (p / "adapter_config.json").is_file() or not (p / "adapters.safetensors").is_file():
        raise ModelLoadError(f"--adapter-path {p} holds no mlx-lm adapters (adapter_config.json + "
                             "adapters.safetensors, as mlx_lm.lora writes them)")
    try:
        load_adapters(model, str(p))
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
        reason = " ".join(str(e).split())
        raise ModelLoadError(f"the adapters in {p} do not fit this base: {reason}") from e
    mx.eval(model.parameters())


def base_identity(base, model_dir: Path, adapter_path: Optional[str]) -> dict:
    """What a checkpoint must match to resume: the base's architecture, weights summary and adapters."""
    digest = hashlib.sha256()
    for name, w in sorted(tree_flatten(base.parameters()), key=lambda x: x[0]):
        digest.update(name.encode())
        digest.update(str(w.shape).encode())
    norm = base.layers[0].input_layernorm.weight  # a cheap fingerprint of the values too
    digest.update(np.array(norm.astype(mx.float32)).tobytes())
    adapters = str(Path(adapter_path).expanduser().absolute()) if adapter_path else None
    return {"model": str(Path(model_dir).absolute()), "adapter_path": adapters,
            "architecture": digest.hexdigest()[:16]}


# -- memory

def memory_estimate(base, drafter, batch_size: int, seq_len: int, k: int) -> dict:
    """Bytes, roughly: the base's weights, the drafter with gradients and Adam state (float32), and the
    activations of one step (the family's objective says what they are)."""
    n_params = sum(v.size for _, v in tree_flatten(drafter.trainable_parameters()))
    activations = objective.of_drafter(drafter).activation_bytes(base, drafter, batch_size, seq_len, k)
    return {"base": weight_bytes(base), "drafter": n_params * 16, "activations": activations}


def device_memory() -> int:
    try:
        size = int(mx.device_info().get("memory_size", 0) or 0)
    except (AttributeError, RuntimeError):
        size = 0
    if not size:
        try:
            import os

            size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            size = 0
    return size


# -- the job

def _check_window(options: ForgeOptions, base) -> None:
    """Training windows (and held-out estimates) within the base's positions."""
    ctx = context_length(base)
    if ctx and options.max_seq_length > ctx:
        raise MlxSpecError(f"--max-seq-length {options.max_seq_length} exceeds the base's context ({ctx} positions, "
                           f"its max_position_embeddings); pass at most {ctx}")


def _fit_eval_tokens(options: ForgeOptions, base, valid) -> ForgeOptions:
    """--eval-tokens cut (with a note) to what fits the context after the longest report prompt, as
    generate cuts --max-tokens: past the context the base runs on positions it was never trained on."""
    ctx = context_length(base)
    longest = max((len(w.prompt_tokens) for w in valid[: options.eval_prompts]), default=0)
    if not ctx or not longest or options.eval_tokens <= ctx - longest:
        return options
    room = max(1, ctx - longest)
    info(f"note: the longest report prompt is {longest} tokens and the context holds {ctx} (the base's "
         f"max_position_embeddings), so the report generates at most {room} of --eval-tokens {options.eval_tokens}")
    return replace(options, eval_tokens=room)


def _batches(options: ForgeOptions, base, tokenizer, dataset: data.Dataset) -> data.Batches:
    """Training batches (the data as it is, or the base's own continuations); may self-generate the
    held-out windows in place."""
    pad_id = tokenizer.pad_token_id or 0
    if not options.self_generate:
        return data.Batches(dataset.train, options.batch_size, options.seed, pad_id)

    def generate(wins):
        return data.self_generate(base, wins, options.self_generate, tokenizer.eos_token_ids, options.max_seq_length)

    info(f"self-generating: the base continues each window's prompt by {options.self_generate} tokens "
         "(held-out now, training windows as training reaches them)")
    dataset.valid = generate(dataset.valid)
    return data.SelfGeneratedBatches(dataset.train, options.batch_size, options.seed, pad_id, generate)


def _announce_memory(options: ForgeOptions, base, drafter) -> None:
    mem = memory_estimate(base, drafter, options.batch_size, options.max_seq_length, options.num_draft_tokens)
    total, have = sum(mem.values()), device_memory()
    info(f"memory estimate: base {mem['base'] / 1e9:.2f} GB + drafter {mem['drafter'] / 1e9:.2f} GB (weights, "
         f"gradients, Adam) + activations {mem['activations'] / 1e9:.2f} GB (batch {options.batch_size} x "
         f"{options.max_seq_length} tokens, k={options.num_draft_tokens}) = {total / 1e9:.2f} GB"
         + (f" of {have / 1e9:.0f} GB" if have else ""))
    if have and total > 0.8 * have:
        info("warning: that is close to this machine's memory; lower --batch-size or --max-seq-length")


def _final_report(options: ForgeOptions, base, tokenizer, report: "Report", valid, drafters) -> None:
    """τ of each (name, drafter) on the held-out prompts, and whether each output equalled plain decoding."""
    prompts = [w.prompt_tokens for w in valid[: options.eval_prompts]]
    if not prompts:
        return
    info(f"measuring tau on {len(prompts)} held-out prompts (greedy, k={options.num_draft_tokens}, "
         f"{options.eval_tokens} tokens each) ...")
    plain = evaluate.plain_outputs(base, tokenizer, prompts, options.eval_tokens)
    report.prompts, report.prompt_ids, report.max_tokens = len(prompts), prompts, options.eval_tokens
    for name, d in drafters:
        if d is not None:
            m = evaluate.measure(base, tokenizer, prompts, d, options.num_draft_tokens, options.eval_tokens, plain)
            report.rows.append((name, m))


def forge(options: ForgeOptions, progress: Optional[trainer.Progress] = None) -> Report:
    """Run a forge job; returns the report. Raises MlxSpecError for anything a user can fix."""
    options.validate()
    out = Path(options.out).expanduser().absolute()
    output.check_paths(out, options.checkpoint_path, options.report_json, {
        "--model": options.model, "--drafter": options.drafter, "--adapter-path": options.adapter_path,
        "--data": options.data, "--valid-data": options.valid_data, "--compare": options.compare})
    output.check_out(out, options.force)
    ckpt = trainer.check_checkpoint_dir(options.checkpoint_path, options.resume, options.force)

    base, tokenizer, base_dir = load_base(options.model, options.adapter_path)
    _check_window(options, base)
    identity = base_identity(base, base_dir, options.adapter_path)
    dataset = data.load_dataset(options.data, tokenizer, options.max_seq_length, options.prompt_tokens,
                                options.valid_data)
    drafter, config, begun, dtype, saved = start.starting_point(options, base, tokenizer, ckpt, identity,
                                                                dataset.train)
    start.check_k(options, drafter)
    compare = None
    if options.compare:
        compare = start.load_drafter("--compare", options.compare, base)

    dataset.valid = data.held_out(dataset.valid, options.eval_prompts)
    options = _fit_eval_tokens(options, base, dataset.valid)
    if not options.resume:
        trainer.clear_checkpoints(ckpt)  # everything is validated: only now may --force delete
    info(f"data: {len(dataset.train)} training windows ({sum(len(w.tokens) for w in dataset.train)} tokens), "
         f"{len(dataset.valid)} held out ({dataset.kind})")
    batches = _batches(options, base, tokenizer, dataset)
    _announce_memory(options, base, drafter)

    cfg = trainer.TrainConfig(options.num_draft_tokens, options.learning_rate, options.batch_size, options.steps,
                              options.seconds, options.loss, options.step_decay, options.centroid_weight,
                              options.warmup, options.report_every, options.eval_every, options.save_every,
                              options.seed)
    valid = trainer.held_out_teachers(base, drafter, dataset.valid, options.batch_size, options.num_draft_tokens)
    job = trainer.Trainer(base, drafter, config, batches, valid, cfg, ckpt, identity,
                          saved.state if saved else None, saved.optimizer_state if saved else None, progress,
                          best_weights=saved.best_weights if saved else None)
    state = job.run()
    kept = job.restore_best()
    if kept is not None:
        last = job.state.estimates[-1]
        info(f"keeping the drafter of step {kept['step']}: its held-out estimate (tau {kept['tau']:.2f}) beat the "
             f"last step's (tau {1 + sum(last['acceptance_by_position']):.2f})"
             + ("; training did not improve on the starting drafter" if kept["step"] == 0 else ""))

    output.write_drafter(out, drafter, config, dtype, tokenizer_dir=base_dir, force=options.force)
    info(f"wrote {out} after {state.step} steps ({trainer.format_seconds(state.seconds)} of training, peak memory "
         f"{mx.get_peak_memory() / 1e9:.2f} GB); checkpoints stay in {ckpt}")
    report = Report(out, options.num_draft_tokens, 0, state=state)
    _final_report(options, base, tokenizer, report, dataset.valid,
                  (("start", begun), ("compare", compare), ("forged", _reload(out, base))))
    if options.report_json:
        output.write_json(Path(options.report_json), report.as_dict(),
                          f"--report-json {options.report_json} (the drafter is written: {out})")
    return report


def _reload(out: Path, base):
    """The written directory, loaded as any user will load it."""
    from ..api import load_drafter

    return load_drafter(str(out), base)
