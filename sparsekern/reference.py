"""Pure-torch implementation of every sparsekern op, written the obvious way: unpack the sparse
weight to a dense matrix and use dense matmuls. It is the test oracle, and the ops' fallback when
the C++ extension is not available. Signatures match the ops in csrc/ops.cpp one for one, and
every function is differentiable by torch's own autograd.
"""
import math

import torch
import torch.nn.functional as F

from sparsekern.formats import expand_ptr


def _blocks_to_dense(grid, out_features, in_features):
    """[Nb, Kb, *taps, bk, bn] -> [out, in, *taps] (linear: no taps; conv: kh, kw)."""
    nb, kb, *taps, bk, bn = grid.shape
    t = len(taps)
    full = grid.permute(0, 3 + t, 1, 2 + t, *range(2, 2 + t)).reshape(nb * bn, kb * bk, *taps)
    return full[:out_features, :in_features]


def bsr_to_dense(values, block_row_ptr, block_col_idx, out_features, in_features):
    """values [nnzb, *taps, bk, bn] -> the dense [out, in, *taps] weight."""
    bk = values.shape[-2]
    nb, kb = block_row_ptr.numel() - 1, math.ceil(in_features / bk)
    grid = values.new_zeros(nb, kb, *values.shape[1:]).index_put(
        (expand_ptr(block_row_ptr), block_col_idx.long()), values)
    return _blocks_to_dense(grid, out_features, in_features)


def bsr_transposed_to_dense(values, block_col_ptr, block_row_idx, block_perm, out_features,
                            in_features):
    """The same dense weight, built from the transposed index only."""
    bn = values.shape[-1]
    nb, kb = math.ceil(out_features / bn), block_col_ptr.numel() - 1
    grid = values.new_zeros(nb, kb, *values.shape[1:]).index_put(
        (block_row_idx.long(), expand_ptr(block_col_ptr)), values[block_perm.long()])
    return _blocks_to_dense(grid, out_features, in_features)


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


def csr_transposed_to_dense(values, col_ptr, row_idx, perm, out_features, in_features):
    """The dense [out, in] matrix, built from the transposed index only."""
    return values.new_zeros(out_features, in_features).index_put(
        (row_idx.long(), expand_ptr(col_ptr)), values[perm.long()])


def csr_linear_grad_input(grad_out, values, col_ptr, row_idx, perm, in_features):
    return grad_out @ csr_transposed_to_dense(values, col_ptr, row_idx, perm,
                                              grad_out.shape[1], in_features)


def csr_linear_grad_weight(grad_out, x, row_ptr, col_idx):
    return (grad_out.t() @ x)[expand_ptr(row_ptr), col_idx.long()]


# ---- conv2d: the same formats over the (C_out, C_in * kh * kw) view ---------------------------

def _sample_blocks(dense, block_row_ptr, block_col_idx, block_n, block_k):
    """[C_out, C_in, kh, kw] dense gradient -> [nnzb, kh, kw, bk, bn] at the stored blocks."""
    co, ci, kh, kw = dense.shape
    nb, kb = block_row_ptr.numel() - 1, math.ceil(ci / block_k)
    padded = dense.new_zeros(nb * block_n, kb * block_k, kh, kw)
    padded[:co, :ci] = dense
    grid = padded.view(nb, block_n, kb, block_k, kh, kw).permute(0, 2, 4, 5, 3, 1)
    return grid[expand_ptr(block_row_ptr), block_col_idx.long()].contiguous()


def bsr_conv2d(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx,
               block_perm, bias, out_channels, stride, padding, dilation):
    w = bsr_to_dense(values, block_row_ptr, block_col_idx, out_channels, x.shape[1])
    return F.conv2d(x, w, bias, stride, padding, dilation)


def bsr_conv2d_grad_input(grad_out, values, block_col_ptr, block_row_idx, block_perm,
                          input_size, stride, padding, dilation):
    w = bsr_transposed_to_dense(values, block_col_ptr, block_row_idx, block_perm,
                                grad_out.shape[1], input_size[1])
    return torch.nn.grad.conv2d_input(list(input_size), w, grad_out, stride, padding, dilation)


def bsr_conv2d_grad_weight(grad_out, x, block_row_ptr, block_col_idx, kernel_size, block_n,
                           block_k, stride, padding, dilation):
    shape = (grad_out.shape[1], x.shape[1], *kernel_size)
    dense = torch.nn.grad.conv2d_weight(x, shape, grad_out, stride, padding, dilation)
    return _sample_blocks(dense, block_row_ptr, block_col_idx, block_n, block_k)


def csr_conv2d(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_channels,
               kernel_size, stride, padding, dilation):
    w = csr_to_dense(values, row_ptr, col_idx, out_channels, x.shape[1] * math.prod(kernel_size))
    return F.conv2d(x, w.view(out_channels, x.shape[1], *kernel_size), bias, stride, padding,
                    dilation)


def csr_conv2d_grad_input(grad_out, values, col_ptr, row_idx, perm, input_size, kernel_size,
                          stride, padding, dilation):
    w = csr_transposed_to_dense(values, col_ptr, row_idx, perm, grad_out.shape[1],
                                input_size[1] * math.prod(kernel_size))
    w = w.view(grad_out.shape[1], input_size[1], *kernel_size)
    return torch.nn.grad.conv2d_input(list(input_size), w, grad_out, stride, padding, dilation)


def csr_conv2d_grad_weight(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding,
                           dilation):
    shape = (grad_out.shape[1], x.shape[1], *kernel_size)
    dense = torch.nn.grad.conv2d_weight(x, shape, grad_out, stride, padding, dilation)
    return dense.reshape(shape[0], -1)[expand_ptr(row_ptr), col_idx.long()]


# ---- N:M -------------------------------------------------------------------------------------

def semi_structured_linear(x, values, meta, row_ptr, col_idx, bias):
    """The 2:4 semi-structured linear from the weight's CSR index alone (`meta` unused), so a
    metadata that disagrees with the index shows up as a different result."""
    return csr_linear(x, values.reshape(-1), row_ptr, col_idx, None, None, None, bias,
                      values.shape[0])
