"""Where this process sits in a torchrun job, read from the RANK, WORLD_SIZE and LOCAL_RANK
torchrun sets. No torch here: the command line reads it before torch is imported."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .errors import UserError

JOIN_TIMEOUT_S = 300.0  # how long the processes of a job wait for each other to start
MAX_PROCESSES = 2**20  # a bound on WORLD_SIZE far above any job, inside every count torch keeps


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def streams(self, micro_batches: int) -> range:
        """The data streams of this process's share of a step's `micro_batches`: micro-batch m
        comes from stream m, and rank r owns a contiguous share, so that the global batch does
        not depend on the number of processes."""
        per_rank = micro_batches // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def from_environment() -> Context:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Context()
    rank, world_size, local_rank = (_env_int(name) for name in ("RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK"))
    if (not 1 <= world_size <= MAX_PROCESSES or not 0 <= rank < world_size
            or not 0 <= local_rank < world_size):
        raise UserError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} do not "
                        "describe a process of a torchrun job (0 <= RANK < WORLD_SIZE <= "
                        f"{MAX_PROCESSES}, 0 <= LOCAL_RANK < WORLD_SIZE); launch with torchrun or "
                        "unset them")
    return Context(rank, world_size, local_rank)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer; torchrun sets it, or unset it to "
                        "train in one process") from None


def address() -> tuple[str, int]:
    """Where the job's processes meet: MASTER_ADDR and MASTER_PORT, which torchrun sets."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        missing = " and ".join(n for n, v in (("MASTER_ADDR", host), ("MASTER_PORT", port))
                               if not v)
        raise UserError(f"RANK and WORLD_SIZE describe a job of several processes, but "
                        f"{missing} {'is' if ' and ' not in missing else 'are'} not set: launch "
                        "with `tinygpt torchrun` or torchrun, which set them all, or unset RANK "
                        "and WORLD_SIZE to train in one process")
    number = _env_int("MASTER_PORT")
    if not 0 < number < 2**16:
        raise UserError(f"MASTER_PORT={port!r} is not a TCP port (1 to 65535)")
    try:
        socket.getaddrinfo(host, number)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UserError(f"MASTER_ADDR={host!r:.80} is not an address this machine can reach "
                        f"({reason})") from None
    return host, number
