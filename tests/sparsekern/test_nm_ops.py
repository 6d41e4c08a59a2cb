"""sk.linear / sk.conv2d with an NM weight, and the 2:4 semi-structured op, against reference.py
in float64 (float32 kernels: 1e-5 relative, on every instruction set via the `dtype` fixture):
forward, dX, dW at the slots, dbias; gradcheck; opcheck; hypothesis fuzz over shapes (ragged K,
K < M, no rows, all-pruned groups). The CUDA paths run where a CUDA device is present.
"""
import contextlib
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekern as sk
from _sk_helpers import TOL, assert_close, rel_err
from sparsekern import ops, reference
from test_nm_format import PATTERNS, random_nm_mask

EXAMPLES = int(os.environ.get("SPARSEKERN_FUZZ_EXAMPLES", "40"))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _with_grad(W, dtype=None):
    """W (cast to dtype) with values that require grad (same index)."""
    values = W.values.detach().to(dtype or W.dtype).clone().requires_grad_()
    return sk.NM(values, W.col_idx, W.kept, W.shape, W.nm)


def _reference_linear(W, x, bias, dy):
    """(y, dx, dvalues, dbias) of reference.csr_linear on the NM weight's CSR view, float64."""
    values = W.values.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    rows, k = W.matrix_shape
    x2 = x64.reshape(math.prod(x.shape[:-1]), k)  # not -1: k may be 0
    y = reference.csr_linear(x2, values.reshape(-1), W.row_ptr, W.col_idx, W.col_ptr, W.row_idx,
                             W.perm, b64, rows).reshape(*x.shape[:-1], rows)
    y.backward(dy.double())
    return y, x64.grad, values.grad, None if b64 is None else b64.grad


def _check_linear(W, x, bias, dy, tol):
    Wg = _with_grad(W, x.dtype)
    x = x.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    y = sk.linear(x, Wg, b)
    y.backward(dy)
    ref_y, ref_dx, ref_dv, ref_db = _reference_linear(W, x, bias, dy)
    assert y.dtype == x.dtype
    assert_close(y, ref_y, tol, "y")
    assert_close(x.grad, ref_dx, tol, "dx")
    assert_close(Wg.values.grad, ref_dv, tol, "dvalues")
    if bias is not None:
        assert_close(b.grad, ref_db, tol, "dbias")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fewer"])
