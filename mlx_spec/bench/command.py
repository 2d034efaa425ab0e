"""The `mlx_spec.bench` command line."""

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Union

import mlx.core as mx

from .. import prompts as prompt_sets
from ..api import STRICT_ROWS, encode_prompt, load, load_drafter, strict_rows
from ..cli import (ArgumentParser, add_rank_args, add_sampling_args, format_prompt, load_draft_model,
                   num_draft_tokens, run, sampling_params, tree_nodes)
from ..distributed.group import launched
from ..errors import MlxSpecError
from ..identity import machine_identity, model_identity
from ..memory import resident, weight_bytes
from ..models.base import vocab_size
from ..parity.verdict import row_invariant
from ..proposers import make_proposer
from ..proposers.oracle import OracleProposer
from ..tuning import AutoTuner, CostsStore
from ..version import __version__
from ..long_context import add_kv_args, kv_settings
from .load_command import check_concurrency_args, measure_concurrency
from .memory import format_memory, peak_by_context
from .report import format_table, plot, summarize
from .runner import Bench, Config, baseline_label

DEFAULT_NUM_DRAFT_TOKENS = "1,2,3,4,5,auto"
DEFAULT_MAX_TOKENS = 128
DEFAULT_REPEATS = 3
DEFAULT_PROMPTS = "all"


def k_list(value: str) -> List[Union[int, str]]:
    out = []
    for part in value.split(","):
        if part.strip():
            out.append(num_draft_tokens(part.strip()))
    if not out:
        raise argparse.ArgumentTypeError("give at least one k, e.g. 1,2,3,auto")
    return out


def tree_list(value: str) -> List[Union[int, str]]:
    out = [tree_nodes(part.strip()) for part in value.split(",") if part.strip()]
    if not out:
        raise argparse.ArgumentTypeError("give at least one tree budget, e.g. 0,8,auto (0: chains)")
    return out


def context_list(value: str) -> List[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected context lengths, e.g. 1024,8192; got {value!r}") from None
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"context lengths must be >= 1, got {value!r}")
    return out


def rate_list(value: str) -> List[float]:
    try:
        rates = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected corruption rates in [0, 1], e.g. 0,0.2; got {value!r}") from None
    if not rates or any(not 0 <= r <= 1 for r in rates):
        raise argparse.ArgumentTypeError(f"corruption rates must be in [0, 1], got {value!r}")
    return rates


