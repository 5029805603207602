"""Data-parallel training with torch.distributed, as launched by torchrun.

The process's place in the job comes from `tinygpt.launch`; without torchrun tinygpt runs as one
process and every helper here is a no-op. NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK),
gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError, first_line
from .launch import Context, address

WAIT_NOTICE_S = 5.0  # a wait longer than this is announced
COLLECTIVE_TIMEOUT_S = 1800.0  # torch's default for gloo: rank 0 may evaluate for long


def start(ctx: Context, device: torch.device, join_timeout: float) -> None:
    """Join the job's process group. The processes meet at MASTER_ADDR:MASTER_PORT; one that
    waits there more than `WAIT_NOTICE_S` says so, and all give up after `join_timeout` seconds
    with one line (the collectives after that keep torch's own timeout)."""
    if not ctx.enabled or dist.is_initialized():
        return
    host, port = address()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tag = "" if ctx.is_main else f" (rank {ctx.rank})"
    notice = threading.Timer(WAIT_NOTICE_S, lambda: print(
        f"tinygpt{tag}: waiting for the {ctx.world_size} processes of the job to meet at "
        f"{host}:{port} (giving up after {join_timeout:g} s; --join-timeout S)",
        file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    try:
        store, _, _ = next(dist.rendezvous("env://", ctx.rank, ctx.world_size,
                                           timeout=timedelta(seconds=join_timeout)))
    except (RuntimeError, ValueError) as e:  # torch's DistError family: timed out, refused
        raise UserError(f"the {ctx.world_size} processes of the job did not all meet at "
                        f"{host}:{port} within {join_timeout:g} s ({first_line(e):.160}); start "
                        "every process (torchrun does), or allow longer with --join-timeout") from e
    finally:
        notice.cancel()
    store.set_timeout(timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=ctx.rank, world_size=ctx.world_size,
                            device_id=device if device.type == "cuda" else None)


def stop() -> None:
    """Destroy the process group. Nothing may hold it from C++ by then, DDP's reducer above all:
    a holder let go of later destroys the group while holding the GIL, which gloo's worker
    threads need to drop their last collective's tensors, and the process hangs at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(ctx: Context, device: torch.device, join_timeout: float):
    """The job's process group for the body: joined first (`start`), destroyed after it (`stop`),
    with the frames a failure keeps alive cleared before."""
    start(ctx, device, join_timeout)
    try:
        yield
    except BaseException as error:
        if ctx.enabled:
            clear_frames(error)
        raise
    finally:
        stop()


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


def agreed_signal(signum: int | None, device: torch.device) -> int:
    """The signal that stops the run, agreed on by every rank (0: none)."""
    return int(max_over_ranks(signum or 0, device))


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


def wrap(model: torch.nn.Module, ctx: Context, device: torch.device) -> torch.nn.Module:
    """`model` under DistributedDataParallel in a job, as it is otherwise."""
    if not ctx.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, skip: bool):
    """Within it, a backward pass of `model` (as `wrap` returned it) leaves out the all-reduce if
    `skip`: gradient accumulation reduces on the last micro-batch alone."""
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
