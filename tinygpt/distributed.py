"""Data-parallel training with torch.distributed, as launched by torchrun.

The process's place in the job comes from `tinygpt.launch`; without torchrun tinygpt runs as one
process and every helper here is a no-op. NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK),
gloo on the CPU.
"""

from __future__ import annotations

import traceback

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
    """Destroy the process group. Nothing may hold it from C++ by then, DDP's reducer above all:
    a holder let go of later destroys the group while holding the GIL, which gloo's worker
    threads need to drop their last collective's tensors, and the process hangs at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def clear_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames that `error` and the exceptions chained to it
    keep alive (a failed step's DDP wrapper among them), so that they go before `stop()`."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        pending += [e.__cause__, e.__context__]


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
