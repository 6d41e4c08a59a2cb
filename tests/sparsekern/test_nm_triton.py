"""NM weights on the Triton CSR kernels (what a CUDA N:M weight runs where the 2:4 tensor cores
do not apply: float32, N:M other than 2:4, shapes CUTLASS rejects, conv), checked without a GPU:
the backend switch runs them on CPU tensors in the Triton interpreter, through sk.linear,
sk.conv2d and SparseLinear, against the float64 reference. float32 at 1e-5; float16 at most 2x the error of
torch's own float16 dense product (DESIGN.md). bfloat16 is left to test_triton_interpreter.py
(the interpreter stores bf16 by truncation; it checks the CSR kernels bit for bit there).

The interpreter must be chosen before triton is imported: done at collection, as in
test_triton_interpreter.py.
"""
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
import sparsekern.triton as skt
from _sk_helpers import TOL, rel_err
from test_nm_format import random_nm_mask

skt.use_interpreter()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("nm, shape", [((2, 4), (40, 64)), ((1, 4), (9, 22)), ((4, 8), (7, 3))],
                         ids=["2:4", "1:4-ragged", "4:8-K<M"])
def test_nm_linear_on_the_triton_csr_kernels(nm, shape, dtype):
    rows, k = shape
    W = sk.NM.from_dense(torch.randn(rows, k), random_nm_mask(rows, k, *nm, exact=False), *nm)
    x, dy, bias = torch.randn(13, k), torch.randn(13, rows), torch.randn(rows)
    exact_w = W.to_dense().double().requires_grad_()
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    exact = F.linear(x64, exact_w, b64)
    exact.backward(dy.double())
    cols = W.col_idx.view(rows, -1).long()
    exact_grads = (x64.grad, exact_w.grad.gather(1, cols), b64.grad)
    lowp_w = W.to_dense().to(dtype).requires_grad_()
    xl, bl = x.to(dtype).clone().requires_grad_(), bias.to(dtype).clone().requires_grad_()
    lowp = F.linear(xl, lowp_w, bl)
    lowp.backward(dy.to(dtype))
    lowp_grads = (xl.grad, lowp_w.grad.gather(1, cols), bl.grad)

    values = W.values.to(dtype).clone().requires_grad_()
    xs, bs = x.to(dtype).clone().requires_grad_(), bias.to(dtype).clone().requires_grad_()
    with skt.backend("triton"):
        y = sk.linear(xs, sk.NM(values, W.col_idx, W.kept, W.shape, W.nm), bs)
        y.backward(dy.to(dtype))
    for what, got, want, torch_lowp in zip(("y", "dx", "dvalues", "dbias"),
                                           (y, xs.grad, values.grad, bs.grad),
                                           (exact, *exact_grads), (lowp, *lowp_grads)):
        assert got.dtype == dtype, what
        err = rel_err(got, want)
        budget = TOL[dtype] if dtype in TOL else 2 * rel_err(torch_lowp, want) + 1e-6
        assert err < budget, f"{what}: relative error {err:.2e} >= {budget:.1e}"


def test_nm_module_trains_on_the_triton_kernels():
    layer = torch.nn.Linear(32, 16)
    mask = random_nm_mask(16, 32, 2, 4, exact=False)
    with skt.backend("triton"):
        sparse = sk.SparseLinear.from_dense(layer, mask, format="nm")
        opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for _ in range(2):
            opt.zero_grad()
            sparse(torch.randn(8, 32)).square().mean().backward()
            opt.step()
    assert bool((sparse.dense_weight()[~mask] == 0).all())
    x = torch.randn(5, 32)
    assert rel_err(sparse(x), F.linear(x, sparse.dense_weight(), sparse.bias)) < 1e-5


def test_nm_conv_on_the_triton_csr_kernels():
    """An NM conv weight on CUDA runs the CSR conv kernels: here in the interpreter, float32."""
    shape = (8, 4, 3, 3)
    C = sk.NM.from_dense(torch.randn(shape), random_nm_mask(8, 36, 2, 4, exact=False).view(shape))
    x, bias = torch.randn(2, 4, 6, 5), torch.randn(8)
    exact_w = C.to_dense().double().requires_grad_()
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    exact = F.conv2d(x64, exact_w, b64, 2, 1)
    dy = torch.randn(exact.shape)
    exact.backward(dy.double())
    cols = C.col_idx.view(8, -1).long()
    values = C.values.clone().requires_grad_()
    xs, bs = x.clone().requires_grad_(), bias.clone().requires_grad_()
    with skt.backend("triton"):
        y = sk.conv2d(xs, sk.NM(values, C.col_idx, C.kept, C.shape, C.nm), bs, 2, 1)
        y.backward(dy)
    for what, got, want in (("y", y, exact), ("dx", xs.grad, x64.grad),
                            ("dvalues", values.grad, exact_w.grad.view(8, -1).gather(1, cols)),
                            ("dbias", bs.grad, b64.grad)):
        assert rel_err(got, want) < TOL[torch.float32], what
