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
the gathers on the planar activation (channels_last input costs one transposing copy, like the
CSR linear kernels' transposed activation) and write the ops' channels_last outputs. Forward
and dW read x zero-padded in that same copy, so every tap of every output pixel is in bounds
and a gathered element costs an address add, a load, a widening and an FMA (sm_90 PTX: 9-11
instructions per FMA with the loop's share of the row decode; 18-20 with per-element padding
bounds, 25-36 for the dW before its 2-D accumulator). dX at stride 1 reads dY padded by the
kernel's reach (11-14 per FMA); at other strides it tests bounds and stride divisibility per
element (30-35).
Tiles are few channels x many pixels because a thread holds elements of every channel of its
tile: a channel's column decode (integer divisions) is paid per channel a thread holds. The
planes of the kept input channels are re-read by every channel group and stay in L2. A
program walks only the kept entries
of its rows (the format's row_ptr / col_idx; dX: the transposed col_ptr / row_idx / perm, where
the columns of input channel ci are the contiguous range [ci*taps, (ci+1)*taps)): an empty row
writes the bias (or zeros) and costs one loop test.

dW is sampled at kept positions only: one program per BLOCK_E consecutive entries (mostly one
output channel, so its dY plane is shared in L1) and one slice of the pixels; the dot of the dY
plane with the shifted input plane is accumulated per pixel lane and reduced once. The pixel axis
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

from sparsekern.triton.tuning import CONFIGS, all_configs, cfg, pruner

# CUDA-core gathers: one set for every type. Every [rows, pixels] tile costs a register per
# element and thread for the accumulator, the gathered values and the mask, and two for its
# 64-bit addresses: at most 16 elements per thread (2048 per 4 warps). dW holds two gathered
# tiles (dY and x) and spilled ~1 KB/thread at 32 per thread on sm_80/sm_90 (AOT report).
# Forward/dX tiles are few rows x many pixels (module docstring): with per-element padding
# bounds, 16 rows x 128 pixels cost 35 PTX instructions per FMA, 4 x 512 cost 20, 2 x 1024 18
# (forward, sm_90).
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


@triton.jit
def channel_group_and_pixel_tile(channels, GROUP: tl.constexpr):
    """(channel group, pixel tile) of this program in a 1-D grid of cdiv(channels, GROUP) x
    pixel tiles, channel group fastest: consecutive programs gather the same pixel tile (shared
    in L2), and the pixel tiles are not bound by the 65535 limit of a CUDA grid's second axis
    (a ResNet stem at batch 256 has 3.2M output pixels)."""
    groups = tl.cdiv(channels, GROUP)
    pid = tl.program_id(0)
    tile = pid // groups
    return pid - tile * groups, tile


@triton.autotune(configs=all_configs("csr_conv_fwd"),
                 key=["P_BUCKET", "C_OUT", "TAPS", "NNZ"],
                 prune_configs_by=pruner("csr_conv_fwd"))
@triton.jit
def csr_conv_fwd_kernel(x_ptr, v_ptr, ptr_ptr, idx_ptr, bias_ptr, out_ptr,
                        P, OH, OW, C_OUT, NNZ, P_BUCKET, KW, TAPS, SH, SW, DH, DW,
                        stride_xn, stride_xc, stride_xh,
                        HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[p, co] = sum over kept entries (ci, dh, dw) of row co:
    v * xpad[n(p), ci, oh(p)*SH + dh*DH, ow(p)*SW + dw*DW]  (+ bias[co]).
    xpad: the input zero-padded, planar, unit W stride (every tap in bounds: no bounds test
    per element); out channels_last ([P, C_OUT])."""
    pid_r, pid_p = channel_group_and_pixel_tile(C_OUT, BLOCK_R)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < C_OUT
    start = tl.load(ptr_ptr + rows, mask=r_ok, other=0)
    length = tl.load(ptr_ptr + rows + 1, mask=r_ok, other=0) - start
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    rem = offs_p % (OH * OW)
    base = (offs_p // (OH * OW)) * stride_xn + (rem // OW) * SH * stride_xh + (rem % OW) * SW
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
        off = (col // TAPS) * stride_xc + (tap // KW) * DH * stride_xh + (tap % KW) * DW
        s = tl.load(x_ptr + base[None, :] + off[:, None], mask=live[:, None] & p_ok[None, :],
                    other=0.0)
        acc += v[:, None] * s.to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=r_ok, other=0.0)[:, None].to(acc.dtype)
    tl.store(out_ptr + offs_p[None, :] * C_OUT + rows[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & p_ok[None, :])


@triton.autotune(configs=all_configs("csr_conv_dx"),
                 key=["Q_BUCKET", "C_IN", "TAPS", "NNZ", "UNIT_STRIDE"],
                 prune_configs_by=pruner("csr_conv_dx"))
@triton.jit
def csr_conv_dx_kernel(dy_ptr, v_ptr, ptr_ptr, row_idx_ptr, perm_ptr, col_of_ptr, out_ptr,
                       Q, H, W, C_IN, OH, OW, NNZ, Q_BUCKET, KW, TAPS,
                       SH, SW, PH, PW, DH, DW, stride_dn, stride_dc, stride_dh,
                       UNIT_STRIDE: tl.constexpr, ACC_F64: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """dX[q, ci] = sum over kept entries (co, dh, dw) of the columns of input channel ci:
    v * dY[n(q), co, oh, ow] where oh*SH - PH + dh*DH = ih(q) (and the same for w).
    Transposed entry e: row row_idx[e], column col_of[e], value v[perm[e]]. dX channels_last
    ([Q, C_IN]). dY planar with unit W stride; UNIT_STRIDE: padded by (KH-1)*DH - PH rows and
    (KW-1)*DW - PW columns on each side (cropped where negative), so that every tap of every
    input pixel reads inside it (no bounds or stride tests per element)."""
    pid_c, pid_q = channel_group_and_pixel_tile(C_IN, BLOCK_R)
    chans = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
    c_ok = chans < C_IN
    start = tl.load(ptr_ptr + chans * TAPS, mask=c_ok, other=0)
    length = tl.load(ptr_ptr + chans * TAPS + TAPS, mask=c_ok, other=0) - start
    offs_q = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = offs_q < Q
    n = offs_q // (H * W)
    rem = offs_q % (H * W)
    if UNIT_STRIDE:
        base = n * stride_dn + (rem // W) * stride_dh + rem % W
        last_h = (TAPS // KW - 1) * DH
        last_w = (KW - 1) * DW
    else:
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
        if UNIT_STRIDE:
            off = (co * stride_dc + (last_h - (tap // KW) * DH) * stride_dh
                   + last_w - (tap % KW) * DW)
            g = tl.load(dy_ptr + base[None, :] + off[:, None],
                        mask=live[:, None] & q_ok[None, :], other=0.0)
        else:
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
                       P, OH, OW, NNZ, P_BUCKET, P_PER_SPLIT, KW, TAPS, SH, SW, DH, DW,
                       stride_xn, stride_xc, stride_xh, stride_dn, stride_dc,
                       ACC_F64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    """partial[split, e] = sum over the split's output pixels p of
    dY[n, co(e), oh, ow] * xpad[n, ci(e), oh*SH + dh(e)*DH, ow*SW + dw(e)*DW].
    xpad as in the forward; dY planar and contiguous per image; partial is [splits, NNZ] in
    the accumulator type."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(1)
    e_ok = offs_e < NNZ
    col = tl.load(col_idx_ptr + offs_e, mask=e_ok, other=0)
    tap = col % TAPS
    x_off = (col // TAPS) * stride_xc + (tap // KW) * DH * stride_xh + (tap % KW) * DW
    dy_off = tl.load(row_of_ptr + offs_e, mask=e_ok, other=0) * stride_dc
    p_begin = split * P_PER_SPLIT
    p_end = tl.minimum(P, p_begin + P_PER_SPLIT)
    # per-lane partial sums, reduced across the pixel lanes once after the loop (a reduction
    # per chunk costs warp shuffles every step)
    if ACC_F64:
        acc = tl.zeros((BLOCK_E, BLOCK_P), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_E, BLOCK_P), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ok = e_ok[:, None] & (offs_p < p_end)[None, :]
        n = offs_p // (OH * OW)
        rem = offs_p % (OH * OW)
        x_base = n * stride_xn + (rem // OW) * SH * stride_xh + (rem % OW) * SW
        a = tl.load(dy_ptr + (n * stride_dn + rem)[None, :] + dy_off[:, None], mask=ok,
                    other=0.0)
        b = tl.load(x_ptr + x_base[None, :] + x_off[:, None], mask=ok, other=0.0)
        acc += a.to(acc.dtype) * b.to(acc.dtype)
    tl.store(partial_ptr + split.to(tl.int64) * NNZ + offs_e, tl.sum(acc, axis=1), mask=e_ok)


KERNELS = {
    "csr_conv_fwd": csr_conv_fwd_kernel,
    "csr_conv_dx": csr_conv_dx_kernel,
    "csr_conv_dw": csr_conv_dw_kernel,
}
