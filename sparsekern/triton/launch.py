"""Launchers: the sparsekern ops (linear and conv2d, BSR and CSR) on the Triton kernels, with
the ops' exact signatures.

Each launcher checks its arguments (device, dtype, shape; clear errors naming the argument),
allocates the output and launches one kernel. They are registered as the CUDA implementation of
the sparsekern ops (and, under the triton backend switch, as the CPU one, run by the Triton
interpreter); see sparsekern/triton/__init__.py.

GPU-side index: the kernels walk the format's own tensors (block_row_ptr / block_col_idx and the
transposed block_col_ptr / block_row_idx / block_perm; CSR's row_ptr / col_idx / col_ptr /
row_idx / perm): a block row's list of kept blocks *is* the per-output-tile work list. The only
derived index, the row of every stored block/entry that the dW kernels need (and the column of
every transposed entry for the CSR conv dX), is expanded here per call (one O(nnz)
repeat_interleave with a known output size: no device sync); no copy of the weights is made.
"""
from __future__ import annotations

import math

import torch
import triton

from sparsekern.triton import csr_conv_kernels as CK
from sparsekern.triton import kernels as K

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- checks ----------------------------------------------------------------------------------

def _device_of(op, tensors: dict):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            where = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    return first


def _check_float(op, name, t, dims, dtype=None):
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got "
                         f"{t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but the other operand is {dtype}")


def _check_index(op, name, t, numel, upper=None):
    if t.dtype != torch.int32 or t.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D int32 tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if t.numel() != numel:
        raise ValueError(f"{op}: {name} must have {numel} entries, got {t.numel()}")
    # Range checks read the index back: free on the CPU (interpreter), a device sync on CUDA,
    # where the format's constructor has already validated it (formats._validate_compressed).
    if upper is not None and t.device.type == "cpu" and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{op}: {name} entries must lie in [0, {upper}), got [{lo}, {hi}]")


def _check_ptr(op, name, ptr, rows, nnz):
    _check_index(op, name, ptr, rows + 1)
    if ptr.device.type == "cpu" and (int(ptr[0]) != 0 or int(ptr[-1]) != nnz
                                     or bool((ptr[1:] < ptr[:-1]).any())):
        raise ValueError(f"{op}: {name} must start at 0, never decrease and end at {nnz}")


def _block_dims(op, values):
    if values.dim() != 3:
        raise ValueError(f"{op}: values must be [nnz_blocks, bk, bn], got {tuple(values.shape)}")
    _, bk, bn = values.shape
    for name, b in (("bk", bk), ("bn", bn)):
        if b not in (8, 16, 32, 64):
            raise ValueError(f"{op}: block dim {name}={b} of values must be one of 8, 16, 32, 64")
    return bk, bn


def _precision(dtype, device):
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _m_bucket(m):
    """Autotune key for the row count: its power-of-two bucket (one tuning per bucket)."""
    return triton.next_power_of_2(max(int(m), 1))


def _rows_of(ptr, nnz):
    """[R+1] compressed pointer -> int32 row of every stored entry (no host sync)."""
    counts = (ptr[1:] - ptr[:-1]).to(torch.int64)
    rows = torch.arange(ptr.numel() - 1, device=ptr.device, dtype=torch.int32)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


# ---- BSR ---------------------------------------------------------------------------------------

def _bsr_spmm(op, a, values, ptr, idx, perm, bias, out_cols, a_cols, block_in, block_out,
              trans):
    m = a.shape[0]
    out = torch.empty(m, out_cols, dtype=a.dtype, device=a.device)
    if m == 0 or out_cols == 0:
        return out
    a = a.contiguous()
    values = values.contiguous()
    n_out_blocks = ptr.numel() - 1
    dummy = idx  # never read when the matching constexpr flag is off

    def grid(meta):
        return (n_out_blocks, triton.cdiv(m, meta["BLOCK_M"]))

    K.bsr_spmm_kernel[grid](
        a, values, ptr, idx, perm if perm is not None else dummy,
        bias if bias is not None else a, out,
        m, a_cols, out_cols, _m_bucket(m), a.stride(0), out.stride(0),
        BLOCK_IN=block_in, BLOCK_OUT=block_out, PAD_IN=max(block_in, 16),
        PAD_OUT=max(block_out, 16), TRANS=trans, HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None, ACC_F64=a.dtype == torch.float64,
        PRECISION=_precision(a.dtype, a.device))
    return out


