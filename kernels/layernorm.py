"""Fused residual add + LayerNorm in Triton: one read of each input, one write of each output.

Layers, top to bottom: Triton kernels -> launchers (checks, reshape, allocation, launch settings)
-> `torch.library` ops with autograd -> `layer_norm` and `add_layer_norm`, the public functions.

Forward, per row of N features (fp32 math whatever the storage dtypes):
    h = x + residual (stored in their promoted dtype; h = x without a residual)
    mean = sum(h) / N,  rstd = 1 / sqrt(sum((h - mean)^2) / N + eps)
    hhat = (h - mean) * rstd,  y = hhat * w + b   (y written in `out_dtype`)
mean and rstd (fp32, one per row) are saved for the backward pass, and so is h.

Backward, with g = dy * w (g = dy without a weight) and dh the gradient flowing into h from
later uses of the residual stream:
    dx = dresidual = rstd * (g - mean(g) - hhat * mean(g * hhat)) + dh
    dw = sum over rows of dy * hhat,  db = sum over rows of dy
Each backward program owns a fixed set of rows (and, for wide rows, one column tile) and keeps its
dw/db contributions in fp32 registers; it writes them to its own row of a (programs, N) buffer,
which one more launch sums in a fixed order. No atomics, no locks: the result is bitwise
reproducible.

Rows of up to ROW_IN_REGISTERS features live in registers: one pass over the data. Wider rows go
in column tiles of TILE_N, with two passes over the row (statistics, then output), so that no
width spills registers; the forward merges the tiles' statistics with Chan et al.'s pairwise
update, and the backward computes each row's two sums in a launch of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .gpu import interpreted, on_device, traceable

ROW_IN_REGISTERS = 4096  # widest row kept whole in registers (8192 spills on sm_86, 89, 120)
TILE_N = 4096  # column tile of wider rows
SUM_BLOCK = (16, 128)  # (partial rows, columns) one program of the dw/db sum holds
# Launch settings by row width, padded to a power of two. A program holds a tile of up to 4096
# elements (small rows batched) with warps enough that each thread holds at most 16 values of each
# array (the backward keeps h, dy, dh and the dw, db sums): no kernel's loops spill registers
# (benchmarks/tools/compile_check.py, docs/kernels.md).
SETTINGS = (
    # padded width  rows per program  warps
    (128,           16,               4),
    (256,           16,               8),
    (512,            8,               8),
    (1024,           4,               8),
    (2048,           2,               8),
    (4096,           1,               8),  # ROW_IN_REGISTERS
)


@triton.jit
def _load_h(X, R, H, rows64, cols, mask, stride_x, stride_r, stride_h, HAS_R: tl.constexpr):
    """h = x + r for a tile, rounded to H's dtype and stored there; returned in fp32."""
    h = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    h = h.to(tl.float32)
    if HAS_R:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        h = (h + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    return h


@triton.jit
def _store_y(Y, W, B, hhat, rows64, cols, col_ok, mask, stride_y,
             HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    y = hhat
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(
    # X, R, H: (M, N) input, residual, new residual (R and H only with HAS_R); Y: (M, N) in the
    # output dtype; W, B: (N,); Mean, Rstd: (M,) fp32. Rows are stride_* apart.
    X, R, H, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_h, stride_y, M, N, eps,
    HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, TILED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    if not TILED:  # the whole row in registers: one pass
        cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
        h = _load_h(X, R, H, rows64, cols, mask, stride_x, stride_r, stride_h, HAS_R)
        mean = tl.sum(h, axis=1) / N  # (BLOCK_M,)
        hc = tl.where(mask, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / N + eps)  # (BLOCK_M,)
        _store_y(Y, W, B, hc * rstd[:, None], rows64, cols, col_ok, mask, stride_y, HAS_W, HAS_B)
    else:
        # Pass 1: each tile's mean and squared deviations, merged into the row's (Chan et al.).
        mean = tl.zeros((BLOCK_M,), tl.float32)
        m2 = tl.zeros((BLOCK_M,), tl.float32)
        seen = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            h = _load_h(X, R, H, rows64, cols, mask, stride_x, stride_r, stride_h, HAS_R)
            count = tl.sum(col_ok.to(tl.float32), axis=0)
            tile_mean = tl.sum(h, axis=1) / count  # (BLOCK_M,)
            d = tl.where(mask, h - tile_mean[:, None], 0.0)
            delta = tile_mean - mean
            total = seen + count
            mean += delta * (count / total)
            m2 += tl.sum(d * d, axis=1) + delta * delta * (seen * count / total)
            seen = total
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: normalize, reading back h (just stored by this block: the barrier publishes it).
        tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            if HAS_R:
                h = tl.load(H + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
            else:
                h = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            hhat = (h.to(tl.float32) - mean[:, None]) * rstd[:, None]
            _store_y(Y, W, B, hhat, rows64, cols, col_ok, mask, stride_y, HAS_W, HAS_B)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_row_sums_kernel(
    # DY, H: (M, N); W: (N,); Mean, Rstd: (M,); RowSums: (2, M) fp32, mean(g * hhat) and mean(g)
    DY, H, W, Mean, Rstd, RowSums,
    stride_dy, stride_h, M, N,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For rows in column tiles: each row's two sums, which every tile of dx needs."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    sum_g_hhat = tl.zeros((BLOCK_M,), tl.float32)
    sum_g = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        h = tl.load(H + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        hhat = tl.where(mask, (h.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy.to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sum_g_hhat += tl.sum(g * hhat, axis=1)
        sum_g += tl.sum(g, axis=1)
    tl.store(RowSums + rows, sum_g_hhat / N, mask=row_ok)
    tl.store(RowSums + M + rows, sum_g / N, mask=row_ok)


@triton.jit
def _bwd_kernel(
    # DY: (M, N) in y's dtype; H: (M, N) the normalized input; DH: (M, N) gradient into H;
    # W: (N,); Mean, Rstd: (M,); RowSums: (2, M) from _bwd_row_sums_kernel (TILED only);
    # DX: (M, N) in x's dtype; DR: (M, N) in the residual's dtype, when it differs from x's;
    # DW_part, DB_part: (row groups, N) fp32
    DY, H, DH, W, Mean, Rstd, RowSums, DX, DR, DW_part, DB_part,
    stride_dy, stride_h, stride_dh, stride_dx, stride_dr, M, N,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_DR: tl.constexpr,
    TILED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (group, tile) walks rows group*BLOCK_M, + groups*BLOCK_M, ... in column tile."""
    group = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_N,), 1.0, tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(group * BLOCK_M, M, step):
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        h = tl.load(H + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        hhat = tl.where(mask, (h.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        if TILED:
            mean_g_hhat = tl.load(RowSums + rows, mask=row_ok, other=0.0)
            mean_g = tl.load(RowSums + M + rows, mask=row_ok, other=0.0)
        else:
            mean_g_hhat = tl.sum(g * hhat, axis=1) / N  # (BLOCK_M,)
            mean_g = tl.sum(g, axis=1) / N  # (BLOCK_M,)
        dx = (g - mean_g[:, None] - hhat * mean_g_hhat[:, None]) * rstd[:, None]
        if HAS_DH:
            dh = tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
            dx += dh.to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        if STORE_DR:
            tl.store(DR + rows64[:, None] * stride_dr + cols[None, :],
                     dx.to(DR.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += tl.sum(dy * hhat, axis=0)
        if HAS_B:
            db += tl.sum(dy, axis=0)
    part = group.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DW_part + part, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB_part + part, db, mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    DW_part, DB_part, DW, DB,  # DW_part, DB_part: (G, N) fp32; DW, DB: (N,) in the params' dtype
    G, N,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dw, db = the column sums of the partials, in the same order on every run."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    dw = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
    db = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
        mask = (rows < G)[:, None] & col_ok[None, :]  # (BLOCK_G, BLOCK_N)
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_W:
            dw += tl.load(DW_part + offsets, mask=mask, other=0.0)
        if HAS_B:
            db += tl.load(DB_part + offsets, mask=mask, other=0.0)
    if HAS_W:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    if HAS_B:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_ok)


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_config(N: int) -> tuple[int, int, int]:
    """(BLOCK_M rows per program, BLOCK_N columns, num_warps) for rows of N features: a row of
    `SETTINGS`, BLOCK_N being N padded to a power of two; wider rows than ROW_IN_REGISTERS go
    one per program in column tiles of TILE_N, with 8 warps."""
    if N > ROW_IN_REGISTERS:
        return 1, TILE_N, 8
    block_n = triton.next_power_of_2(N)
    block_m, num_warps = next((rows, warps) for width, rows, warps in SETTINGS if block_n <= width)
    return block_m, block_n, num_warps


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    t = t.reshape(-1, N)  # (..., N) -> (M, N), a view when strides allow
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_groups(M: int, block_m: int, tiles: int, device: torch.device) -> int:
    """Backward programs along the rows: enough, with the column tiles, to fill the GPU."""
    blocks = triton.cdiv(M, block_m)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(blocks, 4 * sms // tiles))
    return max(1, min(blocks, 8))


def _launch_forward(x, residual, weight, bias, eps, out_dtype):
    """(y, h, mean, rstd); h is None without a residual."""
    N = x.shape[-1]
    x2 = _rows(x, N)  # (M, N)
    M = x2.shape[0]
    r2 = h = None
    if residual is not None:
        r2 = _rows(residual, N)  # (M, N)
        h = _new_output((M, N), torch.promote_types(x.dtype, residual.dtype), x.device)
    y = _new_output((M, N), out_dtype or (x.dtype if h is None else h.dtype), x.device)
    mean = _new_output((M,), torch.float32, x.device)
    rstd = _new_output((M,), torch.float32, x.device)
    block_m, block_n, num_warps = _launch_config(N)
    with on_device(x):
        traceable(_fwd_kernel)[(triton.cdiv(M, block_m),)](
            x2, r2, h, y, weight, bias, mean, rstd,
            x2.stride(0), 0 if r2 is None else r2.stride(0), 0 if h is None else h.stride(0),
            y.stride(0), M, N, eps,
            HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            TILED=block_n < N, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y.view(x.shape), None if h is None else h.view(x.shape), mean, rstd


@triton_op("tinygpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd)."""
    y, _, mean, rstd = _launch_forward(x, None, weight, bias, eps, out_dtype)
    return y, mean, rstd


@triton_op("tinygpt::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd) with h = x + residual."""
    return _launch_forward(x, residual, weight, bias, eps, out_dtype)


@triton_op("tinygpt::layer_norm_bwd", mutates_args=("dx", "dr", "dw", "db"))
def _layer_norm_bwd(
    dy: torch.Tensor, h: torch.Tensor, dh: torch.Tensor | None, weight: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, dx: torch.Tensor, dr: torch.Tensor | None,
    dw: torch.Tensor | None, db: torch.Tensor | None,
) -> None:
    """Writes dx (and dr, the same gradient in the residual's dtype), dw and db (when given).

    h is the normalized input; dh, when given, is added to its gradient. dx and dr are
    contiguous tensors shaped like h; dw and db have shape (N,).
    """
    N = h.shape[-1]
    h2, dy2 = _rows(h, N), _rows(dy, N)  # (M, N) each
    dh2 = None if dh is None else _rows(dh, N)  # (M, N)
    dx2 = dx.view(-1, N)  # (M, N)
    dr2 = None if dr is None else dr.view(-1, N)  # (M, N)
    M = h2.shape[0]
    block_m, block_n, num_warps = _launch_config(N)
    tiles = triton.cdiv(N, block_n)
    groups = _row_groups(M, block_m, tiles, h.device)
    row_sums = None
    dw_part = None if dw is None else _new_output((groups, N), torch.float32, h.device)
    db_part = None if db is None else _new_output((groups, N), torch.float32, h.device)
    with on_device(h):
        if tiles > 1:
            row_sums = _new_output((2, M), torch.float32, h.device)
            traceable(_bwd_row_sums_kernel)[(triton.cdiv(M, block_m),)](
                dy2, h2, weight, mean, rstd, row_sums, dy2.stride(0), h2.stride(0), M, N,
                HAS_W=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )
        traceable(_bwd_kernel)[(groups, tiles)](
            dy2, h2, dh2, weight, mean, rstd, row_sums, dx2, dr2, dw_part, db_part,
            dy2.stride(0), h2.stride(0), 0 if dh2 is None else dh2.stride(0), dx2.stride(0),
            0 if dr2 is None else dr2.stride(0), M, N,
            HAS_DH=dh is not None, HAS_W=weight is not None, HAS_B=db is not None,
            STORE_DR=dr is not None, TILED=tiles > 1, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps,
        )
        if dw is not None or db is not None:
            block_g, block_cols = SUM_BLOCK
            traceable(_sum_partials_kernel)[(triton.cdiv(N, block_cols),)](
                dw_part, db_part, dw, db, groups, N,
                HAS_W=dw is not None, HAS_B=db is not None, BLOCK_G=block_g,
                BLOCK_N=block_cols, num_warps=4,
            )


# Shapes only, for FakeTensor tracing. triton_op derives these by running the launchers on fake
# tensors, which the Triton interpreter (it reads real memory) cannot do.
@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=out_dtype or x.dtype),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1]
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=out_dtype or h_dtype), x.new_empty(x.shape, dtype=h_dtype),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


@_layer_norm_bwd.register_fake
def _(dy, h, dh, weight, mean, rstd, dx, dr, dw, db):
    return None


def _param_grads(h, weight, bias_dtype):
    """Empty dw and db, (N,) each, for the parameters the forward had, in their dtypes."""
    N = h.shape[-1]
    dw = None if weight is None else _new_output((N,), weight.dtype, h.device)
    db = None if bias_dtype is None else _new_output((N,), bias_dtype, h.device)
    return dw, db


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _eps, _out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward_layer_norm(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx = _new_output(x.shape, x.dtype, x.device)
    dw, db = _param_grads(x, weight, ctx.bias_dtype)
    _layer_norm_bwd(dy, x, None, weight, mean, rstd, dx, None, dw, db)
    return dx, dw, db, None, None


def _setup_add_layer_norm(ctx, inputs, output):
    x, residual, weight, bias, _eps, _out_dtype = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.x_dtype, ctx.residual_dtype = x.dtype, residual.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward_add_layer_norm(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dx = _new_output(h.shape, ctx.x_dtype, h.device)
    dr = None
    if ctx.residual_dtype != ctx.x_dtype:
        dr = _new_output(h.shape, ctx.residual_dtype, h.device)
    dw, db = _param_grads(h, weight, ctx.bias_dtype)
    _layer_norm_bwd(dy, h, dh, weight, mean, rstd, dx, dr, dw, db)
    return dx, dx if dr is None else dr, dw, db, None, None


_layer_norm_fwd.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)
_add_layer_norm_fwd.register_autograd(_backward_add_layer_norm,
                                      setup_context=_setup_add_layer_norm)


def _check(x, weight, bias, out_dtype, residual=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in floats:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized one)")
    N = x.shape[-1]
    if N == 0 or x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(f"x is on {x.device}: the Triton LayerNorm needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")
    if out_dtype is not None and out_dtype not in floats:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.dtype not in floats:
            raise TypeError("residual must be a float16, bfloat16 or float32 tensor, got "
                            f"{getattr(residual, 'dtype', type(residual).__name__)}")
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has "
                             f"{tuple(x.shape)}: they must match")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) to match x, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension of x (..., N), fused in Triton, with autograd.

    x may be fp32, fp16 or bf16, any strides, any width; math is fp32; y has x's shape and
    `out_dtype` (default x's dtype). weight and bias, shape (N,), are each optional. Traceable
    by torch.compile.
    """
    _check(x, weight, bias, out_dtype)
    return _layer_norm_fwd(x, _contiguous(weight), _contiguous(bias), float(eps), out_dtype)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(h), h) with h = x + residual, in one pass: the pre-norm block's residual add
    and the next LayerNorm, fused.

    h has the promoted dtype of x and residual (what `x + residual` gives); LayerNorm(h) has
    `out_dtype` (default h's), e.g. the autocast dtype the next Linear wants. The gradient
    flowing into h is added to the LayerNorm's in the backward pass.
    """
    _check(x, weight, bias, out_dtype, residual)
    y, h, _, _ = _add_layer_norm_fwd(x, residual, _contiguous(weight), _contiguous(bias),
                                     float(eps), out_dtype)
    return y, h
