"""Fully connected networks: `mlp` (hidden widths from --widths) and the `lenet300` preset
(LeNet-300-100 of the original lottery-ticket paper)."""
from __future__ import annotations

import math

from torch import nn

from lth.models import MODELS


class MLP(nn.Module):
    def __init__(self, in_features: int, widths, num_classes: int):
        super().__init__()
        sizes = [in_features, *widths]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for fc in self.fcs:
            x = nn.functional.relu(fc(x))
        return self.classifier(x)


@MODELS.register("mlp", "fully connected, hidden widths from --widths")
def mlp(hp, input_shape, num_classes):
    return MLP(math.prod(input_shape), hp.widths, num_classes)


@MODELS.register("lenet300", "LeNet-300-100 (mlp with widths 300,100)")
def lenet300(hp, input_shape, num_classes):
    return MLP(math.prod(input_shape), (300, 100), num_classes)
