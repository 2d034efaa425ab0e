"""`mlx_spec.forge` (or `python -m mlx_spec.forge`): distill a Gemma 4 drafter (MTP assistant, DFlash, DSpark
or EAGLE-3) for your own base.

    mlx_spec.forge --model BASE (--drafter DRAFTER | --from-scratch [--family mtp|dflash|dspark|eagle3])
                   --data DATA --out DIR [--adapter-path A] [--self-generate N] [--minutes M | --steps N]
                   [--lr LR] [--batch-size B] [--num-draft-tokens K] [--resume] [--force] ...

Progress goes to stderr; the final report (tau and acceptance by draft position of the starting drafter
and the forged one on held-out prompts) to stdout. A user mistake prints one `error: ...` line and exits 2.
"""

import argparse
import sys

from ..cli import ArgumentParser, run
from ..loading import DTYPES
from . import build, objective
from . import run as job


def layer_ids(text: str):
    """--target-layers 0,1,2 -> (0, 1, 2)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected base layer ids separated by commas (e.g. 1,8,15), got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.forge", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the base: MLX or Hugging Face directory or hub repo id, "
                   "quantized or not (as it will run at inference)")
    p.add_argument("--adapter-path", help="mlx-lm adapters (LoRA, DoRA or full, as mlx_lm.lora writes them) "
                   "applied to the base")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--drafter", help="the drafter to fine-tune, of any family forge trains (MTP assistant, "
                       "DFlash, DSpark, EAGLE-3; directory or hub repo id): written back in its family's layout")
    start.add_argument("--from-scratch", action="store_true", help="build a new drafter with shapes from the base")
    p.add_argument("--data", required=True, help="training data: .jsonl (text | messages | prompt+completion), "
                   "an mlx-lm data directory (train.jsonl, valid.jsonl), a text file or a directory of text files")
    p.add_argument("--valid-data", help="held-out data (default: valid.jsonl, or the last 5%% of --data)")
    p.add_argument("--out", required=True, help="output drafter directory (written atomically)")
    p.add_argument("--self-generate", type=int, default=0, metavar="N",
                   help="train on the base's own greedy continuation (N tokens) of each data prompt")
    g = p.add_argument_group("budget and optimization")
    g.add_argument("--minutes", type=float, help=f"training time (default: {job.DEFAULT_MINUTES:g} unless --steps)")
    g.add_argument("--steps", type=int, help="training steps (with --minutes: whichever ends first)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {job.DEFAULT_LR_FINE_TUNE:g} to fine-tune, "
                   f"{job.DEFAULT_LR_SCRATCH:g} from scratch); warm-up, then cosine decay over the budget")
    g.add_argument("--batch-size", type=int, default=job.DEFAULT_BATCH_SIZE)
    g.add_argument("--max-seq-length", type=int, default=job.DEFAULT_MAX_SEQ_LENGTH, help="tokens per window")
    g.add_argument("--num-draft-tokens", type=int, default=job.DEFAULT_NUM_DRAFT_TOKENS, metavar="K",
                   help="draft steps unrolled in training (a block drafter: blocks of every length up to K drafts), "
                   "and k of the held-out estimates and the final report")
    g.add_argument("--loss", choices=objective.LOSSES, default=job.ForgeOptions.loss,
                   help="kl: KL to the base's distribution; ce: cross-entropy to its argmax")
    g.add_argument("--step-decay", type=float, default=job.ForgeOptions.step_decay,
                   help="weight of draft step (block row) j is decay^(j-1)")
    g.add_argument("--centroid-weight", type=float, default=job.ForgeOptions.centroid_weight,
                   help="weight of the centroid head's cluster loss")
    g.add_argument("--warmup", type=int, default=job.ForgeOptions.warmup, help="warm-up steps")
    g.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("progress, checkpoints, report")
    c.add_argument("--report-every", type=int, default=job.ForgeOptions.report_every,
                   help="steps between progress lines")
    c.add_argument("--eval-every", type=int, default=job.ForgeOptions.eval_every,
                   help="steps between held-out acceptance estimates (0: off)")
    c.add_argument("--save-every", type=int, default=job.ForgeOptions.save_every,
                   help="steps between checkpoints (0: only at the end)")
    c.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT.checkpoints beside --out)")
    c.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    c.add_argument("--force", action="store_true", help="replace an existing --out (and earlier checkpoints)")
    c.add_argument("--prompt-tokens", type=int, default=job.DEFAULT_PROMPT_TOKENS,
                   help="prompt length taken from text windows (self-generation, report)")
    c.add_argument("--eval-prompts", type=int, default=job.DEFAULT_EVAL_PROMPTS, help="held-out prompts in the report")
    c.add_argument("--eval-tokens", type=int, default=job.DEFAULT_EVAL_TOKENS, help="tokens generated per report prompt")
    c.add_argument("--compare", help="another drafter to include in the final report")
    c.add_argument("--report-json", help="also write the report as JSON here (in a directory that exists, or in --out)")
    s = p.add_argument_group("--from-scratch family and shapes (default: from the base)")
    s.add_argument("--family", choices=[f.name for f in objective.forged()],
                   help="the drafter family to build (default: mtp)")
    s.add_argument("--hidden-size", type=int, help="mtp: the drafter's width (block drafters and EAGLE-3 are as "
                   "wide as the base)")
    s.add_argument("--num-layers", type=int)
    s.add_argument("--num-attention-heads", type=int)
    s.add_argument("--intermediate-size", type=int)
    s.add_argument("--head", choices=build.HEADS, default="auto",
                   help="centroid (E2B/E4B style) or dense tied head; auto: centroid for drafters up to 256 wide")
    s.add_argument("--num-centroids", type=int)
    s.add_argument("--centroid-top-k", type=int)
    s.add_argument("--block-size", type=int, help="dflash, dspark: block rows (DFlash drafts block-1 a round, "
                   "DSpark block)")
    s.add_argument("--markov-rank", type=int, help="dspark: rank of the Markov head (0: none)")
    s.add_argument("--target-layers", type=layer_ids, metavar="IDS", help="dflash, dspark: base layers read "
                   "(0-based, e.g. 1,8,15); eagle3: its aux ids (id a reads the input of base layer a)")
    s.add_argument("--draft-vocab-size", type=int, help="eagle3: the draft vocabulary, the most frequent tokens of "
                   "the training data (default: the whole vocabulary up to 32000)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the written drafter (default: the starting "
                   "drafter's; from scratch, the base's)")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    return p


def options_from_args(args: argparse.Namespace) -> job.ForgeOptions:
    fields = job.ForgeOptions.__dataclass_fields__
    return job.ForgeOptions(**{k: v for k, v in vars(args).items() if k in fields})


def main_args(args: argparse.Namespace) -> int:
    report = job.forge(options_from_args(args))  # it writes --report-json too (its path checked up front)
    print(report.text())
    return 0


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
