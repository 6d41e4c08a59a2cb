"""The Triton CSR (unstructured) conv2d kernels (sparsekern/triton/csr_conv_kernels.py) in the
Triton interpreter through the backend switch, against the float64 reference: forward, dX and
dW at kept positions x float32/float16/bfloat16 (and float64 once) on small problems with
padding (also beyond the kernel's reach), stride 2, dilation, rectangular, 1x1 and 3x3 kernels,
empty rows and columns, all-kept and all-pruned weights and a dW split over several pixel
ranges, on NaN-poisoned outputs; gradcheck in float64, opcheck, the public API (sk.conv2d,
SparseConv2d, sparsify, torch.compile) and bad input.

bfloat16 runs here (unlike the BSR kernels, triton #11584): these kernels use no tl.dot. The
interpreter stores bf16 by truncation (a GPU rounds to nearest: test_triton_compile.py), so a
bf16 output must be the float32-accumulated result rounded once; the dW's float32 partial sums
are rounded by torch's cast (to nearest).
"""
import pytest
import torch
from torch import nn

import sparsekern as sk
import sparsekern.triton as skt
from _sk_helpers import (TOL, assert_close, conv_op_args, conv_problem, poisoned, rebuild,
                         reference_op, rel_err, run_op)
from sparsekern import reference

skt.use_interpreter()
from sparsekern.triton import launch  # noqa: E402  (after the interpreter is chosen)
from sparsekern.triton.tuning import configs_for  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16
OPS = ("csr_conv2d", "csr_conv2d_grad_input", "csr_conv2d_grad_weight")

# conv_problem arguments: n, c_in, c_out, hw, kernel, stride, padding, dilation, sparsity, empty
CASES = {
    "3x3_pad_ragged_empty": (2, 5, 7, (6, 5), 3, 1, 1, 1, 0.6, True),
    "stride2_dilated_rect": (2, 4, 9, (7, 8), (3, 2), 2, (1, 0), (1, 2), 0.5, False),
    "1x1_all_kept": (2, 6, 5, (4, 3), 1, 1, 0, 1, 0.0, False),
    # stride 1 with padding beyond the kernel's reach in w: dX crops dY there, pads it in h
    "unit_stride_overpadded": (1, 3, 5, (4, 5), (3, 1), 1, (3, 1), (2, 1), 0.4, False),
    "all_pruned": (1, 3, 4, (5, 5), 3, 1, 1, 1, 1.0, False),
    "dw_pixel_splits": (2, 2, 17, (24, 24), 3, 1, 1, 1, 0.8, False),
}


@pytest.fixture
def triton_backend():
    with skt.backend("triton"):
        yield


def _problem(case, dtype=torch.float32):
    n, cin, cout, hw, kernel, stride, padding, dilation, sparsity, empty = CASES[case]
    return conv_problem("csr", n, cin, cout, hw, kernel, stride, padding, dilation,
                        sparsity=sparsity, dtype=dtype, empty=empty, structured=False)


