"""`mlx_spec.bench --concurrency 1,2,4,8`: C clients at once, plain batching against speculative batching.

For each C, C closed-loop clients (clients.py) decode the prompt set through the batch scheduler the server
runs, in these configurations:
    plain                      drafting off, up to C rows decoded together (plain batching)
    <proposer> k=K             drafting on, up to C rows together, each drafting its own K (or auto)
    <proposer> k=K, one at a   drafting on, decode concurrency 1: the one-at-a-time server; the others
      time                     wait in the queue (C > 1 only)
    mlx-lm                     with --mlx-lm: mlx-lm's BatchGenerator on mlx-lm's own load of the same
                               files (a second copy of the weights, in this process): the peer for plain
                               batching (mlx-lm batches no drafts: its server's is_batchable is
                               `draft_model is None`)
    ..., over HTTP             with --http C: the first proposer's first k and plain, through a real
                               `mlx_spec.server` process at C clients (the check that the server adds
                               nothing the scheduler runs do not show)
First each prompt decodes alone and plainly (the reference every answer is compared with, and a warm-up),
then every configuration runs once at every C with a few tokens (compiling its batch widths), then
`--repeats` passes: per pass, per C, every configuration in an order that rotates between passes, so the
configurations of one C run minutes apart at most and their ratios are taken within one pass.

Knows Engines (api.make_engine), the scheduler through clients.py, and the server through its command line.
"""

import sys
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple, Union

from ..api import Detokenized, make_engine
from ..engine import TokenEvent
from ..request import Request
from ..tuning.batch_policy import BatchDraftPolicy
from ..stats import GenerationStats
from .clients import Load, plan, through_mlx_lm, through_scheduler
from .http_clients import ServerProcess, through_http
from .runner import decode

WARMUP_TOKENS = 16


@dataclass(frozen=True)
class LoadConfig:
    """One way of serving the clients: a proposer family and k (None: plain), where the requests go
    ("scheduler", "mlx-lm" or "http"), and whether one request decodes at a time."""

    proposer: Optional[str] = None
    k: Union[int, str, None] = None
    backend: str = "scheduler"
    serial: bool = False

    @property
    def label(self) -> str:
        if self.backend == "mlx-lm":
            return "mlx-lm"
        label = "plain" if self.proposer is None else f"{self.proposer} k={self.k}"
        return label + (", one at a time" if self.serial else "") + (", over HTTP" if self.backend == "http" else "")


@dataclass
class HttpCheck:
    """--http C: the server's command-line arguments (model, proposer, limits) and the concurrency."""

    argv: List[str]
    concurrency: int
    port: int = 0


