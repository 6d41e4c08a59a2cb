"""Autograd and torch.library registration: gradcheck through sk.linear (float64) and
torch.library.opcheck for all six ops."""
import pytest
import torch
from torch.library import opcheck

import sparsekern as sk
from _sk_helpers import OPS, op_args, random_problem, rebuild

# (M, N, K, block): aligned, ragged in both dims, a single row, an empty block row and column
GRAD_SHAPES = {
    "aligned": (4, 16, 16, (8, 8)),
    "ragged": (3, 13, 19, (8, 8)),
    "ragged_wide_block": (2, 11, 21, (16, 8)),
    "one_row": (1, 9, 10, (8, 8)),
}


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_gradcheck_linear(fmt, shape, with_bias):
    m, n, k, block = GRAD_SHAPES[shape]
    W, x, _, bias = random_problem(fmt, m, n, k, block=block, sparsity=0.4,
                                   dtype=torch.float64, empty=True)
    assert W.nnz > 0
    inputs = [x.requires_grad_(), W.values.detach().clone().requires_grad_()]
    if with_bias:
        inputs.append(bias.requires_grad_())

    def f(x, values, *bias):
        return sk.linear(x, rebuild(W, values), *bias)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_gradcheck_batched_input(fmt):
    """Leading batch dims of x (reshaped inside sk.linear) are differentiated correctly."""
    W, _, _, bias = random_problem(fmt, 1, 10, 12, block=(8, 8), sparsity=0.3,
                                   dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    values = W.values.detach().clone().requires_grad_()
    b = bias.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: sk.linear(x, rebuild(W, v), b),
                                    (x, values, b))


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_double_backward_is_correct_or_refused(fmt):
    """Second derivatives (e.g. a gradient penalty) must either be right or raise: the backward
    ops have no autograd formula of their own, so differentiating through them may not silently
    return wrong numbers (torch only *warns* that no autograd kernel is registered)."""
    W, x, _, bias = random_problem(fmt, 3, 10, 12, block=(8, 8), sparsity=0.3,
                                   dtype=torch.float64)

    def penalty(linear, x, values):
        y = linear(x, values)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return gx.pow(2).sum()

    xs = x.clone().requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    try:
        got = torch.autograd.grad(penalty(lambda x, v: sk.linear(x, rebuild(W, v), bias), xs,
                                          values), values)[0]
    except RuntimeError:
        return  # refusing double backward is acceptable
    xr = x.clone().requires_grad_()
    dense = W.to_dense().clone().requires_grad_()
    expected = torch.autograd.grad(penalty(lambda x, w: torch.nn.functional.linear(x, w, bias),
                                           xr, dense), dense)[0]
    assert torch.allclose(rebuild(W, got).to_dense(), expected * W.mask(), rtol=1e-8, atol=1e-10)


def _opcheck_samples(op, dtype):
    fmt = op[:3]
    # ragged, with an empty block row/column; a second, all-kept aligned sample
    yield random_problem(fmt, 5, 21, 19, block=(8, 8), sparsity=0.4, dtype=dtype, empty=True)
    yield random_problem(fmt, 3, 16, 16, block=(16, 8), sparsity=0.0, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, dtype):
    """Schema, fake kernel, autograd registration and AOT dispatch (incl. dynamic shapes)."""
    calls = []
    for W, x, dy, bias in _opcheck_samples(op, dtype):
        if op.endswith("_linear"):  # the forward ops are differentiable: check with grads on
            x.requires_grad_()
            values = W.values.detach().clone().requires_grad_()
            calls += [op_args(op, rebuild(W, values), x, dy, b)
                      for b in (None, bias.requires_grad_())]
        else:
            calls.append(op_args(op, W, x, dy, None))
    for args in calls:
        results = opcheck(getattr(torch.ops.sparsekern, op), args)
        assert set(results) == {"test_schema", "test_autograd_registration", "test_faketensor",
                                "test_aot_dispatch_dynamic"}
        assert all(r == "SUCCESS" for r in results.values()), results
