"""mlx_spec.forge: distill a Gemma 4 MTP assistant drafter for your own base model (quantized, fine-tuned,
LoRA-adapted), with MLX, on the machine that will run it.

    from mlx_spec.forge import ForgeOptions, forge
    report = forge(ForgeOptions(model="my-base-4bit", drafter="google/gemma-4-E2B-it-assistant",
                                data="train.jsonl", out="my-assistant", minutes=20))
    print(report.text())

Files, one job each: data.py (formats, windows, self-generation), objective.py (the inference-exact
parallel draft rollout and its loss), build.py (a drafter from scratch, centroid clustering), trainer.py
(the loop, checkpoints), resume.py (a checkpoint checked before training on from it), output.py (Google's
layout, atomically; the output paths' checks), evaluate.py (τ with the real engine), run.py (one job end
to end), __main__.py (the command line).
"""

from .run import ForgeOptions, Report, forge

__all__ = ["ForgeOptions", "Report", "forge"]
