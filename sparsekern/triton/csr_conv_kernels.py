"""Triton kernels of the unstructured (CSR) conv2d: forward, dX and dW at kept positions.

The weight is the CSR format over the (C_out, C_in*kh*kw) view, column = ci*kh*kw + dh*kw + dw
(sparsekern.formats.CSR, csrc/cpu/conv.cpp). Implicit GEMM: no im2col buffer; each kept weight
(co, ci, dh, dw) multiplies the input channel plane ci shifted by its tap.

Why this mapping fits the GPU. An unstructured weight has no dense sub-block for a tensor-core
``tl.dot`` (densifying its scattered taps costs more than it saves at the sparsities tickets
have), so these kernels run on CUDA cores like the CSR linear kernels: a program owns BLOCK_R
output channels (dX: input channels) x BLOCK_P pixels and every step multiplies one kept weight
per channel with a vector of BLOCK_P pixels of *one* input channel at one tap. That vector is
contiguous in a channel-planar (NCHW) activation, so the gather is coalesced (a warp reads 32
consecutive pixels of one plane); in NHWC consecutive pixels of one channel lie C_in elements
apart and every gathered element would cost its own 32-byte sector. The launchers therefore run
the gathers on the planar activation (NCHW input is used as is; channels_last input costs one
transposing copy, like the CSR linear kernels' transposed activation) and write the ops'
channels_last outputs (BLOCK_R contiguous channels per pixel). The planes of the kept input
channels are re-read by every row group and stay in L2. A program walks only the kept entries
of its rows (the format's row_ptr / col_idx; dX: the transposed col_ptr / row_idx / perm, where
the columns of input channel ci are the contiguous range [ci*taps, (ci+1)*taps)): an empty row
writes the bias (or zeros) and costs one loop test.

dW is sampled at kept positions only: one program per BLOCK_E consecutive entries (mostly one
output channel, so its dY plane is shared in L1) and one slice of the pixels; the dot of the dY
plane with the shifted input plane is reduced over BLOCK_P pixels at a time. The pixel axis
(N*OH*OW, up to 10^5 for ResNet stems) is split over the grid's second axis so that a layer
with few kept weights still fills the GPU; the per-split partial sums are added by the launcher
(deterministic, no atomics).

Accumulation is float32 (float64 for float64 inputs), products on CUDA-core FMAs: tf32 does not
apply. Offsets are int32 (the launchers refuse tensors of 2**31 elements or more): every
[rows, pixels] tile of 64-bit offsets costs two registers per element and thread, which cost
the dW kernel a third of its registers (AOT report: 237 -> 152 on sm_90).
"""
from __future__ import annotations

import triton
import triton.language as tl

from sparsekern.triton.grid import channel_group_and_pixel_tile
from sparsekern.triton.tuning import CONFIGS, all_configs, cfg, pruner

# CUDA-core gathers: one set for every type. Every [rows, pixels] tile costs a register per
# element and thread for the accumulator, the gathered values and the mask, and two for its
# 64-bit addresses: at most 16 elements per thread (2048 per 4 warps). dW holds two gathered
# tiles (dY and x) and spilled ~1 KB/thread at 32 per thread on sm_80/sm_90 (AOT report).
# Forward/dX tiles are few rows x many pixels: a thread holds elements of every row of the
# tile, so each row's decode (column -> channel, tap: integer divisions) is paid per row a
# thread holds; 16 rows x 128 pixels cost 35 PTX instructions per FMA, 4 x 512 cost 20, 2 x
# 1024 cost 18 (forward, sm_90).
_GATHER = [cfg(4, 2, BLOCK_R=4, BLOCK_P=512), cfg(4, 2, BLOCK_R=2, BLOCK_P=1024),
           cfg(8, 2, BLOCK_R=4, BLOCK_P=1024)]
_SAMPLED = [cfg(4, 2, BLOCK_E=16, BLOCK_P=128), cfg(4, 2, BLOCK_E=32, BLOCK_P=64),
            cfg(8, 2, BLOCK_E=32, BLOCK_P=128)]
