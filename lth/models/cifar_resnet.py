"""CIFAR ResNets of He et al. 2016 (depth 6n+2: resnet20/32/56/110), 16-32-64 channels,
projection (1x1 conv + BN) shortcuts where the shape changes."""
from __future__ import annotations

from torch import nn

from lth.models import MODELS, scaled
from lth.models.lenet import _image_shape


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, input_shape, num_classes: int, mult: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        c, _, _ = _image_shape(input_shape)
        widths = [scaled(w, mult) for w in (16, 32, 64)]
        self.conv = nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = nn.functional.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _register(depth):
    @MODELS.register(f"resnet{depth}", f"CIFAR ResNet-{depth}")
    def build(hp, input_shape, num_classes):
        return CifarResNet(depth, input_shape, num_classes, hp.width_mult)


for _depth in (20, 32, 56, 110):
    _register(_depth)
