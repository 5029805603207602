"""Fused causal attention in Triton (FlashAttention-2 style) with dropout on the weights.

Layers, top to bottom: Triton kernels -> launchers -> `torch.library` ops with autograd ->
`attention(q, k, v)` and `attention_qkv(qkv)`, the public functions. The T x S score matrix is
never stored: memory is O(T).

Forward, per tile of BLOCK_M queries, streaming BLOCK_N keys at a time (online softmax):
    s = q k^T * scale * log2(e)               scores in base-2 units, so exp2 replaces exp
    m' = max(m, rowmax(s)),  a = 2^(m - m'),  p = 2^(s - m')
    l  = l * a + rowsum(p)                     the normaliser counts dropped weights too
    acc = acc * a + (p * keep) v
    out = acc / (l (1 - p_drop)),  lse = m + log2(l)     lse (fp32, per row) is saved for backward
With `causal`, query i sees keys j <= i. Key tiles wholly above the diagonal are never visited;
only the tiles that straddle it are masked (the constexpr DIAGONAL pass).

Backward recomputes p = 2^(s - lse) tile by tile. With Z = keep / (1 - p_drop) and
delta_i = rowsum(dO_i * O_i) (computed first, one small kernel):
    dV_j = sum_i (p_ij Z_ij) dO_i
    dS_ij = p_ij (Z_ij (dO_i . v_j) - delta_i)
    dK_j = scale * sum_i dS_ij q_i,  dQ_i = scale * sum_j dS_ij k_j
One kernel owns a block of keys and walks the queries (dK, dV); another owns a block of queries
and walks the keys (dQ). No atomics, no T x S buffer. The gradients are written through strides,
so `attention_qkv` gets the gradient of its packed (B, T, 3, H, D) input written in place: no
stack of three gradients, no copy.

Dropout: one Philox draw (7 rounds, 64-bit seed) decides eight weights, queries {i, i+8} against
keys {j, j+1, j+8, j+9} of a 16 x 16 block: the pattern one thread holds of a tensor-core tile
(`_dropout_keep` gives the exact map). Each weight takes a 16-bit slice of the 128 random bits
and is kept when the slice is >= round(p_drop * 2^16), so the keep probability is within 2^-17
of 1 - p_drop. The mask is a pure function of (seed, b*H + h, i, j) that backward regenerates
(it is never stored), and no index can overflow. The seed is a one-element int64 tensor, drawn
from torch's generator when not given: `torch.manual_seed` makes runs reproducible,
torch.compile traces the draw, and CUDA graphs capture it.

Head dims: any D from 1 to 256. The kernels compute with BLOCK_D = D rounded up to a power of two
(at least 16, the smallest tensor-core matmul depth): loads fill the padding with zeros, which add
nothing to q k^T or to the outputs, and stores skip it. For a power-of-two D the masks fold away:
the machine code is the same as without them.

fp16 and bf16 inputs use tensor-core matmuls with fp32 accumulation; fp32 inputs are computed in
full fp32 (no tf32), so they match an fp32 reference closely and run slower. Offsets are 64-bit
wherever a product can pass 2^31. Launch settings depend on the GPU (`launch_settings`); the
kernels need compute capability 8.0 or newer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .gpu import (
    LEAST_SHARED_MEMORY,
    MIN_CAPABILITY,
    Target,
    interpreted,
    on_device,
    target,
    traceable,
)

MAX_HEAD_DIM = 256
MAX_BATCH_HEADS = 65535  # B * H runs along the second launch-grid axis
LOG2E = 1.4426950408889634
DROPOUT_BITS = 16  # random bits per keep decision: 128 // 16 = 8 decisions per Philox draw
# Philox rounds per draw. Random123 finds 7 the fewest that pass BigCrush (10 is its default, with
# margin); over 2**24 of our keep bits, 6 rounds correlate keys j, j+2 (neighbouring draws) at -14
# standard errors, and 7 show nothing beyond 3.5 at any offset within two blocks (the tests).
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _head(base, bh, H, stride_b, stride_h):
    """Pointer to head bh = b * H + h of a (B, H, ...) tensor."""
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    return base + b * stride_b + h * stride_h


@triton.jit
def _tile(base, rows, stride_r, cols, stride_c):
    """Pointers to the (len(rows), len(cols)) tile at `base`, with 64-bit offsets."""
    return base + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c


@triton.jit
def _keep_halves(word, thr):
    """Keep bits (..., 2) of the low and high 16-bit halves of `word`; thr = threshold << 16."""
    return tl.join((word << 16) >= thr, word >= thr)


@triton.jit
def _dropout_keep(seed, bh, start_m, start_n, threshold,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Keep-mask (BLOCK_M, BLOCK_N) of queries start_m + i against keys start_n + j, or with
    TRANSPOSED its transpose (BLOCK_N, BLOCK_M). Starts and blocks are multiples of 16.

    Query 16c + 8z + d and key 16a + 8x + 2b + y take half y of word 2x + z of the Philox draw
    for counter (8c + d, 4a + b, bh, 0): queries {i, i+8} and keys {j, j+1, j+8, j+9} share a
    draw. One thread holds exactly that pattern of the tensor-core accumulator, so no bits move
    between threads. The dK/dV tile is transposed: a thread holds half of a draw's weights there,
    and two neighbouring lanes draw the same counter rather than exchange bits.
    """
    thr = tl.cast(threshold, tl.uint32) << 16
    c = start_m // 16 + tl.arange(0, BLOCK_M // 16)
    d = tl.arange(0, 8)
    a = start_n // 16 + tl.arange(0, BLOCK_N // 16)
    b = tl.arange(0, 4)
    if TRANSPOSED:
        y = tl.arange(0, 2)[None, None, :, None, None]  # (1, 1, 2, 1, 1)
        key_group = (a[:, None] * 4 + b[None, :])[:, :, None, None, None] + y * 0  # (., 4, 2, 1, 1)
        query_group = (c[:, None] * 8 + d[None, :])[None, None, None, :, :]  # (1, 1, 1, ., 8)
        key_group, query_group = tl.broadcast(key_group, query_group)  # (a, b, y, c, d)
        zero = key_group * 0
        r0, r1, r2, r3 = tl.philox(seed, query_group, key_group, zero + bh, zero, PHILOX_ROUNDS)
        high = y == 1
        keep = tl.join(tl.join(tl.where(high, r0, r0 << 16) >= thr,
                               tl.where(high, r1, r1 << 16) >= thr),
                       tl.join(tl.where(high, r2, r2 << 16) >= thr,
                               tl.where(high, r3, r3 << 16) >= thr))  # (a, b, y, c, d, z, x)
        keep = tl.permute(keep, (0, 6, 1, 2, 3, 5, 4))  # (a, x, b, y, c, z, d)
        return tl.reshape(keep, (BLOCK_N, BLOCK_M))
    else:
        query_group = (c[:, None] * 8 + d[None, :])[:, :, None, None]  # (BLOCK_M // 16, 8, 1, 1)
        key_group = (a[:, None] * 4 + b[None, :])[None, None, :, :]  # (1, 1, BLOCK_N // 16, 4)
        query_group, key_group = tl.broadcast(query_group, key_group)  # (c, d, a, b)
        zero = query_group * 0
        r0, r1, r2, r3 = tl.philox(seed, query_group, key_group, zero + bh, zero, PHILOX_ROUNDS)
        keep = tl.join(tl.join(_keep_halves(r0, thr), _keep_halves(r1, thr)),
                       tl.join(_keep_halves(r2, thr), _keep_halves(r3, thr)))
        # keep: (c, d, a, b, y, z, x)
        keep = tl.permute(keep, (0, 5, 1, 2, 6, 3, 4))  # (c, z, d, a, x, b, y)
        return tl.reshape(keep, (BLOCK_M, BLOCK_N))


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok, start_m, lo, hi, S, qk_scale,
    seed, bh, threshold,
    DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = offs_n < S
        row = tl.cast(start_n, tl.int64)
        k_t = tl.load(k_ptrs + row * stride_kt, mask=d_ok[:, None] & col_ok[None, :],
                      other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = col_ok[None, :]
        if DIAGONAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])  # (BLOCK_M, BLOCK_N)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # 1 / (1 - p_drop) is applied once, to the output
            p = tl.where(_dropout_keep(seed, bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N),
                         p, 0.0)
        v = tl.load(v_ptrs + row * stride_vt, mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_D)
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
    H, T, S, qk_scale, keep_scale, threshold,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # (BLOCK_D,): the head dim padded to a power of two
    row_ok = offs_m < T
    q = tl.load(_tile(_head(Q, bh, H, stride_qb, stride_qh), offs_m, stride_qt, offs_d, stride_qd),
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_ptrs = _tile(_head(K, bh, H, stride_kb, stride_kh), offs_d, stride_kd, offs_n, stride_kt)
    v_ptrs = _tile(_head(V, bh, H, stride_vb, stride_vh), offs_n, stride_vt, offs_d, stride_vd)
    seed = tl.load(Seed)  # unused without dropout

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    if CAUSAL:
        # Key tiles left of this query tile are fully visible; the ones on its diagonal are masked.
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok, start_m, 0,
            tl.minimum(start_m, S), S, qk_scale, seed, bh, threshold, False, DROPOUT, BLOCK_M,
            BLOCK_N, PRECISION)
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok, start_m, start_m,
            tl.minimum(start_m + BLOCK_M, S), S, qk_scale, seed, bh, threshold, True, DROPOUT,
            BLOCK_M, BLOCK_N, PRECISION)
    else:
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok, start_m, 0, S, S,
            qk_scale, seed, bh, threshold, False, DROPOUT, BLOCK_M, BLOCK_N, PRECISION)

    out = acc * (keep_scale / l_i)[:, None]  # keep_scale = 1 / (1 - p_drop)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(_tile(_head(O, bh, H, stride_ob, stride_oh), offs_m, stride_ot, offs_d, stride_od),
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta,  # O, DO: (B, H, T, D); Delta: (B*H, T) fp32
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, keep_prob, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(dO * O) * (1 - p_drop): delta in the units of dP * keep."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]  # (BLOCK_M, BLOCK_D)
    o = tl.load(_tile(_head(O, bh, H, stride_ob, stride_oh), offs_m, stride_ot, offs_d, stride_od),
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(_tile(_head(DO, bh, H, stride_dob, stride_doh), offs_m, stride_dot, offs_d,
                       stride_dod), mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1) * keep_prob,
             mask=offs_m < T)


