"""Fused causal attention in Triton (FlashAttention-2 style) with dropout on the weights.

Layers, top to bottom: Triton kernels -> launchers -> `torch.library` ops with autograd ->
`attention`, the public function. The T x S score matrix is never stored: memory is O(T).

Forward, per tile of BLOCK_M queries, streaming BLOCK_N keys at a time (online softmax):
    s = q k^T * scale * log2(e)               scores in base-2 units, so exp2 replaces exp
    m' = max(m, rowmax(s)),  a = 2^(m - m'),  p = 2^(s - m')
    l  = l * a + rowsum(p)                     the normaliser counts dropped weights too
    acc = acc * a + (p * keep / (1 - p_drop)) v
    out = acc / l,  lse = m + log2(l)           lse (fp32, per row) is saved for backward
With `causal`, query i sees keys j <= i. Key tiles wholly above the diagonal are never visited;
only the tiles that straddle it are masked (the constexpr DIAGONAL pass).

Backward recomputes p = 2^(s - lse) tile by tile. With Z = keep / (1 - p_drop) and
delta_i = rowsum(dO_i * O_i) (computed first, one small kernel):
    dV_j = sum_i (p_ij Z_ij) dO_i
    dS_ij = p_ij (Z_ij (dO_i . v_j) - delta_i)
    dK_j = scale * sum_i dS_ij q_i,  dQ_i = scale * sum_j dS_ij k_j
One kernel owns a block of keys and walks the queries (dK, dV); another owns a block of queries
and walks the keys (dQ). No atomics, no T x S buffer.

Dropout: element (b, h, i, j) is kept when the Philox draw for counter (i, j, b*H + h, 0) under
the 64-bit seed is >= p_drop, so the mask is regenerated in backward and never stored, and no
index can overflow. The seed is a one-element int64 tensor, drawn from torch's generator when not
given: `torch.manual_seed` makes runs reproducible, and torch.compile traces the draw.

fp16 and bf16 inputs use tensor-core matmuls with fp32 accumulation; fp32 inputs are computed in
full fp32 (no tf32), so they match an fp32 reference closely and run slower.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

HEAD_DIMS = (16, 32, 64, 128)
MAX_BATCH_HEADS = 65535  # B * H runs along the second launch-grid axis
LOG2E = 1.4426950408889634


@triton.jit
def _tile(base, b, h, stride_b, stride_h, rows, stride_r, cols, stride_c):
    """Pointers to the (len(rows), len(cols)) tile of head (b, h) of a 4-d tensor."""
    return base + b * stride_b + h * stride_h + rows[:, None] * stride_r + cols[None, :] * stride_c


@triton.jit
def _dropout_keep(seed, bh, rows, cols, dropout_p):
    """Keep-mask for query indices `rows` and key indices `cols` (broadcast against each other)."""
    rows, cols = tl.broadcast(rows, cols)
    zero = rows * 0
    r, _, _, _ = tl.philox(seed, rows, cols, zero + bh, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lo, hi, S, qk_scale,
    seed, bh, dropout_p,
    DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        valid = offs_n[None, :] < S  # (1, BLOCK_N)
        if DIAGONAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])  # (BLOCK_M, BLOCK_N)
        k_t = tl.load(k_ptrs + start_n * stride_kt, mask=offs_n[None, :] < S, other=0.0)  # (D, N)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=offs_n[:, None] < S, other=0.0)  # (N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, Seed,  # Q, O: (B, H, T, D); K, V: (B, H, S, D); LSE: (B*H, T) fp32
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, S, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(_tile(Q, b, h, stride_qb, stride_qh, offs_m, stride_qt, offs_d, stride_qd),
                mask=offs_m[:, None] < T, other=0.0)  # (BLOCK_M, D)
    k_ptrs = _tile(K, b, h, stride_kb, stride_kh, offs_d, stride_kd, offs_n, stride_kt)  # (D, N)
    v_ptrs = _tile(V, b, h, stride_vb, stride_vh, offs_n, stride_vt, offs_d, stride_vd)  # (N, D)
    seed = tl.load(Seed)  # unused without dropout

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    if CAUSAL:
        # Key tiles left of this query tile are fully visible; the ones on its diagonal are masked.
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, 0,
            tl.minimum(start_m, S), S, qk_scale, seed, bh, dropout_p, False, DROPOUT, BLOCK_N,
            PRECISION)
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, start_m,
            tl.minimum(start_m + BLOCK_M, S), S, qk_scale, seed, bh, dropout_p, True, DROPOUT,
            BLOCK_N, PRECISION)
    else:
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, 0, S, S, qk_scale,
            seed, bh, dropout_p, False, DROPOUT, BLOCK_N, PRECISION)

    out = acc / l_i[:, None]
    row_ok = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(_tile(O, b, h, stride_ob, stride_oh, offs_m, stride_ot, offs_d, stride_od),
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta,  # O, DO: (B, H, T, D); Delta: (B*H, T) fp32
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_db, stride_dh, stride_dt, stride_dd,
    H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(_tile(O, b, h, stride_ob, stride_oh, offs_m, stride_ot, offs_d, stride_od),
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(_tile(DO, b, h, stride_db, stride_dh, offs_m, stride_dt, offs_d, stride_dd),
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_query_loop(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, offs_n, lo, hi, T, S,
    qk_scale, seed, bh, dropout_p,
    DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = offs_m < T
        q = tl.load(q_ptrs + start_m * stride_qt, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        do = tl.load(do_ptrs + start_m * stride_dot, mask=row_ok[:, None], other=0.0)  # (M, D)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        valid = row_ok[None, :] & (offs_n[:, None] < S)
        if DIAGONAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :])
        p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M): dO_i . v_j
        if DROPOUT:
            keep_t = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], dropout_p)
            pz_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
            dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
        else:
            pz_t = p_t
        dv += tl.dot(pz_t.to(do.dtype), do, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, Seed,  # DK, DV: like K, V (contiguous)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, S, scale, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < S
    k = tl.load(_tile(K, b, h, stride_kb, stride_kh, offs_n, stride_kt, offs_d, stride_kd),
                mask=col_ok, other=0.0)  # (BLOCK_N, D)
    v = tl.load(_tile(V, b, h, stride_vb, stride_vh, offs_n, stride_vt, offs_d, stride_vd),
                mask=col_ok, other=0.0)
    q_ptrs = _tile(Q, b, h, stride_qb, stride_qh, offs_m, stride_qt, offs_d, stride_qd)
    do_ptrs = _tile(DO, b, h, stride_dob, stride_doh, offs_m, stride_dot, offs_d, stride_dod)
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = Delta + bh.to(tl.int64) * T
    seed = tl.load(Seed)  # unused without dropout

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        # Queries before start_n see none of these keys; the next BLOCK_N straddle the diagonal.
        diag_end = tl.minimum(start_n + BLOCK_N, T)
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, offs_n,
            start_n, diag_end, T, S, qk_scale, seed, bh, dropout_p, True, DROPOUT, BLOCK_M,
            PRECISION)
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, offs_n,
            start_n + BLOCK_N, T, T, S, qk_scale, seed, bh, dropout_p, False,
            DROPOUT, BLOCK_M, PRECISION)
    else:
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, offs_n,
            0, T, T, S, qk_scale, seed, bh, dropout_p, False, DROPOUT, BLOCK_M, PRECISION)

    # DK and DV are allocated contiguous: (B, H, S, D).
    out = bh.to(tl.int64) * S * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_key_loop(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lo, hi, S, qk_scale,
    seed, bh, dropout_p,
    DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    row_ok = lse > float("-inf")  # rows past T carry lse = -inf
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        k = tl.load(k_ptrs + start_n * stride_kt, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = row_ok[:, None] & col_ok[None, :]
        if DIAGONAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, Seed,  # DQ: like Q (contiguous)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, S, scale, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(_tile(Q, b, h, stride_qb, stride_qh, offs_m, stride_qt, offs_d, stride_qd),
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(_tile(DO, b, h, stride_dob, stride_doh, offs_m, stride_dot, offs_d, stride_dod),
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("-inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_ptrs = _tile(K, b, h, stride_kb, stride_kh, offs_n, stride_kt, offs_d, stride_kd)
    v_ptrs = _tile(V, b, h, stride_vb, stride_vh, offs_n, stride_vt, offs_d, stride_vd)
    seed = tl.load(Seed)  # unused without dropout

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        dq = _dq_key_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, 0,
                          tl.minimum(start_m, S), S, qk_scale, seed, bh, dropout_p, False, DROPOUT,
                          BLOCK_N, PRECISION)
        dq = _dq_key_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                          start_m, tl.minimum(start_m + BLOCK_M, S), S, qk_scale, seed, bh,
                          dropout_p, True, DROPOUT, BLOCK_N, PRECISION)
    else:
        dq = _dq_key_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, 0,
                          S, S, qk_scale, seed, bh, dropout_p, False, DROPOUT, BLOCK_N, PRECISION)

    out = bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dropout_mask_kernel(Mask, Seed, H, T, S, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mask: (B, H, T, S) uint8, the keep-mask the attention kernels use."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), bh, offs_m[:, None], offs_n[None, :], dropout_p)
    ptrs = Mask + bh.to(tl.int64) * T * S + offs_m[:, None].to(tl.int64) * S + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < S))


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def _fwd_config(D: int, dtype: torch.dtype) -> dict:
    """Launch settings; the causal diagonal pass needs BLOCK_M % BLOCK_N == 0.

    Chosen so that no kernel spills registers on sm_90 (see benchmarks/compile_check.py): 8 warps
    share the 128-row fp32 accumulator. fp32 inputs use FMA matmuls and smaller tiles.
    """
    if dtype == torch.float32:
        return dict(BLOCK_M=64 if D <= 64 else 32, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _bwd_configs(D: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """(dK/dV kernel, dQ kernel) launch settings; the diagonal passes need BLOCK_N % BLOCK_M == 0
    for dK/dV and BLOCK_M % BLOCK_N == 0 for dQ."""
    if dtype == torch.float32:
        return (dict(BLOCK_M=32, BLOCK_N=64 if D <= 64 else 32, num_warps=8, num_stages=2),
                dict(BLOCK_M=64 if D <= 64 else 32, BLOCK_N=32, num_warps=8, num_stages=2))
    return (dict(BLOCK_M=32, BLOCK_N=128 if D <= 64 else 64, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3))


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _new_attention_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) view of a (B, T, H, D) buffer: merging heads afterwards needs no copy."""
    B, H, T, D = q.shape
    return _new_output((B, T, H, D), q.dtype, q.device).transpose(1, 2)


