"""torch.autocast on the sparse ops: the product runs in the context's dtype (bfloat16 or
float16), as F.linear / F.conv2d do, and autograd flows back to float32 parameters."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from _sk_helpers import block_mask, unstructured_mask

DTYPES = [torch.bfloat16, torch.float16]


def _layers():
    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 48), nn.Conv2d(16, 32, 3, padding=1)
    return [
        (sk.SparseLinear.from_dense(linear, block_mask(48, 64, (16, 16), 0.5), format="bsr",
                                    block=(16, 16)), torch.randn(8, 64)),
        (sk.SparseLinear.from_dense(linear, unstructured_mask(48, 64, 0.7), format="csr"),
         torch.randn(8, 64)),
        (sk.SparseConv2d.from_dense(conv, torch.rand(32, 16, 3, 3) > 0.7, format="csr"),
         torch.randn(2, 16, 6, 6)),
        (sk.SparseConv2d.from_dense(
            conv, block_mask(32, 16, (8, 8), 0.5)[:, :, None, None].expand(32, 16, 3, 3),
            format="bsr", block=(8, 8)), torch.randn(2, 16, 6, 6)),
    ]


def _dense_twin(layer):
    return sk.densify(nn.Sequential(layer))[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(4))
def test_sparse_layer_follows_the_autocast_dtype(dtype, case):
    layer, x = _layers()[case]
    dense = _dense_twin(layer)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        y_dense = dense(x)
    assert y.dtype == y_dense.dtype == dtype
    with torch.no_grad():
        ref = dense.double()(x.double())
    # error relative to torch's own low-precision result, as for the bf16 ops
    err = float((y.double() - ref).norm() / ref.norm())
    torch_err = float((y_dense.double() - ref).norm() / ref.norm())
    assert err <= 2 * torch_err + 1e-6
    y.float().sum().backward()
    assert layer.values.grad is not None and layer.values.grad.dtype == torch.float32
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_outside_autocast_nothing_is_cast():
    layer, x = _layers()[1]
    assert layer(x).dtype == torch.float32
    assert F.linear(x, layer.weight_format().to_dense()).dtype == torch.float32
