"""The Triton BSR conv2d kernels (implicit GEMM over kept channel blocks, NHWC) in the Triton
interpreter through the backend switch, against the float64 reference: forward, dX, dW at kept
blocks x float32/float16/float64 on small problems with padding, stride, dilation, rectangular
kernels, ragged channel counts, empty block rows/columns, all-kept and all-pruned weights; the
public API (sk.conv2d, autograd) and opcheck. bfloat16 is compile-only for the same reason as in
test_triton_interpreter.py (triton #11584); test_triton_compile.py compiles these kernels for
sm_80/sm_90. The CSR conv kernels: test_triton_conv_csr.py.
"""
import math

import pytest
import torch

import sparsekern as sk
import sparsekern.triton as skt
from _sk_helpers import TOL, block_mask, poisoned, rel_err
from sparsekern import reference

skt.use_interpreter()

F16, BF16 = torch.float16, torch.bfloat16
BF16_REASON = ("compile-only: triton 3.8's interpreter multiplies bf16 bit patterns in tl.dot "
               "(triton #11584); bf16 conv is proven by the sm_80/sm_90 compile test")

# (n, c_in, c_out, hw, kernel, stride, padding, dilation, block (bn, bk), sparsity, empty)
CASES = {
    "pad_stride2_ragged": (2, 20, 24, (11, 10), (3, 3), (2, 2), (1, 1), (1, 1), (16, 8), 0.5,
                           True),
    "dilated_rect_kernel": (1, 16, 12, (8, 7), (3, 2), (1, 2), (2, 0), (2, 1), (8, 8), 0.5, False),
    "pointwise_all_kept": (2, 16, 16, (4, 4), (1, 1), (1, 1), (0, 0), (1, 1), (16, 16), 0.0,
                           False),
    "all_pruned": (1, 16, 16, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1), (8, 16), 1.0, False),
}
OPS = ("bsr_conv2d", "bsr_conv2d_grad_input", "bsr_conv2d_grad_weight")


@pytest.fixture
def triton_backend():
    with skt.backend("triton"):
        yield


