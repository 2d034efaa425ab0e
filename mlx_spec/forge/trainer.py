"""The training loop: Adam on the drafter against the frozen base, a time/step budget, progress on stderr,
a held-out acceptance estimate every so often, and checkpoints that `--resume` continues from.

A checkpoint is a directory `step-NNNNNN/` in the checkpoint directory (never inside --out): the drafter's
config and weights, the optimizer state, and `state.json` (step, training seconds so far, the data order's
position, the held-out estimates, what base it was made for). It is written to a temporary directory and
renamed, so the newest complete one is always readable; the two newest are kept.

Knows nothing of file formats for data or of the engine.
"""

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..atomic import atomic_directory
from ..errors import MlxSpecError
from . import objective
from .data import Batches, pad
from .output import disk_message, drafter_weights, save_safetensors

CHECKPOINT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2
STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"
MIN_LR_FRACTION = 0.1  # cosine decay ends at this fraction of --lr
GRAD_CLIP = 1.0


class CheckpointError(MlxSpecError):
    """A checkpoint directory cannot be used (missing, from another base, unreadable, disk full)."""


@dataclass
class TrainConfig:
    k: int
    lr: float
    batch_size: int
    steps: Optional[int]
    seconds: Optional[float]
    loss: str = "kl"
    step_decay: float = objective.DEFAULT_STEP_DECAY
    centroid_weight: float = objective.DEFAULT_CENTROID_WEIGHT
    warmup: int = 20
    report_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0  # with the step, draws a block drafter's training blocks (a resumed run draws the same)

    @property
    def settings(self) -> objective.Settings:
        return objective.Settings(self.k, self.loss, self.step_decay, self.centroid_weight)


@dataclass
class Estimate:
    """The held-out acceptance estimate (objective.acceptance_estimate) at one step."""

    step: int
    acceptance_by_position: List[float]

    @property
    def tau(self) -> float:
        return 1.0 + sum(self.acceptance_by_position)

    def line(self) -> str:
        by = " ".join(f"{a:.2f}" for a in self.acceptance_by_position)
        return f"held-out estimate at step {self.step}: acceptance by position {by}, tau {self.tau:.2f}"


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0  # training time so far, over every run of a resumed job
    batches: dict = field(default_factory=dict)
    estimates: List[dict] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)  # the mean loss of each report interval
    best: dict = field(default_factory=dict)  # {"step", "tau"} of the best held-out estimate so far


def learning_rate(cfg: TrainConfig, step: int, seconds: float) -> float:
    """Linear warm-up, then cosine decay to MIN_LR_FRACTION over the budget (steps or time, whichever ends first)."""
    progress = 0.0
    if cfg.steps:
        progress = max(progress, step / cfg.steps)
    if cfg.seconds:
        progress = max(progress, seconds / cfg.seconds)
    progress = min(1.0, progress)
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    return cfg.lr * warm * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def to_float32(drafter) -> None:
    """Train in float32 whatever the stored dtype (bf16 Adam updates vanish); saved back in --dtype."""
    drafter.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                            drafter.parameters()))


def estimate(drafter, teachers: Sequence, k: int, step: int) -> Estimate:
    family = objective.of_drafter(drafter)
    accepted, counted = mx.zeros((k,)), mx.zeros((k,))
    for t in teachers:
        a, c = family.acceptance_estimate(drafter, t, k)
        accepted, counted = accepted + a.astype(mx.float32), counted + c.astype(mx.float32)
    acc = (accepted / mx.maximum(counted, 1.0)).tolist()
    return Estimate(step, acc)


def held_out_teachers(base, drafter, windows, batch_size: int, k: int) -> list:
    """The held-out windows' base forwards, computed once (the base is frozen)."""
    family = objective.of_drafter(drafter)
    out = []
    for s in range(0, len(windows), batch_size):
        tokens, mask = pad([w.tokens for w in windows[s:s + batch_size]])
        t = family.teacher(base, drafter, tokens, mask, k, light=True)
        mx.eval(t.arrays())
        out.append(t)
    return out


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line per report on stderr; on a terminal the line is rewritten in place."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._open = False

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()


