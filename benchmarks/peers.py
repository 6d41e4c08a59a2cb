"""The peers a user would pick instead of sparsekern, wrapped like the harness's own candidates.

Each implementation is `prepare(dense_weight, block, train) -> (apply, leaves)`: `apply(x)`
computes y = x W^T for the pruned weight (zeros where pruned); `leaves` are the tensors whose
.grad a training step produces and must reset. A peer that does not support a case raises on
its first call; the harness records the reason and shows "n/a".
"""
from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Peer:
    name: str                                 # key in results.json
    label: str                                # column header in tables
    applies: Callable[[int | None], bool]     # block (None = unstructured) -> is this row its?
    prepare: Callable | None                  # None when not importable
    unavailable: str | None = None            # why the column is absent
    version: str | None = None


def torch_sparse_prepare(dense_weight: torch.Tensor, block: int | None, train: bool):
    """torch's own sparse layouts: CSR for unstructured rows, BSR (block x block) for block rows.

    y = x W^T is computed as (W x^T)^T with torch.sparse.mm: torch's CPU kernel (MKL sparse)
    takes the sparse operand on the left. Probed on this machine at 2048^2 / 90%:
    F.linear(x, W_sparse) and x @ W_sparse.t() were 2-6x slower (they convert the layout on
    every call), so this is the fastest legitimate torch spelling.
    """
    with warnings.catch_warnings():
        # torch warns on every CSR/BSR construction that the layouts are beta: known, and it
        # would drown the progress table.
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        if block is None:
            weight = dense_weight.to_sparse_csr()
        else:
            weight = dense_weight.to_sparse_bsr((block, block))
    weight.requires_grad_(train)
    return (lambda x: torch.sparse.mm(weight, x.t()).t()), [weight]


def sparseprop_prepare_with(module_cls):
    def prepare(dense_weight: torch.Tensor, block: int | None, train: bool):
        # SparseProp builds its CSR from the nonzeros of the dense weight it is given.
        layer = module_cls(dense_weight=dense_weight.clone())
        layer.W_val.requires_grad_(train)
        return layer, [layer.W_val]
    return prepare


def _sparseprop(threads: int) -> Peer:
    name, label = "sparseprop", "SparseProp"
    unstructured_only = lambda block: block is None  # noqa: E731  (its format is plain CSR)
    # SparseProp's OpenMP loops read OMP_NUM_THREADS when its backend loads; set it to the
    # harness's thread count so it is not measured with more (or fewer) threads than torch.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        from sparseprop.modules import SparseLinear
    except Exception as exc:  # not installed, or its C++ backend did not build/load
        reason = (f"not importable ({type(exc).__name__}: {exc}); install the optional extra "
                  f"`pip install '.[bench]'` (sparseprop==0.1.14)")
        return Peer(name, label, unstructured_only, None, unavailable=reason)
    return Peer(name, label, unstructured_only, sparseprop_prepare_with(SparseLinear),
                version=importlib.metadata.version("sparseprop"))


def available_peers(threads: int) -> list[Peer]:
    """Every peer, importable or not (an absent one carries the reason in `unavailable`)."""
    torch_sparse = Peer("torch_sparse", "torch CSR/BSR", lambda block: True,
                        torch_sparse_prepare, version=torch.__version__)
    return [torch_sparse, _sparseprop(threads)]
