"""Hypothesis fuzzing of the six conv2d ops and of sk.conv2d against reference.py / F.conv2d:
stride, padding, dilation, kernels 1..5, spatial sizes 1..12, channels 1..70 (ragged for every
block), all 16 block shapes, structured and unstructured masks, sparsities 0 %, 100 % and in
between, empty (block) rows/columns, batches 0..3, float64 and float32 on every ISA.

Tensor data comes from a torch.Generator seeded by hypothesis: fresh every run, reproducible
when hypothesis replays a failure. SPARSEKERN_FUZZ_EXAMPLES=<n> runs a longer campaign.
"""
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekern as sk
from _sk_helpers import (BLOCK_SIZES, CONV_BSR_OPS, CONV_CSR_OPS, ISAS, TOL, assert_close,
                         check_conv_op, conv_problem, rebuild, use_isa)

EXAMPLES = int(os.environ.get("SPARSEKERN_FUZZ_EXAMPLES", "40"))
FUZZ = settings(deadline=None, derandomize=False, max_examples=EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow])

sparsities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))


@st.composite
def kernels(draw):
    """(dtype, isa): float64 (scalar kernels), or float32 on any available ISA."""
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    isa = draw(st.sampled_from(ISAS)) if dtype == torch.float32 else "scalar"
    return dtype, isa


@st.composite
def geometries(draw):
    """(kernel, stride, padding, dilation, (H, W)) with the padded input at least as large as
    the dilated kernel (the dilation is dropped where no size up to 12 would fit)."""
    kernel, stride, padding, dilation, hw = [], [], [], [], []
    for _ in range(2):
        k, s = draw(st.integers(1, 5)), draw(st.integers(1, 3))
        p, d = draw(st.integers(0, 3)), draw(st.integers(1, 3))
        if d * (k - 1) + 1 - 2 * p > 12:
            d = 1
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        size = draw(st.one_of(st.just(smallest), st.integers(smallest, 12)))
        for lst, v in zip((kernel, stride, padding, dilation, hw), (k, s, p, d, size)):
            lst.append(v)
    return tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), tuple(hw)


@st.composite
def conv_cases(draw, fmt):
    kernel, stride, padding, dilation, hw = draw(geometries())
    block = (draw(st.sampled_from(BLOCK_SIZES)), draw(st.sampled_from(BLOCK_SIZES)))
    return dict(
        n=draw(st.integers(0, 3)), c_in=draw(st.integers(1, 70)),
        c_out=draw(st.integers(1, 70)), hw=hw, kernel=kernel, stride=stride, padding=padding,
        dilation=dilation, block=block, sparsity=draw(sparsities), empty=draw(st.booleans()),
        structured=fmt == "bsr" and draw(st.booleans()),
        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**63 - 1))))


def _problem(fmt, case, dtype):
    c = dict(case)
    return conv_problem(fmt, c.pop("n"), c.pop("c_in"), c.pop("c_out"), c.pop("hw"),
                        c.pop("kernel"), c.pop("stride"), c.pop("padding"), c.pop("dilation"),
                        dtype=dtype, **c)


def _check_all_ops(fmt, case, kernel, with_bias):
    dtype, isa = kernel
    W, x, dy, bias, geometry = _problem(fmt, case, dtype)
    bias = bias if with_bias else None
    forward, grad_input, grad_weight = CONV_BSR_OPS if fmt == "bsr" else CONV_CSR_OPS
    with use_isa(isa):
        y = check_conv_op(forward, W, x, dy, bias, geometry)
        dx = check_conv_op(grad_input, W, x, dy, None, geometry)
        dw = check_conv_op(grad_weight, W, x, dy, None, geometry)
    if W.nnz == 0:  # all pruned: y is exactly the bias (or zeros), dX exactly zero
        expected = torch.zeros_like(y) if bias is None else bias.view(1, -1, 1, 1).expand_as(y)
        assert torch.equal(y, expected)
        assert not bool(dx.any())
    if x.shape[0] == 0:
        assert not bool(dw.any())


@FUZZ
@given(case=conv_cases("bsr"), kernel=kernels(), with_bias=st.booleans())
def test_fuzz_bsr_conv_ops(case, kernel, with_bias):
    _check_all_ops("bsr", case, kernel, with_bias)


@FUZZ
@given(case=conv_cases("csr"), kernel=kernels(), with_bias=st.booleans())
def test_fuzz_csr_conv_ops(case, kernel, with_bias):
    _check_all_ops("csr", case, kernel, with_bias)


@settings(deadline=None, derandomize=False, max_examples=max(EXAMPLES // 2, 1),
          suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["bsr", "csr"]), case=conv_cases("bsr"), kernel=kernels(),
       with_bias=st.booleans(), same=st.booleans(), unbatched=st.booleans(),
       channels_last=st.booleans())
def test_fuzz_public_conv2d_autograd(fmt, case, kernel, with_bias, same, unbatched,
                                     channels_last):
    """sk.conv2d end to end (padding ints or 'same', unbatched or batched, NCHW or channels_last;
    forward + backward through the registered autograd) against torch autograd of F.conv2d on
    the dense masked weight in float64."""
    dtype, isa = kernel
    if same:  # 'same' needs stride 1; its (possibly asymmetric) padding is the wrapper's job
        case = dict(case, stride=(1, 1))
    if unbatched:  # an unbatched input is one image
        case = dict(case, n=1)
    W, x, _, bias, (stride, padding, dilation) = _problem(fmt, case, dtype)
    padding = "same" if same else padding
    if unbatched:
        x = x[0]
    elif channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = bias if with_bias else None

    xs = x.clone().requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    bs = bias.clone().requires_grad_() if with_bias else None
    with use_isa(isa):
        y = sk.conv2d(xs, rebuild(W, values), bs, stride, padding, dilation)
        grad = torch.randn(y.shape, dtype=dtype, generator=case["generator"])
        y.backward(grad)

    x64 = x.double().requires_grad_()
    dense64 = W.to_dense().double().requires_grad_()
    b64 = bias.double().requires_grad_() if with_bias else None
    y64 = F.conv2d(x64, dense64, b64, stride, padding, dilation)
    y64.backward(grad.double())
    tol = TOL[dtype]
    assert_close(y, y64, tol, "y")
    assert_close(xs.grad, x64.grad, tol, "dx")
    assert_close(rebuild(W, values.grad).to_dense(), dense64.grad * W.mask(), tol, "dvalues")
    if with_bias:
        assert_close(bs.grad, b64.grad, tol, "dbias")
