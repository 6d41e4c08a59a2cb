"""Model registry. A builder takes (ModelHparams, input_shape, num_classes) and returns an
nn.Module whose prunable layers are nn.Linear / nn.Conv2d; `build_model` seeds and initialises."""
from __future__ import annotations

import torch
from torch import nn

from lth.registry import Registry

MODELS = Registry("model")



def build_model(hp, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model; the same (hp, shapes, seed) always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS.get(hp.name)(hp, tuple(input_shape), num_classes)
        initialise(model, hp.init)
    return model


def initialise(model: nn.Module, scheme: str) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "kaiming_normal":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(m.weight)
            elif scheme != "torch":
                raise ValueError(f"unknown init {scheme!r}")
            if m.bias is not None and scheme != "torch":
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def scaled(channels: int, mult: float) -> int:
    return max(1, int(round(channels * mult)))


# importing the families registers them
from lth.models import mlp, lenet, cifar_resnet, vgg, resnet, mobilenetv2  # noqa: E402,F401,I001
