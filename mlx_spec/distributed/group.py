"""The ranks of an mx.distributed group as the runtime sees them: who is who, how they agree, how they fail.

Every rank runs the same program on the same inputs and must issue the same collectives in the same order.
Whatever a rank could decide on its own (a fresh seed, an error only it meets, a value it read) is decided
once and shared here. Knows nothing of models or decoding.
"""

import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, TypeVar

import mlx.core as mx
import numpy as np

from ..errors import DistributedError, MlxSpecError, RankDivergenceError

TENSOR, PIPELINE = "tensor", "pipeline"
CONNECT_TIMEOUT_S = 120.0  # a ring rank that listens waits forever for peers that never come (measured here)
CONNECT_TIMEOUT_ENV = "MLX_SPEC_CONNECT_TIMEOUT"
# what mlx.launch sets for a rank (ring: MLX_RANK + MLX_HOSTFILE, JACCL: MLX_JACCL_COORDINATOR, MPI: OMPI_*)
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "OMPI_COMM_WORLD_SIZE")
MESSAGE_BYTES = 2048  # an error message travels as this many UTF-8 bytes (longer ones are cut)
T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch, mpirun)."""
    return any(os.environ.get(name) for name in LAUNCH_ENV)


def connect_timeout() -> float:
    try:
        value = float(os.environ.get(CONNECT_TIMEOUT_ENV) or CONNECT_TIMEOUT_S)
    except ValueError:
        return CONNECT_TIMEOUT_S
    return value if value > 0 else CONNECT_TIMEOUT_S


# a watchdog process: unless its stdin closes within the timeout (the parent connected), it writes the error
# and ends the parent, whose thread is then blocked inside mx.distributed.init holding the GIL
_WATCHDOG = """import os, select, signal, sys
if not select.select([sys.stdin], [], [], float(sys.argv[2]))[0]:
    os.write(2, sys.argv[3].encode())
    os.kill(int(sys.argv[1]), signal.SIGTERM)
"""


def connect(timeout_s: Optional[float] = None) -> mx.distributed.Group:
    """The launched group (strict: a rank that cannot join is an error, never a silent single process).
    A ring rank that listens waits without limit for peers that never come, inside mx.distributed.init and
    holding the GIL, so a watchdog process ends this one after `timeout_s` (MLX_SPEC_CONNECT_TIMEOUT,
    default 120 s) with one error line."""
    timeout_s = timeout_s or connect_timeout()
    message = (f"error: the ranks did not connect within {timeout_s:g} s ({CONNECT_TIMEOUT_ENV}): check that every "
               "host in the hostfile was started, is reachable at its address and has its port free\n")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout_s), message],
                                stdin=subprocess.PIPE)
    try:
        return mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise DistributedError(f"the distributed backend failed to connect: {e}; check the hostfile's addresses and "
                               "that every host runs the same command") from None
    finally:
        watchdog.stdin.close()
        watchdog.wait()


@dataclass(frozen=True)
class Ranks:
    """A group and how the model is split over it (TENSOR or PIPELINE). `check`: compare a digest of the
    tokens across ranks after every emitted token (tests and debugging; one collective each)."""

    group: mx.distributed.Group
    mode: str = TENSOR
    check: bool = False

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def gather_ints(self, values: Sequence[int]) -> List[List[int]]:
        """Every rank's `values` (the same count on every rank), by rank."""
        local = mx.array(list(values), mx.int64)
        return mx.distributed.all_gather(local, group=self.group).reshape(self.size, -1).tolist()

    def from_root(self, values: Sequence[int]) -> List[int]:
        """Rank 0's `values` on every rank (the count must be the same everywhere)."""
        return self.gather_ints(values)[0]

    def root_ids(self, ids: Sequence[int]) -> List[int]:
        """Rank 0's token ids (any length) on every rank."""
        n = self.from_root([len(ids)])[0]
        return self.from_root(list(ids)[:n] + [0] * (n - len(ids)))

    def root_bytes(self, data: bytes) -> bytes:
        """Rank 0's bytes (any length) on every rank."""
        n = self.from_root([len(data)])[0]
        if n == 0:
            return b""
        local = np.zeros(n, np.uint8)
        local[: min(n, len(data))] = np.frombuffer(data[:n], np.uint8)
        rows = mx.distributed.all_gather(mx.array(local), group=self.group)
        return bytes(np.array(rows[:n]))

    def gather_texts(self, text: str) -> List[str]:
        data = np.zeros(MESSAGE_BYTES, np.uint8)
        raw = text.encode("utf-8", "replace")[:MESSAGE_BYTES]
        data[: len(raw)] = np.frombuffer(raw, np.uint8)
        rows = np.array(mx.distributed.all_gather(mx.array(data), group=self.group)).reshape(self.size, -1)
        return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in rows]

    def agree(self, step: Callable[[], T], what: str) -> T:
        """Run `step` on every rank; when it raised a user error on any rank, raise one on every rank naming
        the rank, so none waits forever in a collective for a rank that gave up."""
        try:
            result, message = step(), ""
        except MlxSpecError as e:
            result, message = None, str(e) or type(e).__name__
        failed = [(r, m) for r, m in enumerate(self.gather_texts(message)) if m]
        if failed:
            r, m = failed[0]
            more = f" (and on {len(failed) - 1} other rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
            error = DistributedError(f"{what} failed on rank {r}{more}: {m}")
            error.reported_by_root = not self.is_root  # the commands print it once, on rank 0
            raise error
        return result

    def check_same(self, tokens: Sequence[int], where: str) -> None:
        """Raise RankDivergenceError unless every rank holds the same `tokens` (a CRC-32 of them, compared)."""
        digest = zlib.crc32(np.asarray(tokens, np.int64).tobytes())
        digests = [d[0] for d in self.gather_ints([digest])]
        if len(set(digests)) > 1:
            raise RankDivergenceError(f"ranks diverged {where}: token digests by rank {digests}")

    def describe(self) -> str:
        return f"{self.mode} parallel over {self.size} ranks"
