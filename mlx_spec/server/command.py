"""The `mlx_spec.server` command line: flags, loading, serving until Ctrl-C or SIGTERM."""

import argparse
import math
import signal
import sys
from pathlib import Path

from ..batch.scheduler import DEFAULT_DECODE_CONCURRENCY, DEFAULT_PROMPT_CONCURRENCY
from ..cli import (DEFAULT_MAX_TOKENS, ArgumentParser, add_model_args, add_sampling_args, check_length_args,
                   load_models, run, sampling_params)
from ..distributed.serving import Lockstep
from ..errors import MlxSpecError
from ..models.base import as_base, context_length
from ..long_context import add_kv_args, check_memory, kv_settings, load_session, model_dir_context
from ..loading import is_hub_id
from ..tuning.tuner import check_tree_nodes, check_trees_possible
from .connections import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT
from .http import DEFAULT_HOST, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PORT, Server
from .worker import Worker


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.server", description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this "
                   "machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"completion length when a request does not say (default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--max-context", type=int, default=None,
                   help="most prompt + completion tokens per request (default: the model's max_position_embeddings)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default: {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                   help="a request must arrive within this, and each write to a client go out within it; else 408 "
                        f"or the connection is closed (default: {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="connections served at once; more get 503 with Retry-After (default: "
                        f"{DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--served-model-name", default=None,
                   help="the model id /v1/models and responses show (default: the model directory's name, or the "
                        "hub repo id; never a local path)")
    add_sampling_args(p, seed=False)  # defaults for requests that leave them out
    p.add_argument("--quiet", action="store_true", help="no per-request log lines on stderr")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="prefill every request from scratch (default: keep the last request's K/V and prefill "
                   "only what a follow-up adds; the output is the same)")
    p.add_argument("--prompt-cache-slots", type=int, default=1,
                   help="conversations whose K/V are kept at once, least recently used dropped first (default: 1; "
                   "each holds up to a context's worth of K/V)")
    p.add_argument("--prompt-cache-file", default=None,
                   help="a saved prompt (mlx_spec.cache_prompt): requests that start with it continue from it")
    p.add_argument("--decode-concurrency", type=int, default=DEFAULT_DECODE_CONCURRENCY,
                   help="requests decoded together in one batch, each speculating with its own drafts "
                   f"(default: {DEFAULT_DECODE_CONCURRENCY}; 1: one at a time)")
    p.add_argument("--prompt-concurrency", type=int, default=DEFAULT_PROMPT_CONCURRENCY,
                   help="requests prefilled at once, a chunk each between the batch's rounds "
                   f"(default: {DEFAULT_PROMPT_CONCURRENCY})")
    add_kv_args(p)
    return p


def main_args(args) -> int:
    sampling = sampling_params(args)
    check_length_args(args)
    if args.max_request_bytes < 1:
        raise MlxSpecError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.prompt_cache_slots < 1:
        raise MlxSpecError(f"--prompt-cache-slots must be >= 1, got {args.prompt_cache_slots}")
    if not 0 <= args.port <= 65535:
        raise MlxSpecError(f"--port must be between 0 and 65535, got {args.port}")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise MlxSpecError(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout}")
    if args.max_connections < 1:
        raise MlxSpecError(f"--max-connections must be >= 1, got {args.max_connections}")
    for flag in ("decode_concurrency", "prompt_concurrency"):
        if getattr(args, flag) < 1:
            raise MlxSpecError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.tree_nodes:  # the requests' default: refused here, not in every request
        check_tree_nodes(args.tree_nodes, args.num_draft_tokens)
        if args.strict:
            raise MlxSpecError("--tree-nodes and --strict do not go together (trees are verified without strict "
                               "mode's padding): leave one of them out")
    kv = kv_settings(args)
    slots = 1 if args.no_prompt_cache else args.prompt_cache_slots  # each holds up to a context's worth of K/V
    check_memory(args.model, args.drafter, args.max_context or model_dir_context(args.model), kv, slots=slots)
    model, tokenizer, proposer = load_models(args, with_proposer=True)  # requests can turn drafting on
    if args.tree_nodes and proposer is not None:
        check_trees_possible(model, proposer)
    ranks = as_base(model).ranks
    lockstep = Lockstep(ranks) if ranks is not None else None
    if ranks is not None and not ranks.is_root:  # under mlx.launch rank 0 alone listens; this rank follows it
        Worker(model, tokenizer, proposer, max_context=args.max_context or context_length(model),
               max_tokens=args.max_tokens, prompt_cache=not args.no_prompt_cache,
               prompt_cache_slots=args.prompt_cache_slots, strict=args.strict, kv=kv,
               decode_concurrency=args.decode_concurrency, prompt_concurrency=args.prompt_concurrency,
               lockstep=lockstep).follow()
        return 0
    saved = load_session(args.prompt_cache_file, model, kv) if args.prompt_cache_file else None
    log = None if args.quiet else sys.stderr
    try:
        server = Server(model, tokenizer, proposer, host=args.host, port=args.port,
                        model_name=args.served_model_name or served_model_name(args.model),
                        max_tokens=args.max_tokens, max_context=args.max_context,
                        max_request_bytes=args.max_request_bytes, num_draft_tokens=args.num_draft_tokens,
                        draft_by_default=not args.no_draft, sampling=sampling, log=log, access_log=log,
                        prompt_cache=not args.no_prompt_cache, prompt_cache_slots=args.prompt_cache_slots,
                        strict=args.strict, request_timeout=args.request_timeout,
                        max_connections=args.max_connections, kv=kv, session=saved,
                        decode_concurrency=args.decode_concurrency, prompt_concurrency=args.prompt_concurrency,
                        lockstep=lockstep, tree_nodes=args.tree_nodes)
    except OSError as e:
        raise MlxSpecError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port "
                           "or --host") from e
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    proposer = server.worker.proposer
    drafting = f"{proposer}, k={args.num_draft_tokens}" + (" (off by default)" if args.no_draft else "") \
        if proposer else "off"
    print(f"mlx_spec.server: {args.model} on http://{host}:{port}/v1 (drafting: {drafting}; up to "
          f"{args.decode_concurrency} requests decoded together)", file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine; the server has no authentication", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: finish as on Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.close()
    return 0


def served_model_name(model: str) -> str:
    """The id clients see: a hub repo id as given, a local model by its directory's name (a path would tell
    every client where the server's files are)."""
    if is_hub_id(model):
        return model
    return Path(model).expanduser().resolve().name or "model"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)