@triton_op("tinygpt::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float,
    seed: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    S = k.shape[2]
    o = _new_attention_output(q)  # (B, H, T, D)
    lse = _new_output((B, H, T), torch.float32, q.device)
    cfg = _fwd_config(D, q.dtype)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    wrap_triton(_attn_fwd_kernel)[grid](
        q, k, v, o, lse, seed, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, T, S, scale * LOG2E, dropout_p,
        CAUSAL=causal, DROPOUT=dropout_p > 0.0, HEAD_DIM=D, PRECISION=_precision(q.dtype), **cfg,
    )
    return o, lse


@triton_op("tinygpt::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, causal: bool, dropout_p: float, seed: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    S = k.shape[2]
    delta = _new_output((B, H, T), torch.float32, q.device)
    dq = _new_output((B, H, T, D), q.dtype, q.device)
    dk = _new_output((B, H, S, D), k.dtype, k.device)
    dv = _new_output((B, H, S, D), v.dtype, v.device)
    wrap_triton(_attn_bwd_delta_kernel)[(triton.cdiv(T, 64), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK_M=64)
    dkdv_cfg, dq_cfg = _bwd_configs(D, q.dtype)
    common = dict(CAUSAL=causal, DROPOUT=dropout_p > 0.0, HEAD_DIM=D, PRECISION=_precision(q.dtype))
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do),
            H, T, S, scale, scale * LOG2E, dropout_p)
    wrap_triton(_attn_bwd_dkdv_kernel)[(triton.cdiv(S, dkdv_cfg["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, seed, *args, **common, **dkdv_cfg)
    wrap_triton(_attn_bwd_dq_kernel)[(triton.cdiv(T, dq_cfg["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, seed, *args, **common, **dq_cfg)
    return dq, dk, dv


# Shapes only, for FakeTensor tracing (the Triton interpreter cannot run on fake tensors).
@_attention_fwd.register_fake
def _(q, k, v, causal, dropout_p, seed, scale):
    B, H, T, D = q.shape
    return (q.new_empty((B, T, H, D)).transpose(1, 2),
            q.new_empty((B, H, T), dtype=torch.float32))


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, dropout_p, seed, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, dropout_p, seed, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, seed, ctx.scale)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} is on {t.device}: the Triton attention needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_device("q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k's batch, heads and head dim must match q's: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[3]} is not supported; use one of {HEAD_DIMS}")
    if min(q.shape[:3]) < 1 or k.shape[2] < 1:
        raise ValueError(f"q and k must be non-empty, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        raise ValueError(f"B * H = {q.shape[0] * q.shape[1]} exceeds {MAX_BATCH_HEADS}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    if seed is None:  # from torch's generator for `device`: reproducible under torch.manual_seed
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0, seed: int | None = None, scale: float | None = None
              ) -> torch.Tensor:
    """softmax(q k^T * scale, causal mask) with dropout on the weights, @ v; with autograd.

    q: (B, H, T, D), k and v: (B, H, S, D), any strides; D in 16, 32, 64, 128; fp16, bf16 or
    fp32. With `causal`, query i attends to keys j <= i. `scale` defaults to D**-0.5. The
    dropout mask comes from `seed` (drawn from torch's generator when None); see
    `attention_dropout_mask`. Returns (B, H, T, D) in q's dtype.
    """
    _check(q, k, v, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dropout_p > 0.0:
        seed_t = _seed_tensor(seed, q.device)
    else:  # the kernels take a seed pointer either way
        seed_t = q.new_zeros((1,), dtype=torch.int64)
    return _attention_fwd(q, k, v, bool(causal), float(dropout_p), seed_t, scale)[0]


def attention_dropout_mask(B: int, H: int, T: int, S: int, dropout_p: float, seed: int,
                           device: torch.device | str = "cuda") -> torch.Tensor:
    """The keep-mask (bool, (B, H, T, S), True = kept) that `attention` uses for this seed."""
    device = torch.device(device)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    probe = torch.empty(0, device=device)
    _check_device("device", probe)
    mask = torch.empty((B, H, T, S), dtype=torch.uint8, device=device)
    grid = (triton.cdiv(T, 64), triton.cdiv(S, 64), B * H)
    _dropout_mask_kernel[grid](mask, _seed_tensor(seed, device), H, T, S, dropout_p,
                               BLOCK_M=64, BLOCK_N=64)
    return mask.view(torch.bool)