CONFIGS.update({
    "csr_conv_fwd": {2: _GATHER, 4: _GATHER},
    "csr_conv_dx": {2: _GATHER, 4: _GATHER},
    "csr_conv_dw": {2: _SAMPLED, 4: _SAMPLED},
})
# The dW launcher sizes its pixel splits for this many entries per program (the smallest
# BLOCK_E of _SAMPLED), so the split count does not depend on the config the autotuner picks.
DW_MIN_BLOCK_E = min(c.kwargs["BLOCK_E"] for c in _SAMPLED)
DW_MAX_BLOCK_P = max(c.kwargs["BLOCK_P"] for c in _SAMPLED)


@triton.autotune(configs=all_configs("csr_conv_fwd"),
                 key=["P_BUCKET", "C_OUT", "TAPS", "NNZ"],
                 prune_configs_by=pruner("csr_conv_fwd"))
@triton.jit
def csr_conv_fwd_kernel(x_ptr, v_ptr, ptr_ptr, idx_ptr, bias_ptr, out_ptr,
                        P, H, W, OH, OW, C_OUT, NNZ, P_BUCKET, KW, TAPS,
                        SH, SW, PH, PW, DH, DW, stride_xn, stride_xc, stride_xh,
                        HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[p, co] = sum over kept entries (ci, dh, dw) of row co:
    v * x[n(p), ci, oh(p)*SH - PH + dh*DH, ow(p)*SW - PW + dw*DW]  (+ bias[co]).
    x planar with unit W stride; out channels_last ([P, C_OUT])."""
    pid_r, pid_p = channel_group_and_pixel_tile(C_OUT, BLOCK_R)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < C_OUT
    start = tl.load(ptr_ptr + rows, mask=r_ok, other=0)
    length = tl.load(ptr_ptr + rows + 1, mask=r_ok, other=0) - start
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    n = offs_p // (OH * OW)
    rem = offs_p % (OH * OW)
    ih0 = (rem // OW) * SH - PH
    iw0 = (rem % OW) * SW - PW
    base = n * stride_xn + ih0 * stride_xh + iw0
    if ACC_F64:
        acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for t in range(0, tl.max(length, axis=0)):
        live = t < length
        e = start + t
        col = tl.load(idx_ptr + e, mask=live, other=0)
        v = tl.load(v_ptr + e, mask=live, other=0.0).to(acc.dtype)
        tap = col % TAPS
        dh = (tap // KW) * DH
        dw = (tap % KW) * DW
        ih = ih0[None, :] + dh[:, None]
        iw = iw0[None, :] + dw[:, None]
        ok = (live[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        off = (col // TAPS) * stride_xc + dh * stride_xh + dw
        s = tl.load(x_ptr + base[None, :] + off[:, None], mask=ok, other=0.0)
        acc += v[:, None] * s.to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=r_ok, other=0.0)[:, None].to(acc.dtype)
    tl.store(out_ptr + offs_p[None, :] * C_OUT + rows[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & p_ok[None, :])


@triton.autotune(configs=all_configs("csr_conv_dx"),
                 key=["Q_BUCKET", "C_IN", "TAPS", "NNZ"],
                 prune_configs_by=pruner("csr_conv_dx"))
@triton.jit
def csr_conv_dx_kernel(dy_ptr, v_ptr, ptr_ptr, row_idx_ptr, perm_ptr, col_of_ptr, out_ptr,
                       Q, H, W, C_IN, OH, OW, NNZ, Q_BUCKET, KW, TAPS,
                       SH, SW, PH, PW, DH, DW, stride_dn, stride_dc, stride_dh,
                       ACC_F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """dX[q, ci] = sum over kept entries (co, dh, dw) of the columns of input channel ci:
    v * dY[n(q), co, oh, ow] where oh*SH - PH + dh*DH = ih(q) (and the same for w).
    Transposed entry e: row row_idx[e], column col_of[e], value v[perm[e]].
    dY planar with unit W stride; dX channels_last ([Q, C_IN])."""
    pid_c, pid_q = channel_group_and_pixel_tile(C_IN, BLOCK_R)
    chans = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
    c_ok = chans < C_IN
    start = tl.load(ptr_ptr + chans * TAPS, mask=c_ok, other=0)
    length = tl.load(ptr_ptr + chans * TAPS + TAPS, mask=c_ok, other=0) - start
    offs_q = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = offs_q < Q
    n = offs_q // (H * W)
    rem = offs_q % (H * W)
    th0 = rem // W + PH
    tw0 = rem % W + PW
    base = n * stride_dn
    if ACC_F64:
        acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for t in range(0, tl.max(length, axis=0)):
        live = t < length
        e = start + t
        co = tl.load(row_idx_ptr + e, mask=live, other=0)
        tap = tl.load(col_of_ptr + e, mask=live, other=0) % TAPS
        v = tl.load(v_ptr + tl.load(perm_ptr + e, mask=live, other=0), mask=live,
                    other=0.0).to(acc.dtype)
        th = th0[None, :] - ((tap // KW) * DH)[:, None]
        tw = tw0[None, :] - ((tap % KW) * DW)[:, None]
        oh = th // SH
        ow = tw // SW
        ok = (live[:, None] & q_ok[None, :] & (th >= 0) & (tw >= 0) & (th % SH == 0)
              & (tw % SW == 0) & (oh < OH) & (ow < OW))
        off = co[:, None] * stride_dc + oh * stride_dh + ow
        g = tl.load(dy_ptr + base[None, :] + off, mask=ok, other=0.0)
        acc += v[:, None] * g.to(acc.dtype)
    tl.store(out_ptr + offs_q[None, :] * C_IN + chans[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & q_ok[None, :])


@triton.autotune(configs=all_configs("csr_conv_dw"),
                 key=["P_BUCKET", "TAPS", "NNZ"],
                 prune_configs_by=pruner("csr_conv_dw"))
@triton.jit
def csr_conv_dw_kernel(dy_ptr, x_ptr, row_of_ptr, col_idx_ptr, partial_ptr,
                       P, H, W, OH, OW, NNZ, P_BUCKET, P_PER_SPLIT, KW, TAPS,
                       SH, SW, PH, PW, DH, DW, stride_xn, stride_xc, stride_xh,
                       stride_dn, stride_dc, stride_dh,
                       ACC_F64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    """partial[split, e] = sum over the split's output pixels p of
    dY[n, co(e), oh, ow] * x[n, ci(e), oh*SH - PH + dh(e)*DH, ow*SW - PW + dw(e)*DW].
    dY and x planar with unit W stride; partial is [splits, NNZ] in the accumulator type."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(1)
    e_ok = offs_e < NNZ
    co = tl.load(row_of_ptr + offs_e, mask=e_ok, other=0)
    col = tl.load(col_idx_ptr + offs_e, mask=e_ok, other=0)
    tap = col % TAPS
    dh = (tap // KW) * DH
    dw = (tap % KW) * DW
    x_off = (col // TAPS) * stride_xc + dh * stride_xh + dw
    dy_off = co * stride_dc
    p_begin = split * P_PER_SPLIT
    p_end = tl.minimum(P, p_begin + P_PER_SPLIT)
    if ACC_F64:
        acc = tl.zeros((BLOCK_E, ), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_E, ), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_end
        n = offs_p // (OH * OW)
        rem = offs_p % (OH * OW)
        oh = rem // OW
        ow = rem % OW
        ih0 = oh * SH - PH
        iw0 = ow * SW - PW
        ih = ih0[None, :] + dh[:, None]
        iw = iw0[None, :] + dw[:, None]
        ok = (e_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        n64 = n
        x_base = n64 * stride_xn + ih0 * stride_xh + iw0
        dy_base = n64 * stride_dn + oh * stride_dh + ow
        a = tl.load(dy_ptr + dy_base[None, :] + dy_off[:, None],
                    mask=e_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(x_ptr + x_base[None, :] + x_off[:, None], mask=ok, other=0.0)
        acc += tl.sum(a.to(acc.dtype) * b.to(acc.dtype), axis=1)
    tl.store(partial_ptr + split.to(tl.int64) * NNZ + offs_e, acc, mask=e_ok)


KERNELS = {
    "csr_conv_fwd": csr_conv_fwd_kernel,
    "csr_conv_dx": csr_conv_dx_kernel,
    "csr_conv_dw": csr_conv_dw_kernel,
}
