"""One forge job from options to a drafter directory: load the base (and its LoRA adapters), read the
data, start from an assistant or from scratch, say what memory it will take, train, write the result
atomically, and report τ before and after on held-out prompts with the real engine.

    from mlx_spec.forge import ForgeOptions, forge
    report = forge(ForgeOptions(model="my-base-4bit", drafter="my-base-assistant", data="train.jsonl",
                                out="my-assistant", minutes=20))
"""

import hashlib
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import families
from ..errors import MlxSpecError, ModelLoadError
from ..loading import DTYPES
from ..memory import weight_bytes
from ..models.base import context_length
from . import build, data, evaluate, objective, output, resume, trainer

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
    # --from-scratch shapes (None: from the base, see build.py)
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    head: str = "auto"
    num_centroids: Optional[int] = None
    centroid_top_k: Optional[int] = None

    def validate(self) -> None:
        if bool(self.drafter) == bool(self.from_scratch):
            raise MlxSpecError("pass either --drafter STOCK_ASSISTANT (fine-tune it) or --from-scratch")
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
        scratch_flags = [f for f, v in (("--hidden-size", self.hidden_size), ("--num-layers", self.num_layers),
                                        ("--num-attention-heads", self.num_attention_heads),
                                        ("--intermediate-size", self.intermediate_size),
                                        ("--num-centroids", self.num_centroids),
                                        ("--centroid-top-k", self.centroid_top_k)) if v is not None]
        if self.head != "auto":
            scratch_flags.append("--head")
        if scratch_flags and not self.from_scratch:
            raise MlxSpecError(f"{', '.join(scratch_flags)} shape a --from-scratch drafter; a --drafter keeps its own")

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
    def learning_rate(self) -> float:
        return self.lr or (DEFAULT_LR_SCRATCH if self.from_scratch else DEFAULT_LR_FINE_TUNE)

    @property
    def checkpoint_path(self) -> Path:
        out = Path(self.out).expanduser().absolute()
        return Path(self.checkpoint_dir).expanduser().absolute() if self.checkpoint_dir else \
            out.parent / f"{out.name}.checkpoints"


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
    if not offers(model, families.PRODUCER_KV):
        raise ModelLoadError(f"{path} is a {getattr(model, 'model_type', '?')} model; forge trains Gemma 4 "
                             "assistant drafters, which need a Gemma 4 base")
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
    activations of one step. The vocabulary-wide arrays dominate: the base's distribution (probabilities
    and logits) and, per draft step, the drafter's logits and log-softmax with their gradients (kept for
    one step at a time when the head is recomputed, as for Gemma 4's 262k vocabulary)."""
    V = drafter.text_args.vocab_size
    H_d = drafter.text_args.hidden_size
    n_params = sum(v.size for _, v in tree_flatten(drafter.trainable_parameters()))
    tokens = batch_size * seq_len
    layers = drafter.text_args.num_hidden_layers
    heads = drafter.text_args.num_attention_heads
    teacher = tokens * (3 * V + 4 * base.text_args.hidden_size) * 4
    vocab_step = tokens * 4 * V * 4
    trunk_step = tokens * layers * (6 * drafter.text_args.intermediate_size + 12 * H_d) * 4 \
        + batch_size * layers * heads * seq_len * seq_len * 4 * 2
    kept = 1 if V >= objective.RECOMPUTE_VOCAB else k
    return {"base": weight_bytes(base), "drafter": n_params * 16,
            "activations": teacher + k * trunk_step + kept * vocab_step}


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

def _scratch_dtype(options: ForgeOptions, base) -> str:
    """--dtype, else the base's float dtype (float32 next to a float32 base, else Google's bfloat16)."""
    return options.dtype or ("float32" if base.layers[0].input_layernorm.weight.dtype == mx.float32 else "bfloat16")


