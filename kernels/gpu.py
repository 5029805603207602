"""The GPU a kernel launches on: which architectures the kernels support, how much shared memory a
block may use there (the launch settings depend on it), and the device guard around launches.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
from torch.library import wrap_triton

MIN_CAPABILITY = 80  # Ampere: native bf16 tensor cores, and the shared memory the tiles need

# Shared memory one block may opt into, in bytes, by compute capability x10 (CUDA programming
# guide, "Technical Specifications per Compute Capability").
SHARED_MEMORY = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                 100: 232448, 120: 101376}
# The least of it among the supported targets: every launch setting fits in this much.
LEAST_SHARED_MEMORY = min(v for c, v in SHARED_MEMORY.items() if c >= MIN_CAPABILITY)


# TRITON_INTERPRET as Triton reads it: these words switch its CPU interpreter on; anything else
# leaves it off, so a value in neither list is refused rather than guessed at.
INTERPRET_ON = ("1", "true", "yes", "on", "y")
INTERPRET_OFF = ("", "0", "false", "no", "off", "n")


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    value = os.environ.get("TRITON_INTERPRET", "")
    if value.lower() in INTERPRET_ON:
        return True
    if value.lower() in INTERPRET_OFF:
        return False
    raise ValueError(f"TRITON_INTERPRET={value!r} is neither on ({', '.join(INTERPRET_ON)}) nor "
                     f"off (unset, {', '.join(INTERPRET_OFF[1:])})")


@dataclass(frozen=True)
class Target:
    capability: int  # major * 10 + minor: 80 for A100, 90 for H100
    shared: int  # bytes of shared memory one block may use


INTERPRETER = Target(90, SHARED_MEMORY[90])  # the CPU interpreter runs Hopper's launch settings


def target(device: torch.device) -> Target:
    """The architecture and shared memory of `device` (INTERPRETER off CUDA)."""
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_target(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_target(index: int) -> Target:
    from triton.runtime import driver  # the limit Triton itself checks a launch against

    major, minor = torch.cuda.get_device_capability(index)
    shared = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Target(10 * major + minor, shared)


def unsupported_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on CUDA `device`, or None when they can."""
    capability = target(device).capability
    if capability >= MIN_CAPABILITY:
        return None
    name = torch.cuda.get_device_name(device)
    return (f"{device} ({name}) has compute capability {capability // 10}.{capability % 10}; the "
            f"Triton kernels need {MIN_CAPABILITY // 10}.{MIN_CAPABILITY % 10} (Ampere) or newer")


def traceable(kernel):
    """`wrap_triton(kernel)`, whose launches torch.compile traces; in Triton's interpreter, the
    kernel itself (torch before 2.13 refuses the interpreter's kernels there)."""
    from triton.runtime.jit import JITFunction  # here: this module imports without Triton

    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes t's CUDA device current, so that a launch runs where t lives (a no-op off CUDA)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
