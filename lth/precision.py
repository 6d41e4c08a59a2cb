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


class Autocast(nn.Module):
    """A model whose forward runs under --autocast: what the step timing measures."""

    def __init__(self, model: nn.Module, context):
        super().__init__()
        self.model, self.context = model, context

    def forward(self, x):
        with self.context():
            return self.model(x)
