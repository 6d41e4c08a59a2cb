"""torch.compile(fullgraph=True) over models using SparseLinear (BSR and CSR layers) and over
sk.linear itself matches eager, forward and forward+backward."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from _sk_helpers import assert_close, block_mask, unstructured_mask


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    """A BSR layer (ragged for its 8 x 8 blocks), a CSR layer and a dense head."""
    l1, l2 = nn.Linear(45, 37), nn.Linear(37, 30)
    return nn.Sequential(
        sk.SparseLinear.from_dense(l1, block_mask(37, 45, (8, 8), 0.5, (1,), (0,)),
                                   format="bsr", block=(8, 8)),
        nn.ReLU(),
        sk.SparseLinear.from_dense(l2, unstructured_mask(30, 37, 0.7, (2,), (3,)), format="csr"),
        nn.Tanh(), nn.Linear(30, 5))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_train_step(model, compiled, xs):
    for x in xs:
        model.zero_grad()
        x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager = model(x_eager)
        y_eager.square().sum().backward()
        eager = _grads(model)
        model.zero_grad()
        y_comp = compiled(x_comp)
        y_comp.square().sum().backward()
        assert_close(y_comp, y_eager, 1e-5, "forward")
        assert_close(x_comp.grad, x_eager.grad, 1e-5, "grad x")
        for name, g in _grads(model).items():
            assert_close(g, eager[name], 1e-5, f"grad {name}")
        assert set(eager) == {"0.values", "0.bias", "2.values", "2.bias", "4.weight", "4.bias"}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend):
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    _check_train_step(model, compiled, [torch.randn(6, 45), torch.randn(6, 45)])


def test_compiled_inference_matches_eager():
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for rows in (6, 1):
            x = torch.randn(rows, 45)
            assert_close(compiled(x), model(x), 1e-6, "inference")


def test_compiled_dynamic_batch():
    """Symbolic batch sizes go through the fake kernels."""
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    _check_train_step(model, compiled, [torch.randn(rows, 45) for rows in (3, 9, 17)])


@pytest.mark.parametrize("fmt", ["bsr", "csr"])
def test_compiled_functional_linear(fmt):
    """sk.linear with a format object captured by the compiled function, 3-D x and bias."""
    weight, mask = torch.randn(24, 40), unstructured_mask(24, 40, 0.6)
    W = sk.BlockSparse.from_dense(weight, mask, block=(8, 16)) if fmt == "bsr" else \
        sk.CSR.from_dense(weight, mask)
    bias = torch.randn(24, requires_grad=True)

    def f(x):
        return torch.relu(sk.linear(x, W, bias))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 40)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = f(xe), compiled(xc)
    ye.sum().backward()
    be = bias.grad.clone()
    bias.grad = None
    yc.sum().backward()
    assert_close(yc, ye, 1e-6, "forward")
    assert_close(xc.grad, xe.grad, 1e-6, "grad x")
    assert_close(bias.grad, be, 1e-6, "grad bias")
