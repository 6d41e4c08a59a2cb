"""A learnable synthetic classification task for smoke tests and timing: each class is a
Gaussian cloud around its own random centre in input space. Always generated with the same seed,
so the data does not depend on the training seed."""
from __future__ import annotations

import math

import torch

from lth.datasets import DATASETS, Data, TensorData


@DATASETS.register("synthetic", "Gaussian class clusters of --synthetic-shape, no download")
def synthetic(hp) -> Data:
    shape, classes = tuple(hp.synthetic_shape), hp.synthetic_classes
    g = torch.Generator().manual_seed(1234)
    dim = math.prod(shape)
    centres = torch.randn(classes, dim, generator=g)

    def sample(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = centres[y] + 2.0 * torch.randn(n, dim, generator=g)
        return TensorData(x.reshape(n, *shape), y)

    train = sample(hp.synthetic_train)
    return Data("synthetic", train, sample(hp.synthetic_test), shape, classes)
