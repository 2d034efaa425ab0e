"""The server under mlx.launch: rank 0 listens and decides what runs; every other rank follows it.

Before a request's turn, rank 0's worker sends the turn (its prompt ids and settings) to every rank
(`Lockstep.announce`); each rank then runs that same turn on its own `Conversations` (its part of the K/V,
the same slots, since every rank sees the same turns in the same order). What only rank 0 can know is
shared as it happens: before each prefill chunk, whether the client went away (`should_stop`); after each
token, whether to go on (a stop string, a cancel, the end: `go`). So every rank runs the same engine
steps, and the same collectives in the same order. An idle follower waits in the next announcement.
Knows the conversation turn and the ranks; nothing of HTTP.
"""

import json
from typing import Callable, Optional, Tuple

from ..conversation import Conversations
from ..sampling import SamplingParams
from .group import Ranks

SHUTDOWN = b""  # an empty announcement: the server is stopping


class Lockstep:
    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    # -- rank 0 (the worker thread) and followers alike
    def go(self, decision: Optional[bool]) -> bool:
        """Rank 0's decision (rank 0 passes it; the others pass None) on every rank."""
        return bool(self.ranks.from_root([int(bool(decision))])[0])

    def should_stop(self, local: Optional[Callable[[], bool]]) -> Callable[[], bool]:
        """A prefill's should_stop that every rank answers as rank 0's `local` does."""
        return lambda: self.go(local() if local is not None else None)

    # -- rank 0
    def announce(self, prompt, settings: dict) -> None:
        sampling: SamplingParams = settings["sampling"]
        message = {**settings, "prompt": list(prompt), "sampling": [sampling.temp, sampling.top_p, sampling.top_k,
                                                                     sampling.min_p, sampling.acceptance]}
        self.ranks.root_bytes(json.dumps(message).encode())

    def shutdown(self) -> None:
        self.ranks.root_bytes(SHUTDOWN)

    # -- followers
    def next_turn(self) -> Optional[Tuple[list, dict]]:
        data = self.ranks.root_bytes(b"")
        if data == SHUTDOWN:
            return None
        message = json.loads(data)
        prompt = message.pop("prompt")
        message["sampling"] = SamplingParams(*message["sampling"])
        return prompt, message


def follow(conversations: Conversations, lockstep: Lockstep) -> None:
    """A follower rank's server: run every turn rank 0 announces, as far as rank 0 runs it, until it stops."""
    while True:
        job = lockstep.next_turn()
        if job is None:
            return
        prompt, settings = job
        turn = conversations.turn(prompt, should_stop=lockstep.should_stop(None), **settings)
        try:
            for _ in turn:
                if not lockstep.go(None):
                    break
        finally:
            turn.close()
