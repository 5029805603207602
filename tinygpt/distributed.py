"""Data-parallel training with torch.distributed, as launched by torchrun.

The process's place in the job comes from `tinygpt.launch`; without torchrun tinygpt runs as one
process and every helper here is a no-op. NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK),
gloo on the CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .launch import Context


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
