"""LeNet-5 (two 5x5 convs, three fully connected layers), padded so it fits 8x8 digits too."""
from __future__ import annotations

import torch
from torch import nn

from lth.models import MODELS, scaled


class LeNet5(nn.Module):
    def __init__(self, input_shape, num_classes: int, mult: float = 1.0):
        super().__init__()
        c, h, w = _image_shape(input_shape)
        c1, c2 = scaled(6, mult), scaled(16, mult)
        self.conv1 = nn.Conv2d(c, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.input_shape = (c, h, w)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).shape[1]
        self.fc1 = nn.Linear(flat, scaled(120, mult))
        self.fc2 = nn.Linear(scaled(120, mult), scaled(84, mult))
        self.classifier = nn.Linear(scaled(84, mult), num_classes)

    def features(self, x):
        for conv in (self.conv1, self.conv2):
            x = nn.functional.relu(conv(x))
            if x.shape[-1] >= 2 and x.shape[-2] >= 2:
                x = nn.functional.max_pool2d(x, 2)
        return x.flatten(1)

    def forward(self, x):
        x = self.features(x.reshape(x.shape[0], *self.input_shape))
        x = nn.functional.relu(self.fc1(x))
        x = nn.functional.relu(self.fc2(x))
        return self.classifier(x)


def _image_shape(input_shape):
    if len(input_shape) != 3:
        raise ValueError(f"this model needs image inputs CxHxW, got input shape {input_shape}")
    return input_shape


@MODELS.register("lenet5", "LeNet-5: conv 6, conv 16, fc 120, fc 84")
def lenet5(hp, input_shape, num_classes):
    return LeNet5(input_shape, num_classes, hp.width_mult)