def bsr_linear(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx,
               block_perm, bias, out_features):
    op = "bsr_linear"
    _device_of(op, dict(x=x, values=values, block_row_ptr=block_row_ptr,
                        block_col_idx=block_col_idx, block_col_ptr=block_col_ptr,
                        block_row_idx=block_row_idx, block_perm=block_perm, bias=bias))
    _check_float(op, "x", x, 2)
    _check_float(op, "values", values, 3, x.dtype)
    bk, bn = _block_dims(op, values)
    n, k = int(out_features), x.shape[1]
    if n < 0:
        raise ValueError(f"{op}: out_features must be >= 0, got {n}")
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    nnzb = values.shape[0]
    _check_ptr(op, "block_row_ptr", block_row_ptr, nb, nnzb)
    _check_index(op, "block_col_idx", block_col_idx, nnzb, kb)
    _check_ptr(op, "block_col_ptr", block_col_ptr, kb, nnzb)
    _check_index(op, "block_row_idx", block_row_idx, nnzb, nb)
    _check_index(op, "block_perm", block_perm, nnzb, nnzb)
    if bias is not None:
        _check_float(op, "bias", bias, 1, x.dtype)
        if bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have {n} entries, got {bias.shape[0]}")
        bias = bias.contiguous()
    return _bsr_spmm(op, x, values, block_row_ptr, block_col_idx, None, bias, n, k, bk, bn,
                     False)


def bsr_linear_grad_input(grad_out, values, block_col_ptr, block_row_idx, block_perm,
                          in_features):
    op = "bsr_linear_grad_input"
    _device_of(op, dict(grad_out=grad_out, values=values, block_col_ptr=block_col_ptr,
                        block_row_idx=block_row_idx, block_perm=block_perm))
    _check_float(op, "grad_out", grad_out, 2)
    _check_float(op, "values", values, 3, grad_out.dtype)
    bk, bn = _block_dims(op, values)
    n, k = grad_out.shape[1], int(in_features)
    if k < 0:
        raise ValueError(f"{op}: in_features must be >= 0, got {k}")
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    nnzb = values.shape[0]
    _check_ptr(op, "block_col_ptr", block_col_ptr, kb, nnzb)
    _check_index(op, "block_row_idx", block_row_idx, nnzb, nb)
    _check_index(op, "block_perm", block_perm, nnzb, nnzb)
    return _bsr_spmm(op, grad_out, values, block_col_ptr, block_row_idx, block_perm, None, k, n,
                     bn, bk, True)


def bsr_linear_grad_weight(grad_out, x, block_row_ptr, block_col_idx, block_n, block_k):
    op = "bsr_linear_grad_weight"
    _device_of(op, dict(grad_out=grad_out, x=x, block_row_ptr=block_row_ptr,
                        block_col_idx=block_col_idx))
    _check_float(op, "grad_out", grad_out, 2)
    _check_float(op, "x", x, 2, grad_out.dtype)
    if x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"{op}: x has {x.shape[0]} rows but grad_out has {grad_out.shape[0]}")
    bn, bk = int(block_n), int(block_k)
    for name, b in (("block_n", bn), ("block_k", bk)):
        if b not in (8, 16, 32, 64):
            raise ValueError(f"{op}: {name}={b} must be one of 8, 16, 32, 64")
    m, n, k = x.shape[0], grad_out.shape[1], x.shape[1]
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    nnzb = block_col_idx.numel()
    _check_ptr(op, "block_row_ptr", block_row_ptr, nb, nnzb)
    _check_index(op, "block_col_idx", block_col_idx, nnzb, kb)
    out = torch.empty(nnzb, bk, bn, dtype=x.dtype, device=x.device)
    if nnzb == 0:
        return out
    if m == 0:
        return out.zero_()
    x, grad_out = x.contiguous(), grad_out.contiguous()
    K.bsr_sddmm_kernel[(nnzb,)](
        grad_out, x, _rows_of(block_row_ptr, nnzb), block_col_idx, out,
        m, n, k, _m_bucket(m), grad_out.stride(0), x.stride(0),
        BK=bk, BN=bn, PAD_K=max(bk, 16), PAD_N=max(bn, 16), ACC_F64=x.dtype == torch.float64,
        PRECISION=_precision(x.dtype, x.device))
    return out


