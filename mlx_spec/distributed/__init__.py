"""Exact speculative decoding across machines: a Gemma 4 model sharded over the ranks of an mx.distributed
group (launched by `mlx.launch`), tensor parallel (the default) or pipeline parallel.

    group.py      who is who, agreeing on values and errors, connecting without hanging
    tensor.py     heads, K/V heads, MLP (vocab.py: embeddings and head; experts.py: MoE experts)
    pipeline.py   layers split over ranks (pipeline_run.py: one pass, the K/V mirrors)
    loading.py    each rank loads only its part; the one stderr line on how the model is sharded
    requests.py   one request, the same on every rank; the per-token digest check
    commands.py   the commands under mlx.launch: rank 0 alone writes, errors agreed
    serving.py    the server: rank 0 listens and announces each turn, the other ranks follow

Every rank runs the same engine on the same request: drafters are replicated (an MTP assistant's attention is
sharded with the base's K/V heads), so every rank drafts, verifies, accepts and rolls back identically.

    from mlx_spec.distributed import load          # under mlx.launch, on every rank
    model, tokenizer = load("path/to/gemma-4", mode="tensor")
    text = mlx_spec.generate(model, tokenizer, prompt, drafter=mlx_spec.load_drafter(path, model))
"""

from .group import PIPELINE, TENSOR, Ranks, launched  # noqa: F401
from .loading import load  # noqa: F401
