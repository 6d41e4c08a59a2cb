"""bfloat16: the ops widen to float32, run the float32 kernels and round each output once.

Tolerance as in flash-attention: the error against the float64 reference (on the same
bf16-rounded inputs) is at most twice the error of torch's own bf16 dense computation of the
same product (reference.py run in bf16: dense matmuls with fp32 accumulation).
"""
import pytest
import torch

import sparsekern as sk
from _sk_helpers import (FORMATS, format_ops, op_args, poisoned, random_problem, rebuild,
                         reference_op, rel_err, run_op)
from sparsekern import reference

BF16 = torch.bfloat16


def _bf16_problem(fmt, m=37, n=40, k=72):
    W, x, dy, bias = random_problem(fmt, m, n, k, block=(16, 8), sparsity=0.6)
    return W.to(BF16), x.to(BF16), dy.to(BF16), bias.to(BF16)


def _assert_within_torch_bf16(out, args, name, what):
    exact = reference_op(name, args)
    torch_bf16 = getattr(reference, name)(*args)
    ours, theirs = rel_err(out, exact), rel_err(torch_bf16, exact)
    assert ours <= 2 * theirs + 1e-6, f"{what}: error {ours:.2e} > 2 x torch bf16 {theirs:.2e}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_ops_in_bf16_within_twice_torch_bf16_error(fmt, isa):
    W, x, dy, bias = _bf16_problem(fmt)
    for name in format_ops(fmt):
        args = op_args(name, W, x, dy, bias)
        with poisoned(dy.numel(), x.numel(), W.values.numel(), dtype=BF16):
            out = run_op(name, args)
        assert out.dtype == BF16 and not out.isnan().any(), name
        _assert_within_torch_bf16(out, args, name, f"{name} [{isa}]")


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_autograd_in_bf16(fmt):
    W, x, dy, bias = _bf16_problem(fmt)
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = sk.linear(xg, rebuild(W, values), bg)
    dx, dv, db = torch.autograd.grad(y, (xg, values, bg), dy)
    assert y.dtype == dx.dtype == dv.dtype == db.dtype == BF16
    forward, grad_input, grad_weight = format_ops(fmt)
    _assert_within_torch_bf16(y, op_args(forward, W, x, dy, bias), forward, "y")
    _assert_within_torch_bf16(dx, op_args(grad_input, W, x, dy, bias), grad_input, "dx")
    _assert_within_torch_bf16(dv, op_args(grad_weight, W, x, dy, bias), grad_weight, "dvalues")


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_bf16(fmt):
    W, x, dy, bias = _bf16_problem(fmt, m=5, n=16, k=24)
    for name in format_ops(fmt):
        result = torch.library.opcheck(getattr(torch.ops.sparsekern, name),
                                       op_args(name, W, x, dy, bias))
        assert all(v == "SUCCESS" for v in result.values()), (name, result)
