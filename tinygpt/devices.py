"""Which device a command runs on: cuda, then mps, then cpu under `auto`; an explicit device that
is absent is an error. And what a CPU has for bf16 matrix products."""

from __future__ import annotations

import os
import platform

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


# oneDNN's instruction sets (dnnl_cpu_isa_t) as bit masks: each holds the bits of those it extends.
ONEDNN_ISAS = {"SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F,
               "AVX512_CORE": 0x27, "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7,
               "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF, "AVX10_1_512_AMX": 0xFEF,
               "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF,
               "AVX512_CORE_AMX_FP16": 0x1FEF}


def cpu_bf16_units(environ=os.environ, flags: dict[str, bool] | None = None
                   ) -> tuple[str | None, str]:
    """The CPU's bf16 matrix units that oneDNN (which runs torch's bf16 products) may use: "AMX"
    or "AVX-512 BF16", or None and why not. Without them bf16 products are emulated, several
    times slower than fp32's. `flags`: the CPU's {"amx": ..., "avx512_bf16": ...} (default:
    torch's reading of this CPU); ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) below
    AVX512_CORE_BF16 keeps oneDNN off them, as on a CPU without them."""
    if flags is None:
        flags = {name: bool(getattr(torch.cpu, f"_is_{check}_supported", lambda: False)())
                 for name, check in (("amx", "amx_tile"), ("avx512_bf16", "avx512_bf16"))}
    units = "AMX" if flags["amx"] else "AVX-512 BF16" if flags["avx512_bf16"] else None
    if units is None:
        return None, "this CPU has no bf16 units (AMX, AVX-512 BF16)"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        limit = environ.get(name, "").strip().upper()
        mask = ONEDNN_ISAS.get(limit)
        bf16 = ONEDNN_ISAS["AVX512_CORE_BF16"]
        if mask is not None and (mask & bf16) != bf16:
            return None, f"{name}={limit} keeps oneDNN off this CPU's {units}"
    return units, ""


# The variables that make a CPU look like one with fewer instruction sets to torch's libraries.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
              "ATEN_CPU_CAPABILITY")


def cpu_words(environ=os.environ) -> str:
    """This CPU as measured figures name it: its model, the vector instructions torch's own
    kernels use, its bf16 units as oneDNN may use them, and the variables that limit either."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    units, _ = cpu_bf16_units(environ)
    limits = [f"{name}={environ[name]}" for name in ISA_LIMITS if name in environ]
    return (f"{model} ({torch.backends.cpu.get_cpu_capability()}, "
            + (f"bf16 units: {units}" if units else "no bf16 units")
            + (f"; {', '.join(limits)}" if limits else "") + ")")
