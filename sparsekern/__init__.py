"""sparsekern: sparse (block and unstructured) linear kernels for PyTorch."""
from sparsekern import _extension
from sparsekern.formats import CSR, BlockSparse
from sparsekern.nn import MaskedLinear, SparseLinear, decisions, densify, sparsify
from sparsekern.ops import linear

__all__ = ["BlockSparse", "CSR", "linear", "SparseLinear", "MaskedLinear", "sparsify",
           "densify", "decisions"]