def _upcast(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _check(name, out, args, dtype):
    exact = reference_op(name, args)
    assert out.dtype == dtype and out.shape == exact.shape, name
    assert not bool(out.isnan().any()), f"{name}: NaN (unwritten output?)"
    if name != "csr_conv2d_grad_weight":
        assert out.is_contiguous(memory_format=torch.channels_last), name
    ours = rel_err(out, exact)
    if dtype in TOL:
        assert ours < TOL[dtype], f"{name}: relative error {ours:.2e}"
    elif dtype == BF16:
        acc = run_op(name, _upcast(args))
        assert rel_err(acc, exact) < TOL[torch.float32], name
        truncated = (acc.view(torch.int32) & -65536).view(torch.float32).to(BF16)
        once = (out == truncated) | (out == acc.to(BF16))
        assert bool(once.all()), f"{name}: {int((~once).sum())} bf16 outputs are not the fp32 " \
            "accumulation rounded once"
    else:  # float16: at most 2x torch's own float16 error on the same inputs
        theirs = rel_err(getattr(reference, name)(*args), exact)
        assert ours <= 2 * theirs + 1e-6, f"{name}: {ours:.2e} > 2 x torch's {theirs:.2e}"


def _params():
    for case in CASES:
        for dtype in (torch.float32, F16, BF16, torch.float64):
            if dtype == torch.float64 and case != "stride2_dilated_rect":
                continue  # one float64 case: the fp64 accumulator path
            if case == "dw_pixel_splits" and dtype != torch.float32:
                continue  # the split's own case; the dtypes are covered by the others
            yield pytest.param(case, dtype, id=f"{case}-{str(dtype).split('.')[1]}")


@pytest.mark.parametrize("case,dtype", list(_params()))
def test_csr_conv_ops_match_reference(case, dtype, triton_backend):
    W, x, dy, bias, geo = _problem(case, dtype)
    if case == "all_pruned":
        assert W.nnz == 0
    if case == "1x1_all_kept":
        assert W.nnz == W.shape[0] * W.shape[1]
    for name in OPS:
        args = conv_op_args(name, W, x, dy, bias, geo)
        with poisoned(dy.numel(), x.numel(), max(W.values.numel(), 1), dtype=dtype):
            out = run_op(name, args)
        _check(name, out, args, dtype)


def test_case_coverage():
    """The cases above hold what their names promise: empty rows and columns; a forward over
    several channel groups x pixel tiles of the config the interpreter runs (the 1-D grid's
    decomposition), and a dW whose pixels are split over several programs (partial sums added
    by the launcher)."""
    W, x, dy, _, _ = _problem("3x3_pad_ragged_empty")
    assert bool((W.row_ptr[1:] == W.row_ptr[:-1]).any()), "no empty row"
    assert bool((W.col_ptr[1:] == W.col_ptr[:-1]).any()), "no empty column"
    W, x, dy, _, _ = _problem("dw_pixel_splits")
    p = dy.shape[0] * dy.shape[2] * dy.shape[3]
    tiles = configs_for("csr_conv_fwd", 4)[0].kwargs
    assert W.shape[0] > tiles["BLOCK_R"] and p > tiles["BLOCK_P"]
    per_split, splits = launch.dw_pixel_splits(p, W.nnz)
    assert splits > 1 and per_split * (splits - 1) < p <= per_split * splits


def test_inputs_in_any_layout(triton_backend):
    """channels_last input and grad_out (what a preceding sparse conv hands on), and NCHW."""
    W, x, dy, bias, geo = _problem("stride2_dilated_rect")
    for layout in (torch.contiguous_format, torch.channels_last):
        xl, dyl = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
        for name in OPS:
            args = conv_op_args(name, W, xl, dyl, bias, geo)
            assert_close(run_op(name, args), reference_op(name, args), 1e-5, name)


def test_forward_without_bias(triton_backend):
    W, x, dy, _, geo = _problem("3x3_pad_ragged_empty")
    args = conv_op_args("csr_conv2d", W, x, dy, None, geo)
    assert_close(run_op("csr_conv2d", args), reference_op("csr_conv2d", args), 1e-5, "forward")


def test_gradcheck_float64(triton_backend):
    W, x, _, bias, (stride, padding, dilation) = conv_problem(
        "csr", 1, 2, 3, (5, 4), 3, 2, 1, 1, sparsity=0.5, dtype=torch.float64, structured=False)
    values = W.values.clone().requires_grad_()
    x, bias = x.requires_grad_(), bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, x, b: sk.conv2d(x, rebuild(W, v), b, stride=stride, padding=padding,
                                  dilation=dilation), (values, x, bias), fast_mode=True)


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, triton_backend):
    W, x, dy, bias, geo = _problem("stride2_dilated_rect")
    args = conv_op_args(name, W, x, dy, bias, geo)
    if name == "csr_conv2d":
        args = (args[0].requires_grad_(), args[1].clone().requires_grad_()) + args[2:7] + \
            (args[7].requires_grad_(),) + args[8:]
    torch.library.opcheck(getattr(torch.ops.sparsekern, name), args)


def test_public_api_autograd_matches_reference(triton_backend):
    """sk.conv2d on a CSR conv weight: forward and every gradient vs float64 autograd."""
    W, x, dy, bias, (stride, padding, dilation) = _problem("3x3_pad_ragged_empty")
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = sk.conv2d(xg, rebuild(W, values), bg, stride=stride, padding=padding, dilation=dilation)
    dx, dv, db = torch.autograd.grad(y, (xg, values, bg), dy)
    v64 = W.values.double().requires_grad_()
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    y64 = reference.csr_conv2d(x64, v64, W.row_ptr, W.col_idx, W.col_ptr, W.row_idx, W.perm,
                               b64, W.shape[0], list(W.shape[2:]), list(stride), list(padding),
                               list(dilation))
    ref = (y64, *torch.autograd.grad(y64, (x64, v64, b64), dy.double()))
    for what, ours, exact in zip(("y", "dx", "dvalues", "dbias"), (y, dx, dv, db), ref):
        assert rel_err(ours, exact) < 1e-5, what