class LoadBench:
    """Closed-loop runs of every configuration at every concurrency (see the module docstring)."""

    def __init__(self, model, ids: List[List[int]], proposers: Dict[str, object], ks: List[Union[int, str]],
                 sampling, eos_ids, seed: int, max_tokens: int, tuner, *, kv=None, strict: bool = False,
                 peer=None, http: Optional[HttpCheck] = None, progress: bool = False):
        """`proposers`: family name -> one proposer, forked for every request (an MTP drafter's rows then
        draft in one pass); `peer`: mlx-lm's model for --mlx-lm; `tuner`: what auto shares across requests."""
        self.model, self.ids, self.proposers, self.ks = model, ids, proposers, ks
        self.sampling, self.eos_ids, self.seed, self.max_tokens = sampling, list(eos_ids), seed, max_tokens
        self.tuner, self.kv, self.strict, self.peer, self.http = tuner, kv, strict, peer, http
        self.batch_policies = {}  # proposer -> its BatchDraftPolicy, kept across runs as the tuner is
        self.progress = progress
        self.plain_s_per_token = 0.0  # measured by references()

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    def configs(self, concurrency: int) -> List[LoadConfig]:
        spec = [LoadConfig(name, k) for name in self.proposers for k in self.ks]
        out = [LoadConfig()] + spec
        if concurrency > 1:  # at 1 the one-at-a-time server is the batch
            out += [replace(c, serial=True) for c in spec]
        if self.peer is not None:
            out.append(LoadConfig(backend="mlx-lm"))
        if self.http is not None and self.http.concurrency == concurrency:
            out += [LoadConfig(backend="http"), replace(spec[0], backend="http")]
        return out

    # -- one run
    def engine(self, cfg: LoadConfig, i: int, max_tokens: int):
        """Prompt i's Engine: its own caches, a fork of the shared proposer, its policy (auto from the tuner)."""
        drafting = cfg.proposer is not None
        request = Request(self.ids[i], max_tokens=max_tokens, sampling=self.sampling, seed=self.seed + i,
                          draft=drafting, num_draft_tokens=cfg.k if drafting else 0, strict=self.strict, kv=self.kv)
        proposer = self.proposers[cfg.proposer].fork() if drafting else None
        return make_engine(self.model, request, eos_ids=self.eos_ids, proposer=proposer, tuner=self.tuner)

    def run(self, cfg: LoadConfig, concurrency: int, clients: Optional[List[List[int]]] = None,
            max_tokens: Optional[int] = None) -> Load:
        clients = clients or plan(len(self.ids), concurrency)
        n = max_tokens or self.max_tokens
        if cfg.backend == "mlx-lm":
            return through_mlx_lm(self.peer, clients, self.ids, n, self.eos_ids, self._peer_sampler())
        if cfg.backend == "http":
            body = {"max_tokens": n, "temperature": self.sampling.temp, "top_p": self.sampling.top_p,
                    "top_k": self.sampling.top_k, "min_p": self.sampling.min_p, "draft": cfg.proposer is not None}
            if cfg.proposer is not None:
                body["num_draft_tokens"] = cfg.k
            return through_http(self.http.port, clients, self.ids, body, self.seed)
        policy = None
        if cfg.proposer is not None and cfg.k == "auto":  # as the server: one batch policy for auto rows
            policy = self.batch_policies.setdefault(cfg.proposer, BatchDraftPolicy(self.model, self.tuner))
        return through_scheduler(self.model, clients, lambda i: self.engine(cfg, i, n),
                                 1 if cfg.serial else concurrency, policy)

    def _peer_sampler(self):
        from mlx_lm.sample_utils import make_sampler

        s = self.sampling
        return make_sampler(s.temp, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)

    # -- the phases
    def references(self) -> Dict[int, List[int]]:
        """Each prompt's plain output decoded alone (one request, the engine's own loop): what every answer
        must equal under greedy decoding."""
        self.log(f"each prompt alone, plainly ({len(self.ids)} prompts x {self.max_tokens} tokens)")
        start = time.perf_counter()
        out = {i: decode(self.model, ids, None, 0, self.sampling, self.max_tokens, self.eos_ids, self.seed + i,
                         self.tuner, kv=self.kv).tokens for i, ids in enumerate(self.ids)}
        self.plain_s_per_token = (time.perf_counter() - start) / max(1, sum(map(len, out.values())))
        return out

    def estimate(self, concurrencies: List[int], repeats: int) -> None:
        """Say up front how many tokens the passes decode, and how long that takes at one request's plain
        speed (batching and drafting make it shorter)."""
        tokens = repeats * sum(c * len(self.ids) * self.max_tokens * len(self.configs(c)) for c in concurrencies)
        self.log(f"the passes decode about {tokens} tokens: up to {tokens * self.plain_s_per_token / 60:.1f} min at "
                 f"one request's plain speed ({1 / max(self.plain_s_per_token, 1e-9):.0f} tok/s)")

    def warm_up(self, concurrencies: List[int]) -> None:
        """Every configuration once at every C, a few tokens per client: compiles each batch width and
        measures auto's costs before anything is timed."""
        self.log("warm-up: every configuration at every concurrency")
        for c in concurrencies:
            clients = [[j % len(self.ids)] for j in range(c)]
            for cfg in self.configs(c):
                self.run(cfg, c, clients, min(WARMUP_TOKENS, self.max_tokens))

    def measure(self, concurrencies: List[int], repeats: int) -> Dict[Tuple[LoadConfig, int], List[Load]]:
        """(configuration, C) -> one Load per pass."""
        out: Dict[Tuple[LoadConfig, int], List[Load]] = {}
        for r in range(repeats):
            for c in concurrencies:
                cfgs = self.configs(c)
                for cfg in cfgs[r % len(cfgs):] + cfgs[: r % len(cfgs)]:
                    out.setdefault((cfg, c), []).append(self.run(cfg, c))
                self.log(f"pass {r + 1}/{repeats}: {c} client{'s' if c > 1 else ''} done")
        return out

    def session(self):
        """The server process for --http while the passes run (nothing without --http)."""
        return _Serving(self.http)


class _Serving:
    def __init__(self, http: Optional[HttpCheck]):
        self.http, self.server = http, None

    def __enter__(self):
        if self.http is not None:
            self.server = ServerProcess(self.http.argv).__enter__()
            self.http.port = self.server.port

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.__exit__(*exc)


def reference_texts(tokenizer, references: Dict[int, List[int]]) -> Dict[int, str]:
    """The text a server streams for each reference (its detokenizer, the end-of-sequence token left out)."""
    out = {}
    for i, tokens in references.items():
        text = Detokenized(tokenizer, GenerationStats())
        parts = [text.response(TokenEvent(t, False, _finish(tokens, j, tokenizer))).text for j, t in enumerate(tokens)]
        out[i] = "".join(parts)
    return out


def _finish(tokens: List[int], j: int, tokenizer) -> Optional[str]:
    if j < len(tokens) - 1:
        return None
    return "stop" if tokens[j] in tokenizer.eos_token_ids else "length"
