"""Which device a command runs on: cuda, then mps, then cpu under `auto`; an explicit device that
is absent is an error."""

from __future__ import annotations

import torch

from .errors import UserError

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` means cuda, then mps, then cpu; an explicit device that is absent is an error.
    Under torchrun (`local_rank` given) a process takes GPU cuda:LOCAL_RANK."""
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        name = f"cuda:{local_rank}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use {DEVICES}") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not supported; use {DEVICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was requested but MPS is not available on this machine")
    return device
