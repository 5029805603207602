"""Where this process sits in a torchrun job, read from the RANK, WORLD_SIZE and LOCAL_RANK
torchrun sets. No torch here: the command line reads it before torch is imported."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError


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


def from_environment() -> Context:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Context()
    rank, world_size, local_rank = (_env_int(name) for name in ("RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK"))
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} do not "
                        "describe a process of a torchrun job (0 <= RANK < WORLD_SIZE, "
                        "LOCAL_RANK >= 0); launch with torchrun or unset them")
    return Context(rank, world_size, local_rank)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer; torchrun sets it, or unset it to "
                        "train in one process") from None
