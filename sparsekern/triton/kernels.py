"""The Triton kernels of sparsekern: @triton.autotune -> @triton.jit, constexpr tiles.

Imported lazily (by the launchers), never at `import sparsekern`: whether triton runs compiled or
in the interpreter is fixed when triton itself is first imported (TRITON_INTERPRET), see
sparsekern/triton/__init__.py.

Four kernels cover the six linear ops (three products per format), three more the BSR conv2d
(below); the CSR conv2d kernels live in csr_conv_kernels.py and join ``KERNELS`` at the end:

* ``bsr_spmm``   BSR forward ``y = x W^T + b`` and BSR ``dX = dY W``. One program per (output
  block, BLOCK_M rows); it walks only the kept blocks of its output block: the block-CSR row of
  W for the forward (``block_row_ptr``/``block_col_idx``), the transposed index for dX
  (``block_col_ptr``/``block_row_idx``/``block_perm``, the block loaded transposed). Each kept
  block is one ``tl.dot`` of a [BLOCK_M, bk] activation tile with the [bk, bn] block (tensor
  cores; wgmma on sm_90). An output block with no kept block writes zeros (or the bias).
* ``bsr_sddmm``  BSR ``dW`` at kept blocks only: one program per kept block reduces
  ``x[:, cols]^T @ dY[:, rows]`` over M in BLOCK_M chunks -> [bk, bn], the stored layout.
* ``csr_spmm``   CSR forward and dX, row-split over W's rows (or columns for dX): one program
  per (BLOCK_R rows of W, BLOCK_M activation rows), each row walking its own kept entries and
  accumulating ``value * srcT[col, m-tile]`` on CUDA cores. ``srcT`` is the activation
  transposed ([K, M]) so that every gathered row is a contiguous, coalesced M-tile.
* ``csr_sddmm``  CSR ``dW`` at kept positions: one program per BLOCK_E consecutive entries, a
  dot of two contiguous rows of dY^T and x^T per entry, reduced over M.

Block dims below 16 (bn or bk = 8) are padded to 16 in registers (masked loads), since
``tl.dot`` needs every dim >= 16. Accumulation is float32 (float64 for float64 inputs); float32
inputs use tf32 only when the launcher says torch.backends.cuda.matmul.allow_tf32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from sparsekern.triton.tuning import CONFIGS, configs_for  # noqa: F401  (re-exported)
from sparsekern.triton.tuning import all_configs as _all, cfg as _cfg, pruner as _pruner

# ---- autotune configurations (also what the AOT compile report iterates) ----------------------
#
# Two sets per dot kernel, chosen by the operands' element size (prune below): 16-bit types run
# tensor-core tiles (wgmma on sm_90 needs BLOCK_M >= 64); 32/64-bit types (fp32 runs ieee FMA
# unless tf32 is allowed) keep operand tiles small enough that sm_80 does not spill (found by the
# AOT report: BLOCK_M=128 with 64-blocks spills 4 KB/thread in fp32 on sm_80).

CONFIGS.update({
    "bsr_spmm": {
        2: [_cfg(4, 3, BLOCK_M=64), _cfg(4, 3, BLOCK_M=128), _cfg(8, 4, BLOCK_M=128),
            _cfg(8, 3, BLOCK_M=256)],
        4: [_cfg(4, 2, BLOCK_M=32), _cfg(8, 2, BLOCK_M=64)],
    },
    "bsr_sddmm": {
        2: [_cfg(4, 3, BLOCK_M=64), _cfg(4, 3, BLOCK_M=128), _cfg(8, 4, BLOCK_M=128)],
        4: [_cfg(4, 2, BLOCK_M=32), _cfg(8, 3, BLOCK_M=32)],
    },
})
# The CSR kernels gather on CUDA cores: one set for every type.
_CSR_SPMM = [_cfg(4, 2, BLOCK_R=16, BLOCK_M=128), _cfg(4, 2, BLOCK_R=32, BLOCK_M=64)]
_CSR_SDDMM = [_cfg(4, 2, BLOCK_E=32, BLOCK_M=128), _cfg(4, 2, BLOCK_E=64, BLOCK_M=64)]
CONFIGS["csr_spmm"] = {2: _CSR_SPMM, 4: _CSR_SPMM}
CONFIGS["csr_sddmm"] = {2: _CSR_SDDMM, 4: _CSR_SDDMM}


# ---- BSR: forward and dX -------------------------------------------------------------------------

@triton.autotune(configs=_all("bsr_spmm"),
                 key=["M_BUCKET", "A_COLS", "OUT_COLS", "BLOCK_IN", "BLOCK_OUT", "TRANS"],
                 prune_configs_by=_pruner("bsr_spmm"))
@triton.jit
def bsr_spmm_kernel(a_ptr, v_ptr, ptr_ptr, idx_ptr, perm_ptr, bias_ptr, out_ptr,
                    M, A_COLS, OUT_COLS, M_BUCKET, stride_am, stride_om,
                    BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr,
                    PAD_IN: tl.constexpr, PAD_OUT: tl.constexpr,
                    TRANS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACC_F64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[m, o*BLOCK_OUT + c] = sum over kept blocks t of output block o:
    a[m, in_block(t)*BLOCK_IN + i] * Wblk(t)[i, c]  (+ bias[c]).

    Forward: a = x, o = block row, BLOCK_IN = bk, BLOCK_OUT = bn, Wblk = values[t] ([bk, bn]).
    dX (TRANS): a = dY, o = block column, BLOCK_IN = bn, BLOCK_OUT = bk,
    Wblk = values[perm[t]]^T ([bn, bk]).
    """
    pid_o = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(ptr_ptr + pid_o)
    end = tl.load(ptr_ptr + pid_o + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, PAD_IN)
    offs_o = tl.arange(0, PAD_OUT)
    m_ok = offs_m < M
    w_ok = (offs_i < BLOCK_IN)[:, None] & (offs_o < BLOCK_OUT)[None, :]
    if TRANS:
        w_off = offs_i[:, None] + offs_o[None, :] * BLOCK_IN     # values[b][c][i]
    else:
        w_off = offs_i[:, None] * BLOCK_OUT + offs_o[None, :]    # values[b][i][c]
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    if ACC_F64:
        acc = tl.zeros((BLOCK_M, PAD_OUT), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, PAD_OUT), dtype=tl.float32)
    for t in range(start, end):
        j = tl.load(idx_ptr + t)
        if HAS_PERM:
            b = tl.load(perm_ptr + t)
        else:
            b = t
        cols = j * BLOCK_IN + offs_i
        a = tl.load(a_rows + cols[None, :],
                    mask=m_ok[:, None] & ((offs_i < BLOCK_IN) & (cols < A_COLS))[None, :],
                    other=0.0)
        w = tl.load(v_ptr + b.to(tl.int64) * (BLOCK_IN * BLOCK_OUT) + w_off, mask=w_ok,
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    out_cols = pid_o * BLOCK_OUT + offs_o
    c_ok = (offs_o < BLOCK_OUT) & (out_cols < OUT_COLS)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + out_cols, mask=c_ok, other=0.0)
        acc += bias[None, :].to(acc.dtype)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + out_cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# ---- BSR: dW at kept blocks ----------------------------------------------------------------------