def _model():
    conv1, conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, stride=2)
    m1 = torch.rand(conv1.weight.shape) > 0.5
    m2 = torch.rand(conv2.weight.shape) > 0.7
    return nn.Sequential(sk.SparseConv2d.from_dense(conv1, m1, format="csr"), nn.ReLU(),
                         sk.SparseConv2d.from_dense(conv2, m2, format="csr"), nn.Flatten(),
                         nn.Linear(5 * 3 * 3, 4))


def test_sparse_conv_modules_train_like_the_cpu_kernels(triton_backend):
    """One training step of CSR SparseConv2d layers on the Triton kernels equals the C++ one."""
    model = _model()
    x = torch.randn(2, 3, 7, 7)
    model(x).square().sum().backward()
    triton_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with skt.backend("cpu"):
        model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert_close(triton_grads[n], p.grad, 1e-5, f"grad {n}")


def test_sparsify_converts_unstructured_convs(triton_backend):
    dense = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))
    masks = {"0.weight": torch.rand(6, 4, 3, 3) > 0.6, "2.weight": torch.rand(3, 6, 1, 1) > 0.5}
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        for name, m in masks.items():
            dict(dense.named_parameters())[name].mul_(m)
        expected = dense(x)
    model = sk.sparsify(dense, masks=masks, format="csr", policy="sparse")
    assert isinstance(model[0], sk.SparseConv2d) and model[0].format == "csr"
    assert_close(model(x), expected, 1e-5, "sparsified forward")


def test_compile_fullgraph_matches_eager(triton_backend):
    torch._dynamo.reset()
    try:
        model = _model()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x = torch.randn(2, 3, 7, 7)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        model(xe).sum().backward()
        eager = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        compiled(xc).sum().backward()
        assert_close(xc.grad, xe.grad, 1e-5, "grad x")
        for n, p in model.named_parameters():
            assert_close(p.grad, eager[n], 1e-5, f"grad {n}")
    finally:
        torch._dynamo.reset()


def test_launchers_reject_bad_input(triton_backend):
    W, x, dy, bias, geo = _problem("stride2_dilated_rect")
    fwd = list(conv_op_args("csr_conv2d", W, x, dy, bias, geo))
    cases = [
        (0, x[0], "x must be 4-D"),
        (1, W.values[:, None], "values must be 1-D"),
        (1, W.values.double(), "values has dtype torch.float64"),
        (3, W.col_idx + 1000, r"col_idx entries must lie in \[0, 24\)"),
        (3, W.col_idx.long(), "col_idx must be a 1-D int32 tensor"),
        (7, bias[:-1], "bias must have 9 entries"),
        (9, [3, 0], "kernel_size must be 2 ints >= 1"),
        (10, [0, 1], "stride must be 2 ints >= 1"),
    ]
    for pos, bad, match in cases:
        args = list(fwd)
        args[pos] = bad
        with pytest.raises(ValueError, match=f"csr_conv2d: {match}"):
            launch.csr_conv2d(*args)
    gi = list(conv_op_args("csr_conv2d_grad_input", W, x, dy, bias, geo))
    with pytest.raises(ValueError, match="csr_conv2d_grad_input: grad_out must be"):
        launch.csr_conv2d_grad_input(gi[0][:, :, :2], *gi[1:])
    with pytest.raises(ValueError, match="csr_conv2d_grad_input: perm must have"):
        launch.csr_conv2d_grad_input(*gi[:4], gi[4][:-1], *gi[5:])
    gw = list(conv_op_args("csr_conv2d_grad_weight", W, x, dy, bias, geo))
    with pytest.raises(ValueError, match="csr_conv2d_grad_weight: x has dtype"):
        launch.csr_conv2d_grad_weight(gw[0], gw[1].double(), *gw[2:])
    with pytest.raises(ValueError, match="csr_conv2d_grad_weight: row_ptr must"):
        launch.csr_conv2d_grad_weight(gw[0], gw[1], gw[2][:-1], *gw[3:])
