"""Training memory of one layer: parameter + optimizer-state bytes, counted from the actual
tensors after one optimizer step (so lazily created state such as Adam's moments exists),
never from formulas. Index buffers are reported separately because they are part of what a
sparse layer costs, though not what the optimizer multiplies."""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

import sparsekern as sk
from benchmarks.masks import make_mask

OPTIMIZERS: dict[str, Callable] = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}

# Sparse layers compared with nn.Linear: (row label, format, square block or None).
SPARSE_LAYERS = (("bsr32", "bsr", 32), ("csr", "csr", None))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def footprint_after_one_step(module: nn.Module, make_optimizer: Callable,
                             x: torch.Tensor) -> dict[str, int]:
    optimizer = make_optimizer(module.parameters())
    module(x).square().mean().backward()
    optimizer.step()
    return {"param_bytes": tensor_bytes(module.parameters()),
            "optimizer_state_bytes": tensor_bytes(optimizer_state_tensors(optimizer)),
            "index_bytes": tensor_bytes(module.buffers())}


def measure(in_features: int, out_features: int, sparsity: float,
            seed: int = 0) -> list[dict]:
    """One row per optimizer x layer (dense nn.Linear first), with ratios vs the dense layer."""
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_features, out_features)
    x = torch.randn(8, in_features, generator=gen)
    layers = {"dense": dense}
    for label, fmt, block in SPARSE_LAYERS:
        mask = make_mask(block, out_features, in_features, sparsity, gen)
        layers[label] = sk.SparseLinear.from_dense(dense, mask, format=fmt,
                                                   block=(block, block) if block else None)
    rows = []
    for opt_name, make_optimizer in OPTIMIZERS.items():
        base = None
        for label, layer in layers.items():
            counted = footprint_after_one_step(copy.deepcopy(layer), make_optimizer, x)
            without_index = counted["param_bytes"] + counted["optimizer_state_bytes"]
            with_index = without_index + counted["index_bytes"]
            base = base or without_index  # the dense layer comes first and has no index
            rows.append({"optimizer": opt_name, "layer": label,
                         "sparsity": 0.0 if label == "dense" else sparsity, **counted,
                         "params_and_state_bytes": without_index,
                         "with_index_bytes": with_index,
                         "ratio": without_index / base, "ratio_with_index": with_index / base})
    return rows
