"""sparsekern: sparse (block and unstructured) linear and conv2d kernels for PyTorch."""
from sparsekern import _extension
from sparsekern.formats import CSR, NM, BlockSparse
from sparsekern.nn import (MaskedConv2d, MaskedLinear, SparseConv2d, SparseLinear, decisions,
                           densify, fold_batchnorm, load_sparse, report, sparsify)
from sparsekern.ops import conv2d, csr_cuda_enabled, linear, set_csr_cuda
from sparsekern.triton import get_backend, set_backend  # GPU kernels; SPARSEKERN_BACKEND

__all__ = ["BlockSparse", "CSR", "NM", "linear", "conv2d", "SparseLinear", "MaskedLinear",
           "SparseConv2d", "MaskedConv2d", "sparsify", "densify", "load_sparse", "decisions",
           "report", "fold_batchnorm", "set_backend", "get_backend", "set_csr_cuda",
           "csr_cuda_enabled"]
