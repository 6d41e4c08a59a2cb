"""The public API on the Triton kernels (backend switch, CPU tensors, interpreter): autograd of
sk.linear / SparseLinear / sparsify against float64 autograd of the reference, gradcheck in
float64, opcheck of every op, torch.compile(fullgraph=True) against eager.

See test_triton_interpreter.py for why the interpreter is chosen at collection.
"""
import pytest
import torch
from torch import nn

import sparsekern as sk
import sparsekern.triton as skt
from _sk_helpers import (FORMATS, assert_close, block_mask, op_args, random_problem,
                         rebuild, unstructured_mask)
from sparsekern import reference

skt.use_interpreter()


@pytest.fixture(autouse=True)
def triton_backend():
    with skt.backend("triton"):
        yield


def _reference_grads(W, x, dy, bias):
    values = W.values.detach().double().requires_grad_()
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    n, k = W.shape
    if isinstance(W, sk.BlockSparse):
        w = reference.bsr_to_dense(values, W.block_row_ptr, W.block_col_idx, n, k)
    else:
        w = reference.csr_to_dense(values, W.row_ptr, W.col_idx, n, k)
    y = torch.nn.functional.linear(x64, w, b64)
    return (y, *torch.autograd.grad(y, (x64, values, b64), dy.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_autograd_matches_reference(fmt, dtype):
    W, x, dy, bias = random_problem(fmt, 13, 40, 56, block=(8, 16), sparsity=0.5, empty=True)
    W, x, dy, bias = W.to(dtype), x.to(dtype), dy.to(dtype), bias.to(dtype)
    values = W.values.clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = sk.linear(xg.view(1, 13, 56), rebuild(W, values), bg).view(13, 40)
    dx, dv, db = torch.autograd.grad(y, (xg, values, bg), dy)
    tol = 1e-5 if dtype == torch.float32 else 3e-3  # fp16: ~2^-11 per rounded output
    for name, ours, ref in zip(("y", "dx", "dvalues", "dbias"), (y, dx, dv, db),
                               _reference_grads(W, x, dy, bias)):
        assert ours.dtype == dtype, name
        assert_close(ours, ref, tol, name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_float64(fmt):
    W, x, _, bias = random_problem(fmt, 3, 12, 20, block=(8, 8), sparsity=0.5,
                                   dtype=torch.float64)
    values = W.values.clone().requires_grad_()
    x, bias = x.requires_grad_(), bias.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, x, b: sk.linear(x, rebuild(W, v), b),
                                    (values, x, bias), fast_mode=True)


@pytest.mark.parametrize("name", skt.LINEAR_OPS)
def test_opcheck(name):
    fmt = name.split("_")[0]
    W, x, dy, bias = random_problem(fmt, 7, 24, 40, block=(8, 16), sparsity=0.5, empty=True)
    args = op_args(name, W, x, dy, bias)
    if name.endswith("_linear"):
        args = (args[0].requires_grad_(), args[1].clone().requires_grad_()) + args[2:7] + \
            (args[7].requires_grad_(),) + args[8:]
    torch.library.opcheck(getattr(torch.ops.sparsekern, name), args)


def _model():
    l1, l2 = nn.Linear(45, 37), nn.Linear(37, 30)
    return nn.Sequential(
        sk.SparseLinear.from_dense(l1, block_mask(37, 45, (8, 8), 0.5, (1,), (0,)),
                                   format="bsr", block=(8, 8)),
        nn.ReLU(),
        sk.SparseLinear.from_dense(l2, unstructured_mask(30, 37, 0.7, (2,), (3,)), format="csr"),
        nn.Tanh(), nn.Linear(30, 5))


def test_sparse_modules_train_like_the_cpu_kernels():
    """One training step of SparseLinear layers on the Triton kernels equals the C++ kernels'."""
    model = _model()
    x = torch.randn(6, 45)
    model(x).square().sum().backward()
    triton_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with skt.backend("cpu"):
        model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert_close(triton_grads[n], p.grad, 1e-5, f"grad {n}")


def test_sparsify_runs_on_triton_kernels():
    dense = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    masks = {"0.weight": block_mask(48, 32, (16, 16), 0.5), "2.weight": unstructured_mask(16, 48, 0.8)}
    x = torch.randn(5, 32)
    with torch.no_grad():
        for name, m in masks.items():
            dict(dense.named_parameters())[name].mul_(m)
        expected = dense(x)
    model = sk.sparsify(dense, masks=masks, format="auto", policy="sparse")
    assert isinstance(model[0], sk.SparseLinear) and isinstance(model[2], sk.SparseLinear)
    assert_close(model(x), expected, 1e-5, "sparsified forward")


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    try:
        model = _model()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x = torch.randn(6, 45)
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