# -- checkpoints

def checkpoints(directory: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def check_checkpoint_dir(directory: Path, resume: bool, force: bool) -> Path:
    """The checkpoint directory, refused when it does not fit --resume / --force (nothing deleted here)."""
    existing = checkpoints(directory)
    if resume and not existing:
        raise CheckpointError(f"--resume: no checkpoint in {directory}; start without --resume")
    if existing and not (resume or force):
        raise CheckpointError(f"{directory} holds checkpoints of an earlier run; pass --resume to continue it, "
                              "or --force to start over")
    return directory


def clear_checkpoints(directory: Path) -> None:
    """--force: the earlier run's checkpoints go (nothing else in the directory), once the whole job has been
    validated: a typo in any flag must not cost them."""
    for p in checkpoints(directory):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(directory: Path, drafter, config: dict, optimizer, state: TrainState, identity: dict,
                    best: Optional[dict] = None) -> Path:
    """best: the weights of the best held-out estimate, when they are not the current ones."""
    dest = directory / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    kept = "; the previous checkpoint is kept"

    def full(reason: str) -> CheckpointError:
        return CheckpointError(f"disk full while writing the checkpoint {dest} ({reason}){kept}")

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_directory(dest, full=full) as tmp:  # a same-step directory (a resumed run's) is replaced
            save_safetensors(tmp / "drafter.safetensors", drafter_weights(drafter, None))
            if best is not None:
                save_safetensors(tmp / BEST_FILE, best)
            save_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            body = {"step": state.step, "seconds": state.seconds, "batches": state.batches,
                    "estimates": state.estimates, "losses": state.losses, "best": state.best,
                    "identity": identity}
            (tmp / STATE_FILE).write_text(json.dumps(body, indent=2))
    except OSError as e:
        raise CheckpointError(disk_message(e, f"the checkpoint {dest}") + kept) from e
    for old in checkpoints(directory)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


@dataclass
class Checkpoint:
    config: dict
    weights: dict
    optimizer_state: dict  # flat
    state: TrainState
    identity: dict
    best_weights: Optional[dict] = None  # when the best held-out estimate was not the last step's
    path: Optional[Path] = None  # where it was read from (named by errors)


def damaged(path: Path, problem: str) -> CheckpointError:
    """The error for a checkpoint that cannot be resumed: which file, what is wrong, and the ways on."""
    step_dir = path if path.name.startswith(CHECKPOINT_PREFIX) else path.parent
    return CheckpointError(f"the checkpoint {path} {problem}; remove {step_dir} to resume from an earlier "
                           "checkpoint, or start over: without --resume, with --force or another --checkpoint-dir")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _state_problem(body) -> Optional[str]:
    """What makes a state.json body unusable (a key missing or of the wrong type), or None."""
    if not isinstance(body, dict):
        return f"is a JSON {type(body).__name__}, not an object"
    for key, ok, want in (("step", _is_count, "a whole number >= 0"),
                          ("seconds", lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0")):
        if key not in body:
            return f"has no '{key}'"
        if not ok(body[key]):
            return f"has '{key}' {body[key]!r}, not {want}"
    batches = body.get("batches", {})
    if not isinstance(batches, dict) or (batches and not all(_is_count(batches.get(k)) for k in ("epoch", "index"))):
        return f"has 'batches' {batches!r}, not {{\"epoch\": N, \"index\": N}}"
    estimates = body.get("estimates", [])
    if not isinstance(estimates, list) or not all(
            isinstance(e, dict) and _is_count(e.get("step")) and isinstance(e.get("acceptance_by_position"), list)
            and all(_is_number(a) for a in e["acceptance_by_position"]) for e in estimates):
        return "has malformed held-out 'estimates'"
    losses = body.get("losses", [])
    if not isinstance(losses, list) or not all(_is_number(x) for x in losses):
        return "has malformed 'losses'"
    best = body.get("best", {})
    if not isinstance(best, dict) or (best and not (_is_count(best.get("step")) and _is_number(best.get("tau")))):
        return f"has a malformed 'best' ({best!r})"
    if not isinstance(body.get("identity", {}), dict):
        return "has a malformed 'identity'"
    return None


def _read(path: Path, load: Callable[[Path], object]):
    try:
        return load(path)
    except (OSError, ValueError, RuntimeError) as e:  # RecursionError (JSON nested too deeply) included
        reason = "holds JSON nested too deeply" if isinstance(e, RecursionError) else f"cannot be read ({e})"
        raise damaged(path, reason) from e


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint as saved; anything unreadable or malformed is a CheckpointError naming its file."""
    body = _read(path / STATE_FILE, lambda p: json.loads(p.read_text()))
    config = _read(path / "config.json", lambda p: json.loads(p.read_text()))
    weights = _read(path / "drafter.safetensors", lambda p: mx.load(str(p)))
    opt_state = _read(path / "optimizer.safetensors", lambda p: mx.load(str(p)))
    best = _read(path / BEST_FILE, lambda p: mx.load(str(p))) if (path / BEST_FILE).is_file() else None
    problem = _state_problem(body)
    if problem:
        raise damaged(path / STATE_FILE, problem)
    if not isinstance(config, dict):
        raise damaged(path / "config.json", f"is a JSON {type(config).__name__}, not an object")
    state = TrainState(body["step"], body["seconds"], body.get("batches", {}), body.get("estimates", []),
                       body.get("losses", []), body.get("best", {}))
    return Checkpoint(config, weights, opt_state, state, body.get("identity", {}), best, path)


def restore_optimizer(optimizer, drafter, flat_state: dict) -> None:
    optimizer.init(drafter.trainable_parameters())
    optimizer.state = tree_unflatten(list(flat_state.items()))


# -- the loop

class Trainer:
    """Trains `drafter` (float32, in place) against `base` on `batches`; `run()` returns the final state.

    The drafter left in place at the end is the one with the best held-out estimate (the starting one
    included), so forge never writes a drafter it measured worse than what it started from; the
    checkpoints keep the last step's for --resume."""

    def __init__(self, base, drafter, config: dict, batches: Batches, valid: Sequence,
                 cfg: TrainConfig, checkpoint_dir: Path, identity: dict, state: Optional[TrainState] = None,
                 optimizer_state: Optional[dict] = None, progress: Optional[Progress] = None,
                 clock: Callable[[], float] = time.perf_counter, best_weights: Optional[dict] = None):
        self.base, self.drafter, self.config, self.batches = base, drafter, config, batches
        self.valid, self.cfg, self.checkpoint_dir, self.identity = valid, cfg, checkpoint_dir, identity
        self.state = state or TrainState()
        self.progress = progress or Progress()
        self.clock = clock
        self.objective = objective.of_drafter(drafter)
        self.optimizer = optim.Adam(learning_rate=cfg.lr)
        if optimizer_state is not None:
            restore_optimizer(self.optimizer, drafter, optimizer_state)
        if self.state.batches:
            batches.restore(self.state.batches)
        self._loss_and_grad = nn.value_and_grad(drafter, self._loss)
        self._best = best_weights  # flat weights of the best estimate, or None while the current ones are

    def _loss(self, teacher):
        return self.objective.loss(self.drafter, teacher, self.cfg.settings)

    def _done(self) -> bool:
        c, s = self.cfg, self.state
        return bool((c.steps is not None and s.step >= c.steps) or (c.seconds is not None and s.seconds >= c.seconds))

    def time_left(self, step_seconds: float) -> Optional[float]:
        c, s = self.cfg, self.state
        left = []
        if c.steps is not None:
            left.append((c.steps - s.step) * step_seconds)
        if c.seconds is not None:
            left.append(c.seconds - s.seconds)
        return max(0.0, min(left)) if left else None

    def estimate(self) -> Estimate:
        s = self.state
        e = estimate(self.drafter, self.valid, self.cfg.k, s.step)
        s.estimates.append({"step": e.step, "acceptance_by_position": e.acceptance_by_position})
        if not s.best or e.tau > s.best["tau"]:
            s.best = {"step": e.step, "tau": e.tau}
            self._best = None  # the current weights: referenced before the next step changes them
        return e

    def _keep_current_as_best(self) -> None:
        """Before the weights change: if they are the best so far, hold on to them (MLX arrays are
        immutable, so this keeps references, not a copy)."""
        if self.state.best and self.state.best["step"] == self.state.step and self._best is None:
            self._best = dict(tree_flatten(self.drafter.parameters()))

    def save(self) -> Path:
        self.state.batches = self.batches.state()
        best = self._best if self.state.best and self.state.best["step"] != self.state.step else None
        return save_checkpoint(self.checkpoint_dir, self.drafter, self.config, self.optimizer, self.state,
                               self.identity, best)

    def restore_best(self) -> Optional[dict]:
        """Put the best-estimated weights back into the drafter; returns state.best when that changed them."""
        s = self.state
        if s.best and s.best["step"] != s.step and self._best is not None:
            self.drafter.update(tree_unflatten(list(self._best.items())))
            return s.best
        return None

    def step(self):
        self._keep_current_as_best()
        tokens, mask = next(self.batches)
        rng = np.random.default_rng((self.cfg.seed, self.state.step))
        teacher = self.objective.teacher(self.base, self.drafter, tokens, mask, self.cfg.k, rng)
        mx.eval(teacher.arrays())  # the base's pass apart: the drafter's graph stays small
        (loss, per_step), grads = self._loss_and_grad(teacher)
        grads, _ = optim.clip_grad_norm(grads, GRAD_CLIP)
        self.optimizer.learning_rate = learning_rate(self.cfg, self.state.step, self.state.seconds)
        self.optimizer.update(self.drafter, grads)
        mx.eval(loss, per_step, self.drafter.parameters(), self.optimizer.state)
        return loss.item(), per_step.tolist(), int(mask.sum().item())

    def run(self) -> TrainState:
        c, s = self.cfg, self.state
        if not s.estimates and self.valid:
            self.progress.line(self.estimate().line())
        losses, tokens, interval_start, steps_in_interval = [], 0, self.clock(), 0
        last_saved = s.step
        step_seconds = None
        while not self._done():
            t0 = self.clock()
            loss, per_step, n = self.step()
            s.step += 1
            s.seconds += self.clock() - t0
            losses.append(loss)
            tokens += n
            steps_in_interval += 1
            if s.step % c.report_every == 0 or self._done():
                now = self.clock()
                step_seconds = (now - interval_start) / steps_in_interval
                mean = sum(losses) / len(losses)
                s.losses.append(mean)
                left = self.time_left(step_seconds)
                per = " ".join(f"{x:.3f}" for x in per_step)
                total = f"/{c.steps}" if c.steps else ""
                self.progress.update(
                    f"step {s.step}{total} | loss {mean:.4f} (by draft step {per}) | "
                    f"{1 / step_seconds:.2f} steps/s, {tokens / (now - interval_start):.0f} tok/s | "
                    f"lr {self.optimizer.learning_rate.item():.2e}"
                    + (f" | {format_seconds(left)} left" if left is not None else ""))
                losses, tokens, interval_start, steps_in_interval = [], 0, self.clock(), 0
            if self.valid and c.eval_every and s.step % c.eval_every == 0:
                t0 = self.clock()
                self.progress.line(self.estimate().line())
                s.seconds += self.clock() - t0
                interval_start += self.clock() - t0
            if c.save_every and s.step % c.save_every == 0:
                self.save()
                last_saved = s.step
        if self.valid and (not s.estimates or s.estimates[-1]["step"] != s.step):
            self.progress.line(self.estimate().line())
        if last_saved != s.step or not checkpoints(self.checkpoint_dir):
            self.save()
        return s
