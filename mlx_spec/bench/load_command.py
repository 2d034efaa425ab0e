"""The `--concurrency` side of the `mlx_spec.bench` command line: its flag checks, the peer's and the
server's set-up, the phases (concurrency.py), the table and the JSON."""

import json
from pathlib import Path
from typing import List

from ..errors import MlxSpecError
from ..memory import resident
from ..tuning import AutoTuner, CostsStore
from .concurrency import HttpCheck, LoadBench, reference_texts
from .load_report import format_load_table, summarize_all

NOT_WITH_CONCURRENCY = {"oracle": "--oracle", "memory_contexts": "--memory-contexts", "plot": "--plot"}


def check_concurrency_args(args) -> None:
    """Flags that only go with --concurrency, and those that do not go with it: one error each."""
    if not args.concurrency:
        for flag, given in (("--mlx-lm", args.mlx_lm), ("--http", args.http is not None)):
            if given:
                raise MlxSpecError(f"{flag} goes with --concurrency (e.g. --concurrency 1,2,4,8)")
        return
    for attr, flag in NOT_WITH_CONCURRENCY.items():
        if getattr(args, attr):
            raise MlxSpecError(f"{flag} does not apply with --concurrency")
    if args.clock != "wall" and args.http is not None:
        raise MlxSpecError("--clock cpu counts this process's CPU time, and the --http server is another process: "
                           "use one or the other")
    if args.http is not None and args.http not in args.concurrency:
        raise MlxSpecError(f"--http {args.http}: the client count must be one of --concurrency's "
                           f"({','.join(map(str, args.concurrency))})")


def load_peer(path: str):
    """mlx-lm's own model for the same files (its loader, its dtype)."""
    import mlx_lm

    try:
        model, _ = mlx_lm.load(path)
    except Exception as e:  # noqa: BLE001 - any failure of mlx-lm's loader is one line for the user
        raise MlxSpecError(f"--mlx-lm: mlx-lm could not load {path} ({type(e).__name__}: {e})") from e
    return model


def _dtype(module) -> str:
    from mlx.utils import tree_flatten

    import mlx.core as mx

    return next((str(w.dtype).replace("mlx.core.", "") for _, w in tree_flatten(module.parameters())
                 if mx.issubdtype(w.dtype, mx.floating)), "?")


def server_argv(args, concurrency: int) -> List[str]:
    """`mlx_spec.server`'s arguments for the --http check: the bench's model and first proposer, no prompt
    cache (the scheduler runs prefill every prompt too), the first k, this concurrency."""
    argv = ["--model", args.model, "--decode-concurrency", str(concurrency), "--max-tokens", str(args.max_tokens),
            "--num-draft-tokens", str(args.num_draft_tokens[0]), "--no-prompt-cache"]
    if args.drafter:
        argv += ["--drafter", args.drafter[0]]
    elif args.draft_model:
        argv += ["--draft-model", args.draft_model]
    else:
        argv += ["--ngram", str(args.ngram)]
    if args.kv_bits is not None:
        argv += ["--kv-bits", str(args.kv_bits), "--kv-group-size", str(args.kv_group_size),
                 "--quantized-kv-start", str(args.quantized_kv_start)]
    return argv + (["--strict"] if args.strict else [])


def measure_concurrency(args, model, tokenizer, ids, configs, sampling, kv, environment: dict) -> int:
    """`configs`: the command's proposer x k configurations; each family's proposer is made once and forked
    per request."""
    proposers = {}
    for c in configs:
        proposers.setdefault(c.proposer, c.make(0))
    weights = {id(c.weights): c.weights for c in configs if c.weights is not None}
    peer = load_peer(args.model) if args.mlx_lm else None
    http = HttpCheck(server_argv(args, args.http), args.http) if args.http is not None else None
    bench = LoadBench(model, ids, proposers, args.num_draft_tokens, sampling, tokenizer.eos_token_ids,
                      args.seed if args.seed is not None else 0, args.max_tokens, AutoTuner(CostsStore()), kv=kv,
                      strict=args.strict, peer=peer, http=http, progress=not args.quiet)
    with resident(model, *weights.values()), bench.session():
        references = bench.references()
        bench.estimate(args.concurrency, args.repeats)
        bench.warm_up(args.concurrency)
        runs = bench.measure(args.concurrency, args.repeats)
    environment = dict(environment, temp=args.temp, concurrency=args.concurrency, http=args.http,
                       peer={"mlx_lm_dtype": _dtype(peer)} if peer is not None else None)
    out = summarize_all(runs, references, reference_texts(tokenizer, references), args.temp == 0, environment)
    print(format_load_table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
