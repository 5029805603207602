"""The random streams a run draws from: the positions of its data streams and torch's generators,
which draw dropout. A step takes them first and puts them back if a stop request cuts it short,
so that resuming takes that very step; checkpoints hold every rank's, which a resumed run on as
many processes restores (on another number, all but the per-rank dropout streams)."""

from __future__ import annotations

import torch

from . import distributed
from .data import Batches
from .launch import Context


def state(batches: Batches, device: torch.device) -> tuple:
    """This process's streams as they stand."""
    cuda = device.type == "cuda"
    return (batches.state(), torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if cuda else None)


def set_state(batches: Batches, device: torch.device, saved: tuple) -> None:
    """Put back the streams that `state` took."""
    positions, cpu, cuda = saved
    batches.load_state(positions)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def gathered(batches: Batches, device: torch.device) -> dict:
    """Every rank's streams, for a checkpoint's "rng"; every rank must call this."""
    positions, cpu, cuda = zip(*distributed.gather(state(batches, device)))  # each: one a rank
    return {"torch": list(cpu), "cuda": list(cuda) if device.type == "cuda" else None,
            "batches": Batches.merge_states(list(positions))}


def restore(rng: dict, batches: Batches, device: torch.device, ctx: Context) -> None:
    """This rank's streams from a checkpoint's "rng" (checked by `check_training_state`)."""
    if len(rng["torch"]) == ctx.world_size:  # per-rank dropout streams: same count only
        torch.set_rng_state(rng["torch"][ctx.rank])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"][ctx.rank], device)
    batches.load_state(rng["batches"])
