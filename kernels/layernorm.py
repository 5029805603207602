"""Fused LayerNorm in Triton: one read and one write per element, forward and backward.

Layers, top to bottom: Triton kernels -> launchers (checks, reshape, allocation, launch settings)
-> `torch.library` ops with autograd -> `layer_norm`, the public function.

Forward, per row of N features (fp32 math whatever the storage dtype):
    mean = sum(x) / N,  rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)
    xhat = (x - mean) * rstd,  y = xhat * w + b
mean and rstd (fp32, one per row) are saved for the backward pass.

Backward, with g = dy * w (g = dy without a weight):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat,  db = sum over rows of dy
Each backward program owns a fixed set of rows and keeps its dw/db contributions in fp32
registers; it writes them to its own row of a (programs, N) buffer, which is then summed once.
No atomics, no locks: the result is bitwise reproducible.

A whole row lives in registers, so N is limited to MAX_N (65536); rows of up to 64 KiB cost
register spills past 16K features but stay correct.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

MAX_N = 65536


@triton.jit
def _layer_norm_fwd_kernel(
    # X, Y: (M, N), rows stride_x / stride_y apart; W, B: (N,); Mean, Rstd: (M,) fp32
    X, Y, W, B, Mean, Rstd,
    stride_x, stride_y, M, N, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N  # (BLOCK_M,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)  # (BLOCK_M,)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DX, DW_part, DB_part,  # DW_part, DB_part: (programs, N) fp32
    stride_dy, stride_x, stride_dx, M, N,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_N,), 1.0, tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, step):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        x, dy = x.to(tl.float32), dy.to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c_xhat = tl.sum(g * xhat, axis=1) / N  # (BLOCK_M,)
        c_mean = tl.sum(g, axis=1) / N  # (BLOCK_M,)
        dx = (g - c_mean[:, None] - xhat * c_xhat[:, None]) * rstd[:, None]
        dx_ptrs = DX + rows64[:, None] * stride_dx + cols[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_part + pid * N + cols, dw, mask=col_ok)
    tl.store(DB_part + pid * N + cols, db, mask=col_ok)


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_config(N: int) -> tuple[int, int, int]:
    """(BLOCK_M rows per program, BLOCK_N, num_warps) for rows of N features.

    Small rows are batched so that each program moves at least ~4K elements; warps grow with the
    tile so that each thread holds at most 16 values of each array until 16 warps (the backward
    keeps four: x, dy, and the dw, db sums), which keeps both kernels free of register spills
    on sm_90 up to N = 8192 (benchmarks/compile_check.py).
    """
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = min(16, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    t = t.reshape(-1, N)  # (..., N) -> (M, N), a view when strides allow
    return t if t.stride(-1) == 1 else t.contiguous()


def _backward_programs(M: int, block_m: int, device: torch.device) -> int:
    tiles = triton.cdiv(M, block_m)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(tiles, 4 * sms))
    return max(1, min(tiles, 8))


@triton_op("tinygpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    x2 = _rows(x, N)  # (M, N)
    M = x2.shape[0]
    y = _new_output((M, N), x.dtype, x.device)
    mean = _new_output((M,), torch.float32, x.device)
    rstd = _new_output((M,), torch.float32, x.device)
    block_m, block_n, num_warps = _launch_config(N)
    wrap_triton(_layer_norm_fwd_kernel)[(triton.cdiv(M, block_m),)](
        x2, y, weight, bias, mean, rstd, x2.stride(0), y.stride(0), M, N, eps,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y.view(x.shape), mean, rstd


@triton_op("tinygpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); dw and db are fp32 sums of shape (N,)."""
    N = x.shape[-1]
    x2, dy2 = _rows(x, N), _rows(dy, N)  # (M, N) each
    M = x2.shape[0]
    block_m, block_n, num_warps = _launch_config(N)
    programs = _backward_programs(M, block_m, x.device)
    dx = _new_output((M, N), x.dtype, x.device)
    dw_part = _new_output((programs, N), torch.float32, x.device)
    db_part = _new_output((programs, N), torch.float32, x.device)
    wrap_triton(_layer_norm_bwd_kernel)[(programs,)](
        dy2, x2, weight, mean, rstd, dx, dw_part, db_part,
        dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
        HAS_W=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx.view(x.shape), dw_part.sum(dim=0), db_part.sum(dim=0)


# Shapes only, for FakeTensor tracing. triton_op derives these by running the launchers on fake
# tensors, which the Triton interpreter (it reads real memory) cannot do.
@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    M = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((M,), dtype=torch.float32),
            x.new_empty((M,), dtype=torch.float32))


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd):
    N = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((N,), dtype=torch.float32),
            x.new_empty((N,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd)
    dw = dw.to(weight.dtype) if weight is not None else None
    db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dw, db, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized one)")
    N = x.shape[-1]
    if not 1 <= N <= MAX_N:
        raise ValueError(f"x's last dimension must be between 1 and {MAX_N}, got {N}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"x is on {x.device}: the Triton LayerNorm needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) to match x, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension of x (..., N), fused in Triton, with autograd.

    x may be fp32, fp16 or bf16 and any strides; math is fp32; y has x's dtype and shape.
    weight and bias, shape (N,), are each optional. Traceable by torch.compile.
    """
    _check(x, weight, bias)
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return _layer_norm_fwd(x, weight, bias, float(eps))[0]