@triton.autotune(configs=_all("bsr_sddmm"), key=["M_BUCKET", "N", "K", "BK", "BN"],
                 prune_configs_by=_pruner("bsr_sddmm"))
@triton.jit
def bsr_sddmm_kernel(dy_ptr, x_ptr, row_of_ptr, col_idx_ptr, out_ptr,
                     M, N, K, M_BUCKET, stride_dym, stride_xm,
                     BK: tl.constexpr, BN: tl.constexpr, PAD_K: tl.constexpr,
                     PAD_N: tl.constexpr, ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """out[b][k][n] = sum_m x[m, j*BK + k] * dy[m, i*BN + n] for kept block b at (i, j)."""
    b = tl.program_id(0)
    i = tl.load(row_of_ptr + b)
    j = tl.load(col_idx_ptr + b)
    offs_k = tl.arange(0, PAD_K)
    offs_n = tl.arange(0, PAD_N)
    cols_k = j * BK + offs_k
    cols_n = i * BN + offs_n
    k_ok = (offs_k < BK) & (cols_k < K)
    n_ok = (offs_n < BN) & (cols_n < N)
    if ACC_F64:
        acc = tl.zeros((PAD_K, PAD_N), dtype=tl.float64)
    else:
        acc = tl.zeros((PAD_K, PAD_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + cols_k[:, None],
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)       # [PAD_K, BLOCK_M]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols_n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)       # [BLOCK_M, PAD_N]
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    out_off = offs_k[:, None] * BN + offs_n[None, :]
    tl.store(out_ptr + b.to(tl.int64) * (BK * BN) + out_off, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_k < BK)[:, None] & (offs_n < BN)[None, :])


# ---- CSR: forward and dX (row-split SpMM on the transposed activation) -------------------

@triton.autotune(configs=_all("csr_spmm"), key=["M_BUCKET", "OUT_COLS", "SRC_ROWS"],
                 prune_configs_by=_pruner("csr_spmm"))
@triton.jit
def csr_spmm_kernel(srcT_ptr, v_ptr, ptr_ptr, idx_ptr, perm_ptr, bias_ptr, out_ptr,
                    M, OUT_COLS, SRC_ROWS, M_BUCKET, stride_src, stride_om,
                    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[m, r] = sum over entries e of compressed row r: v[perm(e)] * srcT[idx[e], m] (+ bias).

    Forward: rows r = W's rows (row_ptr/col_idx), srcT = x^T [K, M].
    dX: rows r = W's columns (col_ptr/row_idx/perm), srcT = dY^T [N, M].
    """
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < OUT_COLS
    start = tl.load(ptr_ptr + rows, mask=r_ok, other=0)
    end = tl.load(ptr_ptr + rows + 1, mask=r_ok, other=0)
    length = end - start
    longest = tl.max(length, axis=0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if ACC_F64:
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for t in range(0, longest):
        live = t < length
        e = start + t
        c = tl.load(idx_ptr + e, mask=live, other=0)
        if HAS_PERM:
            p = tl.load(perm_ptr + e, mask=live, other=0)
        else:
            p = e
        v = tl.load(v_ptr + p, mask=live, other=0.0).to(acc.dtype)
        s = tl.load(srcT_ptr + c[:, None].to(tl.int64) * stride_src + offs_m[None, :],
                    mask=live[:, None] & m_ok[None, :], other=0.0).to(acc.dtype)
        acc += v[:, None] * s
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=r_ok, other=0.0)
        acc += bias[:, None].to(acc.dtype)
    tl.store(out_ptr + offs_m[None, :].to(tl.int64) * stride_om + rows[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & m_ok[None, :])


# ---- CSR: dW at kept positions (SDDMM) -----------------------------------------------------

@triton.autotune(configs=_all("csr_sddmm"), key=["M_BUCKET", "NNZ"],
                 prune_configs_by=_pruner("csr_sddmm"))
@triton.jit
def csr_sddmm_kernel(dyT_ptr, xT_ptr, row_of_ptr, col_idx_ptr, out_ptr, M, NNZ, M_BUCKET,
                     stride_dy, stride_x, ACC_F64: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """out[e] = sum_m dY^T[row(e), m] * x^T[col(e), m] for BLOCK_E consecutive entries."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < NNZ
    r = tl.load(row_of_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)
    c = tl.load(col_idx_ptr + offs_e, mask=e_ok, other=0).to(tl.int64)
    if ACC_F64:
        acc = tl.zeros((BLOCK_E, ), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_E, ), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ok = e_ok[:, None] & (offs_m < M)[None, :]
        a = tl.load(dyT_ptr + r[:, None] * stride_dy + offs_m[None, :], mask=ok, other=0.0)
        b = tl.load(xT_ptr + c[:, None] * stride_x + offs_m[None, :], mask=ok, other=0.0)
        acc += tl.sum(a.to(acc.dtype) * b.to(acc.dtype), axis=1)
    tl.store(out_ptr + offs_e, acc.to(out_ptr.dtype.element_ty), mask=e_ok)


KERNELS = {
    "bsr_spmm": bsr_spmm_kernel,
    "bsr_sddmm": bsr_sddmm_kernel,
    "csr_spmm": csr_spmm_kernel,
    "csr_sddmm": csr_sddmm_kernel,
}


# ---- BSR conv2d: implicit GEMM over kept channel blocks, NHWC ------------------------------------
#
# Conv weights are the BSR format over (C_out, C_in) channel blocks spanning the kh x kw window:
# values[nnz_blocks, kh, kw, bk, bn]. Activations are channels_last, so a pixel's channels are
# contiguous: every kept block and tap is one tl.dot of a gathered [BLOCK_P, bk] pixel tile
# (zero where the tap falls into the padding) with the [bk, bn] weight slice. No im2col buffer.

CONFIGS["bsr_conv_fwd"] = {
    2: [_cfg(4, 3, BLOCK_P=64), _cfg(4, 3, BLOCK_P=128), _cfg(8, 3, BLOCK_P=128)],
    # fp32 FMA: BLOCK_P=32 with 4 warps spilled 8 KB on sm_80 at 64-blocks (AOT report)
    4: [_cfg(8, 2, BLOCK_P=32), _cfg(8, 2, BLOCK_P=64)],
}
CONFIGS["bsr_conv_dx"] = CONFIGS["bsr_conv_fwd"]
CONFIGS["bsr_conv_dw"] = {
    2: [_cfg(4, 3, BLOCK_P=64), _cfg(4, 3, BLOCK_P=128)],
    4: [_cfg(4, 2, BLOCK_P=32), _cfg(8, 3, BLOCK_P=32)],
}


@triton.autotune(configs=_all("bsr_conv_fwd"),
                 key=["P_BUCKET", "C_IN", "C_OUT", "TAPS", "BK", "BN"],
                 prune_configs_by=_pruner("bsr_conv_fwd"))
@triton.jit
def bsr_conv_fwd_kernel(x_ptr, v_ptr, ptr_ptr, idx_ptr, bias_ptr, out_ptr,
                        P, H, W, C_IN, OH, OW, C_OUT, P_BUCKET, KW, TAPS,
                        SH, SW, PH, PW, DH, DW,
                        BK: tl.constexpr, BN: tl.constexpr, PAD_K: tl.constexpr,
                        PAD_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[p, i*BN + c] = sum over kept blocks t of block row i and taps (dh, dw):
    x[pixel(p) shifted by the tap, j(t)*BK + k] * values[t, dh, dw, k, c]  (+ bias)."""
    pid_o = tl.program_id(0)
    pid_p = tl.program_id(1)
    start = tl.load(ptr_ptr + pid_o)
    end = tl.load(ptr_ptr + pid_o + 1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    n = offs_p // (OH * OW)
    rem = offs_p % (OH * OW)
    ih0 = (rem // OW) * SH - PH
    iw0 = (rem % OW) * SW - PW
    offs_k = tl.arange(0, PAD_K)
    offs_n = tl.arange(0, PAD_N)
    w_off = offs_k[:, None] * BN + offs_n[None, :]
    w_ok = (offs_k < BK)[:, None] & (offs_n < BN)[None, :]
    if ACC_F64:
        acc = tl.zeros((BLOCK_P, PAD_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_P, PAD_N), dtype=tl.float32)
    for s in range(start * TAPS, end * TAPS):
        t = s // TAPS
        tap = s % TAPS
        j = tl.load(idx_ptr + t)
        ih = ih0 + (tap // KW) * DH
        iw = iw0 + (tap % KW) * DW
        ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = ((n * H + ih) * W + iw).to(tl.int64)
        cin = j * BK + offs_k
        a = tl.load(x_ptr + pix[:, None] * C_IN + cin[None, :],
                    mask=ok[:, None] & ((offs_k < BK) & (cin < C_IN))[None, :], other=0.0)
        w = tl.load(v_ptr + s * (BK * BN) + w_off, mask=w_ok, other=0.0)  # < 2**31: launcher
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    cout = pid_o * BN + offs_n
    c_ok = (offs_n < BN) & (cout < C_OUT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cout, mask=c_ok, other=0.0)[None, :].to(acc.dtype)
    tl.store(out_ptr + offs_p[:, None].to(tl.int64) * C_OUT + cout[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=_all("bsr_conv_dx"),
                 key=["Q_BUCKET", "C_IN", "C_OUT", "TAPS", "BK", "BN"],
                 prune_configs_by=_pruner("bsr_conv_dx"))
@triton.jit
def bsr_conv_dx_kernel(dy_ptr, v_ptr, ptr_ptr, row_idx_ptr, perm_ptr, out_ptr,
                       Q, H, W, C_IN, OH, OW, C_OUT, Q_BUCKET, KW, TAPS,
                       SH, SW, PH, PW, DH, DW,
                       BK: tl.constexpr, BN: tl.constexpr, PAD_K: tl.constexpr,
                       PAD_N: tl.constexpr, ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """dX[q, j*BK + k] = sum over kept blocks of block column j (transposed index) and taps:
    dY[output pixel that reads q through the tap, i*BN + c] * values[perm, dh, dw, k, c]."""
    pid_o = tl.program_id(0)
    pid_p = tl.program_id(1)
    start = tl.load(ptr_ptr + pid_o)
    end = tl.load(ptr_ptr + pid_o + 1)
    offs_q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = offs_q < Q
    n = offs_q // (H * W)
    rem = offs_q % (H * W)
    th0 = rem // W + PH
    tw0 = rem % W + PW
    offs_k = tl.arange(0, PAD_K)
    offs_n = tl.arange(0, PAD_N)
    wt_off = offs_n[:, None] + offs_k[None, :] * BN          # [c, k] of a [k][c] slice
    wt_ok = (offs_n < BN)[:, None] & (offs_k < BK)[None, :]
    if ACC_F64:
        acc = tl.zeros((BLOCK_P, PAD_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_P, PAD_K), dtype=tl.float32)
    for s in range(start * TAPS, end * TAPS):
        t = s // TAPS
        tap = s % TAPS
        i = tl.load(row_idx_ptr + t)
        b = tl.load(perm_ptr + t)
        th = th0 - (tap // KW) * DH
        tw = tw0 - (tap % KW) * DW
        oh = th // SH
        ow = tw // SW
        ok = q_ok & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (oh < OH) & (ow < OW)
        pix = ((n * OH + oh) * OW + ow).to(tl.int64)
        cout = i * BN + offs_n
        g = tl.load(dy_ptr + pix[:, None] * C_OUT + cout[None, :],
                    mask=ok[:, None] & ((offs_n < BN) & (cout < C_OUT))[None, :], other=0.0)
        w = tl.load(v_ptr + (b.to(tl.int64) * TAPS + tap) * (BK * BN) + wt_off, mask=wt_ok,
                    other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    cin = pid_o * BK + offs_k
    k_ok = (offs_k < BK) & (cin < C_IN)
    tl.store(out_ptr + offs_q[:, None].to(tl.int64) * C_IN + cin[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & k_ok[None, :])


@triton.autotune(configs=_all("bsr_conv_dw"),
                 key=["P_BUCKET", "C_IN", "C_OUT", "TAPS", "BK", "BN"],
                 prune_configs_by=_pruner("bsr_conv_dw"))
@triton.jit
def bsr_conv_dw_kernel(dy_ptr, x_ptr, row_of_ptr, col_idx_ptr, out_ptr,
                       P, H, W, C_IN, OH, OW, C_OUT, P_BUCKET, KW, TAPS,
                       SH, SW, PH, PW, DH, DW,
                       BK: tl.constexpr, BN: tl.constexpr, PAD_K: tl.constexpr,
                       PAD_N: tl.constexpr, ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """values-grad[b, dh, dw, k, c] = sum over output pixels p of
    x[pixel(p) shifted by (dh, dw), j*BK + k] * dY[p, i*BN + c], kept block b at (i, j)."""
    b = tl.program_id(0)
    tap = tl.program_id(1)
    i = tl.load(row_of_ptr + b)
    j = tl.load(col_idx_ptr + b)
    offs_k = tl.arange(0, PAD_K)
    offs_n = tl.arange(0, PAD_N)
    cin = j * BK + offs_k
    cout = i * BN + offs_n
    k_ok = (offs_k < BK) & (cin < C_IN)
    n_ok = (offs_n < BN) & (cout < C_OUT)
    dh = (tap // KW) * DH - PH
    dw = (tap % KW) * DW - PW
    if ACC_F64:
        acc = tl.zeros((PAD_K, PAD_N), dtype=tl.float64)
    else:
        acc = tl.zeros((PAD_K, PAD_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        n = offs_p // (OH * OW)
        rem = offs_p % (OH * OW)
        ih = (rem // OW) * SH + dh
        iw = (rem % OW) * SW + dw
        ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = ((n * H + ih) * W + iw).to(tl.int64)
        xt = tl.load(x_ptr + pix[None, :] * C_IN + cin[:, None],
                     mask=k_ok[:, None] & ok[None, :], other=0.0)           # [PAD_K, BLOCK_P]
        g = tl.load(dy_ptr + offs_p[:, None].to(tl.int64) * C_OUT + cout[None, :],
                    mask=p_ok[:, None] & n_ok[None, :], other=0.0)          # [BLOCK_P, PAD_N]
        acc = tl.dot(xt, g, acc, input_precision=PRECISION)
    out_off = (b.to(tl.int64) * TAPS + tap) * (BK * BN) + offs_k[:, None] * BN + offs_n[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_k < BK)[:, None] & (offs_n < BN)[None, :])


KERNELS.update({
    "bsr_conv_fwd": bsr_conv_fwd_kernel,
    "bsr_conv_dx": bsr_conv_dx_kernel,
    "bsr_conv_dw": bsr_conv_dw_kernel,
})

# ---- CSR conv2d: in its own file (sparsekern/triton/csr_conv_kernels.py) ---------------------

from sparsekern.triton.csr_conv_kernels import KERNELS as _CSR_CONV_KERNELS  # noqa: E402

KERNELS.update(_CSR_CONV_KERNELS)