@triton.jit
def _dkdv_query_loop(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, d_ok, start_n, lo,
    hi, T, S, qk_scale, seed, bh, threshold,
    DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = offs_m < T
        row = tl.cast(start_m, tl.int64)
        ok = row_ok[:, None] & d_ok[None, :]  # (BLOCK_M, BLOCK_D)
        q = tl.load(q_ptrs + row * stride_qt, mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_ptrs + row * stride_dot, mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        valid = row_ok[None, :] & (offs_n[:, None] < S)
        if DIAGONAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :])
        p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M): dO_i . v_j
        if DROPOUT:  # dV's 1 / (1 - p_drop) is applied once, at the end
            keep_t = _dropout_keep(seed, bh, start_m, start_n, threshold, BLOCK_M,
                                   BLOCK_N, True)  # (BLOCK_N, BLOCK_M)
            pz_t = tl.where(keep_t, p_t, 0.0)
            dp_t = tl.where(keep_t, dp_t, 0.0)
        else:
            pz_t = p_t
        dv += tl.dot(pz_t.to(do.dtype), do, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, Seed,  # DK, DV: (B, H, S, D), both with strides stride_dk*
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    H, T, S, scale, qk_scale, keep_scale, threshold,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = (offs_n < S)[:, None] & d_ok[None, :]  # (BLOCK_N, BLOCK_D)
    k = tl.load(_tile(_head(K, bh, H, stride_kb, stride_kh), offs_n, stride_kt, offs_d, stride_kd),
                mask=col_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(_tile(_head(V, bh, H, stride_vb, stride_vh), offs_n, stride_vt, offs_d, stride_vd),
                mask=col_ok, other=0.0)
    q_ptrs = _tile(_head(Q, bh, H, stride_qb, stride_qh), offs_m, stride_qt, offs_d, stride_qd)
    do_ptrs = _tile(_head(DO, bh, H, stride_dob, stride_doh), offs_m, stride_dot, offs_d,
                    stride_dod)
    lse_ptr = LSE + bh.to(tl.int64) * T
    delta_ptr = Delta + bh.to(tl.int64) * T
    seed = tl.load(Seed)  # unused without dropout

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        # Queries before start_n see none of these keys; the next BLOCK_N straddle the diagonal.
        diag_end = tl.minimum(start_n + BLOCK_N, T)
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, d_ok,
            start_n, start_n, diag_end, T, S, qk_scale, seed, bh, threshold, True, DROPOUT,
            BLOCK_M, BLOCK_N, PRECISION)
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, d_ok,
            start_n, start_n + BLOCK_N, T, T, S, qk_scale, seed, bh, threshold, False, DROPOUT,
            BLOCK_M, BLOCK_N, PRECISION)
    else:
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, d_ok,
            start_n, 0, T, T, S, qk_scale, seed, bh, threshold, False, DROPOUT, BLOCK_M, BLOCK_N,
            PRECISION)

    if DROPOUT:
        dv = dv * keep_scale
    tl.store(_tile(_head(DK, bh, H, stride_dkb, stride_dkh), offs_n, stride_dkt, offs_d,
                   stride_dkd), (dk * (scale * keep_scale)).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(_tile(_head(DV, bh, H, stride_dkb, stride_dkh), offs_n, stride_dkt, offs_d,
                   stride_dkd), dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_key_loop(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok, start_m, lo, hi, S,
    qk_scale, seed, bh, threshold,
    DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = lse > float("-inf")  # rows past T carry lse = -inf
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = offs_n < S
        row = tl.cast(start_n, tl.int64)
        ok = col_ok[:, None] & d_ok[None, :]  # (BLOCK_N, BLOCK_D)
        k = tl.load(k_ptrs + row * stride_kt, mask=ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptrs + row * stride_vt, mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = row_ok[:, None] & col_ok[None, :]
        if DIAGONAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, Seed,  # DQ: (B, H, T, D), strides stride_dq*
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, S, scale, qk_scale, keep_scale, threshold,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < T
    ok = row_ok[:, None] & d_ok[None, :]  # (BLOCK_M, BLOCK_D)
    q = tl.load(_tile(_head(Q, bh, H, stride_qb, stride_qh), offs_m, stride_qt, offs_d, stride_qd),
                mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(_tile(_head(DO, bh, H, stride_dob, stride_doh), offs_m, stride_dot, offs_d,
                       stride_dod), mask=ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("-inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_ptrs = _tile(_head(K, bh, H, stride_kb, stride_kh), offs_n, stride_kt, offs_d, stride_kd)
    v_ptrs = _tile(_head(V, bh, H, stride_vb, stride_vh), offs_n, stride_vt, offs_d, stride_vd)
    seed = tl.load(Seed)  # unused without dropout

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        dq = _dq_key_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok,
                          start_m, 0, tl.minimum(start_m, S), S, qk_scale, seed, bh, threshold,
                          False, DROPOUT, BLOCK_M, BLOCK_N, PRECISION)
        dq = _dq_key_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok,
                          start_m, start_m, tl.minimum(start_m + BLOCK_M, S), S, qk_scale,
                          seed, bh, threshold, True, DROPOUT, BLOCK_M, BLOCK_N, PRECISION)
    else:
        dq = _dq_key_loop(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, d_ok,
                          start_m, 0, S, S, qk_scale, seed, bh, threshold, False, DROPOUT,
                          BLOCK_M, BLOCK_N, PRECISION)

    tl.store(_tile(_head(DQ, bh, H, stride_dqb, stride_dqh), offs_m, stride_dqt, offs_d,
                   stride_dqd), (dq * (scale * keep_scale)).to(DQ.dtype.element_ty), mask=ok)


@triton.jit
def _dropout_mask_kernel(Mask, Seed, T, S, threshold,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mask: (B, H, T, S) uint8, the keep-mask the attention kernels use."""
    bh = tl.program_id(2)
    start_m, start_n = tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N
    keep = _dropout_keep(tl.load(Seed), bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    ptrs = _tile(Mask + bh.to(tl.int64) * T * S, offs_m, S, offs_n, 1)
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < S))


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def block_d(D: int) -> int:
    """The head dim the kernels compute with: D padded to a power of two, at least 16 (the
    smallest tensor-core matmul depth). Loads of the padding read zeros; stores skip it."""
    return max(16, triton.next_power_of_2(D))


def delta_rows(D: int) -> int:
    """Rows per program of the delta kernel: two (rows, block_d(D)) fp32 tiles, 4 warps."""
    return min(64, 8192 // block_d(D))


# Launch settings: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, dK/dV and dQ passes,
# by input dtype, padded head dim `block_d(D)`, and the least compute capability and shared memory
# (bytes) of the GPUs a row is for. `launch_settings` takes the first row that fits. fp32 runs
# FMA matmuls, which hold whole operand rows per thread: small tiles everywhere. The diagonal
# passes need forward and dQ BLOCK_M % BLOCK_N == 0 and dK/dV BLOCK_N % BLOCK_M == 0. The
# compile reports (benchmarks/tools/compile_check.py) give each row's registers, spills and shared
# memory on every target; docs/kernels.md says why each row is what it is.
SETTINGS = (
    # dtype  head dim  arch  shared      forward           dK/dV            dQ
    ("fp32",    64,     80,  0,          (64, 16, 8, 2),   (32, 32, 8, 1),  (32, 32, 8, 2)),
    ("fp32",   128,     80,  0,          (16, 16, 4, 3),   (16, 16, 8, 1),  (16, 16, 4, 2)),
    ("fp32",   256,     80,  0,          (16, 16, 4, 2),   (16, 16, 4, 1),  (16, 16, 8, 1)),
    ("16-bit",  64,    120,  0,          (128, 32, 8, 3),  (16, 64, 4, 3),  (128, 32, 8, 3)),
    ("16-bit",  64,     90,  0,          (128, 64, 8, 3),  (32, 128, 8, 3), (128, 32, 8, 3)),
    ("16-bit",  64,     80,  0,          (128, 64, 8, 3),  (32, 128, 8, 2), (128, 32, 8, 3)),
    ("16-bit", 128,    120,  0,          (64, 32, 4, 3),   (32, 32, 4, 3),  (128, 16, 8, 3)),
    ("16-bit", 128,     90,  0,          (128, 64, 8, 4),  (32, 64, 8, 3),  (128, 32, 8, 3)),
    ("16-bit", 128,     80,  0,          (128, 32, 8, 3),  (32, 64, 8, 3),  (128, 16, 8, 3)),
    ("16-bit", 256,    120,  0,          (64, 32, 8, 2),   (16, 32, 8, 2),  (16, 16, 4, 2)),
    ("16-bit", 256,     90,  0,          (64, 32, 8, 4),   (16, 32, 8, 3),  (64, 16, 8, 2)),
    ("16-bit", 256,     80,  160 * 1024, (64, 32, 8, 3),   (16, 32, 8, 3),  (32, 16, 8, 3)),
    ("16-bit", 256,     80,  0,          (64, 32, 8, 2),   (16, 32, 8, 2),  (32, 16, 8, 2)),
)


def launch_settings(D: int, dtype: torch.dtype, gpu: Target) -> tuple[dict, dict, dict]:
    """(forward, dK/dV, dQ) launch settings for head dim D and `dtype` on `gpu`: the first row
    of `SETTINGS` that fits. A GPU with less shared memory than any supported target pipelines
    at most two stages."""
    if gpu.capability < MIN_CAPABILITY:
        raise RuntimeError(f"the Triton attention needs compute capability 8.0 or newer, not "
                           f"{gpu.capability // 10}.{gpu.capability % 10}")
    kind = "fp32" if dtype == torch.float32 else "16-bit"
    settings = next(row[4:] for row in SETTINGS if row[0] == kind and block_d(D) <= row[1]
                    and gpu.capability >= row[2] and gpu.shared >= row[3])
    if gpu.shared < LEAST_SHARED_MEMORY:
        settings = tuple((m, n, warps, min(stages, 2)) for m, n, warps, stages in settings)
    return tuple(dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
                 for m, n, warps, stages in settings)


def _dropout_args(dropout_p: float) -> tuple[float, int]:
    """(1 / (1 - p), the threshold a 16-bit slice must reach to keep its weight); p within
    2**-17 of 1 still keeps one weight in 2**16."""
    return 1.0 / (1.0 - dropout_p), min(round(dropout_p * 2**DROPOUT_BITS), 2**DROPOUT_BITS - 1)


def _launch_forward(q, k, v, seed, causal: bool, dropout_p: float, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: o (B, H, T, D), a view of a (B, T, H, D) buffer so that merging
    heads afterwards needs no copy, and lse (B, H, T) fp32."""
    B, H, T, D = q.shape
    o = _new_output((B, T, H, D), q.dtype, q.device).transpose(1, 2)  # (B, H, T, D)
    lse = _new_output((B, H, T), torch.float32, q.device)
    settings, _, _ = launch_settings(D, q.dtype, target(q.device))
    keep_scale, threshold = _dropout_args(dropout_p)
    grid = (triton.cdiv(T, settings["BLOCK_M"]), B * H)
    with on_device(q):
        traceable(_attn_fwd_kernel)[grid](
            q, k, v, o, lse, seed, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, T, k.shape[2], scale * LOG2E, keep_scale, threshold,
            CAUSAL=causal, DROPOUT=dropout_p > 0.0, HEAD_DIM=D, BLOCK_D=block_d(D),
            PRECISION=_precision(q.dtype), **settings)
    return o, lse


def _launch_backward(do, q, k, v, o, lse, seed, causal: bool, dropout_p: float, scale: float,
                     dq, dk, dv) -> None:
    """Launch the backward kernels, writing dq, dk, dv (any strides; dk's equal dv's)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    assert dk.stride() == dv.stride(), "the dK/dV kernel writes both through one set of strides"
    _, dkdv, dq_settings = launch_settings(D, q.dtype, target(q.device))
    keep_scale, threshold = _dropout_args(dropout_p)
    delta = _new_output((B, H, T), torch.float32, q.device)
    common = dict(CAUSAL=causal, DROPOUT=dropout_p > 0.0, HEAD_DIM=D, BLOCK_D=block_d(D),
                  PRECISION=_precision(q.dtype))
    inputs = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    scalars = (H, T, S, scale, scale * LOG2E, keep_scale, threshold)
    with on_device(q):
        traceable(_attn_bwd_delta_kernel)[(triton.cdiv(T, delta_rows(D)), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, T, 1.0 - dropout_p, HEAD_DIM=D,
            BLOCK_D=block_d(D), BLOCK_M=delta_rows(D))
        traceable(_attn_bwd_dkdv_kernel)[(triton.cdiv(S, dkdv["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, seed, *inputs, *dk.stride(), *scalars, **common,
            **dkdv)
        traceable(_attn_bwd_dq_kernel)[(triton.cdiv(T, dq_settings["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, seed, *inputs, *dq.stride(), *scalars, **common,
            **dq_settings)


def _unpack(qkv: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v: three (B, H, T, D) views of a (B, T, 3, H, D) projection."""
    return [t.transpose(1, 2) for t in qkv.unbind(2)]  # 3 x (B, T, H, D) -> (B, H, T, D)


@triton_op("tinygpt::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float,
    seed: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, seed, causal, dropout_p, scale)


@triton_op("tinygpt::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, causal: bool, dropout_p: float, seed: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq = _new_output(q.shape, q.dtype, q.device)  # (B, H, T, D)
    dk = _new_output(k.shape, k.dtype, k.device)  # (B, H, S, D)
    dv = _new_output(v.shape, v.dtype, v.device)
    _launch_backward(do, q, k, v, o, lse, seed, causal, dropout_p, scale, dq, dk, dv)
    return dq, dk, dv


@triton_op("tinygpt::attention_qkv_fwd", mutates_args=())
def _attention_qkv_fwd(
    qkv: torch.Tensor, causal: bool, dropout_p: float, seed: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(*_unpack(qkv), seed, causal, dropout_p, scale)


@triton_op("tinygpt::attention_qkv_bwd", mutates_args=())
def _attention_qkv_bwd(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, causal: bool,
    dropout_p: float, seed: torch.Tensor, scale: float,
) -> torch.Tensor:
    dqkv = _new_output(qkv.shape, qkv.dtype, qkv.device)  # (B, T, 3, H, D)
    _launch_backward(do, *_unpack(qkv), o, lse, seed, causal, dropout_p, scale, *_unpack(dqkv))
    return dqkv


# Shapes only, for FakeTensor tracing (the Triton interpreter cannot run on fake tensors).
@_attention_fwd.register_fake
def _(q, k, v, causal, dropout_p, seed, scale):
    B, H, T, D = q.shape
    return (q.new_empty((B, T, H, D)).transpose(1, 2),
            q.new_empty((B, H, T), dtype=torch.float32))


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, dropout_p, seed, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@_attention_qkv_fwd.register_fake
def _(qkv, causal, dropout_p, seed, scale):
    B, T, _, H, D = qkv.shape
    return (qkv.new_empty((B, T, H, D)).transpose(1, 2),
            qkv.new_empty((B, H, T), dtype=torch.float32))


@_attention_qkv_bwd.register_fake
def _(do, qkv, o, lse, causal, dropout_p, seed, scale):
    return qkv.new_empty(qkv.shape)


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


def _setup_context_packed(ctx, inputs, output):
    qkv, causal, dropout_p, seed, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _backward_packed(ctx, do, _dlse):
    qkv, o, lse, seed = ctx.saved_tensors
    dqkv = _attention_qkv_bwd(do, qkv, o, lse, ctx.causal, ctx.dropout_p, seed, ctx.scale)
    return dqkv, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_attention_qkv_fwd.register_autograd(_backward_packed, setup_context=_setup_context_packed)


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreted():
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
    if min(q.shape[:3]) < 1 or k.shape[2] < 1:
        raise ValueError(f"q and k must be non-empty, got {tuple(q.shape)} and {tuple(k.shape)}")
    if (reason := unsupported_shape(*q.shape[:2], q.shape[3])) is not None:
        raise ValueError(reason)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def unsupported_shape(B: int, H: int, D: int) -> str | None:
    """Why the kernels cannot serve B sequences of H heads of dim D, or None when they can."""
    if not 1 <= D <= MAX_HEAD_DIM:
        return f"head dim {D} is not supported (the Triton attention takes 1 to {MAX_HEAD_DIM})"
    if B * H > MAX_BATCH_HEADS:
        return (f"batch x heads = {B} x {H} = {B * H} is more than the Triton attention's "
                f"{MAX_BATCH_HEADS}")
    return None


def _seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    """The seed as a one-element int64 tensor on `device`, made by a kernel (no host copy, so
    CUDA graphs capture it); drawn from torch's generator when None."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in 64 bits (signed), got {seed}")
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def _seed_and_scale(q: torch.Tensor, dropout_p: float, seed: int | None,
                    scale: float | None) -> tuple[torch.Tensor, float]:
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dropout_p > 0.0:
        return _seed_tensor(seed, q.device), scale
    return q.new_zeros((1,), dtype=torch.int64), scale  # the kernels take a seed pointer either way


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0, seed: int | None = None, scale: float | None = None
              ) -> torch.Tensor:
    """softmax(q k^T * scale, causal mask) with dropout on the weights, @ v; with autograd.

    q: (B, H, T, D), k and v: (B, H, S, D), any strides; 1 <= D <= 256 (computed padded to
    `block_d(D)`); B * H <= 65535; fp16, bf16 or fp32. With `causal`, query i attends to keys
    j <= i. `scale` defaults to D**-0.5. The dropout mask comes from `seed` (drawn from torch's
    generator when None); see `attention_dropout_mask`. Returns (B, H, T, D) in q's dtype.
    """
    _check(q, k, v, dropout_p)
    seed_t, scale = _seed_and_scale(q, dropout_p, seed, scale)
    return _attention_fwd(q, k, v, bool(causal), float(dropout_p), seed_t, scale)[0]


def attention_qkv(qkv: torch.Tensor, causal: bool = True, dropout_p: float = 0.0,
                  seed: int | None = None, scale: float | None = None) -> torch.Tensor:
    """`attention` of the packed projection qkv: (B, T, 3, H, D), any strides -> (B, H, T, D).

    The same result as attention(q, k, v) on the views qkv[:, :, i].transpose(1, 2), but the
    backward writes the gradient of qkv as one (B, T, 3, H, D) tensor.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must have shape (B, T, 3, H, D), got {shape}")
    q, k, v = _unpack(qkv)
    _check(q, k, v, dropout_p)
    seed_t, scale = _seed_and_scale(q, dropout_p, seed, scale)
    return _attention_qkv_fwd(qkv, bool(causal), float(dropout_p), seed_t, scale)[0]


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
    with on_device(mask):
        _dropout_mask_kernel[grid](mask, _seed_tensor(seed, device), T, S,
                                   _dropout_args(dropout_p)[1], BLOCK_M=64, BLOCK_N=64)
    return mask.view(torch.bool)
