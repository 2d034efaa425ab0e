"""The server under mlx.launch: rank 0 listens and decides what runs; every other rank follows it, step by
step of the batch scheduler.

Before each scheduler step, rank 0's worker sends every rank a `Plan`: the requests it started since the
last one (prompt ids and every setting, its fresh seed included), the requests it cancelled (a client gone,
a stop string: both end a request at the next step), or the end. Each rank applies the plan to its own
worker (its own Conversations: the same slots, since every rank sees the same requests in the same order)
and steps its own scheduler: every rank runs the same rows, rounds and collectives in the same order.
What could differ by rank is decided by rank 0 or left out: a request without a seed gets rank 0's fresh
one, `auto` draft lengths become a fixed k (they time rounds on each rank's clock), a prefill is stopped
only through the plan (never by a rank's own look at its client), and admission by memory is off (each
rank's share of the K/V differs; --decode-concurrency bounds the rows). Stop strings are matched on every
rank alike, from the same tokens.

Knows the worker's start/cancel/step and the ranks; nothing of HTTP.
"""

import json
from dataclasses import dataclass, field
from typing import List, Optional

from ..request import Request
from ..sampling import SamplingParams, random_seed
from .group import Ranks
from .requests import DISTRIBUTED_K


@dataclass
class Plan:
    """What every rank does before its next scheduler step."""

    starts: List[dict] = field(default_factory=list)  # started requests (encode_start), in order
    cancels: List[int] = field(default_factory=list)  # the start numbers of requests cancelled since
    stop: bool = False  # the server is stopping: cancel everything and end


class Lockstep:
    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    @property
    def is_root(self) -> bool:
        return self.ranks.is_root

    def exchange(self, plan: Optional[Plan] = None) -> Plan:
        """Rank 0 sends its plan (every other rank passes None and receives it)."""
        data = json.dumps(plan.__dict__).encode() if plan is not None else b""
        message = json.loads(self.ranks.root_bytes(data))
        return Plan(message["starts"], message["cancels"], message["stop"])


def agreed(request: Request) -> Request:
    """The request as every rank will run it: a seed if it has none (rank 0's fresh one, sent to every rank;
    with no seed of the client's, the sampling stays rejection, as without one), a fixed k for auto, and chains
    for a client's "tree_nodes"."""
    changes = {}
    if request.seed is None:
        if request.sampling.acceptance == "auto":
            changes["sampling"] = SamplingParams(**{**request.sampling.__dict__, "acceptance": "rejection"})
        changes["seed"] = random_seed()
    if request.num_draft_tokens == "auto":
        changes["num_draft_tokens"] = DISTRIBUTED_K
    if request.tree_nodes:  # across ranks drafts stay chains (distributed/commands.py: --tree-nodes is refused)
        changes["tree_nodes"] = 0
    return request.replace(**changes) if changes else request


def encode_start(number: int, request: Request, kind: str, stop: List[str], logprobs: Optional[int]) -> dict:
    """A started request as plain JSON: its number, the Request's fields (no processors: the server has
    none), and what the job's stream needs (kind, stop strings, logprobs asked for)."""
    s = request.sampling
    return {"number": number, "prompt": list(request.prompt), "max_tokens": request.max_tokens,
            "sampling": [s.temp, s.top_p, s.top_k, s.min_p, s.acceptance], "seed": request.seed,
            "draft": request.draft, "num_draft_tokens": request.num_draft_tokens, "logprobs": request.logprobs,
            "strict": request.strict, "kind": kind, "stop": list(stop), "want": logprobs}


def decode_start(entry: dict) -> Request:
    return Request(tuple(entry["prompt"]), max_tokens=entry["max_tokens"], sampling=SamplingParams(*entry["sampling"]),
                   seed=entry["seed"], draft=entry["draft"], num_draft_tokens=entry["num_draft_tokens"],
                   logprobs=entry["logprobs"], strict=entry["strict"]).validate()
