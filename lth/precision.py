"""--autocast: mixed precision for training, evaluation and step timing."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16}


def autocast_context(device: torch.device, name: str):
    """A factory of the context the forward and loss run in (--autocast)."""
    if name == "none":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[name])


def sparse_kernels_autocast(device: torch.device, name: str) -> bool:
    """Whether a sparse layer runs under --autocast on `device` when its input arrives in the
    autocast dtype (the output of a dense layer): sparsekern's ops must be registered for
    torch.autocast, as F.linear / F.conv2d are."""
    import sparsekern as sk
    layer = sk.SparseLinear.from_dense(nn.Linear(8, 8).to(device),
                                       torch.eye(8, dtype=torch.bool, device=device),
                                       format="csr")
    x = torch.ones(2, 8, device=device, requires_grad=True)
    try:
        with autocast_context(device, name)():
            out = layer(x.to(DTYPES[name]))
        out.float().sum().backward()
    except RuntimeError:
        return False
    return True


class Autocast(nn.Module):
    """A model whose forward runs under --autocast: what the step timing measures."""

    def __init__(self, model: nn.Module, context):
        super().__init__()
        self.model, self.context = model, context

    def forward(self, x):
        with self.context():
            return self.model(x)
