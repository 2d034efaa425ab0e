"""mlx_spec.forge: distill a Gemma 4 drafter of any family mlx_spec runs (an MTP assistant, a DFlash or DSpark
block drafter, an EAGLE-3 drafter) for your own base model (quantized, fine-tuned, LoRA-adapted), with MLX,
on the machine that will run it.

    from mlx_spec.forge import ForgeOptions, forge
    report = forge(ForgeOptions(model="my-base-4bit", drafter="google/gemma-4-E2B-it-assistant",
                                data="train.jsonl", out="my-assistant", minutes=20))
    print(report.text())

Files, one job each: data.py (formats, windows, self-generation), objective.py (what a family's objective
provides, and what they share), objectives/ (one per family, named by its registration in families.py:
mtp.py, dflash.py, dspark.py, eagle3.py, blocks.py for what the block drafters share), build.py (an MTP
assistant from scratch, centroid clustering), start.py (where a job starts: a drafter, scratch or a
checkpoint), trainer.py (the loop, checkpoints), resume.py (a checkpoint checked before training on from
it), output.py (the family's published layout, atomically; the output paths' checks), evaluate.py (τ with
the real engine), run.py (one job end to end), __main__.py (the command line).
"""

from .run import ForgeOptions, Report, forge

__all__ = ["ForgeOptions", "Report", "forge"]