def concurrency_list(value: str) -> List[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected client counts, e.g. 1,2,4,8; got {value!r}") from None
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"client counts must be >= 1, got {value!r}")
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="MLX or Hugging Face model directory, or hub repo id")
    p.add_argument("--drafter", action="append", help="a Gemma 4 drafter: MTP assistant, DFlash or DSpark (directory "
                   "or hub repo id; 'auto' finds <base>-assistant); repeat it to compare drafters")
    p.add_argument("--random-drafter", action="store_true",
                   help="also run the drafter with random weights (a drafter that never agrees)")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer, used as the proposer")
    p.add_argument("--ngram", nargs="?", const=3, type=int, metavar="N",
                   help="prompt-lookup drafts from the last N tokens (default N: 3)")
    p.add_argument("--oracle", type=rate_list, metavar="RATE[,RATE]",
                   help="benchmark-only proposer: the plain continuation with drafts corrupted at RATE "
                        "(measures engine efficiency; greedy only)")
    p.add_argument("--num-draft-tokens", type=k_list, default=k_list(DEFAULT_NUM_DRAFT_TOKENS), metavar="K,K,..",
                   help=f"draft lengths to compare, integers and/or 'auto' (default: {DEFAULT_NUM_DRAFT_TOKENS})")
    p.add_argument("--tree-nodes", type=tree_list, default=[0], metavar="N,N,..",
                   help="tree budgets to compare with each k: 0 (chains, the default), N nodes, or 'auto' (with k "
                        "auto); e.g. --num-draft-tokens 4,8 --tree-nodes 0,4,8 (docs/TREES.md)")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per prompt")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="measured passes (medians reported)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help="built-in set: all, chat, code, summarize, structured; or a prompt file")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompts as raw text")
    p.add_argument("--json", metavar="PATH", help="write one object per configuration (a JSON list)")
    p.add_argument("--plot", metavar="PATH", help="draw speedup and acceptance by position (needs matplotlib)")
    p.add_argument("--memory-contexts", type=context_list, default=None, metavar="N,N,..",
                   help="also measure peak memory after prefilling contexts of these lengths (e.g. 1024,8192,32768)")
    p.add_argument("--concurrency", type=concurrency_list, metavar="C,C,..",
                   help="measure batching instead: C clients at once, each sending its next prompt when its answer "
                        "is complete, plain batching vs speculative batching vs one at a time (docs/BATCHING.md)")
    p.add_argument("--mlx-lm", action="store_true",
                   help="with --concurrency: also run mlx-lm's BatchGenerator on the same files (loads the base again)")
    p.add_argument("--http", type=int, metavar="C",
                   help="with --concurrency: also run the first proposer and plain through a real mlx_spec.server "
                        "process with C clients (C one of --concurrency's)")
    add_kv_args(p)
    p.add_argument("--strict", action="store_true",
                   help="strict mode for every run (plain ones too): pads where this device needs it")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or this process's CPU time: steadier on a busy shared machine "
                        "with MLX's CPU backend, but blind to overlap (async_eval) and to GPU time")
    p.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    add_rank_args(p)
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (by default each phase and pass says how long is left)")
    add_sampling_args(p)
    return p


def _random_weights(drafter, seed: int = 0):
    """A copy of the drafter's structure with random weights (token_ordering, an index table, is kept)."""
    import copy

    from mlx.utils import tree_flatten, tree_unflatten

    clone = copy.deepcopy(drafter)
    key = mx.random.key(seed)
    new = []
    for name, w in tree_flatten(clone.parameters()):
        if mx.issubdtype(w.dtype, mx.floating):
            key, sub = mx.random.split(key)
            w = (mx.random.normal(w.shape, key=sub) * 0.05).astype(w.dtype)
        new.append((name, w))
    clone.update(tree_unflatten(new))
    mx.eval(clone.parameters())
    return clone


def _param_bytes(module) -> int:
    return int(weight_bytes(module))


def build_configs(args, model, references: Dict[int, List[int]], vocab: int) -> List[Config]:
    """Every (proposer, k) to compare; `references` (prompt index -> prompt + plain continuation) is filled
    in later, before the oracle proposes anything."""

    families = []  # (name, factory(prompt index) -> Proposer, oracle rate, weights)
    for path in args.drafter or []:
        drafter = load_drafter(path, model, base_path=args.model)
        name = make_proposer(model, drafter=drafter).name  # mtp, dflash, dspark
        name = name if all(f[0] != name for f in families) else f"{name}-{len(families)}"
        families.append((name, lambda i, d=drafter: make_proposer(model, drafter=d), None, drafter))
        if args.random_drafter:
            rnd = _random_weights(drafter)
            families.append((f"{name}-random", lambda i, d=rnd: make_proposer(model, drafter=d), None, rnd))
    if args.random_drafter and not args.drafter:
        raise MlxSpecError("--random-drafter needs --drafter (it randomizes that drafter's weights)")
    if args.draft_model:
        small = load_draft_model(args.draft_model)
        try:
            make_proposer(model, draft_model=small)
        except ImportError as e:
            raise MlxSpecError(f"--draft-model is not available in this version of mlx_spec ({e})") from None
        families.append(("draft_model", lambda i, m=small: make_proposer(model, draft_model=m), None, small))
    if args.ngram is not None:
        families.append(("ngram", lambda i, n=args.ngram: make_proposer(model, ngram=n), None, None))
    for rate in args.oracle or []:
        families.append(("oracle", lambda i, r=rate: OracleProposer(references[i], r, vocab, seed=i), rate, None))
    if not families:
        raise MlxSpecError("nothing to compare with plain decoding: pass --drafter, --draft-model, --ngram or --oracle")
    return [Config(name, k, make, rate, weights, tree) for name, make, rate, weights in families
            for k in args.num_draft_tokens for tree in args.tree_nodes if _pairs(k, tree)]