def _problem(case, dtype):
    n, cin, cout, hw, kernel, stride, padding, dilation, block, sparsity, empty = CASES[case]
    nb, kb = math.ceil(cout / block[0]), math.ceil(cin / block[1])
    rows, cols = ((1,), (0,)) if empty else ((), ())
    mask = block_mask(cout, cin, block, sparsity, rows, cols)
    mask4 = mask[:, :, None, None].expand(-1, -1, *kernel).contiguous()
    W = sk.BlockSparse.from_dense(torch.randn(cout, cin, *kernel), mask4, block=block).to(dtype)
    x = torch.randn(n, cin, *hw, dtype=dtype)
    oh, ow = ((hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
              for i in range(2))
    dy = torch.randn(n, cout, oh, ow, dtype=dtype)
    bias = torch.randn(cout, dtype=dtype)
    geo = (list(stride), list(padding), list(dilation))
    return W, x, dy, bias, geo, nb, kb


def _args(name, W, x, dy, bias, geo):
    stride, padding, dilation = geo
    if name == "bsr_conv2d":
        return (x, W.values, W.block_row_ptr, W.block_col_idx, W.block_col_ptr, W.block_row_idx,
                W.block_perm, bias, W.shape[0], stride, padding, dilation)
    if name == "bsr_conv2d_grad_input":
        return (dy, W.values, W.block_col_ptr, W.block_row_idx, W.block_perm, list(x.shape),
                stride, padding, dilation)
    bn, bk = W.block
    return (dy, x, W.block_row_ptr, W.block_col_idx, list(W.values.shape[1:3]), bn, bk,
            stride, padding, dilation)


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _params():
    for case in CASES:
        for dtype in (torch.float32, F16, BF16, torch.float64):
            marks = [pytest.mark.skip(reason=BF16_REASON)] if dtype == BF16 else []
            if dtype == torch.float64 and case != "pad_stride2_ragged":
                continue  # one float64 case: the fp64 accumulator path
            yield pytest.param(case, dtype, marks=marks,
                               id=f"{case}-{str(dtype).split('.')[1]}")


@pytest.mark.parametrize("case,dtype", list(_params()))
def test_conv_ops_match_reference(case, dtype, triton_backend):
    W, x, dy, bias, geo, _, _ = _problem(case, dtype)
    if case == "all_pruned":
        assert W.values.shape[0] == 0
    for name in OPS:
        args = _args(name, W, x, dy, bias, geo)
        with poisoned(dy.numel(), x.numel(), max(W.values.numel(), 1), dtype=dtype):
            out = getattr(torch.ops.sparsekern, name)(*args)
        exact = getattr(reference, name)(*_f64(args))
        assert out.dtype == dtype and out.shape == exact.shape, name
        assert not bool(out.isnan().any()), f"{name}: NaN (unwritten output?)"
        if name != "bsr_conv2d_grad_weight":
            assert out.is_contiguous(memory_format=torch.channels_last), name
        ours = rel_err(out, exact)
        if dtype in TOL:
            assert ours < TOL[dtype], f"{name}: relative error {ours:.2e}"
        else:  # float16: at most 2x torch's own float16 error on the same inputs
            theirs = rel_err(getattr(reference, name)(*args), exact)
            assert ours <= 2 * theirs + 1e-6, f"{name}: {ours:.2e} > 2 x torch's {theirs:.2e}"


def test_conv2d_public_api_autograd(triton_backend):
    """sk.conv2d on a SparseConv2d-style weight: forward and all gradients vs float64."""
    W, x, dy, bias, geo, _, _ = _problem("pad_stride2_ragged", torch.float32)
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    Wv = sk.BlockSparse(values, W.block_row_ptr, W.block_col_idx, W.shape, W.block_col_ptr,
                        W.block_row_idx, W.block_perm)
    y = sk.conv2d(xg, Wv, bg, stride=2, padding=1)
    dx, dv, db = torch.autograd.grad(y, (xg, values, bg), dy)
    v64 = W.values.double().requires_grad_()
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    y64 = reference.bsr_conv2d(x64, v64, W.block_row_ptr, W.block_col_idx, W.block_col_ptr,
                               W.block_row_idx, W.block_perm, b64, W.shape[0], [2, 2], [1, 1],
                               [1, 1])
    ref = (y64, *torch.autograd.grad(y64, (x64, v64, b64), dy.double()))
    for what, ours, exact in zip(("y", "dx", "dvalues", "dbias"), (y, dx, dv, db), ref):
        assert rel_err(ours, exact) < 1e-5, what


@pytest.mark.parametrize("name", OPS)
def test_conv_opcheck(name, triton_backend):
    W, x, dy, bias, geo, _, _ = _problem("dilated_rect_kernel", torch.float32)
    torch.library.opcheck(getattr(torch.ops.sparsekern, name), _args(name, W, x, dy, bias, geo))


def test_conv_rejects_bad_input(triton_backend):
    W, x, dy, bias, geo, _, _ = _problem("pointwise_all_kept", torch.float32)
    from sparsekern.triton import launch
    args = list(_args("bsr_conv2d", W, x, dy, bias, geo))
    with pytest.raises(ValueError, match="values must be"):
        launch.bsr_conv2d(args[0], W.values[:, 0], *args[2:])
    with pytest.raises(ValueError, match="stride must be 2 ints >= 1"):
        launch.bsr_conv2d(*args[:9], [0, 1], *args[10:])
    big = list(_args("bsr_conv2d", W, x[:, :, :1, :1], dy, bias, ([1, 1], [0, 0], [1, 1])))
    big_w = W.values.expand(-1, 3, 3, -1, -1).contiguous()
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        launch.bsr_conv2d(big[0], big_w, *big[2:])
    gi = _args("bsr_conv2d_grad_input", W, x, dy, bias, geo)
    with pytest.raises(ValueError, match="grad_out must be"):
        launch.bsr_conv2d_grad_input(gi[0][:, :, :2], *gi[1:])
