"""Pure-torch implementation of every sparsekern op, written the obvious way: unpack the sparse
weight to a dense matrix and use dense matmuls. It is the test oracle, and the ops' fallback when
the C++ extension is not available. Signatures match the ops in csrc/ops.cpp one for one, and
every function is differentiable by torch's own autograd.
"""
import math

import torch
import torch.nn.functional as F

from sparsekern.formats import expand_ptr


def bsr_to_dense(values, block_row_ptr, block_col_idx, out_features, in_features):
    nnzb, bk, bn = values.shape
    nb, kb = block_row_ptr.numel() - 1, math.ceil(in_features / bk)
    grid = values.new_zeros(nb, kb, bk, bn).index_put(
        (expand_ptr(block_row_ptr), block_col_idx.long()), values)
    return grid.permute(0, 3, 1, 2).reshape(nb * bn, kb * bk)[:out_features, :in_features]


def bsr_transposed_to_dense(values, block_col_ptr, block_row_idx, block_perm, out_features,
                            in_features):
    """The same dense weight, built from the transposed index only."""
    nnzb, bk, bn = values.shape
    nb, kb = math.ceil(out_features / bn), block_col_ptr.numel() - 1
    grid = values.new_zeros(nb, kb, bk, bn).index_put(
        (block_row_idx.long(), expand_ptr(block_col_ptr)), values[block_perm.long()])
    return grid.permute(0, 3, 1, 2).reshape(nb * bn, kb * bk)[:out_features, :in_features]


def bsr_linear(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx,
               block_perm, bias, out_features):
    w = bsr_to_dense(values, block_row_ptr, block_col_idx, out_features, x.shape[1])
    return F.linear(x, w, bias)


def bsr_linear_grad_input(grad_out, values, block_col_ptr, block_row_idx, block_perm,
                          in_features):
    w = bsr_transposed_to_dense(values, block_col_ptr, block_row_idx, block_perm,
                                grad_out.shape[1], in_features)
    return grad_out @ w


def bsr_linear_grad_weight(grad_out, x, block_row_ptr, block_col_idx, block_n, block_k):
    n, k = grad_out.shape[1], x.shape[1]
    nb, kb = block_row_ptr.numel() - 1, math.ceil(k / block_k)
    dense = grad_out.new_zeros(nb * block_n, kb * block_k)
    dense[:n, :k] = grad_out.t() @ x
    grid = dense.view(nb, block_n, kb, block_k).permute(0, 2, 3, 1)
    return grid[expand_ptr(block_row_ptr), block_col_idx.long()].contiguous()


def csr_to_dense(values, row_ptr, col_idx, out_features, in_features):
    return values.new_zeros(out_features, in_features).index_put(
        (expand_ptr(row_ptr), col_idx.long()), values)


def csr_linear(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_features):
    return F.linear(x, csr_to_dense(values, row_ptr, col_idx, out_features, x.shape[1]), bias)


def csr_linear_grad_input(grad_out, values, col_ptr, row_idx, perm, in_features):
    w = values.new_zeros(grad_out.shape[1], in_features).index_put(
        (row_idx.long(), expand_ptr(col_ptr)), values[perm.long()])
    return grad_out @ w


def csr_linear_grad_weight(grad_out, x, row_ptr, col_idx):
    return (grad_out.t() @ x)[expand_ptr(row_ptr), col_idx.long()]
