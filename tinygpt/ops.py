"""The one dispatch point: which implementation runs attention and LayerNorm.

Backends:
  reference  the explicit math in `tinygpt.kernels.reference` (the truth tests compare against);
  torch      PyTorch built-ins (`scaled_dot_product_attention`, `layer_norm`), for cpu and mps;
  triton     the fused kernels in `tinygpt.kernels`, for CUDA (or the CPU under TRITON_INTERPRET=1);
  auto       triton on CUDA when triton imports, the GPU is Ampere (sm_80) or newer and the kernels
             take the model's attention shape; torch otherwise (saying why, once). Training then
             checks the kernels on the GPU and times them against torch (`tinygpt.trust`).

`$TINYGPT_BACKEND` replaces `auto` with a fixed choice. `precision` picks the autocast dtype for
a device. Nothing else in tinygpt branches on the device or the backend.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tinygpt import kernels
from tinygpt.kernels.gpu import interpreted, unsupported_reason
from tinygpt.kernels.reference import attention_reference, layer_norm_reference

from .errors import UserError

BACKENDS = ("auto", "triton", "torch", "reference")


class AttentionShape(NamedTuple):
    """The largest attention call a model makes: batch, heads, head dim."""

    batch: int
    heads: int
    head_dim: int


def interpreter_on() -> bool:
    """Whether Triton runs kernels in its CPU interpreter; a TRITON_INTERPRET that is neither on
    nor off is a UserError."""
    try:
        return interpreted()
    except ValueError as e:
        raise UserError(str(e)) from e


def requested_backend(requested: str) -> tuple[str, str]:
    """The backend asked for, with `$TINYGPT_BACKEND` replacing `auto`, and where it came from."""
    if requested == "auto" and (env := os.environ.get("TINYGPT_BACKEND")):
        return env, "TINYGPT_BACKEND"
    return requested, "--backend"


def resolve_backend(requested: str, device: torch.device | str,
                    shape: AttentionShape | None = None) -> str:
    """The concrete backend for `requested` on `device` and attention of `shape` (None: the
    model has no attention); raises UserError if it cannot run."""
    device = torch.device(device)
    requested, source = requested_backend(requested)
    if requested not in BACKENDS:
        raise UserError(f"{source}: unknown backend {requested!r}; choose one of: "
                        f"{', '.join(BACKENDS)}")
    if requested == "auto":
        if device.type != "cuda":
            return "torch"
        if (err := kernels.TRITON_IMPORT_ERROR) is not None:
            _warn_once(f"triton is not usable ({err}); falling back to the torch backend")
            return "torch"
        if (reason := unsupported_reason(device)) is not None:
            _warn_once(f"{reason}; using the torch backend")
            return "torch"
        if shape is not None and (reason := kernels.unsupported_shape(*shape)) is not None:
            _warn_once(f"{reason}; using the torch backend")
            return "torch"
        return "triton"
    if requested == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and interpreter_on()):
            raise UserError(
                f"backend 'triton' needs a CUDA device, not {device.type} "
                "(on the CPU only under TRITON_INTERPRET=1, which is very slow)"
            )
        if (err := kernels.TRITON_IMPORT_ERROR) is not None:
            raise UserError(f"backend 'triton' is not usable here: {err}")
        if device.type == "cuda" and (reason := unsupported_reason(device)) is not None:
            raise UserError(f"backend 'triton': {reason}; use --backend torch")
        if shape is not None and (reason := kernels.unsupported_shape(*shape)) is not None:
            raise UserError(f"backend 'triton': {reason}; use --backend torch")
    return requested


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def precision(device: torch.device) -> tuple[torch.dtype | None, str]:
    """Autocast dtype for `device` (None: full fp32) and how to describe it. bf16 needs sm_80;
    older GPUs only emulate it, slowly, so they get fp16 (with a GradScaler in training)."""
    if device.type != "cuda":
        return None, "fp32"
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16, "bf16 autocast"
    return torch.float16, "fp16 autocast + GradScaler"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
              backend: str, causal: bool = True) -> torch.Tensor:
    """Self-attention; q: (B, H, T, D), k, v: (B, H, S, D) -> (B, H, T, D). `causal=False` is
    for decoding, where T new queries (T = 1) see every cached key."""
    if backend == "torch":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    if backend == "triton":
        return kernels.attention(q, k, v, causal=causal, dropout_p=dropout_p)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, dropout_p=dropout_p)
    raise ValueError(f"backend must be resolved first, got {backend!r}")


def attention_qkv(qkv: torch.Tensor, dropout_p: float, backend: str) -> torch.Tensor:
    """Causal self-attention of the packed projection qkv: (B, T, 3, H, D) -> (B, H, T, D).
    The triton backend writes the gradient of qkv in place, as one tensor."""
    if backend == "triton":
        return kernels.attention_qkv(qkv, causal=True, dropout_p=dropout_p)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D), strided views
    return attention(q, k, v, dropout_p, backend)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(h), h) with h = x + residual (h = x without one), over the last dimension of
    x: (..., N). The pre-norm block's residual add and the LayerNorm after it.

    The triton backend fuses the two and, under autocast, writes LayerNorm(h) in the autocast
    dtype, which the next Linear would cast it to anyway; the others run the plain math.
    """
    if backend == "triton":
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if residual is None:
            return kernels.layer_norm(x, weight, bias, eps, out_dtype=out_dtype), x
        return kernels.add_layer_norm(x, residual, weight, bias, eps, out_dtype=out_dtype)
    h = x if residual is None else x + residual
    if backend == "torch" and h.device.type == "cpu":
        # torch's CPU kernel sums the gain and bias gradients in a partial sum per thread, which
        # the thread count would change; the gradient of a broadcast gain sums each column on
        # one thread, in row order.
        y = F.layer_norm(h, h.shape[-1:], None, None, eps)
        y = y * weight if weight is not None else y
        return (y + bias if bias is not None else y), h
    if backend == "torch":
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps), h
    if backend == "reference":
        return layer_norm_reference(h, weight, bias, eps), h
    raise ValueError(f"backend must be resolved first, got {backend!r}")