def _load_drafter(flag: str, path: str, base):
    """An MTP assistant (what forge trains and compares), validated against the base; block drafters
    (DFlash, DSpark), which load_drafter also loads, are refused."""
    from ..api import load_drafter

    drafter = load_drafter(path, base)
    if families.of_drafter(drafter).forge is None:
        trained = ", ".join(t for f in families.FAMILIES if f.forge for t in f.model_types)
        raise MlxSpecError(f"{flag} {path} is a {drafter.describe()}; forge trains Gemma 4 MTP assistants "
                           f"({trained})")
    return drafter


def _load_start(options: ForgeOptions, base):
    """The --drafter to fine-tune, as stored (it is also the report's starting point); (drafter, dtype)."""
    start = _load_drafter("--drafter", options.drafter, base)
    if any(type(m).__name__.startswith("Quantized") for _, m in start.named_modules()):
        raise MlxSpecError(f"{options.drafter} is quantized; forge trains float drafters: convert the assistant "
                           "without -q (mlx_spec.convert --hf-path ... --mlx-path ...) and pass that")
    return start, options.dtype or str(start.pre_projection.weight.dtype).split(".")[-1]


def _resumed_start(options: ForgeOptions, base, config: dict):
    """(starting drafter or None, output dtype) when resuming."""
    if options.from_scratch:
        return None, options.dtype or config.get("dtype") or _scratch_dtype(options, base)
    return _load_start(options, base)


def _start_drafter(options: ForgeOptions, base):
    """(drafter float32, its config.json dict, starting drafter for the report or None, output dtype)."""
    from ..checkpoint import read_config

    if options.from_scratch:
        dtype = _scratch_dtype(options, base)
        config = build.scratch_config(base, options.hidden_size, options.num_layers, options.num_attention_heads,
                                      options.intermediate_size, options.head, options.num_centroids,
                                      options.centroid_top_k, dtype)
        try:
            drafter = build.build_from_scratch(base, config, options.seed)
        except ValueError as e:
            raise MlxSpecError(f"cannot build a drafter of these shapes: {e}") from e
        return drafter, config, None, dtype
    start, dtype = _load_start(options, base)
    config = read_config(Path(start.source_path))
    drafter, _ = _clone(start, config)
    return drafter, config, start, dtype


def _clone(drafter, config: dict):
    """A float32 copy of a drafter (the original stays as it was, for the before/after report)."""
    from ..models import gemma4_assistant

    copy = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    copy.update(drafter.parameters())
    trainer.to_float32(copy)
    mx.eval(copy.parameters())
    return copy, config


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


def _starting_point(options: ForgeOptions, base, ckpt: Path, identity: dict):
    """(drafter to train, its config, report's starting drafter or None, output dtype, Checkpoint or None):
    from the newest checkpoint with --resume, else from --drafter / scratch."""
    if not options.resume:
        drafter, config, start, dtype = _start_drafter(options, base)
        return drafter, config, start, dtype, None
    path = trainer.checkpoints(ckpt)[-1]
    drafter, saved = resume.load(path, base, identity)
    config = saved.config
    start, dtype = _resumed_start(options, base, config)  # a --drafter is still the report's starting point
    info(f"resuming from {path} (step {saved.state.step}, {trainer.format_seconds(saved.state.seconds)} trained)")
    return drafter, config, start, dtype, saved


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
    drafter, config, start, dtype, saved = _starting_point(options, base, ckpt, identity)
    compare = None
    if options.compare:
        compare = _load_drafter("--compare", options.compare, base)

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
                              options.warmup, options.report_every, options.eval_every, options.save_every)
    valid = trainer.held_out_teachers(base, drafter, dataset.valid, options.batch_size)
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
                  (("start", start), ("compare", compare), ("forged", _reload(out, base))))
    if options.report_json:
        output.write_json(Path(options.report_json), report.as_dict(),
                          f"--report-json {options.report_json} (the drafter is written: {out})")
    return report


def _reload(out: Path, base):
    """The written directory, loaded as any user will load it."""
    from ..api import load_drafter

    return load_drafter(str(out), base)
