"""Data-parallel training with torch.distributed, as launched by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them tinygpt runs as one process and every
helper here is a no-op. NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


def start(ctx: Context, device: torch.device) -> None:
    if ctx.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest `value` over all ranks, on every rank: how ranks agree to stop together."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any."""
    return bool(max_over_ranks(float(flag), device))


def gather(obj) -> list:
    """`obj` from every rank, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