@pytest.mark.parametrize("nm", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("shape", [(24, 40), (7, 10), (5, 3), (0, 8), (6, 0)], ids=str)
def test_linear_matches_reference(dtype, shape, nm, exact, with_bias):
    rows, k = shape
    W = sk.NM.from_dense(torch.randn(rows, k, dtype=dtype),
                         random_nm_mask(rows, k, *nm, exact=exact), *nm)
    x = torch.randn(2, 3, k, dtype=dtype)  # leading batch dims
    dy = torch.randn(2, 3, rows, dtype=dtype)
    bias = torch.randn(rows, dtype=dtype) if with_bias else None
    _check_linear(W, x, bias, dy, TOL[dtype])


def _reference_conv(W, x, bias, dy, geometry):
    values = W.values.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    co, _, kh, kw = W.shape
    y = reference.csr_conv2d(x64, values.reshape(-1), W.row_ptr, W.col_idx, W.col_ptr,
                             W.row_idx, W.perm, b64, co, (kh, kw), *geometry)
    y.backward(dy.double())
    return y, x64.grad, values.grad, b64.grad


@pytest.mark.parametrize("nm", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("weight_shape, geometry", [
    ((8, 4, 3, 3), ((1, 1), (1, 1), (1, 1))),   # K = 36
    ((6, 3, 3, 3), ((2, 1), (0, 2), (1, 2))),   # K = 27: ragged tail group
    ((5, 3, 1, 1), ((1, 1), (0, 0), (1, 1))),   # K = 3 < M
], ids=["3x3", "ragged-strided", "1x1-K<M"])
def test_conv2d_matches_reference(dtype, weight_shape, geometry, nm):
    co = weight_shape[0]
    k = weight_shape[1] * weight_shape[2] * weight_shape[3]
    W = sk.NM.from_dense(torch.randn(weight_shape, dtype=dtype),
                         random_nm_mask(co, k, *nm, exact=False).view(weight_shape), *nm)
    x = torch.randn(2, weight_shape[1], 7, 6, dtype=dtype)
    bias = torch.randn(co, dtype=dtype)
    stride, padding, dilation = geometry
    out_shape = F.conv2d(x, W.to_dense(), None, stride, padding, dilation).shape
    dy = torch.randn(out_shape, dtype=dtype)
    Wg = _with_grad(W)
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = sk.conv2d(xg, Wg, bg, stride, padding, dilation)
    y.backward(dy)
    ref = _reference_conv(W, x, bias, dy, geometry)
    for got, want, what in zip((y, xg.grad, Wg.values.grad, bg.grad), ref,
                               ("y", "dx", "dvalues", "dbias")):
        assert_close(got, want, TOL[dtype], what)


def test_gradcheck_linear_and_conv():
    W = sk.NM.from_dense(torch.randn(6, 10, dtype=torch.float64),
                         random_nm_mask(6, 10, 2, 4, exact=False))
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    values = W.values.clone().requires_grad_()
    # gradcheck perturbs every value, free slots too: they are masked as the modules do
    assert torch.autograd.gradcheck(
        lambda x, v, b: sk.linear(x, sk.NM(v * W.kept, W.col_idx, W.kept, W.shape, W.nm), b),
        (x, values, b))
    C = sk.NM.from_dense(torch.randn(4, 3, 2, 2, dtype=torch.float64),
                         random_nm_mask(4, 12, 2, 4).view(4, 3, 2, 2))
    xc = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    vc = C.values.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, v: sk.conv2d(x, sk.NM(v, C.col_idx, C.kept, C.shape, C.nm), None, 1, 1),
        (xc, vc))


# ---- the 2:4 semi-structured op -------------------------------------------------------------

def _semi_structured_problem(rows=64, k=128, m=5, dtype=torch.float64, exact=False):
    W = sk.NM.from_dense(torch.randn(rows, k, dtype=dtype),
                         random_nm_mask(rows, k, 2, 4, exact=exact))
    assert W.semi_structured_ready()
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(rows, dtype=dtype)
    return W, x, bias


def _semi_args(W, x, bias):
    return (x, W.values, W.semi_structured_meta, W.row_ptr, W.col_idx, bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_semi_structured_op_matches_reference_on_cpu(dtype):
    """The op's CPU kernel decodes values + meta with torch's CUTLASS converter: equal to the
    reference, which reads only the CSR index, so meta and index agree."""
    W, x, bias = _semi_structured_problem(dtype=dtype)
    for b in (bias, None):
        out = ops.semi_structured_linear(*_semi_args(W, x, b))
        ref = reference.semi_structured_linear(*(a.double() if a is not None and
                                                 a.is_floating_point() else a
                                                 for a in _semi_args(W, x, b)))
        assert_close(out, ref, TOL[dtype])


def test_semi_structured_op_opcheck_and_gradcheck():
    W, x, bias = _semi_structured_problem(rows=32, k=64, m=3)
    values = W.values.clone().requires_grad_()
    args = (x.requires_grad_(), values, W.semi_structured_meta, W.row_ptr, W.col_idx,
            bias.requires_grad_())
    torch.library.opcheck(torch.ops.sparsekern.semi_structured_linear.default, args)
    torch.library.opcheck(torch.ops.sparsekern.semi_structured_linear.default,
                          args[:5] + (None,))
    assert torch.autograd.gradcheck(ops.semi_structured_linear, args)


def test_semi_structured_op_rejects_bad_arguments():
    W, x, bias = _semi_structured_problem()
    meta = W.semi_structured_meta
    with pytest.raises(ValueError, match=r"semi_structured_linear: x must be \[M, K\] and values "
                                         r"\[N, K / 2\]"):
        ops.semi_structured_linear(x[:, :64], W.values, meta, W.row_ptr, W.col_idx, bias)
    with pytest.raises(ValueError, match="must share a dtype"):
        ops.semi_structured_linear(x.float(), W.values, meta, W.row_ptr, W.col_idx, bias)
    with pytest.raises(ValueError, match=r"meta must be int16 \[64, 8\]"):
        ops.semi_structured_linear(x, W.values, meta.int(), W.row_ptr, W.col_idx, bias)
    with pytest.raises(ValueError, match="bias must have 64 entries"):
        ops.semi_structured_linear(x, W.values, meta, W.row_ptr, W.col_idx, bias[:3])


@pytest.mark.parametrize("nm, shape, has_meta, dtype, capability, cusparselt, reason", [
    ((2, 4), (64, 128), True, torch.float16, (9, 0), True, None),
    ((2, 4), (64, 128), True, torch.bfloat16, (8, 0), False, None),
    ((2, 4), (64, 128), True, torch.bfloat16, (8, 6), True, None),
    ((1, 4), (64, 128), False, torch.float16, (9, 0), True, "1:4 is not 2:4"),
    ((2, 4), (64, 128), True, torch.float32, (9, 0), True,
     "dtype torch.float32: the 2:4 kernels take"),
    ((2, 4), (48, 128), False, torch.float16, (9, 0), True,
     "weight 48x128 is not a multiple of 32x64"),
    ((2, 4), (64, 128), True, torch.float16, (7, 5), True, "compute capability 7.5 < 8.0"),
    ((2, 4), (64, 128), True, torch.float16, (9, 0), False,
     "CUTLASS 2:4 kernels run on 8.x only and this torch build has no cuSPARSELt"),
])
def test_semi_structured_refusal(nm, shape, has_meta, dtype, capability, cusparselt, reason):
    got = ops.semi_structured_refusal(nm, shape, has_meta, dtype, capability, cusparselt)
    if reason is None:
        assert got is None
    else:
        assert reason in got


@contextlib.contextmanager
def _autocast_state(device_type, dtype):
    """torch.autocast's thread-local state for `device_type`, set directly: torch.autocast
    ("cuda") disables itself on a machine without CUDA, the state functions do not, so the
    decision can be tested here."""
    previous = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, previous[0])
        torch.set_autocast_dtype(device_type, previous[1])


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_the_2to4_path_is_chosen_for_the_autocast_dtype(autocast):
    """float32 master weights under a CUDA 16-bit autocast run in 16 bits: the 2:4 path, not
    the CSR fallback its float32 values alone would pick."""
    args = ((2, 4), (64, 128), True)
    assert "dtype torch.float32" in ops.semi_structured_refusal(*args, torch.float32, (9, 0),
                                                                True)
    with _autocast_state("cuda", autocast):
        assert ops.product_dtype(torch.float32, "cuda") == autocast
        assert ops.product_dtype(torch.float16, "cuda") == autocast
        assert ops.product_dtype(torch.float64, "cuda") == torch.float64  # autocast skips it
        assert ops.product_dtype(torch.float32, "cpu") == torch.float32  # another device
        assert ops.semi_structured_refusal(*args, torch.float32, (9, 0), True) is None
        assert ops.semi_structured_refusal(*args, torch.float32, (8, 0), False) is None
        assert "dtype torch.float64" in ops.semi_structured_refusal(*args, torch.float64,
                                                                    (9, 0), True)
    with _autocast_state("cpu", torch.bfloat16):  # a CPU autocast leaves CUDA products alone
        assert "dtype torch.float32" in ops.semi_structured_refusal(*args, torch.float32,
                                                                    (9, 0), True)


# ---- CUDA --------------------------------------------------------------------------------------

def _torch_low_precision(W, x, bias, dy, dtype):
    """(y, dx, dvalues, dbias) of torch's own dense product in `dtype`: the error budget."""
    w = W.to_dense().to(dtype).requires_grad_()
    xl, bl = x.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
    y = F.linear(xl, w, bl)
    y.backward(dy.to(dtype))
    cols = W.col_idx.view(W.matrix_shape[0], -1).long()
    return y, xl.grad, w.grad.gather(1, cols), bl.grad


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_2to4_runs_the_semi_structured_matmul(dtype):
    """Tolerance: at most 2x the error of torch's dense product in the same dtype (DESIGN.md)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no sparse tensor cores (compute capability < 8.0)")
    W, x, bias = _semi_structured_problem(rows=128, k=256, m=37, dtype=torch.float32)
    Wc, xc, bc, dyc = W.to("cuda"), x.cuda(), bias.cuda(), torch.randn(37, 128, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no CSR fallback
        Wg = _with_grad(Wc, dtype)
        xg, bg = xc.to(dtype).requires_grad_(), bc.to(dtype).requires_grad_()
        y = sk.linear(xg, Wg, bg)
        y.backward(dyc.to(dtype))
    ref = _reference_linear(Wc, xc, bc, dyc)
    budget = _torch_low_precision(Wc, xc, bc, dyc, dtype)
    for got, want, dense, what in zip((y, xg.grad, Wg.values.grad, bg.grad), ref, budget,
                                      ("y", "dx", "dvalues", "dbias")):
        assert got.dtype == dtype, what
        assert rel_err(got, want) <= max(2 * rel_err(dense, want), 1e-6), what


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_runs_float32_2to4_weights_on_the_semi_structured_matmul(dtype,
                                                                              monkeypatch):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no sparse tensor cores (compute capability < 8.0)")
    calls = []
    semi_structured = ops.semi_structured_linear
    monkeypatch.setattr(ops, "semi_structured_linear",
                        lambda *args: calls.append(args[0].dtype) or semi_structured(*args))
    W, x, bias = _semi_structured_problem(rows=128, k=256, m=37, dtype=torch.float32)
    Wc, xc, bc, dyc = W.to("cuda"), x.cuda(), bias.cuda(), torch.randn(37, 128, device="cuda")
    Wg = _with_grad(Wc)
    xg, bg = xc.clone().requires_grad_(), bc.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no CSR fallback
        with torch.autocast("cuda", dtype=dtype):
            y = sk.linear(xg, Wg, bg)
        y.float().backward(dyc)
    assert calls == [torch.float32] and y.dtype == dtype  # cast inside the op, by autocast
    ref = _reference_linear(Wc, xc, bc, dyc)
    budget = _torch_low_precision(Wc, xc, bc, dyc, dtype)
    for got, want, dense, what in zip((y, xg.grad, Wg.values.grad, bg.grad), ref, budget,
                                      ("y", "dx", "dvalues", "dbias")):
        assert rel_err(got, want) <= max(2 * rel_err(dense, want), 1e-6), what
    assert Wg.values.grad.dtype == xg.grad.dtype == torch.float32  # the master weights' dtype


@CUDA
def test_cuda_fallback_warns_once_and_is_correct(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    W, x, bias = _semi_structured_problem(rows=64, k=128, m=9, dtype=torch.float32)
    Wc, xc, bc = W.to("cuda"), x.cuda(), bias.cuda()
    with pytest.warns(RuntimeWarning, match="runs the CSR kernels, not the 2:4 sparse tensor "
                                            "cores: dtype torch.float32"):
        y = sk.linear(xc, Wc, bc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sk.linear(xc, Wc, bc)  # the same reason: said once
    assert rel_err(y, F.linear(x.double(), W.to_dense().double(), bias.double())) < 1e-4


@CUDA
def test_cuda_nm_conv_says_it_runs_the_csr_kernels(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    C = sk.NM.from_dense(torch.randn(8, 4, 3, 3), random_nm_mask(8, 36, 2, 4).view(8, 4, 3, 3))
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(RuntimeWarning, match="semi-structured matmul is linear-only"):
        y = sk.conv2d(x.cuda(), C.to("cuda"), None, 1, 1)
    assert rel_err(y, F.conv2d(x.double(), C.to_dense().double(), None, 1, 1)) < 1e-4


# ---- fuzz --------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 9), k=st.integers(0, 21), batch=st.integers(0, 5),
       nm=st.sampled_from(PATTERNS), exact=st.booleans(), with_bias=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_fuzz_linear(rows, k, batch, nm, exact, with_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    W = sk.NM.from_dense(torch.randn(rows, k, dtype=dtype, generator=gen),
                         random_nm_mask(rows, k, *nm, exact=exact, generator=gen), *nm)
    assert torch.equal(W.mask(), sk.NM.from_state_dict(W.state_dict()).mask())
    x = torch.randn(batch, k, dtype=dtype, generator=gen)
    dy = torch.randn(batch, rows, dtype=dtype, generator=gen)
    bias = torch.randn(rows, dtype=dtype, generator=gen) if with_bias else None
    _check_linear(W, x, bias, dy, TOL[dtype])