# ---- CSR ---------------------------------------------------------------------------------------

def _csr_spmm(a, values, ptr, idx, perm, bias, out_cols, src_rows):
    m = a.shape[0]
    out = torch.empty(m, out_cols, dtype=a.dtype, device=a.device)
    if m == 0 or out_cols == 0:
        return out
    srcT = a.t().contiguous()  # [src_rows, M]: each gathered row is a contiguous M-tile

    def grid(meta):
        return (triton.cdiv(out_cols, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"]))

    K.csr_spmm_kernel[grid](
        srcT, values.contiguous(), ptr, idx, perm if perm is not None else idx,
        bias if bias is not None else a, out, m, out_cols, src_rows, _m_bucket(m),
        srcT.stride(0), out.stride(0), HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
        ACC_F64=a.dtype == torch.float64)
    return out


def csr_linear(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_features):
    op = "csr_linear"
    _device_of(op, dict(x=x, values=values, row_ptr=row_ptr, col_idx=col_idx, col_ptr=col_ptr,
                        row_idx=row_idx, perm=perm, bias=bias))
    _check_float(op, "x", x, 2)
    _check_float(op, "values", values, 1, x.dtype)
    n, k, nnz = int(out_features), x.shape[1], values.shape[0]
    if n < 0:
        raise ValueError(f"{op}: out_features must be >= 0, got {n}")
    _check_ptr(op, "row_ptr", row_ptr, n, nnz)
    _check_index(op, "col_idx", col_idx, nnz, k)
    _check_ptr(op, "col_ptr", col_ptr, k, nnz)
    _check_index(op, "row_idx", row_idx, nnz, n)
    _check_index(op, "perm", perm, nnz, nnz)
    if bias is not None:
        _check_float(op, "bias", bias, 1, x.dtype)
        if bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have {n} entries, got {bias.shape[0]}")
        bias = bias.contiguous()
    return _csr_spmm(x, values, row_ptr, col_idx, None, bias, n, k)


def csr_linear_grad_input(grad_out, values, col_ptr, row_idx, perm, in_features):
    op = "csr_linear_grad_input"
    _device_of(op, dict(grad_out=grad_out, values=values, col_ptr=col_ptr, row_idx=row_idx,
                        perm=perm))
    _check_float(op, "grad_out", grad_out, 2)
    _check_float(op, "values", values, 1, grad_out.dtype)
    n, k, nnz = grad_out.shape[1], int(in_features), values.shape[0]
    if k < 0:
        raise ValueError(f"{op}: in_features must be >= 0, got {k}")
    _check_ptr(op, "col_ptr", col_ptr, k, nnz)
    _check_index(op, "row_idx", row_idx, nnz, n)
    _check_index(op, "perm", perm, nnz, nnz)
    return _csr_spmm(grad_out, values, col_ptr, row_idx, perm, None, k, n)


def csr_linear_grad_weight(grad_out, x, row_ptr, col_idx):
    op = "csr_linear_grad_weight"
    _device_of(op, dict(grad_out=grad_out, x=x, row_ptr=row_ptr, col_idx=col_idx))
    _check_float(op, "grad_out", grad_out, 2)
    _check_float(op, "x", x, 2, grad_out.dtype)
    if x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"{op}: x has {x.shape[0]} rows but grad_out has {grad_out.shape[0]}")
    m, n, k, nnz = x.shape[0], grad_out.shape[1], x.shape[1], col_idx.numel()
    _check_ptr(op, "row_ptr", row_ptr, n, nnz)
    _check_index(op, "col_idx", col_idx, nnz, k)
    out = torch.empty(nnz, dtype=x.dtype, device=x.device)
    if nnz == 0:
        return out
    if m == 0:
        return out.zero_()
    dyT, xT = grad_out.t().contiguous(), x.t().contiguous()

    def grid(meta):
        return (triton.cdiv(nnz, meta["BLOCK_E"]),)

    K.csr_sddmm_kernel[grid](dyT, xT, _rows_of(row_ptr, nnz), col_idx, out, m, nnz,
                             _m_bucket(m), dyT.stride(0), xT.stride(0),
                             ACC_F64=x.dtype == torch.float64)
    return out


# ---- BSR conv2d (implicit GEMM, NHWC) ------------------------------------------------------------

CL = torch.channels_last


def _pair(op, name, v, minimum):
    v = [int(a) for a in v]
    if len(v) != 2 or min(v) < minimum:
        raise ValueError(f"{op}: {name} must be 2 ints >= {minimum}, got {v}")
    return v


def _conv_geometry(op, h, w, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = (_pair(op, "stride", stride, 1),
                                    _pair(op, "padding", padding, 0),
                                    _pair(op, "dilation", dilation, 1))
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{op}: the padded input ({h + 2 * ph}x{w + 2 * pw}) is smaller than "
                         f"the dilated kernel ({dh * (kh - 1) + 1}x{dw * (kw - 1) + 1})")
    return oh, ow, (sh, sw, ph, pw, dh, dw)


def _conv_values(op, values):
    if values.dim() != 5:
        raise ValueError(f"{op}: values must be [nnz_blocks, kh, kw, bk, bn], got "
                         f"{tuple(values.shape)}")
    _, kh, kw, bk, bn = values.shape
    for name, b in (("bk", bk), ("bn", bn)):
        if b not in (8, 16, 32, 64):
            raise ValueError(f"{op}: block dim {name}={b} of values must be one of 8, 16, 32, 64")
    return kh, kw, bk, bn


def _bucket(p):
    return triton.next_power_of_2(max(int(p), 1))


def bsr_conv2d(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx,
               block_perm, bias, out_channels, stride, padding, dilation):
    op = "bsr_conv2d"
    _device_of(op, dict(x=x, values=values, block_row_ptr=block_row_ptr,
                        block_col_idx=block_col_idx, block_col_ptr=block_col_ptr,
                        block_row_idx=block_row_idx, block_perm=block_perm, bias=bias))
    _check_float(op, "x", x, 4)
    _check_float(op, "values", values, 5, x.dtype)
    kh, kw, bk, bn = _conv_values(op, values)
    nimg, cin, h, w = x.shape
    cout = int(out_channels)
    oh, ow, geo = _conv_geometry(op, h, w, kh, kw, stride, padding, dilation)
    nb, kb, nnzb = math.ceil(cout / bn), math.ceil(cin / bk), values.shape[0]
    _check_ptr(op, "block_row_ptr", block_row_ptr, nb, nnzb)
    _check_index(op, "block_col_idx", block_col_idx, nnzb, kb)
    _check_ptr(op, "block_col_ptr", block_col_ptr, kb, nnzb)
    _check_index(op, "block_row_idx", block_row_idx, nnzb, nb)
    _check_index(op, "block_perm", block_perm, nnzb, nnzb)
    if bias is not None:
        _check_float(op, "bias", bias, 1, x.dtype)
        if bias.shape[0] != cout:
            raise ValueError(f"{op}: bias must have {cout} entries, got {bias.shape[0]}")
        bias = bias.contiguous()
    if values.numel() >= 2**31:
        raise ValueError(f"{op}: values has {values.numel()} elements; the kernel indexes them "
                         "with 32-bit offsets (at most 2**31 - 1)")
    out = torch.empty(nimg, cout, oh, ow, dtype=x.dtype, device=x.device, memory_format=CL)
    p = nimg * oh * ow
    if p == 0 or cout == 0:
        return out
    x = x.contiguous(memory_format=CL)

    def grid(meta):
        return (nb, triton.cdiv(p, meta["BLOCK_P"]))

    K.bsr_conv_fwd_kernel[grid](
        x, values.contiguous(), block_row_ptr, block_col_idx,
        bias if bias is not None else x, out, p, h, w, cin, oh, ow, cout, _bucket(p), kw,
        kh * kw, *geo, BK=bk, BN=bn, PAD_K=max(bk, 16), PAD_N=max(bn, 16),
        HAS_BIAS=bias is not None, ACC_F64=x.dtype == torch.float64,
        PRECISION=_precision(x.dtype, x.device))
    return out


def bsr_conv2d_grad_input(grad_out, values, block_col_ptr, block_row_idx, block_perm,
                          input_size, stride, padding, dilation):
    op = "bsr_conv2d_grad_input"
    _device_of(op, dict(grad_out=grad_out, values=values, block_col_ptr=block_col_ptr,
                        block_row_idx=block_row_idx, block_perm=block_perm))
    _check_float(op, "grad_out", grad_out, 4)
    _check_float(op, "values", values, 5, grad_out.dtype)
    kh, kw, bk, bn = _conv_values(op, values)
    if len(input_size) != 4:
        raise ValueError(f"{op}: input_size must be [N, C_in, H, W], got {list(input_size)}")
    nimg, cin, h, w = (int(v) for v in input_size)
    cout = grad_out.shape[1]
    oh, ow, geo = _conv_geometry(op, h, w, kh, kw, stride, padding, dilation)
    if tuple(grad_out.shape) != (nimg, cout, oh, ow):
        raise ValueError(f"{op}: grad_out must be {[nimg, cout, oh, ow]} for input_size "
                         f"{list(input_size)}, got {list(grad_out.shape)}")
    nb, kb, nnzb = math.ceil(cout / bn), math.ceil(cin / bk), values.shape[0]
    _check_ptr(op, "block_col_ptr", block_col_ptr, kb, nnzb)
    _check_index(op, "block_row_idx", block_row_idx, nnzb, nb)
    _check_index(op, "block_perm", block_perm, nnzb, nnzb)
    out = torch.empty(nimg, cin, h, w, dtype=grad_out.dtype, device=grad_out.device,
                      memory_format=CL)
    q = nimg * h * w
    if q == 0 or cin == 0:
        return out
    dy = grad_out.contiguous(memory_format=CL)

    def grid(meta):
        return (kb, triton.cdiv(q, meta["BLOCK_P"]))

    K.bsr_conv_dx_kernel[grid](
        dy, values.contiguous(), block_col_ptr, block_row_idx, block_perm, out,
        q, h, w, cin, oh, ow, cout, _bucket(q), kw, kh * kw, *geo,
        BK=bk, BN=bn, PAD_K=max(bk, 16), PAD_N=max(bn, 16),
        ACC_F64=dy.dtype == torch.float64, PRECISION=_precision(dy.dtype, dy.device))
    return out


def bsr_conv2d_grad_weight(grad_out, x, block_row_ptr, block_col_idx, kernel_size, block_n,
                           block_k, stride, padding, dilation):
    op = "bsr_conv2d_grad_weight"
    _device_of(op, dict(grad_out=grad_out, x=x, block_row_ptr=block_row_ptr,
                        block_col_idx=block_col_idx))
    _check_float(op, "grad_out", grad_out, 4)
    _check_float(op, "x", x, 4, grad_out.dtype)
    kh, kw = _pair(op, "kernel_size", kernel_size, 1)
    bn, bk = int(block_n), int(block_k)
    for name, b in (("block_n", bn), ("block_k", bk)):
        if b not in (8, 16, 32, 64):
            raise ValueError(f"{op}: {name}={b} must be one of 8, 16, 32, 64")
    nimg, cin, h, w = x.shape
    cout = grad_out.shape[1]
    oh, ow, geo = _conv_geometry(op, h, w, kh, kw, stride, padding, dilation)
    if tuple(grad_out.shape) != (nimg, cout, oh, ow):
        raise ValueError(f"{op}: grad_out must be {[nimg, cout, oh, ow]} for x "
                         f"{list(x.shape)}, got {list(grad_out.shape)}")
    nb, kb, nnzb = math.ceil(cout / bn), math.ceil(cin / bk), block_col_idx.numel()
    _check_ptr(op, "block_row_ptr", block_row_ptr, nb, nnzb)
    _check_index(op, "block_col_idx", block_col_idx, nnzb, kb)
    out = torch.empty(nnzb, kh, kw, bk, bn, dtype=x.dtype, device=x.device)
    p = nimg * oh * ow
    if nnzb == 0:
        return out
    if p == 0:
        return out.zero_()
    x, dy = x.contiguous(memory_format=CL), grad_out.contiguous(memory_format=CL)
    K.bsr_conv_dw_kernel[(nnzb, kh * kw)](
        dy, x, _rows_of(block_row_ptr, nnzb), block_col_idx, out,
        p, h, w, cin, oh, ow, cout, _bucket(p), kw, kh * kw, *geo,
        BK=bk, BN=bn, PAD_K=max(bk, 16), PAD_N=max(bn, 16),
        ACC_F64=x.dtype == torch.float64, PRECISION=_precision(x.dtype, x.device))
    return out


# ---- CSR conv2d (implicit GEMM, gathers on the channel-planar activation) -----------------------
#
# The gathers read one input channel plane at a time (why: csr_conv_kernels.py), so the
# launchers hand the kernels NCHW-contiguous activations and allocate the ops' channels_last
# outputs. The forward and dW read x zero-padded (one copy, which a channels_last x needs for
# the planar layout anyway), so their gathers test no padding bounds per element.

def _padded_planar(x, ph, pw):
    """x [N, C, H, W] (any layout) as a contiguous NCHW tensor with ph / pw zero rows and
    columns on each side."""
    if ph == 0 and pw == 0:
        return x.contiguous()
    n, c, h, w = x.shape
    padded = x.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    return padded


def _csr_conv_index(op, ptr_name, ptr, idx_name, idx, rows, cols, nnz):
    _check_ptr(op, ptr_name, ptr, rows, nnz)
    _check_index(op, idx_name, idx, nnz, cols)


def _int32_offsets(op, elements: dict):
    """The CSR conv kernels address activations with 32-bit offsets (csr_conv_kernels.py);
    `elements`: {what: element count}."""
    for name, numel in elements.items():
        if numel >= 2**31:
            raise ValueError(f"{op}: {name} has {numel} elements; the CSR conv kernels index "
                             "it with 32-bit offsets (at most 2**31 - 1): split the batch")


def _csr_conv_values(op, values, dtype):
    _check_float(op, "values", values, 1, dtype)
    return values.contiguous()


def csr_conv2d(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_channels,
               kernel_size, stride, padding, dilation):
    op = "csr_conv2d"
    _device_of(op, dict(x=x, values=values, row_ptr=row_ptr, col_idx=col_idx, col_ptr=col_ptr,
                        row_idx=row_idx, perm=perm, bias=bias))
    _check_float(op, "x", x, 4)
    values = _csr_conv_values(op, values, x.dtype)
    kh, kw = _pair(op, "kernel_size", kernel_size, 1)
    nimg, cin, h, w = x.shape
    cout, nnz = int(out_channels), values.shape[0]
    if cout < 0:
        raise ValueError(f"{op}: out_channels must be >= 0, got {cout}")
    oh, ow, geo = _conv_geometry(op, h, w, kh, kw, stride, padding, dilation)
    cols = cin * kh * kw
    _csr_conv_index(op, "row_ptr", row_ptr, "col_idx", col_idx, cout, cols, nnz)
    _csr_conv_index(op, "col_ptr", col_ptr, "row_idx", row_idx, cols, cout, nnz)
    _check_index(op, "perm", perm, nnz, nnz)
    if bias is not None:
        _check_float(op, "bias", bias, 1, x.dtype)
        if bias.shape[0] != cout:
            raise ValueError(f"{op}: bias must have {cout} entries, got {bias.shape[0]}")
        bias = bias.contiguous()
    out = torch.empty(nimg, cout, oh, ow, dtype=x.dtype, device=x.device, memory_format=CL)
    sh, sw, ph, pw, dh, dw = geo
    _int32_offsets(op, {"the padded x": nimg * cin * (h + 2 * ph) * (w + 2 * pw),
                        "the output": out.numel()})
    p = nimg * oh * ow
    if p == 0 or cout == 0:
        return out
    xp = _padded_planar(x, ph, pw)

    def grid(meta):
        return (triton.cdiv(cout, meta["BLOCK_R"]) * triton.cdiv(p, meta["BLOCK_P"]),)

    CK.csr_conv_fwd_kernel[grid](
        xp, values, row_ptr, col_idx, bias if bias is not None else xp, out,
        p, oh, ow, cout, nnz, _bucket(p), kw, kh * kw, sh, sw, dh, dw,
        xp.stride(0), xp.stride(1), xp.stride(2),
        HAS_BIAS=bias is not None, ACC_F64=x.dtype == torch.float64)
    return out


def csr_conv2d_grad_input(grad_out, values, col_ptr, row_idx, perm, input_size, kernel_size,
                          stride, padding, dilation):
    op = "csr_conv2d_grad_input"
    _device_of(op, dict(grad_out=grad_out, values=values, col_ptr=col_ptr, row_idx=row_idx,
                        perm=perm))
    _check_float(op, "grad_out", grad_out, 4)
    values = _csr_conv_values(op, values, grad_out.dtype)
    kh, kw = _pair(op, "kernel_size", kernel_size, 1)
    if len(input_size) != 4:
        raise ValueError(f"{op}: input_size must be [N, C_in, H, W], got {list(input_size)}")
    nimg, cin, h, w = (int(v) for v in input_size)
    cout, nnz = grad_out.shape[1], values.shape[0]
    oh, ow, geo = _conv_geometry(op, h, w, kh, kw, stride, padding, dilation)
    if tuple(grad_out.shape) != (nimg, cout, oh, ow):
        raise ValueError(f"{op}: grad_out must be {[nimg, cout, oh, ow]} for input_size "
                         f"{list(input_size)}, got {list(grad_out.shape)}")
    taps = kh * kw
    _csr_conv_index(op, "col_ptr", col_ptr, "row_idx", row_idx, cin * taps, cout, nnz)
    _check_index(op, "perm", perm, nnz, nnz)
    out = torch.empty(nimg, cin, h, w, dtype=grad_out.dtype, device=grad_out.device,
                      memory_format=CL)
    _int32_offsets(op, {"grad_out": grad_out.numel(), "the output": out.numel()})
    q = nimg * h * w
    if q == 0 or cin == 0:
        return out
    sh, sw, ph, pw, dh, dw = geo
    unit_stride = sh == 1 and sw == 1
    if unit_stride:  # dY padded by the kernel's reach less the padding (cropped where that
        # is negative): every tap of every input pixel then reads inside it
        pad_h, pad_w = (kh - 1) * dh - ph, (kw - 1) * dw - pw
        _int32_offsets(op, {"the padded grad_out": nimg * cout * (oh + 2 * pad_h) *
                            (ow + 2 * pad_w)})
        dy = torch.nn.functional.pad(grad_out.contiguous(), (pad_w, pad_w, pad_h, pad_h))
    else:
        dy = grad_out.contiguous()
    # the column (hence the tap) of every transposed entry: the op has no col_idx
    col_of = _rows_of(col_ptr, nnz)

    def grid(meta):
        return (triton.cdiv(cin, meta["BLOCK_R"]) * triton.cdiv(q, meta["BLOCK_P"]),)

    CK.csr_conv_dx_kernel[grid](
        dy, values, col_ptr, row_idx, perm, col_of, out,
        q, h, w, cin, oh, ow, nnz, _bucket(q), kw, taps, *geo,
        dy.stride(0), dy.stride(1), dy.stride(2), UNIT_STRIDE=unit_stride,
        ACC_F64=dy.dtype == torch.float64)
    return out


# dW: enough programs to fill an H100 (132 SMs x ~8 resident CTAs); a split gets at least this
# many pixels, so the per-split partial sums stay a small fraction of the work.
DW_TARGET_PROGRAMS = 1024
DW_MIN_PIXELS_PER_SPLIT = 512


def dw_pixel_splits(p, nnz):
    """(pixels per split, splits) for the CSR conv dW grid: a multiple of the largest BLOCK_P
    per split, at most one split per DW_MIN_PIXELS_PER_SPLIT pixels."""
    entry_blocks = triton.cdiv(nnz, CK.DW_MIN_BLOCK_E)
    wanted = max(1, min(triton.cdiv(DW_TARGET_PROGRAMS, entry_blocks),
                        p // DW_MIN_PIXELS_PER_SPLIT))
    per_split = triton.cdiv(triton.cdiv(p, wanted), CK.DW_MAX_BLOCK_P) * CK.DW_MAX_BLOCK_P
    return per_split, triton.cdiv(p, per_split)


def csr_conv2d_grad_weight(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding,
                           dilation):
    op = "csr_conv2d_grad_weight"
    _device_of(op, dict(grad_out=grad_out, x=x, row_ptr=row_ptr, col_idx=col_idx))
    _check_float(op, "grad_out", grad_out, 4)
    _check_float(op, "x", x, 4, grad_out.dtype)
    kh, kw = _pair(op, "kernel_size", kernel_size, 1)
    nimg, cin, h, w = x.shape
    cout, nnz = grad_out.shape[1], col_idx.numel()
    oh, ow, geo = _conv_geometry(op, h, w, kh, kw, stride, padding, dilation)
    if tuple(grad_out.shape) != (nimg, cout, oh, ow):
        raise ValueError(f"{op}: grad_out must be {[nimg, cout, oh, ow]} for x "
                         f"{list(x.shape)}, got {list(grad_out.shape)}")
    _csr_conv_index(op, "row_ptr", row_ptr, "col_idx", col_idx, cout, cin * kh * kw, nnz)
    sh, sw, ph, pw, dh, dw = geo
    _int32_offsets(op, {"the padded x": nimg * cin * (h + 2 * ph) * (w + 2 * pw),
                        "grad_out": grad_out.numel()})
    p = nimg * oh * ow
    if nnz == 0:
        return torch.empty(0, dtype=x.dtype, device=x.device)
    if p == 0:
        return torch.zeros(nnz, dtype=x.dtype, device=x.device)
    xp, dy = _padded_planar(x, ph, pw), grad_out.contiguous()
    per_split, splits = dw_pixel_splits(p, nnz)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(splits, nnz, dtype=acc, device=x.device)

    def grid(meta):
        return (triton.cdiv(nnz, meta["BLOCK_E"]), splits)

    CK.csr_conv_dw_kernel[grid](
        dy, xp, _rows_of(row_ptr, nnz), col_idx, partial,
        p, oh, ow, nnz, _bucket(p), per_split, kw, kh * kw, sh, sw, dh, dw,
        xp.stride(0), xp.stride(1), xp.stride(2), dy.stride(0), dy.stride(1),
        ACC_F64=acc == torch.float64)
    return partial.sum(0).to(x.dtype)


OPS = {
    "bsr_linear": bsr_linear,
    "bsr_linear_grad_input": bsr_linear_grad_input,
    "bsr_linear_grad_weight": bsr_linear_grad_weight,
    "csr_linear": csr_linear,
    "csr_linear_grad_input": csr_linear_grad_input,
    "csr_linear_grad_weight": csr_linear_grad_weight,
    "bsr_conv2d": bsr_conv2d,
    "bsr_conv2d_grad_input": bsr_conv2d_grad_input,
    "bsr_conv2d_grad_weight": bsr_conv2d_grad_weight,
    "csr_conv2d": csr_conv2d,
    "csr_conv2d_grad_input": csr_conv2d_grad_input,
    "csr_conv2d_grad_weight": csr_conv2d_grad_weight,
}
