"""Typed wrappers over torch.ops.sparsekern.*, with fake (meta) kernels and autograd formulas.

The schemas live in csrc/ops.cpp. When the extension is not loaded every wrapper runs the
matching function of reference.py instead, so callers never need to care.
"""
from __future__ import annotations

import math

import torch

from sparsekern import _extension, reference
from sparsekern.formats import CSR, BlockSparse

_HAVE_OPS = _extension.available()


def _op(name):
    return getattr(torch.ops.sparsekern, name) if _HAVE_OPS else getattr(reference, name)


def bsr_linear(x: torch.Tensor, values: torch.Tensor, block_row_ptr: torch.Tensor,
               block_col_idx: torch.Tensor, block_col_ptr: torch.Tensor,
               block_row_idx: torch.Tensor, block_perm: torch.Tensor,
               bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """y = x W^T + bias for a BlockSparse W; x is [M, in_features]."""
    return _op("bsr_linear")(x, values, block_row_ptr, block_col_idx, block_col_ptr,
                             block_row_idx, block_perm, bias, out_features)


def bsr_linear_grad_input(grad_out, values, block_col_ptr, block_row_idx, block_perm,
                          in_features: int) -> torch.Tensor:
    """dX = dY W on the transposed block index."""
    return _op("bsr_linear_grad_input")(grad_out, values, block_col_ptr, block_row_idx,
                                        block_perm, in_features)


def bsr_linear_grad_weight(grad_out, x, block_row_ptr, block_col_idx, block_n: int,
                           block_k: int) -> torch.Tensor:
    """dW = dY^T X at the stored blocks only: [nnz_blocks, block_k, block_n]."""
    return _op("bsr_linear_grad_weight")(grad_out, x, block_row_ptr, block_col_idx, block_n,
                                         block_k)


def csr_linear(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias,
               out_features: int) -> torch.Tensor:
    """y = x W^T + bias for a CSR W; x is [M, in_features]."""
    return _op("csr_linear")(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias,
                             out_features)


def csr_linear_grad_input(grad_out, values, col_ptr, row_idx, perm,
                          in_features: int) -> torch.Tensor:
    return _op("csr_linear_grad_input")(grad_out, values, col_ptr, row_idx, perm, in_features)


def csr_linear_grad_weight(grad_out, x, row_ptr, col_idx) -> torch.Tensor:
    """dW = dY^T X at the stored positions only: [nnz]."""
    return _op("csr_linear_grad_weight")(grad_out, x, row_ptr, col_idx)


def linear(x: torch.Tensor, weight: BlockSparse | CSR,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias with a sparse W; x may have any leading batch dims. Autograd-aware."""
    if not isinstance(weight, (BlockSparse, CSR)):
        raise TypeError(f"linear: weight must be a sparsekern.BlockSparse or CSR, got "
                        f"{type(weight).__name__}")
    return sparse_linear(x, weight.values, weight.tensors(), weight.shape, bias)


def sparse_linear(x: torch.Tensor, values: torch.Tensor, index: dict, shape, bias=None):
    """The dispatch behind `linear` and the modules: `index` holds a format's index tensors."""
    out_features, in_features = shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"linear: x must end in in_features={in_features}, got shape "
                         f"{tuple(x.shape)}")
    x2 = x.reshape(math.prod(x.shape[:-1]), in_features)  # not -1: in_features may be 0
    if "block_row_ptr" in index:
        y = bsr_linear(x2, values, index["block_row_ptr"], index["block_col_idx"],
                       index["block_col_ptr"], index["block_row_idx"], index["block_perm"],
                       bias, out_features)
    else:
        y = csr_linear(x2, values, index["row_ptr"], index["col_idx"], index["col_ptr"],
                       index["row_idx"], index["perm"], bias, out_features)
    return y.reshape(*x.shape[:-1], out_features)


if _HAVE_OPS:

    @torch.library.register_fake("sparsekern::bsr_linear")
    def _(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx, block_perm,
          bias, out_features):
        torch._check(x.dim() == 2, lambda: "bsr_linear: x must be 2-D")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("sparsekern::bsr_linear_grad_input")
    def _(grad_out, values, block_col_ptr, block_row_idx, block_perm, in_features):
        return grad_out.new_empty(grad_out.shape[0], in_features)

    @torch.library.register_fake("sparsekern::bsr_linear_grad_weight")
    def _(grad_out, x, block_row_ptr, block_col_idx, block_n, block_k):
        return x.new_empty(block_col_idx.shape[0], block_k, block_n)

    @torch.library.register_fake("sparsekern::csr_linear")
    def _(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_features):
        torch._check(x.dim() == 2, lambda: "csr_linear: x must be 2-D")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("sparsekern::csr_linear_grad_input")
    def _(grad_out, values, col_ptr, row_idx, perm, in_features):
        return grad_out.new_empty(grad_out.shape[0], in_features)

    @torch.library.register_fake("sparsekern::csr_linear_grad_weight")
    def _(grad_out, x, row_ptr, col_idx):
        return x.new_empty(col_idx.shape[0])

    def _setup(ctx, inputs, output):
        x, values, ptr, idx, t_ptr, t_idx, perm, bias, _ = inputs
        ctx.save_for_backward(x, values, ptr, idx, t_ptr, t_idx, perm)
        ctx.has_bias = bias is not None

    def _backward_of(grad_input, grad_weight):
        def backward(ctx, grad_out):
            x, values, ptr, idx, t_ptr, t_idx, perm = ctx.saved_tensors
            grad_out = grad_out.contiguous()
            dx = dv = db = None
            if ctx.needs_input_grad[0]:
                dx = grad_input(grad_out, values, t_ptr, t_idx, perm, x.shape[1])
            if ctx.needs_input_grad[1]:
                dv = grad_weight(grad_out, x, ptr, idx, values)
            if ctx.has_bias and ctx.needs_input_grad[7]:
                db = grad_out.sum(0)
            return dx, dv, None, None, None, None, None, db, None

        return backward

    torch.library.register_autograd(
        "sparsekern::bsr_linear",
        _backward_of(bsr_linear_grad_input,
                     lambda dy, x, ptr, idx, values: bsr_linear_grad_weight(
                         dy, x, ptr, idx, values.shape[2], values.shape[1])),
        setup_context=_setup)
    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "sparsekern: differentiating through a sparse linear backward (double backward, "
            "e.g. a gradient penalty) is not supported")

    # Without a formula autograd would treat these ops as constants and silently return zero
    # second-order gradients; an explicit error is the honest answer.
    for _name in ("bsr_linear_grad_input", "bsr_linear_grad_weight", "csr_linear_grad_input",
                  "csr_linear_grad_weight"):
        torch.library.register_autograd(f"sparsekern::{_name}", _no_double_backward)

    torch.library.register_autograd(
        "sparsekern::csr_linear",
        _backward_of(csr_linear_grad_input,
                     lambda dy, x, ptr, idx, values: csr_linear_grad_weight(dy, x, ptr, idx)),
        setup_context=_setup)
