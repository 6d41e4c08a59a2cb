"""float16 weights on the CPU: supported like bfloat16. The CPU kernels have no float16 path, so
sk.linear / sk.conv2d and the modules widen the operands to float32 once per call, run the float32
kernels (float32 accumulation) and round each output (y, dX, dW, dbias) to float16 once; the
same with and without the compiled extension (the latter checked in a fresh interpreter whose
import of sparsekern._C fails, as in test_extension.py).

Tolerance as for bfloat16 (test_bf16.py): against the float64 result on the same float16
inputs, at most twice the error of torch's own float16 dense computation, which rounds the same
exact product once too, so the two are close.
"""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from _sk_helpers import block_for, conv_problem, random_problem, rebuild, rel_err
from test_nm_format import random_nm_mask

F16 = torch.float16


def _check_within_torch_f16(got, exact, torch_f16, what):
    assert got.dtype == F16 and bool(torch.isfinite(got).all()), what
    ours, theirs = rel_err(got, exact), rel_err(torch_f16, exact)
    assert ours <= 2 * theirs + 1e-6, f"{what}: error {ours:.2e} > 2 x torch fp16 {theirs:.2e}"


def _grads(fn, w, x, bias, dy):
    """y and (dx, dw, dbias) of fn(x, w, bias) against dy."""
    x, w, bias = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    y = fn(x, w, bias)
    return (y, *torch.autograd.grad(y, (x, w, bias), dy))


def _weights():
    """(name, format object) per format: BSR, CSR and NM linear weights [40, 72], float32."""
    W_bsr, *_ = random_problem("bsr", 1, 40, 72, block=(16, 8), sparsity=0.6)
    W_csr, *_ = random_problem("csr", 1, 40, 72, sparsity=0.6)
    W_nm = sk.NM.from_dense(torch.randn(40, 72), random_nm_mask(40, 72, 2, 4, exact=False))
    return [("bsr", W_bsr), ("csr", W_csr), ("nm", W_nm)]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["bsr", "csr", "nm"])
def test_linear_and_its_gradients_in_float16(which):
    name, W = _weights()[which]
    W = W.to(F16)  # .to() of a format: a supported dtype
    x, dy, bias = torch.randn(37, 72, dtype=F16), torch.randn(37, 40, dtype=F16), \
        torch.randn(40, dtype=F16)
    dense = W.to_dense()
    exact = _grads(F.linear, dense.double(), x.double(), bias.double(), dy.double())
    torch_f16 = _grads(F.linear, dense, x, bias, dy)
    values = W.values.detach().clone().requires_grad_()
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = sk.linear(xg, rebuild(W, values) if name != "nm" else
                  sk.NM(values, W.col_idx, W.kept, W.shape, W.nm), bg)
    dx, dv, db = torch.autograd.grad(y, (xg, values, bg), dy)
    dense_dv = W._replace({"values": dv}).to_dense()  # dW at the stored positions, as a matrix
    for what, got, want, theirs in zip(("y", "dx", "dW", "dbias"), (y, dx, dense_dv, db),
                                       exact, torch_f16):
        if what == "dW":  # torch's dense dW also fills unstored positions: compare at stored
            stored = W._replace({"values": torch.ones_like(W.values)}).to_dense() != 0
            want, theirs = want * stored, theirs * stored
        _check_within_torch_f16(got, want, theirs, f"{name} {what}")