def _pairs(k, tree) -> bool:
    """Which (k, tree budget) make a configuration: a tree budget of 'auto' goes with k auto only."""
    return tree != "auto" or k == "auto"


def environment(args, model, n_prompts: int) -> dict:
    import mlx_lm

    return {"machine": machine_identity(), "model": model_identity(model),
            "model_path": args.model, "drafter_path": args.drafter, "python": platform.python_version(),
            "mlx_lm": mlx_lm.__version__, "mlx_spec": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "prompts": n_prompts, "prompt_set": args.prompts, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "seed": args.seed, "clock": args.clock,
            # the op check runs the model's layers one by one: not on a model split over ranks
            "row_invariant": None if launched() else row_invariant(model, STRICT_ROWS), "strict": args.strict,
            "kv": kv_settings(args).as_dict() if args.kv_bits is not None else None}


def main_args(args) -> int:
    sampling = sampling_params(args)
    if args.max_tokens < 1:
        raise MlxSpecError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.repeats < 1:
        raise MlxSpecError(f"--repeats must be >= 1, got {args.repeats}")
    if args.oracle and args.temp > 0:
        raise MlxSpecError("--oracle proposes the greedy continuation; use it with --temp 0")
    check_concurrency_args(args)
    kv = kv_settings(args)
    if launched() and "auto" in args.num_draft_tokens:
        raise MlxSpecError("under mlx.launch --num-draft-tokens takes integers only: auto times rounds on each rank "
                           "apart, which ranks cannot share")
    if launched():
        from ..distributed.commands import load_for_command

        model, tokenizer = load_for_command(args)  # sharded; rank 0 alone writes
    else:
        model, tokenizer = load(args.model)
    prompt_list = prompt_sets.resolve(args.prompts)
    ids = [encode_prompt(tokenizer, format_prompt(tokenizer, p.text, None, not args.ignore_chat_template))
           for p in prompt_list]
    references: Dict[int, List[int]] = {}
    configs = build_configs(args, model, references, vocab_size(model) or 256)
    if args.concurrency:
        return measure_concurrency(args, model, tokenizer, ids, configs, sampling, kv,
                                   environment(args, model, len(ids)))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bench = Bench(model, ids, sampling, tokenizer.eos_token_ids, args.seed if args.seed is not None else 0,
                  args.max_tokens, progress=not args.quiet, tuner=AutoTuner(CostsStore(clock=clock)),
                  strict_rows=strict_rows(model, None) if args.strict else None, kv=kv,
                  probe=not launched())  # a cost probe stops on a time budget: ranks would disagree
    weights = {id(c.weights): c.weights for c in configs if c.weights is not None}
    with resident(model, *weights.values()):  # as stream_generate keeps them, on Apple silicon
        references.update(bench.references())
        bench.estimate(configs, args.repeats)
        bench.probe(configs)
        results, instrumented, probes = bench.measure(configs, args.repeats)
        by_context = peak_by_context(model, configs, args.memory_contexts or [], kv, bench.log)
    env = environment(args, model, len(ids))
    kinds = [p.kind for p in prompt_list]
    out = [summarize(c, results[c.label], results[baseline_label(c)], kinds, probes.get(c.family, []),
                     instrumented[c.label], args.temp, env, _param_bytes(c.weights) if c.weights is not None else 0)
           for c in configs]
    print(format_table(out) + format_memory(by_context))
    if args.json:
        Path(args.json).write_text(json.dumps(out + ([{"memory_by_context": by_context}] if by_context else []),
                                              indent=1))
    if args.plot:
        plot(out, args.plot)
    return 0


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)