def test_conv2d_in_float16():
    for fmt in ("bsr", "csr"):
        W, x, dy, bias, (stride, padding, dilation) = conv_problem(
            fmt, 2, 16, 16, 9, stride=2, padding=1, block=(8, 8), sparsity=0.5)
        W, x, dy, bias = W.to(F16), x.to(F16), dy.to(F16), bias.to(F16)
        y = sk.conv2d(x, W, bias, stride, padding, dilation)
        exact = F.conv2d(x.double(), W.to_dense().double(), bias.double(), stride, padding,
                         dilation)
        torch_f16 = F.conv2d(x, W.to_dense(), bias, stride, padding, dilation)
        _check_within_torch_f16(y, exact, torch_f16, f"{fmt} conv y")
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_half_modules_train_and_keep_pruned_weights_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5))
    masks = {"0.weight": torch.rand(8, 4, 3, 3) < 0.4, "3.weight": torch.rand(16, 288) < 0.3,
             "5.weight": random_nm_mask(5, 16, 2, 4)}
    model = sk.sparsify(model, masks, policy="sparse").half()  # .half() of sparse layers
    assert {sk.decisions(model)[n]["format"] for n in ("0", "3", "5")} == {"csr", "nm"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(6, 4, 6, 6, dtype=F16), torch.randint(0, 5, (6,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        assert all(p.grad.dtype == F16 for p in model.parameters())
        optimizer.step()
    for key, mask in masks.items():
        layer = model.get_submodule(key[: -len(".weight")])
        weight = layer.dense_weight()
        assert weight.dtype == F16 and bool((weight[~mask] == 0).all()), key


def test_float16_mixed_with_another_dtype_is_refused():
    W, x, _, bias = random_problem("csr", 3, 24, 20)
    with pytest.raises(ValueError, match="linear: x, values and bias must share a dtype, got "
                                         "x torch.float32, values torch.float16, bias "
                                         "torch.float32"):
        sk.linear(x, W.to(F16), bias)
    Wc, xc, _, _, _ = conv_problem("csr", 1, 4, 4, 5)
    with pytest.raises(ValueError, match="conv2d: x, values and bias must share a dtype"):
        sk.conv2d(xc.half(), Wc)


# The same computation without the extension: sparsekern falls back to reference.py, and the
# widened call is exactly the float32 dense product rounded once.
NO_EXTENSION_SCRIPT = textwrap.dedent("""
    import sys
    import warnings

    sys.modules["sparsekern._C"] = None  # the import of the extension fails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        import sparsekern as sk
    import torch
    import torch.nn.functional as F
    from sparsekern import _extension

    assert not _extension.available()
    data = torch.load(sys.argv[1], weights_only=True)
    out = {}
    for fmt in ("bsr", "csr"):
        layer = sk.SparseLinear.from_dense(torch.nn.Linear(72, 40), data["mask"], format=fmt,
                                           block=(8, 8) if fmt == "bsr" else None)
        layer.load_state_dict({"values": data[fmt + ".values"], "bias": data["bias"]},
                              strict=False)
        layer = layer.half()
        x = data["x"].clone().requires_grad_()
        y = layer(x)
        y.backward(data["dy"])
        widened = F.linear(data["x"].float(), layer.dense_weight().float(), layer.bias.float())
        assert torch.equal(y, widened.half()), fmt  # fp32 product, rounded once
        out[fmt] = {"y": y.detach(), "dx": x.grad, "dvalues": layer.values.grad}
    torch.save(out, sys.argv[2])
    print("NO-EXTENSION-OK")
""")


def test_float16_is_the_same_answer_without_the_extension(tmp_path):
    mask = torch.rand(40, 72) < 0.4
    data = {"mask": mask, "bias": torch.randn(40), "x": torch.randn(9, 72, dtype=F16),
            "dy": torch.randn(9, 40, dtype=F16)}
    layers = {}
    for fmt in ("bsr", "csr"):
        layers[fmt] = sk.SparseLinear.from_dense(nn.Linear(72, 40), mask, format=fmt,
                                                 block=block_for(fmt))
        data[fmt + ".values"] = layers[fmt].values.detach()
    torch.save(data, tmp_path / "in.pt")
    result = subprocess.run([sys.executable, "-c", NO_EXTENSION_SCRIPT, str(tmp_path / "in.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NO-EXTENSION-OK" in result.stdout
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    for fmt, layer in layers.items():
        layer.bias.data.copy_(data["bias"])
        layer = layer.half()
        x = data["x"].clone().requires_grad_()
        y = layer(x)
        y.backward(data["dy"])
        # both round the float32 result once: they differ at most where float32 sums in another
        # order land on different sides of a float16 rounding boundary (one float16 ulp)
        for what, ours in (("y", y), ("dx", x.grad), ("dvalues", layer.values.grad)):
            other = theirs[fmt][what]
            assert ours.dtype == other.dtype == F16, what
            ulp = torch.finfo(F16).eps * other.abs().float().clamp(min=2 ** -14)
            assert bool(((ours.float() - other.float()).abs() <= ulp).all()), f"{fmt} {what}"
